"""A TCP proxy of our own that cuts connections in the middle of a command.

Clients connect to the proxy instead of Redis; every accepted connection gets
its own connection upstream and two pumps, one per direction. :meth:`cut`
arms every live connection: the next chunk a connection carries in the given
direction is forwarded only in part (the first half of its bytes) and then
both sides are closed, so the server sees half a command (``"up"``) or the
client half a reply (``"down"``). Connections that carry nothing in that
direction within a short grace period are closed outright. New connections
are accepted all along, so clients reconnect at once.

No third-party proxy: the cut has to land inside a command or a reply, which
a proxy that only drops whole connections (or packets) cannot promise.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ChaosProxy", "CutReport", "Direction"]

Direction = Literal["up", "down"]
"""``"up"``: client to server (commands); ``"down"``: server to client (replies)."""

_CHUNK = 65536


@dataclass
class CutReport:
    """What one :meth:`ChaosProxy.cut` did."""

    direction: Direction
    at: float
    """``time.monotonic()`` when the last connection of this cut was closed."""
    partial: int = 0
    """Connections closed right after forwarding part of a chunk."""
    closed: int = 0
    """Connections idle in that direction, closed outright."""


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    armed: Direction | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self) -> None:
        for writer in (self.client, self.server):
            writer.transport.abort()
        self.done.set()


class ChaosProxy:
    """``async with ChaosProxy(port) as proxy``: listens on a free loopback port."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.accepted = 0
        self.cuts: list[CutReport] = []
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._partial = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def live(self) -> int:
        return len(self._links)

    async def __aenter__(self) -> ChaosProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def cut(
        self,
        direction: Direction,
        *,
        grace: float = 0.3,
        timeout: float = 5.0,
    ) -> CutReport:
        """Cut every live connection, each mid-chunk if it carries one in
        ``direction`` soon; returns once all of them are closed.

        Waits (up to ``timeout``) until at least one connection was cut inside
        a chunk, then ``grace`` seconds more for the others, and closes the
        rest outright.
        """
        report = CutReport(direction, 0.0)
        armed = list(self._links)
        before = self._partial
        for link in armed:
            link.armed = direction
        deadline = time.monotonic() + timeout
        while self._partial == before and time.monotonic() < deadline and armed:
            if all(link.done.is_set() for link in armed):
                break
            await asyncio.sleep(0.005)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(link.done.wait() for link in armed)), timeout=grace
            )
        report.partial = self._partial - before
        for link in armed:
            if not link.done.is_set():
                report.closed += 1
                self._drop(link)
        report.at = time.monotonic()
        self.cuts.append(report)
        return report

    # -- connections ---------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()  # the server is down: so is the proxy for now
            return
        self.accepted += 1
        link = _Link(client=writer, server=up_writer)
        self._links.add(link)
        for task in (
            asyncio.create_task(self._pump(link, reader, up_writer, "up")),
            asyncio.create_task(self._pump(link, up_reader, writer, "down")),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await link.done.wait()
        self._links.discard(link)

    async def _pump(
        self,
        link: _Link,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        direction: Direction,
    ) -> None:
        try:
            while not link.done.is_set():
                data = await source.read(_CHUNK)
                if not data:
                    break
                if link.armed == direction and not link.done.is_set():
                    # Half of what is in flight, then nothing: a command (or a
                    # reply) that starts and never ends.
                    sink.write(data[: len(data) // 2])
                    with contextlib.suppress(OSError):
                        await asyncio.wait_for(sink.drain(), timeout=1.0)
                    self._partial += 1
                    sink.close()  # flushes the half first
                    other = link.server if sink is link.client else link.client
                    other.transport.abort()
                    link.done.set()
                    return
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not link.done.is_set():
                self._drop(link)

    def _drop(self, link: _Link) -> None:
        link.close()
        self._links.discard(link)
