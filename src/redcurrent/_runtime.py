"""One run of a consumer: its loops, scopes and in-memory state, and how it stops.

Data path, top to bottom: ``_claim`` (own pending, then XAUTOCLAIM) and
``_read`` (XREADGROUP ``>``) feed the ``_dispatch`` worker pool, which runs
handlers and hands ids to ``_ack`` or to the dead letters. What is held and
how much room is left lives in one ``_inflight.InFlight``, built first and
shared by all of them; ``_lease`` keeps held entries from being claimed by
others meanwhile and ``_recount`` writes back the delivery counters of
stopped and resumed messages. All loops run in one
anyio task group; every Redis call goes through :meth:`GroupMember.call`,
which retries transient faults and turns a vanished stream into a stop.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import redis.asyncio as aredis

from ._ack import Acker
from ._batch import Batcher
from ._claim import Claimer, recover_own_pending
from ._cleanup import AutoCleaner
from ._config import ConsumerConfig
from ._control import ControlListener, announce_hand_back
from ._dead import DeadLetterWriter
from ._dispatch import Counters, Dispatcher, Fence
from ._housekeeping import prune_idle_consumers
from ._inflight import InFlight
from ._keys import TopicKeys
from ._lease import LeaseKeeper
from ._log import in_consumer
from ._member import GroupMember
from ._message import ConsumerStats, StopReason
from ._read import Reader
from ._recount import Recounter
from ._redis import AnyRedis, block_within_socket_timeout
from ._routes import RouteTable
from ._schedule import Mover
from .errors import TopicGoneError

__all__ = ["Runtime"]

logger = logging.getLogger("redcurrent.consumer")

#: Before Redis 7.0 a blocked read is not woken by DEL: block this long at most.
PRE_7_BLOCK = 0.6
#: The least prefetch of a consumer with batch handlers, unless given.
BATCH_PREFETCH = 1024
#: A stopping consumer sets the idle time of what it hands back to at least
#: this (seconds), so that peers with any usual ``claim_idle`` take it at once.
HAND_BACK_IDLE = 86400.0


class Runtime:
    """Runs the loops of one consumer once, in one task group, and records why
    they stopped. :class:`StreamConsumer` is its public face."""

    def __init__(
        self,
        redis: AnyRedis,
        settings: ConsumerConfig,
        router: RouteTable,
        *,
        owns_client: bool,
        label: str,
        counters: Counters | None = None,
        partition: int | None = None,
        topic: str | None = None,
        fence: Fence | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.router = router
        # One partition of a partitioned topic: its messages show the topic's
        # name and the partition; the counters are the whole consumer's.
        self.counters = counters if counters is not None else Counters()
        self.partition = partition
        self.fence = fence
        self.topic = topic if topic is not None else settings.stream
        self.keys = TopicKeys(settings.stream)
        self.member = GroupMember(redis, self.keys, settings.group, settings.name)
        if settings.recreate_group:
            self.member.on_gone = self._recreate_group
        self.started = False
        self.stop_reason: StopReason | None = None
        self.error: BaseException | None = None
        self.done = anyio.Event()
        self.inflight: InFlight | None = None
        self.dispatcher: Dispatcher | None = None
        self.owns_client = owns_client
        self._label = label
        # A read's entries are leased from the moment it was sent (see
        # ``InFlight.delivered``): a read blocking past claim_idle would make
        # the workers wait for a lease refresh before starting what it brought.
        block = min(settings.block, settings.claim_idle / 2)
        self._block = block_within_socket_timeout(redis, block)
        self._services: anyio.abc.TaskGroup | None = None
        self._feed_scope: anyio.CancelScope | None = None
        self._work_scope: anyio.CancelScope | None = None
        self._control: ControlListener | None = None
        #: the XAUTOCLAIM loop, once the feed has built it.
        self.claimer: Claimer | None = None
        self.lease: LeaseKeeper | None = None
        self._watchdog_started = False

    def __str__(self) -> str:
        return self._label

    def stats(self) -> ConsumerStats:
        inflight, dispatcher = self.inflight, self.dispatcher
        return self.counters.snapshot(
            running=dispatcher.running() if dispatcher is not None else 0,
            held=len(inflight.held) if inflight is not None else 0,
        )

    # -- stopping -------------------------------------------------------------
    def request_stop(
        self, reason: StopReason, error: BaseException | None = None, *, hard: bool = False
    ) -> None:
        if self.done.is_set():
            return
        if self.stop_reason is None:
            self.stop_reason = reason
            self.error = error
        if not self.started:
            self.started = True
            self.done.set()
            return
        if self._feed_scope is not None:
            self._feed_scope.cancel()
        if self.dispatcher is not None:
            let_go = self.dispatcher.close()
            wanted = self.stop_reason in (StopReason.STOPPED, StopReason.FAILED)
            if let_go and wanted and not hard and self._services and self.lease is not None:
                # Not started, and never will be here: peers take them now
                # rather than when the running handlers are done.
                self._services.start_soon(self._hand_back_now, self.lease, let_go)
        if hard:
            if self._work_scope is not None:
                self._work_scope.cancel()
        elif self._services is not None and not self._watchdog_started:
            self._watchdog_started = True
            self._services.start_soon(self._watchdog)

    async def _watchdog(self) -> None:
        await anyio.sleep(self.settings.shutdown_timeout)
        if self._work_scope is not None and not self._work_scope.cancel_called:
            logger.warning(
                "%s: shutdown_timeout (%.1fs) passed; cancelling the handlers still running, "
                "their messages stay pending",
                self,
                self.settings.shutdown_timeout,
            )
            self._work_scope.cancel()

    # -- the loops ------------------------------------------------------------
    async def main(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        settings, redis, member = self.settings, self.redis, self.member
        in_consumer(settings.stream, settings.group, settings.name)
        dead = DeadLetterWriter(redis, self.keys, settings.group, settings.name, call=member.call)
        mover = Mover(member, notices=getattr(redis, "pubsub", None) is not None)
        self.inflight = inflight = InFlight(self._effective_prefetch())
        acker = Acker(member, inflight)
        self._control = control = ControlListener(
            redis,
            self.keys,
            on_stop=self._on_stop_message,
            on_resume=self._on_resume_message,
            on_terminate=self._on_terminate,
            on_scheduled=mover.wake,
            on_hand_back=self._on_hand_back,
        )
        batcher = Batcher(settings.batch) if self.router.batch_types else None
        dispatcher = Dispatcher(
            stream=self.topic,
            partition=self.partition,
            fence=self.fence,
            router=self.router,
            inflight=inflight,
            ack=acker.add,
            dead=dead,
            counters=self.counters,
            max_deliveries=settings.max_deliveries,
            batcher=batcher,
            is_stopped=control.is_stopped,
            max_payload_bytes=settings.max_payload_bytes,
            retry=settings.retry,
        )
        self.dispatcher = dispatcher
        started = False
        try:
            await self._create_group()
            await self.member.check_access()
            await self._fit_block_to_server()
            await mover.move_due()  # what fell due meanwhile; a refused ACL fails the start
            async with anyio.create_task_group() as services:
                await services.start(self._listen_for_control, control)
                started = True
                task_status.started()
                self._services = services
                services.start_soon(self._guard, acker.run)
                self.lease = lease = LeaseKeeper(member, inflight, interval=settings.claim_idle / 3)
                services.start_soon(self._guard, lease.run)
                recounter = Recounter(member, inflight)
                services.start_soon(self._guard, recounter.run)
                services.start_soon(self._guard, mover.run)
                services.start_soon(self._guard, dispatcher.retries.run, dispatcher.requeue)
                services.start_soon(
                    self._guard, prune_idle_consumers, member, settings.consumer_idle_timeout
                )
                if batcher is not None:
                    services.start_soon(self._guard, batcher.run, dispatcher.enqueue_batch)
                if settings.cleanup is not None and settings.cleanup.auto:
                    cleaner = AutoCleaner(redis, self.keys, settings.cleanup, settings.name)
                    services.start_soon(self._guard, cleaner.run)
                if self.stop_reason is not None:  # stopped before it got going
                    self.request_stop(self.stop_reason, self.error)
                try:
                    with anyio.CancelScope() as self._work_scope:
                        async with anyio.create_task_group() as work:
                            for _ in range(settings.concurrency):
                                work.start_soon(self._guard, dispatcher.worker)
                            work.start_soon(self._feed, dispatcher, acker)
                finally:
                    # Also when the host cancels us: what was handled gets acked.
                    await self._final_flush(acker, lease, recounter)
                self._services = None
                services.cancel_scope.cancel()
        except Exception as exc:
            if not started:
                # From __aenter__: the caller sees why it could not start, as
                # itself rather than inside the task group's exception group.
                sole = _sole(exc)
                if sole is exc:
                    raise
                raise sole from sole.__cause__
            # Never let a failure escape into the host's task group, where it
            # would cancel the code running inside ``async with consumer``.
            logger.exception("%s: unrecoverable error; stopped", self)
            self.stop_reason = self.stop_reason or StopReason.FAILED
            self.error = self.error or exc
        finally:
            if self.stop_reason is None:
                self.stop_reason = StopReason.STOPPED
            if self.owns_client and isinstance(redis, aredis.Redis):
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await redis.connection_pool.disconnect()
            logger.info("%s stopped: %s", self, self.stop_reason.value)
            self.done.set()

    async def _listen_for_control(
        self, control: ControlListener, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        """The control listener, failing like the other loops once it has
        started (before that, its error is the consumer's start-up error)."""
        try:
            await control.run(task_status=task_status)
        except Exception as exc:
            if self._services is None:
                raise  # before start-up completed
            logger.exception("%s: the control listener failed; stopping", self)
            self.request_stop(StopReason.FAILED, exc, hard=True)

    async def _fit_block_to_server(self) -> None:
        """Before Redis 7.0 a blocked XREADGROUP is not woken when its stream is
        deleted: it sits out its BLOCK. Shorter blocks there keep "stops within
        about a second" true, at about one more command per second. A server
        that does not tell its version (a proxy) is treated as an old one."""
        version = await self.member.server_version()
        if (version is None or version < (7, 0)) and self._block > PRE_7_BLOCK:
            self._block = PRE_7_BLOCK
            logger.info(
                "%s: Redis %s may not wake blocked reads on DEL; blocking %.2fs at a time",
                self,
                "of unknown version" if version is None else ".".join(map(str, version)),
                self._block,
            )

    async def _recreate_group(self, exc: BaseException) -> bool:
        """``recreate_group=True``: the group vanished under a running consumer
        (most often a Redis restart without persistence). Re-create it where
        this consumer last read, unless the topic was terminated; True when the
        failed call should be tried again."""
        control = self._control
        if self.stop_reason is not None or (
            control is not None and (control.terminated or await control.wait_terminated(0.1))
        ):
            return False
        last = self.member.last_read
        start = last.decode() if last is not None else self.settings.start_id
        if await self.member.create_group(start):
            logger.error(
                "%s: the stream or group vanished (%s): was Redis restarted without "
                "persistence? Re-created group %r at %s (recreate_group=True); entries "
                "it had pending are delivered again only if they are still in the stream",
                self,
                exc,
                self.settings.group,
                start,
            )
        return True

    async def _create_group(self) -> None:
        start, group = self.settings.start_id, self.settings.group
        if await self.member.create_group(start):
            logger.info("%s: created group %r at %r", self, group, start)
        else:
            logger.info(
                "%s: group %r exists; it keeps its position (start=%r applies to new groups only)",
                self,
                group,
                start,
            )

    def _effective_prefetch(self) -> int:
        """Room for a few full batches besides the single messages: a batch
        can only fill from what the consumer may hold. Batch handlers are there
        for throughput, so by default they also get room to read ahead."""
        settings = self.settings
        given = settings.prefetch
        prefetch = given if given is not None else max(4 * settings.concurrency, 256)
        sizes = [r.size or settings.batch.size for r in self.router.routes.values() if r.batch]
        if not sizes:
            return prefetch
        floor = 4 * max(sizes)
        if given is None:
            floor = max(floor, BATCH_PREFETCH)
        return max(prefetch, floor)

    async def _feed(self, dispatcher: Dispatcher, acker: Acker) -> None:
        """Own pending first, then claims and new entries side by side."""
        member, claim_idle = self.member, self.settings.claim_idle
        inflight, submit = dispatcher.inflight, dispatcher.submit
        with anyio.CancelScope() as self._feed_scope:
            if self.stop_reason is not None:
                return
            self.claimer = claimer = Claimer(
                member,
                inflight,
                submit,
                self.counters,
                claim_idle=claim_idle,
                interval=max(0.05, claim_idle / 2),
                flush_acks=acker.flush,
            )
            reader = Reader(
                member,
                inflight,
                submit,
                block=self._block,
                count=min(500, inflight.prefetch),
                acker=acker,
            )
            await self._guard(recover_own_pending, member, inflight, submit)
            if self.partition is not None:
                # A partition just taken over: what its last owner handed back
                # goes before anything newer, for per-key order. All of it:
                # one step claims only ``count`` entries, and the reader would
                # start newer entries of the same keys beside the rest.
                await self._guard(claimer.claim_all)
            async with anyio.create_task_group() as feeders:
                feeders.start_soon(self._guard, claimer.run)
                feeders.start_soon(self._guard, reader.run)

    async def _final_flush(self, acker: Acker, lease: LeaseKeeper, recounter: Recounter) -> None:
        """Send the last acks, then hand back what was never finished so that
        other consumers need not wait ``claim_idle`` for it."""
        problem = "the shutdown time ran out"
        limit = max(1.0, self.settings.shutdown_timeout)
        with anyio.CancelScope(shield=True), anyio.move_on_after(limit):
            try:
                await acker.flush()
                if self.stop_reason in (StopReason.STOPPED, StopReason.FAILED):
                    await recounter.flush()
                    handed = await lease.hand_back(self._hand_back_idle)
                    if handed:
                        await self._announce_hand_back(handed)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
        if acker.waiting:
            logger.warning(
                "%s: %d acknowledgements could not be sent (%s); those messages "
                "stay pending and will be delivered again",
                self,
                acker.waiting,
                problem,
            )

    @property
    def _hand_back_idle(self) -> float:
        """The idle time handed-back entries get: past any peer's ``claim_idle``."""
        return max(self.settings.claim_idle, HAND_BACK_IDLE)

    async def _hand_back_now(self, lease: LeaseKeeper, ids: list[bytes]) -> None:
        """On a graceful stop: hand back what was queued at once (the final
        hand-back covers it again, and anything this misses)."""
        with anyio.CancelScope(shield=True):
            try:
                handed = await lease.hand_back_ids(ids, self._hand_back_idle)
            except Exception as exc:
                logger.debug("%s: early hand-back failed (%r); done at the end", self, exc)
                return
            if handed:
                await self._announce_hand_back(handed)

    async def _announce_hand_back(self, handed: int) -> None:
        """Wake the group's running consumers, so that they claim what was
        handed back now instead of at their next pass. Only a hint: a refused
        or failed announcement (an ACL user without PUBLISH, say) costs peers
        that wait and nothing else, so it never fails the stop."""
        member = self.member
        try:
            await member.call(
                "hand-back notice",
                lambda: announce_hand_back(self.redis, self.keys, self.settings.group),
            )
        except Exception as exc:
            logger.warning(
                "%s: handed back %d entries but could not announce it (%s: %s); "
                "peers take them at their next claim pass, within claim_idle / 2",
                self,
                handed,
                type(exc).__name__,
                exc,
            )
        else:
            logger.info("%s: handed back %d entries to the group", self, handed)

    async def _guard(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run a loop; turn its failure into a stop with the right reason."""
        try:
            await fn(*args)
        except TopicGoneError as exc:
            # A terminate notification and the error it causes come on two
            # connections in the same server tick; 0.1 s covers the gap.
            terminated = self._control is not None and (
                self._control.terminated or await self._control.wait_terminated(0.1)
            )
            reason = StopReason.TERMINATED if terminated else StopReason.DELETED
            if self.stop_reason is None and terminated:
                logger.warning("%s: %s; stopping (%s)", self, exc.detail, reason.value)
            elif self.stop_reason is None:
                logger.error(
                    "%s: %s; stopping (%s). The stream or group %r is gone: deleted by "
                    "someone, or Redis restarted without persistence (check its appendonly/"
                    "save settings). Publishes to the stream now reach no consumer of this "
                    "group; pass recreate_group=True to re-create it in that case.",
                    self,
                    exc.detail,
                    reason.value,
                    self.settings.group,
                )
            self.request_stop(reason, exc, hard=True)
        except Exception as exc:
            logger.exception("%s: unrecoverable error; stopping", self)
            self.request_stop(StopReason.FAILED, exc, hard=True)

    # -- control notifications -----------------------------------------------
    def _on_stop_message(self, entry_id: str) -> None:
        if self.dispatcher is not None and self.dispatcher.stop_running(entry_id):
            logger.info("%s: cancelled the handler of stopped message %s", self, entry_id)

    def _on_resume_message(self, entry_id: str) -> None:
        if self.dispatcher is not None:
            self.dispatcher.resume(entry_id)

    def _on_hand_back(self, group: str) -> None:
        """A peer of some group handed entries back: if it is ours and this
        consumer is running, claim them now. A stopping consumer claims
        nothing (its own notice comes back to it too)."""
        if group != self.settings.group or self.stop_reason is not None:
            return
        if self.claimer is not None:
            self.claimer.wake()

    def _on_terminate(self) -> None:
        logger.warning("%s: topic terminated; stopping", self)
        self.request_stop(StopReason.TERMINATED, hard=True)


def _sole(exc: Exception) -> Exception:
    """The one exception inside (nested) exception groups, else ``exc``."""
    while True:
        inner = getattr(exc, "exceptions", None)  # an (Base)ExceptionGroup
        if not isinstance(inner, tuple) or len(inner) != 1 or not isinstance(inner[0], Exception):
            return exc
        exc = inner[0]
