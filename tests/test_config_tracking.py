"""Tests for the C{[tracking]} and C{[[destinations]]} parts of L{tagd.daemon.config}."""

from __future__ import annotations

import pytest

from tagd.daemon.config import ConfigError, TrackingConfig, load_config

META = '[[destinations]]\ntype = "meta"\npixel_id = "1234"\naccess_token = "EAAB-secret-token"\n'


@pytest.fixture
def load(tmp_path):
    """Load TOML text from a real file; return the configuration."""

    def load(text: str):
        path = tmp_path / "tagd.toml"
        path.write_text(text, encoding="utf-8")
        return load_config(str(path))

    return load


def error_of(load, text: str) -> ConfigError:
    """The one-line configuration error that loading C{text} raises."""
    with pytest.raises(ConfigError) as info:
        load(text)
    assert "\n" not in str(info.value)
    return info.value


def test_tracking_defaults(load):
    """Without a [tracking] table, the documented defaults apply: GPC honoured, 2xx tracked."""
    tracking = load("").tracking
    assert tracking == TrackingConfig()
    assert tracking.honor_gpc is True
    assert tracking.track_statuses == ("2xx",)
    assert tracking.event_id_cookie == "tagd_event_id"
    assert tracking.max_events_per_response == 20
    assert load("").destinations == ()


def test_tracking_keys_parsed(load):
    """Every [tracking] key is read with its value."""
    tracking = load(
        "[tracking]\n"
        'include_paths = ["/shop/*"]\nexclude_paths = ["/shop/admin/*"]\n'
        'extra_bots = ["MyScraper"]\nallow_bots = ["ShopMonitor/1"]\n'
        'honor_gpc = false\nconsent_cookie = "cc"\nconsent_values = ["ok"]\n'
        'track_statuses = ["2xx", 304, "400-404"]\nevent_id_cookie = ""\n'
        "first_party_cookies = false\nmax_header_bytes = 1024\nmax_events_per_response = 3\n"
    ).tracking
    assert tracking.include_paths == ("/shop/*",)
    assert tracking.exclude_paths == ("/shop/admin/*",)
    assert tracking.extra_bots == ("MyScraper",)
    assert tracking.allow_bots == ("ShopMonitor/1",)
    assert tracking.honor_gpc is False
    assert (tracking.consent_cookie, tracking.consent_values) == ("cc", ("ok",))
    assert tracking.track_statuses == ("2xx", 304, "400-404")
    assert tracking.event_id_cookie == ""
    assert tracking.first_party_cookies is False
    assert tracking.max_header_bytes == 1024
    assert tracking.max_events_per_response == 3


@pytest.mark.parametrize(
    "text, key",
    [
        ('[tracking]\nextra_bots = ["("]\n', "tracking.extra_bots"),
        ('[tracking]\ntrack_statuses = ["7xx"]\n', "tracking.track_statuses"),
        ("[tracking]\nhonor_gpc = 1\n", "tracking.honor_gpc"),
        ('[tracking]\nconsent_cookie = "a b"\n', "tracking.consent_cookie"),
        ('[tracking]\nconsent_source = "didomi"\n', "tracking.consent_source"),
        ('[tracking]\nconsent_source = "tcf"\nconsent_cookie = "cc"\n', "tracking.consent_cookie"),
        ('[tracking]\ncookie_domain = "com"\n', "tracking.cookie_domain"),
        (META + 'consent_purpose = "ads"\n', "destinations[0].consent_purpose"),
        ("[tracking]\nmax_header_bytes = 0\n", "tracking.max_header_bytes"),
        ("[tracking]\nmax_events_per_response = 0\n", "tracking.max_events_per_response"),
        ("[tracking]\nmax_events_per_response = 2.5\n", "tracking.max_events_per_response"),
        ("[tracking]\nsampling = 1\n", "tracking.sampling"),
        ('[destinations]\ntype = "meta"\n', "destinations"),
        ('[[destinations]]\ntype = "adwords"\n', "destinations[0].type"),
        ('[[destinations]]\ntype = "meta"\npixel_id = "1"\n', "destinations[0].access_token"),
        (META + 'pixel = "typo"\n', "destinations[0].pixel"),
        (META.replace('"1234"', "1234"), "destinations[0].pixel_id"),
        (META + "timeout = 0\n", "destinations[0].timeout"),
        (META + 'name = "has space"\n', "destinations[0].name"),
        (META + META, "destinations[1].name"),
    ],
)
def test_errors_name_the_key(load, text, key):
    """Each mistake stops with one line naming the file and the dotted key."""
    error = error_of(load, text)
    assert error.key == key
    assert error.path.endswith("tagd.toml")


