"""Shared helpers for tests against a real Redis: polling with a deadline,
reading a group's state, and a consumer running in a subprocess."""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import redis.asyncio

from redcurrent import Message
from redcurrent.testing import wait_until

__all__ = [
    "CONSUMER_SCRIPT",
    "Recorder",
    "SRC",
    "consumer_names",
    "pel_of",
    "pending",
    "nothing_pending",
    "pending_count",
    "spawn_consumer",
    "wait_until",
    "xadd_raw",
]

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CONSUMER_SCRIPT = Path(__file__).resolve().with_name("_consumer_proc.py")

Predicate = Callable[[], bool | Awaitable[bool]]


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def pending(
    client: redis.asyncio.Redis, stream: str, group: str, count: int = 10_000
) -> list[tuple[str, str, int]]:
    """The group's pending entries as ``(id, consumer, times_delivered)``."""
    rows = await client.xpending_range(stream, group, min="-", max="+", count=count)
    return [(_s(r["message_id"]), _s(r["consumer"]), int(r["times_delivered"])) for r in rows]


async def pel_of(
    client: redis.asyncio.Redis, stream: str, group: str
) -> dict[str, tuple[str, int, int]]:
    """The group's pending list: id -> (consumer, idle ms, delivery count)."""
    rows = await client.xpending_range(stream, group, min="-", max="+", count=100_000)
    return {
        _s(r["message_id"]): (
            _s(r["consumer"]),
            int(r["time_since_delivered"]),
            int(r["times_delivered"]),
        )
        for r in rows
    }


async def pending_count(client: redis.asyncio.Redis, stream: str, group: str) -> int:
    summary = await client.xpending(stream, group)
    return int(summary["pending"])


async def consumer_names(client: redis.asyncio.Redis, stream: str, group: str) -> dict[str, int]:
    """Consumers of the group, name -> pending count."""
    rows = await client.xinfo_consumers(stream, group)
    return {_s(r["name"]): int(r["pending"]) for r in rows}


async def xadd_raw(
    client: redis.asyncio.Redis, stream: str, fields: Mapping[str | bytes, str | bytes]
) -> str:
    """Append an entry with exactly these fields (no encoding by redcurrent)."""
    entry_id = await client.xadd(stream, dict(fields))  # type: ignore[arg-type]
    return _s(entry_id)


def spawn_consumer(*args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``tests/_consumer_proc.py`` with redcurrent importable from ``src``."""
    full_env: dict[str, str] = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SRC), full_env.get("PYTHONPATH", "")) if p
    )
    if env:
        full_env.update(env)
    return subprocess.Popen(
        [sys.executable, str(CONSUMER_SCRIPT), *args],
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


class Recorder:
    """A handler that records every message it gets; ``wait_for(n)`` wakes on
    each new message instead of polling."""

    def __init__(self) -> None:
        self.messages: list[Message[Any]] = []
        self._changed = anyio.Event()

    async def __call__(self, msg: Message[Any]) -> None:
        self.record(msg)

    def record(self, msg: Message[Any]) -> None:
        self.messages.append(msg)
        self._changed.set()

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.messages]

    async def wait_for(self, n: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        with anyio.fail_after(timeout):
            while len(self.messages) < n:
                self._changed = anyio.Event()
                await self._changed.wait()


def nothing_pending(client: redis.asyncio.Redis, stream: str, group: str) -> Predicate:
    """A predicate for :func:`wait_until`: the group's pending list is empty."""

    async def check() -> bool:
        return await pending_count(client, stream, group) == 0

    return check


# -- added for tests/test_faults.py --------------------------------------------------


async def wait_while_running(
    consumers: Any,
    predicate: Predicate,
    timeout: float = 10.0,  # noqa: ASYNC109
    interval: float = 0.02,
) -> None:
    """Like :func:`wait_until`, but fail at once, naming the stop reason and the
    error, when one of ``consumers`` (a consumer or an iterable of them) stops
    meanwhile: a consumer that died must not be reported as a timeout later."""
    group = list(consumers) if isinstance(consumers, list | tuple | set) else [consumers]

    async def check() -> bool:
        for consumer in group:
            if consumer.stop_reason is not None:
                raise AssertionError(
                    f"{consumer!r} stopped ({consumer.stop_reason.value}): {consumer.error!r}"
                )
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        return bool(result)

    await wait_until(check, timeout=timeout, interval=interval)


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` by path (examples are not a package): a
    fresh module each call."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
