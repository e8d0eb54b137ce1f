"""What every command shares: the ``--url`` and ``--json`` options, one Redis
client per command, the async runner, and the one place that turns failures
into a one-line ``Error: ...`` instead of a traceback.

Failures are told apart by exception type (and, for server replies, by the
error code :mod:`redcurrent._faults` reads), never by their text, which only
ends up in the message shown.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import anyio
import click
import redis.asyncio as aredis
from redis import exceptions as rex
from redis.asyncio.cluster import RedisCluster
from rich.console import Console

from .._faults import error_code
from .._ids import normalize_id
from .._redis import as_str
from .._topic import Topic
from ..errors import AccessDeniedError, ConfigurationError, RedcurrentError

__all__ = [
    "DEFAULT_URL",
    "URL_ENVVARS",
    "BadInput",
    "CliError",
    "age",
    "console",
    "echo_json",
    "entry_id_argument",
    "explain",
    "json_option",
    "open_client",
    "plural",
    "redacted",
    "require_topic",
    "run",
    "url_option",
    "client_from_url",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_URL: Final = "redis://localhost:6379/0"
#: Read in this order when ``--url`` is not given.
URL_ENVVARS: Final = ("REDCURRENT_URL", "REDIS_URL")
#: Seconds to wait for a TCP connection before calling the server unreachable.
CONNECT_TIMEOUT: Final = 5.0


class CliError(click.ClickException):
    """An operational failure: shown as ``Error: <message>``, exit code 1."""

    exit_code = 1


class BadInput(click.ClickException):
    """A malformed argument (JSON, entry id): one line, exit code 2 as for usage
    errors, but without click's usage block, which says nothing about a bad id."""

    exit_code = 2


def url_option(func: F) -> F:
    return click.option(
        "--url",
        envvar=list(URL_ENVVARS),
        default=DEFAULT_URL,
        show_default=True,
        show_envvar=True,
        help="Redis URL (redis://[user:password@]host:port/db, rediss:// for TLS, "
        "redis+cluster://host:port for any node of a Redis Cluster); "
        "else $REDCURRENT_URL, then $REDIS_URL.",
    )(func)


def json_option(func: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON for scripts instead of tables."
    )(func)


def entry_id_argument(name: str) -> Callable[[F], F]:
    """An entry id argument, checked and normalised before anything connects."""

    def check(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
        try:
            return normalize_id(value)
        except ConfigurationError as exc:
            raise BadInput(str(exc)) from None

    return click.argument(name, callback=check)


def console() -> Console:
    """A console on the current stdout (click's test runner swaps it)."""
    return Console(file=sys.stdout, highlight=False)


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def redacted(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
        netloc = f"{user}:***@{host}{port}"
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<the URL given>"


def run(url: str, body: Callable[[aredis.Redis], Awaitable[T]]) -> T:
    """Run ``body`` with a client on ``url``, closed afterwards, in a fresh event
    loop; every failure a user can cause becomes a :class:`click.ClickException`."""

    async def main() -> T:
        async with open_client(url) as client:
            return await body(client)

    try:
        return anyio.run(main)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None
    except click.ClickException:
        raise
    except Exception as exc:
        found = explain(exc, url)
        if found is None:
            raise
        raise found from None


@contextlib.asynccontextmanager
async def open_client(url: str) -> AsyncIterator[aredis.Redis]:
    """A client on ``url`` for one command, closed when it ends (also when it
    is cancelled). Errors are left to :func:`run`'s mapper."""
    try:
        client = client_from_url(url, socket_connect_timeout=CONNECT_TIMEOUT)
    except ValueError as exc:  # not a redis://, rediss:// or unix:// URL
        raise BadInput(f"invalid --url {redacted(url)!r}: {exc}") from None
    try:
        yield client
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()


def client_from_url(url: str, **options: Any) -> aredis.Redis:
    """A client for ``url``; ``redis+cluster://`` (or ``rediss+cluster://``) names
    any node of a Redis Cluster and gives a cluster client."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.endswith("+cluster"):
        cluster = RedisCluster.from_url(f"{scheme.removesuffix('+cluster')}://{rest}", **options)
        # The commands use only what both clients offer, routed by key.
        return cast(aredis.Redis, cluster)
    return aredis.Redis.from_url(url, **options)


def explain(exc: BaseException, url: str) -> click.ClickException | None:
    """The one-line error for a failure a user can cause, or None for a bug
    (which keeps its traceback)."""
    where = redacted(url)
    # Order matters: AccessDeniedError is a ConfigurationError, AuthenticationError
    # a ConnectionError, NoPermissionError and AuthenticationWrongNumberOfArgsError
    # ResponseErrors.
    if isinstance(exc, AccessDeniedError):
        return CliError(str(exc))
    if isinstance(exc, ConfigurationError):
        return BadInput(str(exc))
    if isinstance(exc, RedcurrentError):
        return CliError(str(exc))
    if isinstance(
        exc,
        rex.AuthenticationError | rex.AuthenticationWrongNumberOfArgsError | rex.AuthorizationError,
    ):
        return CliError(
            f"Redis at {where} refused the credentials: {exc} "
            "(check the user and password in --url or $REDCURRENT_URL)"
        )
    if isinstance(exc, rex.NoPermissionError) or error_code(exc) in ("NOPERM", "NOAUTH"):
        return CliError(
            f"Redis at {where} denied a command: {exc} "
            "(the ACL user lacks a permission; see the README's ACL section)"
        )
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError | OSError):
        return CliError(f"cannot reach Redis at {where}: {exc}")
    if isinstance(exc, rex.ResponseError):
        code = error_code(exc)
        if code == "WRONGTYPE":
            return CliError(f"a key of this command holds another type than expected: {exc}")
        return CliError(f"Redis at {where} answered: {exc}")
    return None


async def require_topic(
    client: aredis.Redis, topic: Topic, *, stream: bool = False, partitioned: bool = False
) -> bool:
    """Fail unless the topic exists: its stream, or (unless ``stream``) one of its
    dead letters, stopped ids or scheduled messages, which outlive or precede
    the stream. Returns whether the stream itself exists. A partitioned topic
    passes only for commands that work on one through :class:`Topic`
    (``partitioned``); the others are told to name one of its partitions."""
    kind = as_str(await client.type(topic.name))
    if kind == "stream":
        return True
    if kind == "none" and await client.exists(topic.keys.meta):
        # A partitioned topic: its partitions are the streams.
        if not partitioned:
            streams = await topic.partition_streams()
            raise CliError(
                f"topic {topic.name!r} is partitioned: name one of its partition streams "
                f"({', '.join(streams)})"
            )
        return True
    if kind != "none":
        raise CliError(f"key {topic.name!r} holds a {kind}, not a stream")
    keys = topic.keys
    if stream or not await client.exists(keys.dead_letters, keys.stopped, keys.scheduled):
        raise CliError(f"stream {topic.name!r} does not exist")
    return False


def age(ms: int) -> str:
    """A duration for people: ``850ms``, ``12.3s``, ``4m05s``, ``2h07m``, ``3d04h``."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def plural(count: int, word: str, words: str = "") -> str:
    """``1 dead letter``, ``2 dead letters``, ``3 entries`` (with ``words``)."""
    return f"{count} {word}" if count == 1 else f"{count} {words or word + 's'}"
