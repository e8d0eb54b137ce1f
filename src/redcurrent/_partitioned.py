"""One consumer of a partitioned topic: membership, and one runtime per partition it owns.

Each owned partition is consumed by a complete single-stream
:class:`~redcurrent._runtime.Runtime` (own pending first, claims, leases,
acks, dead letters, stop/resume on that partition's keys), sharing the
consumer's handlers and counters. This module only decides which partitions
those are (``_membership``), starts a runtime when a partition becomes ours
and stops it, handing its messages back, when the map moves it elsewhere.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Awaitable, Iterable

import anyio
import anyio.abc
import msgspec
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster

from ._config import ConsumerConfig
from ._control import ControlListener, announce_members
from ._dispatch import Counters, Fence
from ._faults import Fault, access_denied, classify
from ._keys import TopicKeys
from ._log import in_consumer
from ._member import GroupMember
from ._membership import Membership, assign
from ._message import ConsumerStats, StopReason
from ._partitions import Layout
from ._redis import AnyRedis
from ._routes import RouteTable
from ._runtime import Runtime

__all__ = ["PartitionedRuntime"]


async def _all(calls: Iterable[Awaitable[None]]) -> None:
    """Await every call concurrently; the first error is raised as itself
    (not inside an exception group: a transient fault must stay one)."""
    failed: list[BaseException] = []

    async def one(call: Awaitable[None]) -> None:
        try:
            await call
        except Exception as exc:
            failed.append(exc)

    async with anyio.create_task_group() as tg:
        for call in calls:
            tg.start_soon(one, call)
    if failed:
        raise failed[0]


def _ignore(_: str) -> None:
    """Stop and resume act per partition (each runtime listens to its own)."""


logger = logging.getLogger("redcurrent.consumer")

#: Connections a partition may use at once on its node (a blocked read, acks,
#: leases and claims), and what the rest of the consumer needs besides.
POOL_PER_PARTITION = 3
POOL_HEADROOM = 8


class PartitionedRuntime:
    """The runtime of a :class:`StreamConsumer` whose topic has partitions;
    the same face as :class:`Runtime` towards the consumer."""

    def __init__(
        self,
        redis: AnyRedis,
        settings: ConsumerConfig,
        router: RouteTable,
        layout: Layout,
        *,
        owns_client: bool,
        label: str,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.router = router
        self.layout = layout
        self.owns_client = owns_client
        self._label = label
        self.counters = Counters()
        self.keys = TopicKeys(settings.stream)
        #: for health(): the membership's own calls.
        self.member = GroupMember(redis, self.keys, settings.group, settings.name)
        self.started = False
        self.stop_reason: StopReason | None = None
        self.error: BaseException | None = None
        self.done = anyio.Event()
        self._hard = False
        self._stopping = anyio.Event()
        self._wake = anyio.Event()
        self.holder = f"{settings.name}#{secrets.token_hex(4)}"
        self.membership = Membership(
            redis, self.keys.members, settings.group, settings.name, self.holder
        )
        self.part_keys = [TopicKeys(stream) for stream in layout.streams]
        #: partition -> its running runtime.
        self.running: dict[int, Runtime] = {}
        #: partitions whose runtime we are stopping (moved away or fenced).
        self._leaving: set[int] = set()
        #: ... of which those stopped hard (fenced or taken over).
        self._hard_leaving: set[int] = set()
        self._last_beat = -math.inf
        self._tg: anyio.abc.TaskGroup | None = None
        self._outage = self.member.outage
        #: partitions this run has held: released on the way out.
        self._ever_owned: set[int] = set()
        self._pool_warned = False
        #: partition -> until when (monotonic) its lease lets it start messages.
        self._fences: dict[int, Fence] = {}

    def __str__(self) -> str:
        return self._label

    @property
    def owned(self) -> list[int]:
        """The partitions this consumer reads now."""
        return sorted(p for p in self.running if p not in self._leaving)

    def stats(self) -> ConsumerStats:
        running = held = 0
        for runtime in self.running.values():
            if runtime.dispatcher is not None:
                running += runtime.dispatcher.running()
            if runtime.inflight is not None:
                held += len(runtime.inflight.held)
        return self.counters.snapshot(running=running, held=held)

    # -- stopping -------------------------------------------------------------
    def request_stop(
        self, reason: StopReason, error: BaseException | None = None, *, hard: bool = False
    ) -> None:
        if self.done.is_set():
            return
        if self.stop_reason is None:
            self.stop_reason = reason
            self.error = error
        self._hard = self._hard or hard
        if not self.started:
            self.started = True
            self.done.set()
            return
        self._stopping.set()
        for runtime in self.running.values():
            runtime.request_stop(self.stop_reason, self.error, hard=self._hard)

    # -- the loops ------------------------------------------------------------
    async def main(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        settings = self.settings
        in_consumer(settings.stream, settings.group, settings.name)
        started = False
        try:
            # Every partition's group exists from the start, so that a
            # partition no member has taken yet still starts where it should.
            for keys in self.part_keys:
                seat = GroupMember(self.redis, keys, settings.group, settings.name)
                await seat.create_group(settings.start_id)
            live = await self.member.call("membership heartbeat", self._beat)
            async with anyio.create_task_group() as tg:
                self._tg = tg
                # Terminate (also of a member with no partition) and members' news.
                control = ControlListener(
                    self.redis,
                    self.keys,
                    on_stop=_ignore,
                    on_resume=_ignore,
                    on_terminate=self._on_terminate,
                    on_members=self._on_members,
                )
                await tg.start(control.run)
                await self._announce()
                started = True
                task_status.started()
                logger.info(
                    "%s joined the partition map of %r (%d partitions, %d members)",
                    self,
                    settings.stream,
                    self.layout.count,
                    len(live),
                )
                await self._rebalance_or_retry(live)
                tg.start_soon(self._membership_loop)
                tg.start_soon(self._fence_watch)
                await self._stopping.wait()
                for runtime in list(self.running.values()):
                    runtime.request_stop(
                        self.stop_reason or StopReason.STOPPED, self.error, hard=self._hard
                    )
                for runtime in list(self.running.values()):
                    await runtime.done.wait()
                tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await self._leave()
        except Exception as exc:
            if not started:
                raise
            logger.exception("%s: unrecoverable error; stopped", self)
            self.stop_reason = self.stop_reason or StopReason.FAILED
            self.error = self.error or exc
        finally:
            if self.stop_reason is None:
                self.stop_reason = StopReason.STOPPED
            if self.owns_client and isinstance(self.redis, aredis.Redis):
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await self.redis.connection_pool.disconnect()
            logger.info("%s stopped: %s", self, self.stop_reason.value)
            self.done.set()

    def _on_terminate(self) -> None:
        self.request_stop(StopReason.TERMINATED)

    def _on_members(self, group: str) -> None:
        if group == self.settings.group:
            self._wake.set()

    async def _announce(self) -> None:
        try:
            await announce_members(self.redis, self.keys, self.settings.group)
        except Exception as exc:  # only a hint: the next heartbeat finds out anyway
            logger.debug("%s: members notice not sent (%r)", self, exc)

    async def _beat(self) -> list[str]:
        live = await self.membership.beat(self.settings.member_ttl)
        self._last_beat = self.member.last_ok = time.monotonic()
        return live

    async def _lease(self, p: int, *, renew_only: bool = False) -> bool:
        """Take or renew partition ``p``; True when it is ours for ``member_ttl``
        from when the request was sent (its runtime may start messages for
        two thirds of that)."""
        sent = time.monotonic()
        taken = await self.membership.acquire(
            self.part_keys[p].owners, self.settings.member_ttl, renew_only=renew_only
        )
        if taken:
            self._fence(p).until = sent + self.settings.member_ttl * 2 / 3
        return taken

    def _fence(self, p: int) -> Fence:
        fence = self._fences.get(p)
        if fence is None:
            fence = self._fences[p] = Fence()
        return fence

    async def _leave(self) -> None:
        """Released partitions and a left map: the others take over at their
        next heartbeat instead of waiting for our entry to expire."""
        try:
            for p in sorted(self._ever_owned):
                await self.membership.release(self.part_keys[p].owners)
            await self.membership.beat(self.settings.member_ttl, leave=True)
            await self._announce()
        except Exception as exc:  # our entry and leases expire by themselves
            logger.warning(
                "%s: could not leave the partition map (%s: %s); the others take over "
                "once its entries expire (member_ttl)",
                self,
                type(exc).__name__,
                exc,
            )

    async def _membership_loop(self) -> None:
        interval = self.settings.member_ttl / 3
        while not self._stopping.is_set():
            with anyio.move_on_after(interval):
                await self._wake.wait()
            self._wake = anyio.Event()
            if self._stopping.is_set():
                return
            try:
                live = await self._beat()
            except Exception as exc:
                fault = classify(exc)
                if fault is Fault.DENIED:
                    raise access_denied(exc, f"membership of {self.settings.stream!r}") from exc
                if fault is not Fault.TRANSIENT:
                    raise
                self._outage.failed(exc, "membership heartbeat")
                continue
            if self._outage.ongoing:
                self._outage.recovered()
            await self._rebalance_or_retry(live)

    async def _rebalance_or_retry(self, live: list[str]) -> None:
        """A transient fault taking or renewing partitions waits for the next
        tick (a lease not renewed meanwhile fences its partition)."""
        try:
            await self._rebalance(live)
        except Exception as exc:
            if classify(exc) is not Fault.TRANSIENT:
                raise
            self._outage.failed(exc, "taking partitions")

    async def _fence_watch(self) -> None:
        """Stop reading a partition once its lease went unrenewed for two
        thirds of ``member_ttl``: from a third later on, another member may
        take it over. (Its dispatcher already starts nothing past that time.)"""
        ttl = self.settings.member_ttl
        while True:
            await anyio.sleep(ttl / 10)
            now = time.monotonic()
            fenced = [
                p for p in self.running if self._fence(p).until < now and not self._hard_stopping(p)
            ]
            if fenced:
                logger.warning(
                    "%s: could not renew the lease of partitions %s; stopping them "
                    "(another member may take them over)",
                    self,
                    fenced,
                )
            for p in fenced:
                self._stop_partition(p, hard=True)

    def _hard_stopping(self, p: int) -> bool:
        return p in self._hard_leaving

    async def _rebalance(self, live: list[str]) -> None:
        mine = {
            p for p, who in assign(live, self.layout.count).items() if who == self.settings.name
        }
        for p in sorted(set(self.running) - mine - self._leaving):
            logger.info("%s: partition %d moves to another member; handing it over", self, p)
            self._stop_partition(p, hard=False)
        wanted = sorted(mine | set(self.running))
        results: dict[int, bool] = {}

        async def lease(p: int) -> None:
            # A partition being handed over keeps its lease while its runtime
            # drains, but is never taken back: its runtime may end (and
            # release it to its next owner) while we wait for the reply.
            results[p] = await self._lease(p, renew_only=p not in mine)

        # All at once: a tick takes one round trip, not one per partition
        # (sequential renewals on a slow link would fence the last ones).
        await _all(lease(p) for p in wanted)
        for p in wanted:
            if self._stopping.is_set():
                return
            taken = results[p]
            if p in self.running:
                if not taken and not self._hard_stopping(p):
                    logger.warning("%s: partition %d was taken over; stopping it", self, p)
                    self._stop_partition(p, hard=True)
                continue
            if taken and p in mine:
                self._start_partition(p)

    def _start_partition(self, p: int) -> None:
        """Started in the background: the membership loop goes on renewing
        the other partitions' leases meanwhile (a partition's start-up takes a
        few round trips)."""
        assert self._tg is not None
        settings = msgspec.structs.replace(self.settings, stream=self.layout.streams[p])
        runtime = Runtime(
            self.redis,
            settings,
            self.router,
            owns_client=False,
            label=f"{self._label}[partition {p}]",
            counters=self.counters,
            partition=p,
            topic=self.settings.stream,
            fence=self._fence(p),
        )
        runtime.started = True
        self.running[p] = runtime
        self._ever_owned.add(p)
        logger.info("%s: reading partition %d (%s)", self, p, settings.stream)
        self._tg.start_soon(self._run_partition, p, runtime)
        self._check_pool()

    def _check_pool(self) -> None:
        """Every owned partition keeps a read blocked on its node's pool: a
        pool that small makes acks and publishes wait or fail
        (``MaxConnectionsError``). Warn once, naming the fix."""
        if self._pool_warned or not isinstance(self.redis, RedisCluster):
            return
        per_node: dict[str, int] = {}
        limits: dict[str, int] = {}
        for p in self.running:
            try:
                node = self.redis.get_node_from_key(self.layout.streams[p])
            except Exception:  # slots not known yet: nothing to check
                return
            if node is None:
                return
            per_node[node.name] = per_node.get(node.name, 0) + 1
            limits[node.name] = node.max_connections
        for node_name, partitions in per_node.items():
            needed = POOL_PER_PARTITION * partitions + POOL_HEADROOM
            if limits[node_name] < needed:
                self._pool_warned = True
                logger.warning(
                    "%s: %d partitions on node %s, but the client allows only %d "
                    "connections per node; each partition keeps a read blocked, so "
                    "acks and publishes may fail with MaxConnectionsError: create the "
                    "RedisCluster with max_connections >= %d",
                    self,
                    partitions,
                    node_name,
                    limits[node_name],
                    needed,
                )
                return

    async def _run_partition(self, p: int, runtime: Runtime) -> None:
        try:
            await runtime.main(task_status=anyio.TASK_STATUS_IGNORED)
        finally:
            self.running.pop(p, None)
            leaving = p in self._leaving
            self._leaving.discard(p)
            self._hard_leaving.discard(p)
        if leaving and not self._stopping.is_set():
            if runtime.stop_reason is StopReason.STOPPED:
                try:
                    await self.membership.release(self.part_keys[p].owners)
                except Exception as exc:
                    if classify(exc) is not Fault.TRANSIENT:
                        raise
                await self._announce()
                self._wake.set()
            return
        reason = runtime.stop_reason
        if not self._stopping.is_set() and reason is not None and reason is not StopReason.STOPPED:
            # Terminated, deleted or failed under us: the whole consumer stops so.
            self.request_stop(reason, runtime.error)

    def _stop_partition(self, p: int, *, hard: bool) -> None:
        runtime = self.running.get(p)
        if runtime is None:
            return
        self._leaving.add(p)
        if hard:
            self._hard_leaving.add(p)
        runtime.request_stop(StopReason.STOPPED, hard=hard)
