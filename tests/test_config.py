"""Tests for L{tagd.daemon.config}: the TOML file, its defaults and every way it can be wrong."""

from __future__ import annotations

import os

import pytest

from tagd.daemon.config import (
    COMMAND_LINE,
    Config,
    ConfigError,
    ProxyConfig,
    SpoolConfig,
    SpoolSettings,
    load_config,
    parse_spool_settings,
    read_config_file,
)


def load_spool_settings(path: str) -> SpoolSettings:
    """The spool settings of the file at C{path}, as the spool commands read them."""
    return parse_spool_settings(read_config_file(path), path)


@pytest.fixture
def write(tmp_path):
    """Write TOML text (str or bytes) to a file in tmp_path and return its path."""

    def write(text: str | bytes, name: str = "tagd.toml") -> str:
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return str(path)

    return write


def assert_config_error(path: str, key: str, **kwargs) -> ConfigError:
    """Loading C{path} fails with one line that names C{path} and C{key}."""
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)
    error = info.value
    message = str(error)
    assert path in message
    assert f": {key}: " in message
    assert "\n" not in message
    assert (error.path, error.key) == (path, key)
    return error


def test_defaults_from_empty_file(write):
    """An empty file gives the documented defaults."""
    path = write("")
    config = load_config(path)
    assert config == Config(path=path, proxy=ProxyConfig())
    proxy = config.proxy
    assert proxy.listen == "tcp:8080"
    assert proxy.origin == "http://127.0.0.1:8000"
    assert proxy.tracking_header == "Worker-Tracking"
    assert proxy.trusted_proxies == ("cloudflare",)
    assert proxy.client_ip_header == "CF-Connecting-IP"
    assert proxy.allow_underscores_in_headers is False
    for timeout in (proxy.connect_timeout, proxy.response_timeout, proxy.pool_idle_timeout):
        assert timeout > 0
    assert isinstance(proxy.pool_size, int) and proxy.pool_size > 0
    assert (proxy.header_timeout, proxy.body_timeout, proxy.body_min_rate) == (10, 30, 1024)
    assert proxy.max_connections == 1024
    assert (proxy.upload_timeout, proxy.keepalive_timeout) == (600, 60)


def test_defaults_from_empty_table(write):
    """An empty [proxy] table gives the same defaults as no table at all."""
    assert load_config(write("[proxy]\n")).proxy == ProxyConfig()


def test_every_key_parsed(write):
    """Every key of [proxy] is read into the configuration with its value."""
    path = write(
        """
        [proxy]
        listen = "tcp:9090:interface=127.0.0.1"
        origin = "https://app.internal:8443/shop"
        tracking_header = "X-Shop-Tracking"
        trusted_proxies = ["cloudflare", "10.0.0.0/8", "2001:db8::/32"]
        client_ip_header = "X-Client-IP"
        allow_underscores_in_headers = true
        connect_timeout = 2
        response_timeout = 30.5
        pool_size = 16
        pool_idle_timeout = 120.0
        header_timeout = 5
        body_timeout = 12.5
        body_min_rate = 512
        max_connections = 300
        """
    )
    assert load_config(path) == Config(
        path=path,
        proxy=ProxyConfig(
            listen="tcp:9090:interface=127.0.0.1",
            origin="https://app.internal:8443/shop",
            tracking_header="X-Shop-Tracking",
            trusted_proxies=("cloudflare", "10.0.0.0/8", "2001:db8::/32"),
            client_ip_header="X-Client-IP",
            allow_underscores_in_headers=True,
            connect_timeout=2,
            response_timeout=30.5,
            pool_size=16,
            pool_idle_timeout=120.0,
            header_timeout=5,
            body_timeout=12.5,
            body_min_rate=512,
            max_connections=300,
        ),
    )


def test_empty_trusted_proxies(write):
    """An empty trusted_proxies list is allowed: then no peer's header is believed."""
    assert load_config(write("[proxy]\ntrusted_proxies = []\n")).proxy.trusted_proxies == ()


def test_overrides_win_over_file(write):
    """Command-line values replace the file's values for the same keys."""
    path = write('[proxy]\nlisten = "tcp:1111"\norigin = "http://a.example"\n')
    config = load_config(path, {"proxy": {"listen": "tcp:2222", "origin": "http://b.example"}})
    assert (config.proxy.listen, config.proxy.origin) == ("tcp:2222", "http://b.example")


