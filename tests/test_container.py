"""Where no container can boot: the deployment tests skip on a developer's machine, and fail
in CI (C{$TAGD_REQUIRE_SYSTEMD}), each time with one line naming the cause."""

from __future__ import annotations

import os

import pytest

import container
from container import ContainerError, booted, unavailable


def test_without_root_there_is_no_container(monkeypatch):
    monkeypatch.setattr(container.os, "geteuid", lambda: 1000)
    assert unavailable() == "booting a container needs root"


def test_without_nspawn_the_package_is_named(monkeypatch):
    monkeypatch.setattr(container.os, "geteuid", lambda: 0)
    monkeypatch.setattr(container.shutil, "which", lambda name: None if name == "systemd-nspawn" else f"/usr/bin/{name}")
    assert unavailable() == "systemd-nspawn is not installed (apt-get install --no-install-recommends systemd-container)"


def test_a_developer_s_machine_skips(monkeypatch):
    monkeypatch.delenv(container.REQUIRED, raising=False)
    monkeypatch.setattr(container, "unavailable", lambda: "booting a container needs root")
    with pytest.raises(pytest.skip.Exception) as caught:
        booted()
    assert str(caught.value) == "booting a container needs root"


def test_ci_fails_with_the_cause(monkeypatch):
    monkeypatch.setenv(container.REQUIRED, "1")
    monkeypatch.setattr(container, "unavailable", lambda: None)

    def cannot_boot():
        raise ContainerError("systemd-nspawn exited with status 1: Failed to allocate scope")

    monkeypatch.setattr(container.Container, "create", staticmethod(cannot_boot))
    with pytest.raises(pytest.fail.Exception) as caught:
        booted()
    assert str(caught.value) == (
        "no container with systemd could be booted: systemd-nspawn exited with status 1: Failed to allocate scope,"
        " and $TAGD_REQUIRE_SYSTEMD requires a real systemd"
    )


def test_a_boot_that_hangs_is_a_skip_and_the_half_booted_container_is_closed(monkeypatch, tmp_path):
    """A command of the boot still running at its timeout (systemd never answering, say) is
    a ContainerError, so a developer's machine skips; and what the boot made is removed."""
    if unavailable() == "booting a container needs root":
        pytest.skip("entering a process's namespaces needs root")
    monkeypatch.delenv(container.REQUIRED, raising=False)
    monkeypatch.setattr(container, "unavailable", lambda: None)
    base = tmp_path / "tagd-test-hung"
    (base / "root").mkdir(parents=True)
    made = container.Container(base / "root", base.name)
    monkeypatch.setattr(container.Container, "create", staticmethod(lambda: made))

    def hangs(self) -> None:
        self.pid = os.getpid()  # this process's namespaces stand in for a container's
        self.run("sleep 60", timeout=0.5)

    monkeypatch.setattr(container.Container, "boot", hangs)
    with pytest.raises(pytest.skip.Exception) as caught:
        booted()
    assert str(caught.value).startswith("no container with systemd could be booted: sleep 60: still running after 0.5 s")
    assert not base.exists()