def test_consent_keys(load):
    """consent_source and cookie_domain are read; each destination's purpose defaults by
    type and may be set."""
    webhook = '[[destinations]]\ntype = "webhook"\nurl = "http://127.0.0.1:9/"\n'
    ga4 = '[[destinations]]\ntype = "ga4"\nmeasurement_id = "G-1"\napi_secret = "s"\n'
    config = load(
        '[tracking]\nconsent_source = "onetrust"\ncookie_domain = "host"\n'
        + META + ga4 + webhook + 'consent_purpose = "analytics"\n' + '[[destinations]]\ntype = "log"\n'
    )
    assert (config.tracking.consent_source, config.tracking.cookie_domain) == ("onetrust", "host")
    assert [d.consent_purpose for d in config.destinations] == ["marketing", "analytics", "analytics", "none"]
    assert TrackingConfig().consent_source == "" and TrackingConfig().cookie_domain == ""


def test_secret_never_in_errors(load):
    """An error about a destination never quotes its token, whatever key is wrong."""
    for extra in ("max_batch = 0\n", "max_batch = 5000\n", "event_names = { Lead = 3 }\n", "x = 1\n"):
        error = error_of(load, META + extra)
        assert "EAAB-secret-token" not in str(error)


def test_destinations_built_with_defaults(load):
    """Each table becomes a destination with its type's defaults; names default to the type."""
    config = load(
        META
        + 'name = "fb-main"\n'
        + '[[destinations]]\ntype = "ga4"\nmeasurement_id = "G-X"\napi_secret = "s"\n'
        + '[[destinations]]\ntype = "log"\n'
    )
    meta, ga4, log = config.destinations
    assert (meta.type, meta.name, meta.timeout) == ("meta", "fb-main", 1.5)
    assert (ga4.name, ga4.timeout) == ("ga4", 5.0)
    assert log.name == "log"
    assert meta.secrets == ("access_token",)
    assert "EAAB-secret-token" not in repr(config)
    assert meta.destination.max_batch == 1000
    assert ga4.destination.max_batch == 25


# Tables that would load but for their last key, whose value would fail every send:
# (the table's other keys, the key, its value).
UNUSABLE = [
    ('type = "meta"\npixel_id = "1234"\naccess_token = "t"', "endpoint", "graph.facebook.com"),
    ('type = "meta"\npixel_id = "1234"\naccess_token = "t"', "endpoint", "ftp://graph.facebook.com"),
    ('type = "meta"\naccess_token = "t"', "pixel_id", "1/../1234"),
    ('type = "meta"\npixel_id = "1234"\naccess_token = "t"', "api_version", "latest"),
    ('type = "tiktok"\naccess_token = "t"', "pixel_code", "C-1234"),
    ('type = "tiktok"\npixel_code = "C1234"\naccess_token = "t"', "endpoint", "business-api.tiktok.com"),
    ('type = "ga4"\nmeasurement_id = "G-1"\napi_secret = "s"', "endpoint", "https://ga.example/?x=1"),
    ('type = "webhook"', "url", "warehouse.example/events"),
]


@pytest.mark.parametrize(("table", "key", "value"), UNUSABLE)
def test_unusable_destination_values_stop_start_up(load, table, key, value):
    """A URL, id or version that would fail every send is refused when the file is
    loaded, in one line naming the key of the very table (here the second), and never
    quoting the value (it may carry a credential, or be a token in the wrong key)."""
    error = error_of(load, f'{META}[[destinations]]\nname = "second"\n{table}\n{key} = "{value}"\n')
    assert error.key == f"destinations[1].{key}"
    assert str(error).startswith(f"tagd: configuration error in {error.path}: destinations[1].{key}: ")
    assert value not in str(error)
