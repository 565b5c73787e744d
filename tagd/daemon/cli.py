"""The C{tagd} command: look into the spool, check a configuration and try a destination,
beside a running daemon; and the demo.

The spool commands open the daemon's file with a connection of their own (see the end of
L{tagd.delivery.spool}), so they are safe while the daemon runs.  The configuration file is found as
the daemon finds it, so that they look at the same spool as the daemon they sit beside; of
it they read only the spool and the destinations' names, so no secret needs to be at hand.

Output goes to stdout; a problem is one line on stderr and exit status 1.  Neither ever
shows a visitor's event or a secret: the one event shown is C{send-test-event}'s own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
import uuid
from importlib.metadata import version
from typing import Any, Mapping, Sequence

import attrs
from twisted.internet.task import react

from tagd.daemon.config import Config, ConfigError, DestinationConfig, SpoolSettings
from tagd.delivery.client import PlatformAgent
from tagd.delivery.direct import exchange
from tagd.demo.__main__ import SUMMARY as DEMO_SUMMARY, add_arguments as demo_arguments, main as demo_main
from tagd.delivery.destinations import Describing, Destination, Outcome, OutgoingRequest, meta
from tagd.delivery.destinations._common import public_url, redact
from tagd.delivery.destinations.registry import destination_module
from tagd.delivery.destinations.webhook import MIN_SECRET, WebhookDestination
from tagd.tagging.events import Event
from tagd.delivery.spool import SpoolError, read_dead_letters, read_depth, read_journal, retry_dead_letters
from tagd.daemon.tap import BUILT_IN, config_from_options, spool_settings_from_options

MASK = "***"
STATUSES = ("pending", "inflight", "dead", "expired")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# Destination keys holding a URL whose user info or query may carry a credential (a
# webhook's url); the platforms' endpoints are refused with either, so they show as written.
CREDENTIAL_URLS = frozenset({"url"})


class CommandError(Exception):
    """A command that cannot do what was asked; the message is the line shown."""


def load(path: str | None) -> Config:
    """The configuration at C{path}, or where the daemon would look for it."""
    return config_from_options({"config": path})


def load_spool(path: str | None) -> SpoolSettings:
    """The spool and destination names of that configuration, its secrets left unread: the
    spool commands need no token, and may run where the service's are not at hand."""
    return spool_settings_from_options({"config": path})


# Tables on a terminal.


