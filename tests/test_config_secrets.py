"""Secrets given by reference in L{tagd.daemon.config}: C{{ credential = "NAME" }} reads a file of
systemd's C{$CREDENTIALS_DIRECTORY}, C{{ env = "NAME" }} an environment variable.

Every test loads a real file from C{tmp_path}, with a credentials directory of its own and
an environment given as a plain mapping, so that nothing depends on the environment the
tests run in (except the one test of the default, which patches C{os.environ}).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tagd.daemon.config import ConfigError, load_config
from tagd.delivery.destinations.registry import DESTINATION_TYPES, destination_module

META_TOKEN = "EAAB-meta-token-from-a-credential"
GA4_SECRET = "ga4-secret-from-the-environment"
ADMIN_TOKEN = "admin-token-from-a-credential"
HOOK_AUTH = "Bearer hook-token-from-the-environment"

META = '[[destinations]]\ntype = "meta"\npixel_id = "1234"\naccess_token = {access_token}\n'


@pytest.fixture
def credentials(tmp_path) -> Path:
    """An empty credentials directory, as systemd makes one for C{LoadCredential=}."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    return directory


@pytest.fixture
def load(tmp_path, credentials):
    """Load TOML text from a real file, with C{$CREDENTIALS_DIRECTORY} set to the fixture's
    directory unless the given environment says otherwise."""

    def load(text: str, **environ: str):
        path = tmp_path / "tagd.toml"
        path.write_text(text, encoding="utf-8")
        return load_config(str(path), environ={"CREDENTIALS_DIRECTORY": str(credentials), **environ})

    return load


def error_of(load, text: str, **environ: str) -> ConfigError:
    """The one-line configuration error that loading C{text} raises."""
    with pytest.raises(ConfigError) as info:
        load(text, **environ)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"tagd: configuration error in {info.value.path}: ")
    assert info.value.path.endswith("tagd.toml")
    return info.value


def test_credential_file(load, credentials):
    """A credential file's contents become the secret, without the newline it ends with;
    the reference, and not the secret, is kept for check-config."""
    (credentials / "meta-token").write_text(META_TOKEN + "\n", encoding="utf-8")
    config = load(META.format(access_token='{ credential = "meta-token" }'))
    assert config.destinations[0].destination.access_token == META_TOKEN
    assert dict(config.references) == {"destinations[0].access_token": {"credential": "meta-token"}}
    assert META_TOKEN not in repr(config)


def test_only_one_trailing_newline_is_stripped(load, credentials):
    """Only the final newline goes: a value that itself ends in a newline is refused as
    a header value would be, not silently cut."""
    (credentials / "hook").write_text("Bearer x\n\n", encoding="utf-8")
    text = (
        '[[destinations]]\ntype = "webhook"\nurl = "https://h.example/"\n'
        'headers = { Authorization = { credential = "hook" } }\n'
    )
    error = error_of(load, text)
    assert error.key == "destinations[0].headers"
    assert "must be a string on one line" in error.reason


def test_environment_variable(load):
    """An env reference reads the variable from the mapping given to load_config."""
    text = (
        '[[destinations]]\ntype = "ga4"\nmeasurement_id = "G-1"\n'
        'api_secret = { env = "TAGD_GA4_SECRET" }\n'
    )
    config = load(text, TAGD_GA4_SECRET=GA4_SECRET)
    assert config.destinations[0].destination.api_secret == GA4_SECRET
    assert dict(config.references) == {"destinations[0].api_secret": {"env": "TAGD_GA4_SECRET"}}


def test_admin_token(load, credentials):
    """[admin] token is a secret too, and may come from a credential or a variable."""
    (credentials / "admin").write_text(ADMIN_TOKEN, encoding="utf-8")
    assert load('[admin]\ntoken = { credential = "admin" }\n').admin.token == ADMIN_TOKEN
    config = load('[admin]\ntoken = { env = "TAGD_ADMIN" }\n', TAGD_ADMIN=ADMIN_TOKEN)
    assert config.admin.token == ADMIN_TOKEN
    assert dict(config.references) == {"admin.token": {"env": "TAGD_ADMIN"}}


def test_resolved_secret_is_checked_like_a_literal(load, credentials):
    """A token read from a file passes the checks a written one does, and the error still
    does not quote it."""
    (credentials / "admin").write_text("two words\n", encoding="utf-8")
    error = error_of(load, '[admin]\ntoken = { credential = "admin" }\n')
    assert (error.key, error.reason) == ("admin.token", "may hold only printable ASCII without spaces")
    assert "two words" not in str(error)