def test_overrides_checked(write):
    """A bad command-line value is reported under its key, blamed on the command line
    rather than on a file that is fine."""
    with pytest.raises(ConfigError) as info:
        load_config(write(""), overrides={"proxy": {"listen": "bogus:1"}})
    error = info.value
    assert (error.path, error.key) == (COMMAND_LINE, "proxy.listen")
    assert "bogus:1" in error.reason
    assert "\n" not in str(error)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "key",
    ["connect_timeout", "response_timeout", "pool_idle_timeout", "shutdown_timeout", "header_timeout",
     "body_timeout", "body_min_rate", "upload_timeout", "keepalive_timeout"],
)
def test_timeouts_must_be_finite(write, key, value):
    """NaN or infinite seconds would break timers at run time; they stop start-up instead."""
    assert_config_error(write(f"[proxy]\n{key} = {value}\n"), f"proxy.{key}")


@pytest.mark.parametrize(
    "text, key",
    [
        pytest.param('[proxy]\nlisten = "tcp:8080\n', "(file)", id="bad-toml-unterminated-string"),
        pytest.param("[proxy\n", "(file)", id="bad-toml-table-header"),
        pytest.param('[proxy]\nlisten = "tcp:1"\nlisten = "tcp:2"\n', "(file)", id="bad-toml-duplicate-key"),
        pytest.param("[proxie]\n", "proxie", id="unknown-table"),
        pytest.param('listen = "tcp:8080"\n', "listen", id="key-outside-table"),
        pytest.param("proxy = 3\n", "proxy", id="table-not-a-table"),
        pytest.param("[proxy]\nlisen = 1\n", "proxy.lisen", id="unknown-key"),
        pytest.param("[proxy.extra]\na = 1\n", "proxy.extra", id="unknown-subtable"),
        pytest.param("[proxy]\nlisten = 8080\n", "proxy.listen", id="wrong-type-listen"),
        pytest.param("[proxy]\norigin = ['http://a']\n", "proxy.origin", id="wrong-type-origin"),
        pytest.param('[proxy]\ntrusted_proxies = "cloudflare"\n', "proxy.trusted_proxies", id="wrong-type-list"),
        pytest.param("[proxy]\ntrusted_proxies = [1]\n", "proxy.trusted_proxies", id="wrong-type-list-item"),
        pytest.param('[proxy]\nconnect_timeout = "5"\n', "proxy.connect_timeout", id="wrong-type-string-number"),
        pytest.param("[proxy]\npool_size = 1.5\n", "proxy.pool_size", id="wrong-type-float-count"),
        pytest.param("[proxy]\nconnect_timeout = true\n", "proxy.connect_timeout", id="bool-timeout"),
        pytest.param("[proxy]\npool_size = false\n", "proxy.pool_size", id="bool-count"),
        pytest.param("[proxy]\ntracking_header = true\n", "proxy.tracking_header", id="bool-string"),
        pytest.param('[proxy]\nallow_underscores_in_headers = "no"\n', "proxy.allow_underscores_in_headers", id="string-bool"),
        pytest.param('[proxy]\norigin = "ftp://shop.example"\n', "proxy.origin", id="url-scheme-ftp"),
        pytest.param('[proxy]\norigin = "shop.example:8000"\n', "proxy.origin", id="url-no-scheme"),
        pytest.param('[proxy]\norigin = "http:///path"\n', "proxy.origin", id="url-no-host"),
        pytest.param('[proxy]\norigin = "http://shop.example:99999"\n', "proxy.origin", id="url-port-range"),
        pytest.param('[proxy]\norigin = "http://shop.example/?a=1"\n', "proxy.origin", id="url-query"),
        pytest.param('[proxy]\norigin = "http://shop.example/#top"\n', "proxy.origin", id="url-fragment"),
        pytest.param('[proxy]\nlisten = "nonsense:8080"\n', "proxy.listen", id="endpoint-type"),
        pytest.param('[proxy]\nlisten = "tcp:http"\n', "proxy.listen", id="endpoint-port"),
        pytest.param('[proxy]\nlisten = "tcp:8080:bogus=1"\n', "proxy.listen", id="endpoint-argument"),
        pytest.param('[proxy]\nlisten = ""\n', "proxy.listen", id="endpoint-empty"),
        pytest.param('[proxy]\ntrusted_proxies = ["10.0.0.0/33"]\n', "proxy.trusted_proxies", id="cidr-prefix"),
        pytest.param('[proxy]\ntrusted_proxies = ["not-an-ip"]\n', "proxy.trusted_proxies", id="cidr-garbage"),
        pytest.param('[proxy]\ntrusted_proxies = ["Cloudflare"]\n', "proxy.trusted_proxies", id="cidr-word-case"),
        pytest.param("[proxy]\nconnect_timeout = 0\n", "proxy.connect_timeout", id="timeout-zero"),
        pytest.param("[proxy]\nresponse_timeout = -1.5\n", "proxy.response_timeout", id="timeout-negative"),
        pytest.param("[proxy]\npool_idle_timeout = 0.0\n", "proxy.pool_idle_timeout", id="idle-timeout-zero"),
        pytest.param("[proxy]\npool_size = 0\n", "proxy.pool_size", id="pool-size-zero"),
        pytest.param("[proxy]\nheader_timeout = 0\n", "proxy.header_timeout", id="header-timeout-zero"),
        pytest.param("[proxy]\nbody_timeout = -3\n", "proxy.body_timeout", id="body-timeout-negative"),
        pytest.param('[proxy]\nbody_timeout = "30s"\n', "proxy.body_timeout", id="body-timeout-string"),
        pytest.param("[proxy]\nbody_min_rate = 0\n", "proxy.body_min_rate", id="body-min-rate-zero"),
        pytest.param("[proxy]\nmax_connections = 0\n", "proxy.max_connections", id="max-connections-zero"),
        pytest.param("[proxy]\nmax_connections = 10.5\n", "proxy.max_connections", id="max-connections-float"),
        pytest.param('[proxy]\ntracking_header = "Worker Tracking"\n', "proxy.tracking_header", id="header-space"),
        pytest.param('[proxy]\nclient_ip_header = ""\n', "proxy.client_ip_header", id="header-empty"),
    ],
)
def test_error_names_file_and_key(write, text, key):
    """Each kind of mistake raises ConfigError with one line naming the file and the key."""
    assert_config_error(write(text), key)