def cell(value: Any) -> str:
    """C{value} as one line of printable text, so that no stored string can move the cursor
    or break a row."""
    if value is None:
        return "-"
    text = "".join(c if c.isprintable() else " " for c in str(value))
    return " ".join(text.split())


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned columns, numbers to the right, so that counts compare at a glance."""
    cells = [list(header)] + [[cell(v) for v in row] for row in rows]
    numeric = [bool(rows) and all(isinstance(row[i], int) for row in rows) for i in range(len(header))]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]

    def line(values: list[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(padded).rstrip()

    return "\n".join(line(values) for values in cells)


def age(seconds: float) -> str:
    """A duration as people read it at a glance: 42s, 17m, 5h, 3d."""
    seconds = max(0, int(seconds))
    for unit, size, below in (("s", 1, 120), ("m", 60, 7200), ("h", 3600, 172800)):
        if seconds < below:
            return f"{seconds // size}{unit}"
    return f"{seconds // 86400}d"


# tagd spool ...


def known_destinations(config: SpoolSettings, depth: Mapping[tuple[str, str], int]) -> list[str]:
    """The configured destinations, then those the spool still holds rows for that are no
    longer configured."""
    return list(dict.fromkeys([*config.destination_names, *sorted({d for d, _ in depth})]))


def check_destination(config: SpoolSettings, name: str | None) -> None:
    """Refuse a C{--destination} that names nothing: neither configured nor in the spool.

    A mistyped name would otherwise find no dead letters and look like a healthy answer.
    """
    if name is None:
        return
    known = known_destinations(config, read_depth(config.spool.path))
    if name not in known:
        names = ", ".join(known) or "none"
        raise CommandError(
            f"no destination named {name!r} in {config.path} or in the spool {config.spool.path}"
            f" (known: {names})"
        )


def spool_status(args: argparse.Namespace) -> None:
    """Deliveries by destination and status: configured destinations first, even when
    empty, then any the spool still holds for destinations no longer configured."""
    config = load_spool(args.config)
    depth = read_depth(config.spool.path)
    names = known_destinations(config, depth)
    rows = [[name, *(depth.get((name, status), 0) for status in STATUSES)] for name in names]
    print(f"spool {os.path.abspath(config.spool.path)}")
    print(table(["destination", *STATUSES], rows))
    journal, unreadable = read_journal(config.spool.path)
    if journal:
        print(
            f"intake journal: {journal} accepted event(s) not in the file yet (a running tagd "
            "writes those still owed within two group-commit ticks, a stopped one when it next starts)"
        )
    if unreadable:
        print(f"intake journal: cannot read {', '.join(unreadable)}")


def spool_dead(args: argparse.Namespace) -> None:
    """The newest dead letters, with the reason each was given up on."""
    config = load_spool(args.config)
    check_destination(config, args.destination)
    letters = read_dead_letters(config.spool.path, args.destination, args.limit)
    if not letters:
        print("no dead letters")
        return
    now = time.time()
    rows = [
        [d.event_id, d.event_name, d.destination, d.attempts, age(now - d.created), d.last_error]
        for d in letters
    ]
    print(table(["event_id", "event", "destination", "attempts", "age", "last error"], rows))
    if len(letters) == args.limit:
        print(f"(the newest {args.limit} only; a larger --limit shows any older ones)")


def configured(config: SpoolSettings) -> list[str] | None:
    """The names of the destinations configured in the file the command read; None when it
    read none (the built-in defaults): it cannot tell what the daemon beside it runs with."""
    if config.path == BUILT_IN:
        return None
    return list(config.destination_names)


def spool_retry_dead(args: argparse.Namespace) -> None:
    """Dead letters back to pending, for after the cause is fixed (a new token, say).

    Only those of configured destinations: the daemon sends nothing to a destination it has
    no configuration for, and dead-letters its rows again at its next start or reload.  So
    a C{--destination} that is not configured is refused, and without one the dead letters
    of destinations no longer configured stay as they are, with a line saying how many.
    Without a configuration file the command cannot tell, and moves what it is asked to.
    """
    config = load_spool(args.config)
    check_destination(config, args.destination)
    names = configured(config)
    if names is not None and args.destination is not None and args.destination not in names:
        raise CommandError(
            f"{args.destination!r} is not configured in {config.path}: tagd would dead-letter its"
            " rows again at its next start or reload; configure it first"
        )
    left = {}
    if names is not None and args.destination is None:
        depth = read_depth(config.spool.path)
        left = {name: n for (name, status), n in sorted(depth.items()) if status == "dead" and name not in names}
    count = retry_dead_letters(config.spool.path, names if args.destination is None else [args.destination])
    if count:
        print(f"{count} dead letter(s) moved back to pending; tagd sends them within a couple of seconds (or when it starts)")
    else:
        of = f" for {args.destination}" if args.destination else " for the configured destinations" if left else ""
        print(f"no dead letters{of}: nothing moved")
    if left:
        counts = ", ".join(f"{name}: {n}" for name, n in left.items())
        print(
            f"{sum(left.values())} dead letter(s) of destinations not configured in {config.path} left"
            f" as they are ({counts}): tagd would dead-letter them again; configure them first"
        )


# tagd check-config


def toml_value(value: Any) -> str:
    """C{value} written as TOML (strings in JSON's escapes, which TOML shares)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        items = [f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def toml_key(key: str) -> str:
    """A key bare when TOML allows it (an event name or a header name may need quotes)."""
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def masked(value: Any, key: str, references: Mapping[str, Mapping[str, str]]) -> Any:
    """A secret as check-config shows it: the reference it was read through (it names a file
    or a variable, not the secret, and the output stays a working configuration), else
    hidden; of a table of them (webhook headers), the names stay and each value is so shown.
    C{key} is the secret's key as configuration errors name it, as in C{references}."""
    if isinstance(value, Mapping):
        return {name: masked(item, f"{key}.{name}", references) for name, item in value.items()}
    return references.get(key, MASK)


def toml_lines(values: Mapping[str, Any]) -> list[str]:
    """C{key = value} lines; a key without a value is shown as a comment, TOML has no null."""
    return [
        f"# {key} is not set" if value is None else f"{toml_key(key)} = {toml_value(value)}"
        for key, value in values.items()
    ]


def destination_values(
    prefix: str, destination: DestinationConfig, references: Mapping[str, Mapping[str, str]]
) -> dict[str, Any]:
    """Every key of one C{[[destinations]]} table (C{prefix}: C{destinations[0]}) with the
    value the daemon uses, secrets masked, and so the user info, query and fragment of a URL
    (L{CREDENTIAL_URLS}), which the daemon's logs leave out for the same reason.

    The values are read back from the built destination, so defaults and normalisations
    (a trimmed endpoint, say) show as they take effect.
    """
    keys = destination_module(destination.type).KEYS
    values = {
        "type": destination.type,
        "name": destination.name,
        "timeout": destination.timeout,
        "consent_purpose": destination.consent_purpose,
        "concurrency": destination.concurrency,
    }
    for key in keys:
        value = getattr(destination.destination, key)
        if key in destination.secrets and value is not None:
            value = masked(value, f"{prefix}.{key}", references)
        elif key in CREDENTIAL_URLS:
            value = public_url(value, MASK)
        values[key] = value
    return values


def table_values(
    name: str, table: Any, references: Mapping[str, Mapping[str, str]]
) -> dict[str, Any]:
    """Every key of table C{name} with its value; a key marked secret in its field's metadata
    (C{[admin] token}) is masked when set, and shown as not set when not (an empty secret
    is a configuration error)."""
    return {
        field.name: (masked(value, f"{name}.{field.name}", references) if value else None)
        if field.metadata.get("secret")
        else value
        for field in attrs.fields(type(table))
        for value in [getattr(table, field.name)]
    }


def resolved_toml(config: Config) -> str:
    """The whole effective configuration as TOML: every table and key, secrets masked."""
    lines = [f"# tagd: {config.path}: valid"]
    for field in attrs.fields(Config):
        value = getattr(config, field.name)
        if attrs.has(type(value)):
            values = table_values(field.name, value, config.references)
            lines += ["", f"[{field.name}]", *toml_lines(values)]
    for index, destination in enumerate(config.destinations):
        values = destination_values(f"destinations[{index}]", destination, config.references)
        lines += ["", "[[destinations]]", *toml_lines(values)]
    return "\n".join(lines)


def check_config(args: argparse.Namespace) -> None:
    """Validate a configuration and show what the daemon would run with; the file is named
    by C{--config} as for every command, or, as it always could be, by C{FILE}.  Warn (on
    stderr, the output staying a configuration) about what works today but will not for long."""
    if args.file is not None and args.config is not None and args.file != args.config:
        raise CommandError(f"check-config: two files named ({args.config} and {args.file}): name one")
    config = load(args.config or args.file)
    print(resolved_toml(config))
    for destination in config.destinations:
        if destination.type == meta.TYPE and (why := meta.outdated(destination.destination.api_version)):
            print(f"tagd: warning: {destination.name}: {why}", file=sys.stderr)


# tagd send-test-event

# A current desktop browser's user agent, so that the test event is what tagd sends for a
# visitor, and is judged as such.
TEST_USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
# From 192.0.2.0/24, reserved for documentation (RFC 5737): no visitor is ever this address.
TEST_IP = "192.0.2.1"
TEST_URL = "https://tagd.test/"


def test_event(now: int) -> Event:
    """A page view as a visitor's would arrive, with a fresh id (the platforms drop an event
    whose id they have seen, as a duplicate) and a GA4 client id (GA4 takes no event without one)."""
    return Event(
        event_name="PageView",
        event_id=f"tagd-test-{uuid.uuid4()}",
        event_time=now,
        source_url=TEST_URL,
        client_ip=TEST_IP,
        user_agent=TEST_USER_AGENT,
        ga_client_id=f"{random.randrange(10**9, 10**10)}.{now}",
        ga_session_id=str(now),
    )


def named_destination(config: Config, name: str) -> DestinationConfig:
    """The destination called C{name}; the error lists the names there are to choose from."""
    for destination in config.destinations:
        if destination.name == name:
            return destination
    names = ", ".join(d.name for d in config.destinations) or "none"
    raise CommandError(f"no destination named {name!r} in {config.path} (configured: {names})")


# The key that keeps a test event out of each platform's reports: Meta, TikTok and Snapchat
# show an event with a test event code in their test view only; GA4 in debug mode sends to
# its validation server, Pinterest with ?test=true checks and records nothing, Reddit
# shows a test_id's events in Event Testing.  Microsoft documents no test mode.
TEST_MODE_KEYS = {
    "meta": "test_event_code",
    "tiktok": "test_event_code",
    "snapchat": "test_event_code",
    "ga4": "debug",
    "pinterest": "test",
    "reddit": "test_id",
}


def in_test_mode(destination: Destination) -> bool:
    """Whether the platform keeps the event out of its reports (L{TEST_MODE_KEYS})."""
    key = TEST_MODE_KEYS.get(destination.type)
    return bool(key and getattr(destination, key, None))


def secret_values(destination: DestinationConfig) -> list[str]:
    """The destination's secrets, and each word of them (a receiver may echo the token of a
    C{Bearer} header alone), for removing from the platform's answer before it is shown.
    Shorter ones (a webhook's C{X-Version: 1}) are no secret and would garble the answer.
    A webhook names its own as well: its URL's query and user info may hold a key."""
    built = destination.destination
    values = [getattr(built, key) for key in destination.secrets]
    texts = [t for v in values if v for t in (v.values() if isinstance(v, Mapping) else [v])]
    texts += built.secrets() if isinstance(built, WebhookDestination) else ()
    return [s for text in texts for s in (text, *text.split()) if len(s) >= MIN_SECRET]


async def post_test_event(reactor, destination: DestinationConfig, request: OutgoingRequest) -> None:
    """Send one request as the dispatcher would (tagd's client, the destination's timeout)
    and show the platform's answer; exit status 1 unless it is a success."""
    agent = PlatformAgent(reactor, pool_size=1)
    print(f"{request.method} {request.log_url}")  # never request.url: it may carry the token
    try:
        response, body = await exchange(agent, request).addTimeout(destination.timeout, reactor)
    except Exception as e:
        # The exception text may quote the URL, and with it a token: name the type only.
        print(f"tagd: no answer from {request.log_url}: {type(e).__name__}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        await agent.close()
    verdict = destination.destination.classify(response.code, body)
    shown = redact(body.decode("utf-8", "replace"), secret_values(destination))
    print(f"status: {response.code}")
    print(f"outcome: {verdict.outcome.value}" + (f" ({verdict.message})" if verdict.message else ""))
    print(f"answer: {cell(shown) or '(empty)'}")
    if verdict.outcome is not Outcome.SUCCESS:
        raise SystemExit(1)


def send_test_event(args: argparse.Namespace) -> None:
    """Send one made-up event to one destination, to see a new token, pixel or endpoint
    work before real visitors depend on it.

    A C{log} destination prints its dry-run lines instead.  Otherwise the reactor runs
    until the platform has answered, and the process exits with 0 for a success and 1 for
    any other outcome (L{react} ends it: this returns only for a C{log} destination).
    """
    config = load(args.config)
    destination = named_destination(config, args.destination)
    event = test_event(int(time.time()))
    if isinstance(destination.destination, Describing):
        print("\n".join(destination.destination.describe([event])))
        return
    if not in_test_mode(destination.destination):
        key = TEST_MODE_KEYS.get(destination.type)
        missing = f"has no {key}" if key else "is of a platform without a test mode"
        print(
            f"tagd: warning: {destination.name} {missing}, so the platform counts this {event.event_name} as real",
            file=sys.stderr,
        )
    [request] = destination.destination.encode([event])
    react(post_test_event, [destination, request])


# tagd demo


def demo(args: argparse.Namespace) -> None:
    """C{python -m tagd.demo}, under the command people already have."""
    from twisted.internet import reactor

    demo_main(reactor, args)


# The command line.


def sentence(summary: str) -> str:
    """A command's summary, as its parent's help lists it, as the sentence its own help opens with."""
    return summary[0].upper() + summary[1:] + "."


def command(commands, name: str, summary: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A (sub)command whose own help opens with the summary its parent lists."""
    return commands.add_parser(name, help=summary, description=sentence(summary), **kwargs)


def parser() -> argparse.ArgumentParser:
    """C{tagd spool status|dead|retry-dead}, C{tagd check-config}, C{tagd send-test-event}
    and C{tagd demo}; each command's function is its C{run} default."""
    top = argparse.ArgumentParser(
        prog="tagd",
        description="Inspect tagd's spool and configuration, try a destination, run the demo.",
        epilog="The daemon itself runs under twistd: twistd -n --pidfile= tagd --config FILE",
    )
    top.add_argument("--version", action="version", version=f"tagd {version('tagd')}", help="print tagd's version and exit")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config", metavar="FILE", help="TOML configuration file [default: $TAGD_CONFIG or ./tagd.toml]"
    )
    destination = argparse.ArgumentParser(add_help=False)
    destination.add_argument("--destination", metavar="NAME", help="only this destination")

    spool = command(
        commands,
        "spool",
        "look into the spool of a running or stopped tagd",
        epilog="They read the file's [spool] table and its destinations' names only: no secret need resolve.",
    )
    spool_commands = spool.add_subparsers(dest="spool_command", required=True, metavar="COMMAND")
    status = command(spool_commands, "status", "deliveries by destination and status", parents=[config])
    status.set_defaults(run=spool_status)
    dead = command(
        spool_commands, "dead", "dead letters, newest first, with reasons", parents=[config, destination]
    )
    dead.add_argument("--limit", metavar="N", type=positive, default=100, help="show at most N [default: 100]")
    dead.set_defaults(run=spool_dead)
    retry = command(
        spool_commands, "retry-dead", "move dead letters back to pending", parents=[config, destination]
    )
    retry.set_defaults(run=spool_retry_dead)

    check = command(
        commands, "check-config", "validate a configuration and print it, secrets masked", parents=[config]
    )
    check.add_argument("file", metavar="FILE", nargs="?", help="the same as --config FILE")
    check.set_defaults(run=check_config)

    test = command(
        commands, "send-test-event", "send one test event to a destination and show the answer", parents=[config]
    )
    test.add_argument("--destination", metavar="NAME", required=True, help="the destination's name")
    test.set_defaults(run=send_test_event)

    shop = command(commands, "demo", DEMO_SUMMARY)
    demo_arguments(shop)
    shop.set_defaults(run=demo)
    return top


def positive(text: str) -> int:
    """argparse's type for a count of at least one."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: 0 when done, 1 with one line on stderr when not (argparse: 2).

    C{send-test-event} exits by itself once the platform has answered (see L{send_test_event})."""
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except ConfigError as e:
        print(e, file=sys.stderr)  # one line naming the file and the key, never a value
        return 1
    except (SpoolError, CommandError) as e:
        print(f"tagd: {e}", file=sys.stderr)
        return 1
    return 0