def test_webhook_header_values(load, credentials):
    """Each webhook header value may be a reference; literal ones stay as written."""
    (credentials / "hook-key").write_text("key-from-a-file\n", encoding="utf-8")
    text = (
        '[[destinations]]\ntype = "webhook"\nurl = "https://h.example/"\n'
        'headers = { Authorization = { env = "TAGD_HOOK_AUTH" }, '
        'X-Api-Key = { credential = "hook-key" }, X-Version = "1" }\n'
    )
    config = load(text, TAGD_HOOK_AUTH=HOOK_AUTH)
    assert dict(config.destinations[0].destination.headers) == {
        "Authorization": HOOK_AUTH, "X-Api-Key": "key-from-a-file", "X-Version": "1",
    }  # fmt: skip
    assert dict(config.references) == {
        "destinations[0].headers.Authorization": {"env": "TAGD_HOOK_AUTH"},
        "destinations[0].headers.X-Api-Key": {"credential": "hook-key"},
    }


def test_literal_secrets_have_no_reference(load):
    """A secret written in the file is used as it is, and recorded as no reference."""
    config = load(META.format(access_token='"EAAB-literal"'))
    assert config.destinations[0].destination.access_token == "EAAB-literal"
    assert dict(config.references) == {}


def test_only_secrets_are_resolved(load):
    """A reference where no secret belongs is a type error; the variable is never read."""
    text = '[[destinations]]\ntype = "meta"\npixel_id = { env = "PIXEL" }\naccess_token = "t"\n'
    error = error_of(load, text, PIXEL="1234")
    assert (error.key, error.reason) == ("destinations[0].pixel_id", "must be a string, got dict")