@pytest.mark.parametrize("listen", ["tcp:70000", "tcp:-1"])
def test_listen_port_out_of_range(write, listen):
    """A listen port outside 0-65535 is a configuration error under proxy.listen."""
    assert_config_error(write(f'[proxy]\nlisten = "{listen}"\n'), "proxy.listen")


@pytest.mark.parametrize("listen", ["systemd:domain=INET6:index=0", "systemd:domain=INET:name=tagd"])
def test_systemd_listen_checked_by_form_outside_the_service(write, listen):
    """A systemd: endpoint is valid where systemd passed no socket (tagd check-config beside
    the service): only its form is checked."""
    assert load_config(write(f'[proxy]\nlisten = "{listen}"\n')).proxy.listen == listen


@pytest.mark.parametrize(
    "listen",
    ["systemd:index=0", "systemd:domain=INET6", "systemd:domain=INET6:index=0:name=x", "systemd:domain=INET6:index=a",
     "systemd:domain=IPX:index=0", "systemd:domain=INET6:index=0:backlog=5"],
)
def test_systemd_listen_of_the_wrong_form(write, listen):
    assert_config_error(write(f'[proxy]\nlisten = "{listen}"\n'), "proxy.listen")


@pytest.mark.parametrize(
    "origin",
    ["http://bücher.example", "http://user:secret@shop.example", "http://shop.example/my shop"],
    ids=["non-ascii-host", "userinfo", "space-in-path"],
)
def test_origin_unusable_by_proxy(write, origin):
    """An origin URL the proxy could not send requests to is rejected under proxy.origin."""
    assert_config_error(write(f'[proxy]\norigin = "{origin}"\n'), "proxy.origin")


def test_toml_error_says_where(write):
    """A TOML syntax error's line points at the line of the file."""
    error = assert_config_error(write('[proxy]\nlisten = "tcp:8080"\norigin = \n'), "(file)")
    assert "line 3" in str(error)


def test_unknown_key_lists_known_keys(write):
    """The unknown-key line lists the keys that are allowed, so a typo is easy to fix."""
    error = assert_config_error(write("[proxy]\nlisen = 1\n"), "proxy.lisen")
    assert "listen" in error.reason


def test_missing_file(tmp_path):
    """A file that does not exist is reported under (file)."""
    assert_config_error(str(tmp_path / "absent.toml"), "(file)")


