"""The dashboard in a real headless Chromium, driven by Selenium through the system's
chromedriver: log in with the token, watch an event sent through the proxy appear with
its platform's answer, filter it away, follow the destinations a reload changes, and log
out, leaving no stream behind.

Selenium's calls block, so each step runs in a thread while the reactor goes on serving
tagd, the origin and the fake platform.  Without Chromium the test is skipped, unless
C{TAGD_REQUIRE_BROWSER} is set (CI sets it), which makes a missing browser a failure.
"""

from __future__ import annotations

import os
import shutil

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tagd.delivery.outcomes import OUTCOMES

from conftest import eventually, within
from test_admin import TOKEN, meta_destination, start_admin_tagd  # noqa: F401
from test_dashboard import DRY, feed_of, visit

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
# Headless as root, on a machine without a display, GPU or internet: nothing to sandbox
# with, nothing to draw on, nothing for the browser to fetch on its own.
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip
WAIT = 20.0  # seconds for the page to show what the test waits for
# The stream's rows as (outcome, destinations, event ids), as the page marks them.
ROWS = (
    "return [...document.querySelectorAll('#stream tbody tr')]"
    ".map(row => [row.dataset.outcome, row.dataset.destinations, row.dataset.eventIds])"
)


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium with a fresh profile, quit after the test."""
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("TAGD_REQUIRE_BROWSER"):
            pytest.fail("TAGD_REQUIRE_BROWSER is set, but chromium or chromedriver is not installed")
        pytest.skip("chromium and chromedriver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # The system's driver, named: Selenium then downloads nothing.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver, condition, what: str):
    """Wait (in a thread) until C{condition(driver)} is true; its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT).until(condition, f"the page never showed {what}")


def log_in_and_open(driver, url: str) -> None:
    """Open the dashboard: the login form first, the token in it, then the live page."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "login").click()
    until(driver, lambda d: d.find_element(By.ID, "state").text == "live", "a live stream")


def rows(driver) -> list[tuple[str, str, str]]:
    return [tuple(row) for row in driver.execute_script(ROWS)]


def shows_the_event(driver) -> bool:
    """The accepted event and Meta's answer, with their id, as rows a person reads."""
    from selenium.webdriver.common.by import By

    shown = set(rows(driver))
    text = driver.find_element(By.ID, "stream").text
    return {("accepted", "meta dry", "order-9"), ("success", "meta", "order-9")} <= shown and "order-9" in text


def filter_to_dry(driver) -> None:
    """Choose the dry-run destination in the filter, once the counters have listed it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#destination option[value=dry]"), "the destinations")
    Select(driver.find_element(By.ID, "destination")).select_by_value("dry")


def shows_dry_only(driver) -> bool:
    shown = set(rows(driver))
    return ("success", "dry", "order-9") in shown and not any(row[1] == "meta" for row in shown)


def destination_filter(driver) -> tuple[list[str], str]:
    """The destination filter's choices (after "all") and the one chosen."""
    choices, chosen = driver.execute_script(
        "const select = document.getElementById('destination');"
        "return [[...select.options].slice(1).map(option => option.value), select.value]"
    )
    return choices, chosen


def shows_meta_again(driver) -> bool:
    return ("success", "meta", "order-9") in set(rows(driver))


def filter_to_success(driver) -> list[str]:
    """Choose the outcome C{success} in the filter; the outcomes it offers after "all"."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    select = Select(driver.find_element(By.ID, "outcome"))
    offered = [option.get_attribute("value") for option in select.options][1:]
    select.select_by_value("success")
    return offered


def shows_successes_only(driver) -> bool:
    shown = set(rows(driver))
    return ("success", "meta", "order-9") in shown and {row[0] for row in shown} == {"success"}


def log_out(driver) -> None:
    """Press the page's button; the login form comes back."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "logout").click()
    until(driver, lambda d: d.find_elements(By.ID, "token"), "the login form")


def accepted_counter(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "accepted").text


def shows_the_coverage(driver) -> bool:
    """The panel: Meta's purchase carried no e-mail (with the advice), and a user agent."""
    from selenium.webdriver.common.by import By

    text = driver.find_element(By.ID, "coverage").text
    return (
        "meta · Purchase: 1 event" in text
        and "0 % of Purchase events carry an e-mail — put the customer's e-mail in user_data.em" in text
        and "100 % of Purchase events carry a user agent" in text
    )


@pytest_twisted.ensureDeferred
async def test_the_dashboard_shows_an_event_sent_through_the_proxy(start_admin_tagd, http, fake_meta, browser):
    """In Chromium: the dashboard asks for the token, then streams live; a purchase sent
    through the proxy shows as accepted for both destinations and as Meta's success; the
    counters count it; filtering by the dry-run destination hides Meta's row and keeps
    the dry run's; the filter offers the destinations configured now, and when the chosen
    one goes, shows every destination again; logging out ends the stream and the session."""
    tagd = await start_admin_tagd(admin={"token": TOKEN}, destinations=[meta_destination(fake_meta), DRY])
    await within(deferToThread(log_in_and_open, browser, tagd.admin_url("/")), 2 * WAIT)
    assert feed_of(tagd).subscribers == 1

    await visit(http, tagd, "order-9", "Purchase")
    await within(deferToThread(until, browser, shows_the_event, "the event and Meta's answer"), 2 * WAIT)
    await within(deferToThread(until, browser, lambda d: accepted_counter(d) == "1", "the counter"), 2 * WAIT)
    await within(deferToThread(until, browser, shows_the_coverage, "the match keys' panel"), 2 * WAIT)

    await within(deferToThread(filter_to_dry, browser), 2 * WAIT)
    await within(deferToThread(until, browser, shows_dry_only, "the dry run's rows only"), 2 * WAIT)

    # What a reload does to the destinations: the filter follows, keeping a choice still there.
    feed_of(tagd).destinations = ("dry", "ga4")
    kept = (["dry", "ga4"], "dry")
    await within(deferToThread(until, browser, lambda d: destination_filter(d) == kept, "ga4 added"), 2 * WAIT)
    feed_of(tagd).destinations = ("meta",)
    fell_back = (["meta"], "")
    await within(deferToThread(until, browser, lambda d: destination_filter(d) == fell_back, "dry gone"), 2 * WAIT)
    await within(deferToThread(until, browser, shows_meta_again, "every destination's rows"), 2 * WAIT)

    # The outcomes offered are every one tagd has, as /stats.json lists them.
    assert await within(deferToThread(filter_to_success, browser), 2 * WAIT) == ["accepted", *OUTCOMES]
    await within(deferToThread(until, browser, shows_successes_only, "the successes only"), 2 * WAIT)

    await within(deferToThread(log_out, browser), 2 * WAIT)
    await eventually(lambda: feed_of(tagd).subscribers == 0)
    status = "return fetch('stats.json').then(response => response.status)"
    assert await within(deferToThread(browser.execute_script, status)) == 401