def test_default_environment_is_the_process_environment(tmp_path, credentials, monkeypatch):
    """Without an environ argument, the daemon's own environment is read, where systemd
    puts CREDENTIALS_DIRECTORY."""
    (credentials / "meta-token").write_text(META_TOKEN, encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    path = tmp_path / "tagd.toml"
    path.write_text(META.format(access_token='{ credential = "meta-token" }'), encoding="utf-8")
    assert load_config(str(path)).destinations[0].destination.access_token == META_TOKEN


@pytest.mark.parametrize(
    "reference, environ, reason",
    [
        pytest.param(
            '{ credential = "meta-token" }', {"CREDENTIALS_DIRECTORY": ""},
            "credential 'meta-token' not found (no $CREDENTIALS_DIRECTORY, or no such file in it)",
            id="no-credentials-directory",
        ),
        pytest.param(
            '{ credential = "absent" }', {},
            "credential 'absent' not found (no $CREDENTIALS_DIRECTORY, or no such file in it)",
            id="no-such-credential",
        ),
        pytest.param(
            '{ credential = "empty" }', {}, "credential 'empty' is empty", id="empty-credential"
        ),
        pytest.param(
            '{ credential = "newline-only" }', {}, "credential 'newline-only' is empty",
            id="credential-of-a-newline",
        ),
        pytest.param(
            '{ credential = "a-directory" }', {}, "credential 'a-directory' cannot be read: Is a directory",
            id="unreadable-credential",
        ),
        pytest.param(
            '{ credential = "not-utf8" }', {}, "credential 'not-utf8' is not UTF-8 text", id="not-utf8"
        ),
        pytest.param(
            '{ credential = "../tagd.toml" }', {},
            "credential '../tagd.toml' must be a file name, not a path",
            id="credential-path",
        ),
        pytest.param(
            '{ env = "TAGD_META_TOKEN" }', {}, "environment variable TAGD_META_TOKEN is not set",
            id="unset-variable",
        ),
        pytest.param(
            '{ env = "TAGD_META_TOKEN" }', {"TAGD_META_TOKEN": ""},
            "environment variable TAGD_META_TOKEN is empty",
            id="empty-variable",
        ),
        pytest.param(
            '{ env = "" }', {}, "env must name the environment variable as a non-empty string",
            id="empty-name",
        ),
        pytest.param(
            "{ credential = 7 }", {},
            "credential must name the file in $CREDENTIALS_DIRECTORY as a non-empty string",
            id="name-not-a-string",
        ),
        pytest.param(
            '{ credential = "meta-token", env = "TAGD_META_TOKEN" }', {},
            'a secret given as a table must be { credential = "NAME" } or { env = "NAME" }, '
            "got keys: credential, env",
            id="two-kinds",
        ),
        pytest.param(
            '{ file = "meta-token" }', {},
            'a secret given as a table must be { credential = "NAME" } or { env = "NAME" }, '
            "got keys: file",
            id="unknown-kind",
        ),
        pytest.param(
            "{}", {},
            'a secret given as a table must be { credential = "NAME" } or { env = "NAME" }, '
            "got keys: (none)",
            id="empty-table",
        ),
    ],
)
def test_unusable_reference_stops_start_up(load, credentials, reference, environ, reason):
    """A reference that yields no secret: one line naming the file, the key and the
    reference, with no secret in it."""
    (credentials / "meta-token").write_text(META_TOKEN, encoding="utf-8")
    (credentials / "empty").write_bytes(b"")
    (credentials / "newline-only").write_bytes(b"\n")
    (credentials / "a-directory").mkdir()
    (credentials / "not-utf8").write_bytes(b"\xff\xfe token")
    error = error_of(load, META.format(access_token=reference), **environ)
    assert (error.key, error.reason) == ("destinations[0].access_token", reason)
    assert META_TOKEN not in str(error)


def test_error_names_the_header(load):
    """A header's bad reference is reported under the header's own key."""
    text = (
        '[[destinations]]\ntype = "webhook"\nurl = "https://h.example/"\n'
        'headers = { X-Version = "1", Authorization = { env = "TAGD_HOOK_AUTH" } }\n'
    )
    error = error_of(load, text)
    assert error.key == "destinations[0].headers.Authorization"
    assert error.reason == "environment variable TAGD_HOOK_AUTH is not set"


# Empty secrets: a token not pasted yet.

# A table of each destination type that has secrets, valid but for the secret {key} = {value}.
WITH_SECRET = {
    "meta": 'type = "meta"\npixel_id = "1234"\n{key} = {value}\n',
    "ga4": 'type = "ga4"\nmeasurement_id = "G-1"\n{key} = {value}\n',
    "tiktok": 'type = "tiktok"\npixel_code = "C1"\n{key} = {value}\n',
    "webhook": 'type = "webhook"\nurl = "https://h.example/"\n{key} = {{ X-Api-Key = {value} }}\n',
    "pinterest": 'type = "pinterest"\nad_account_id = "1"\n{key} = {value}\n',
    "snapchat": 'type = "snapchat"\npixel_id = "p1"\n{key} = {value}\n',
    "reddit": 'type = "reddit"\npixel_id = "t2_1"\n{key} = {value}\n',
    "microsoft": 'type = "microsoft"\ntag_id = "1"\n{key} = {value}\n',
}


def secret_keys() -> list[tuple[str, str, str]]:
    """(type, key as written, key as errors name it) for every secret of every type."""
    return [
        (kind, key, f"destinations[0].{key}" + (".X-Api-Key" if kind == "webhook" else ""))
        for kind in DESTINATION_TYPES
        for key in destination_module(kind).SECRETS
    ]


def test_every_type_with_secrets_is_covered():
    """A new destination type with a secret gets its table above, so the test below sees it."""
    assert sorted({kind for kind, _, _ in secret_keys()}) == sorted(WITH_SECRET)


@pytest.mark.parametrize("kind, key, named", secret_keys(), ids=[f"{k}.{s}" for k, s, _ in secret_keys()])
@pytest.mark.parametrize("blank", ["", " ", "\\t "], ids=["empty", "space", "tab-space"])
def test_an_empty_secret_is_an_error_naming_the_key(load, kind, key, named, blank):
    """C{access_token = ""}, or only spaces, in any secret: one line naming the key, saying
    how to give the secret."""
    text = "[[destinations]]\n" + WITH_SECRET[kind].format(key=key, value=f'"{blank}"')
    error = error_of(load, text)
    assert error.key == named
    assert error.reason.startswith("must not be empty: give the secret, or { credential")


def test_an_empty_admin_token_is_an_error(load):
    """[admin] token = "" would read as "no token" and leave the admin port open to anyone
    who reaches it: left out is how one says that."""
    error = error_of(load, '[admin]\ntoken = ""\n')
    assert error.key == "admin.token"
    assert load("[admin]\n").admin.token == ""