def test_directory_instead_of_file(tmp_path):
    """A path that names a directory is reported as unreadable under (file)."""
    assert_config_error(str(tmp_path), "(file)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(write):
    """A file without read permission is reported under (file)."""
    path = write("[proxy]\n")
    os.chmod(path, 0)
    assert_config_error(path, "(file)")


def test_not_utf8(write):
    """A file that is not UTF-8 text is reported under (file)."""
    assert_config_error(write(b'[proxy]\nlisten = "tcp:\xff"\n'), "(file)")


# Ids that cannot be right: each would fail every send, or (GA4, which answers 2xx to
# anything) lose every event without a word.


@pytest.mark.parametrize(
    "table, key",
    [
        pytest.param('type = "ga4"\nmeasurement_id = "UA-12345"\napi_secret = "s"', "measurement_id", id="ga4-ua"),
        pytest.param('type = "ga4"\nmeasurement_id = "12345"\napi_secret = "s"', "measurement_id", id="ga4-digits"),
        pytest.param('type = "ga4"\nmeasurement_id = "G-"\napi_secret = "s"', "measurement_id", id="ga4-prefix-only"),
        pytest.param('type = "ga4"\nmeasurement_id = ""\napi_secret = "s"', "measurement_id", id="ga4-empty"),
        pytest.param('type = "ga4"\nmeasurement_id = " G-ABC"\napi_secret = "s"', "measurement_id", id="ga4-space"),
        pytest.param('type = "meta"\npixel_id = "my-pixel"\naccess_token = "t"', "pixel_id", id="meta-name"),
        pytest.param('type = "meta"\npixel_id = "12 34"\naccess_token = "t"', "pixel_id", id="meta-space"),
        pytest.param('type = "meta"\npixel_id = ""\naccess_token = "t"', "pixel_id", id="meta-empty"),
        pytest.param('type = "tiktok"\npixel_code = "C1/2"\naccess_token = "t"', "pixel_code", id="tiktok-path"),
    ],
)
def test_an_id_of_the_wrong_shape_is_an_error_naming_the_key(write, table, key):
    """A GA4 measurement id that is not G-..., a Meta pixel id that is not a number, a
    TikTok pixel code that is not letters and digits: one line naming the key, the value
    not quoted (a token pasted into the wrong key stays out of the log)."""
    value = table.split(f'{key} = "')[1].split('"')[0]
    error = assert_config_error(write(f"[[destinations]]\n{table}\n"), f"destinations[0].{key}")
    assert repr(value) not in str(error)


@pytest.mark.parametrize("measurement_id", ["G-1", "G-ABCDEF1234", "G-abc123"])
def test_a_ga4_measurement_id_as_ga4_shows_it(write, measurement_id):
    """G- and letters and digits, as GA4's admin shows a web stream's id."""
    config = load_config(write(f'[[destinations]]\ntype = "ga4"\nmeasurement_id = "{measurement_id}"\napi_secret = "s"\n'))
    assert config.destinations[0].destination.measurement_id == measurement_id


# What the spool commands read: [spool] and the names, nothing else.


def test_spool_settings_read_the_spool_and_the_names_only(write):
    """The spool table as parse_config reads it, each destination's name (by default its
    type), and no secret resolved: none of these variables exists."""
    text = (
        '[proxy]\nlisten = "nonsense"\n[spool]\npath = "s.db"\nmax_events = 10\n'
        '[admin]\ntoken = { env = "TAGD_TEST_UNSET" }\n'
        '[[destinations]]\ntype = "meta"\naccess_token = { env = "TAGD_TEST_UNSET" }\n'
        '[[destinations]]\ntype = "log"\nname = "dry"\n'
    )
    settings = load_spool_settings(write(text))
    assert settings.spool == SpoolConfig(path="s.db", max_events=10)
    assert settings.destination_names == ("meta", "dry")
    assert load_spool_settings(write("")) == SpoolSettings(path=write(""))


@pytest.mark.parametrize(
    "text, key",
    [
        pytest.param("[spool\n", "(file)", id="bad-toml"),
        pytest.param("[spol]\n", "spol", id="unknown-table"),
        pytest.param("[spool]\npath = 1\n", "spool.path", id="spool-type"),
        pytest.param("[spool]\nflush = 1\n", "spool.flush", id="spool-unknown-key"),
        pytest.param("destinations = 1\n", "destinations", id="not-an-array"),
        pytest.param("destinations = [1]\n", "destinations[0]", id="not-a-table"),
        pytest.param('[[destinations]]\nname = "x"\n', "destinations[0].type", id="no-type"),
        pytest.param('[[destinations]]\ntype = "log"\nname = ""\n', "destinations[0].name", id="empty-name"),
    ],
)
def test_spool_settings_errors_name_the_key(write, text, key):
    """What the spool commands do read is checked as the daemon checks it."""
    path = write(text)
    with pytest.raises(ConfigError) as info:
        load_spool_settings(path)
    assert (info.value.path, info.value.key) == (path, key)
    assert str(info.value).startswith(f"tagd: configuration error in {path}: {key}: ")
