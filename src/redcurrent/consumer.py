"""StreamConsumer: one member of a consumer group, with its loops.

Data path, top to bottom: ``_claim`` (own pending, then XAUTOCLAIM) and
``_read`` (XREADGROUP ``>``) feed the ``_dispatch`` worker pool, which runs
handlers and hands ids to ``_ack`` or to the dead letters; ``_lease`` keeps
held entries from being claimed by others meanwhile. All loops run in one
anyio task group; every Redis call goes through :meth:`GroupMember.call`,
which retries transient faults and turns a vanished stream into a stop.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import secrets
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc
import redis.asyncio as aredis

from ._ack import Acker
from ._batch import BatchConfig, Batcher
from ._claim import Claimer, recover_own_pending
from ._dead import DeadLetterWriter
from ._dispatch import Counters, Dispatcher
from ._housekeeping import prune_idle_consumers
from ._lease import LeaseKeeper, Recounter
from ._member import GroupMember
from ._read import Reader
from ._redis import AnyRedis, bytes_client
from ._routes import BatchHandlerObject, HandlerObject, Router
from .cleanup import AutoCleaner, CleanupPolicy
from .control import ControlListener
from .errors import ConfigurationError, ConsumerStateError, TopicGoneError
from .keys import TopicKeys
from .message import ConsumerStats, StartFrom, StopReason
from .topic import Topic

__all__ = ["StreamConsumer"]

logger = logging.getLogger("redcurrent.consumer")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
R = TypeVar("R")

_ID = re.compile(r"^\d+(-\d+)?$")


def default_consumer_name() -> str:
    """Unique per process, readable in XINFO: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class StreamConsumer:
    """Consume one stream as one member of a consumer group.

    Semantics (at-least-once): a message leaves the group's pending list only
    when its handler finished without error, or when it is moved to the
    topic's dead-letter stream with the reason. Durations are float seconds.

    - ``start``: where a *new* group starts (an existing one keeps its
      position): :attr:`StartFrom.LATEST` (default), :attr:`StartFrom.EARLIEST`
      or an entry id (delivery starts after it).
    - ``claim_idle`` (30 s): entries left idle this long by any consumer are
      taken over; a failed message is retried after it. Running and waiting
      messages are leased, so slow handlers are not robbed.
    - ``concurrency`` (16): the most handlers running at once.
    - ``max_deliveries`` (5): deliveries before a failing message becomes a
      dead letter.
    - ``prefetch`` (``max(4 * concurrency, 256)``; with batch handlers at
      least ``max(4 * largest batch, 1024)``): the most entries held in memory
      (running plus waiting); bounds memory and how much one consumer takes
      from its peers.
    - ``batch``: defaults for batch handlers (:class:`BatchConfig`).
    - ``cleanup``: a :class:`CleanupPolicy` with ``auto=True`` makes this
      consumer take part in trimming processed entries.
    - ``shutdown_timeout`` (10 s): how long a graceful stop waits for the
      messages in hand before cancelling them (they stay pending).
    - ``block`` (5 s): how long one XREADGROUP waits for new entries; an idle
      consumer sends about one command per ``block``.
    - ``consumer_idle_timeout`` (1 h): other consumers of the group idle this
      long and holding nothing are deleted from the group.
    """

    def __init__(
        self,
        redis: AnyRedis,
        stream: str,
        group: str,
        name: str | None = None,
        *,
        start: StartFrom | str = StartFrom.LATEST,
        claim_idle: float = 30.0,
        concurrency: int = 16,
        max_deliveries: int = 5,
        prefetch: int | None = None,
        batch: BatchConfig | None = None,
        cleanup: CleanupPolicy | None = None,
        shutdown_timeout: float = 10.0,
        block: float = 5.0,
        consumer_idle_timeout: float = 3600.0,
    ) -> None:
        if not stream or not group:
            raise ConfigurationError("stream and group must be non-empty")
        if not isinstance(start, StartFrom) and not _ID.match(str(start)):
            raise ConfigurationError(
                f"start must be StartFrom.LATEST, StartFrom.EARLIEST or an entry id, got {start!r}"
            )
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, got {concurrency}")
        if max_deliveries < 1:
            raise ConfigurationError(f"max_deliveries must be >= 1, got {max_deliveries}")
        if not claim_idle > 0 or not block > 0 or shutdown_timeout < 0:
            raise ConfigurationError("claim_idle and block must be > 0, shutdown_timeout >= 0")
        if prefetch is not None and prefetch < concurrency:
            raise ConfigurationError(
                f"prefetch ({prefetch}) must be >= concurrency ({concurrency})"
            )
        self._redis = bytes_client(redis)
        #: a sibling client made for a decode_responses one: ours to close.
        self._owns_client = self._redis is not redis
        self.stream = stream
        self.group = group
        self.name = name or default_consumer_name()
        self.keys = TopicKeys(stream)
        self.start = start
        self.claim_idle = claim_idle
        self.concurrency = concurrency
        self.max_deliveries = max_deliveries
        self.prefetch = prefetch or max(4 * concurrency, 256)
        self._prefetch_given = prefetch is not None
        self.batch = batch or BatchConfig()
        self.cleanup = cleanup
        self.shutdown_timeout = shutdown_timeout
        self.block = _block_within_socket_timeout(self._redis, block)
        self._block = self.block
        self.consumer_idle_timeout = consumer_idle_timeout
        self._router = Router()
        self._counters = Counters()
        self._member = GroupMember(self._redis, self.keys, group, self.name)
        self._started = False
        self._stop_reason: StopReason | None = None
        self._error: BaseException | None = None
        self._done = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._services: anyio.abc.TaskGroup | None = None
        self._feed_scope: anyio.CancelScope | None = None
        self._work_scope: anyio.CancelScope | None = None
        self._dispatcher: Dispatcher | None = None
        self._batcher: Batcher | None = None
        self._control: ControlListener | None = None
        self._acker: Acker | None = None
        self._watchdog_started = False

    def __repr__(self) -> str:
        return f"StreamConsumer({self.stream!r}, group={self.group!r}, name={self.name!r})"

    # -- registration -------------------------------------------------------
    def handler(self, message_type: str, model: type[Any] | None = None) -> Callable[[F], F]:
        """Register ``async def fn(msg: Message) -> None`` for a type (``"*"``:
        every type without a handler of its own). With ``model``, ``msg.data``
        is decoded and validated into that type; entries that do not fit
        become dead letters."""

        def register(fn: F) -> F:
            self._check_not_started()
            self._router.add(message_type, fn, model)
            return fn

        return register

    def batch_handler(
        self,
        message_type: str,
        size: int | None = None,
        timeout: float | None = None,
        model: type[Any] | None = None,
    ) -> Callable[[F], F]:
        """Register ``async def fn(msgs: list[Message]) -> None`` for a type.

        It gets up to ``size`` messages (default: ``BatchConfig.size``), or
        fewer once the oldest waited ``timeout`` seconds. Raise
        :class:`BatchError` naming failed ids to acknowledge the others.
        """

        def register(fn: F) -> F:
            self._check_not_started()
            self._router.add(message_type, fn, model, batch=True, size=size, timeout=timeout)
            return fn

        return register

    def register(self, obj: HandlerObject, model: type[Any] | None = None) -> None:
        """Register an object with ``message_type`` and ``async handle(msg)``."""
        self._check_not_started()
        self._router.add(obj.message_type, obj.handle, model)

    def register_batch(self, obj: BatchHandlerObject, model: type[Any] | None = None) -> None:
        """Register an object with ``message_type``, ``batch_size`` (0: the
        consumer's default) and ``async handle_batch(msgs)``."""
        self._check_not_started()
        size = obj.batch_size or None
        self._router.add(obj.message_type, obj.handle_batch, model, batch=True, size=size)

    def _check_not_started(self) -> None:
        if self._started:
            raise ConsumerStateError("handlers must be registered before the consumer starts")

    # -- state ----------------------------------------------------------------
    @property
    def stop_reason(self) -> StopReason | None:
        """None while running; why it stopped afterwards."""
        return self._stop_reason if self._done.is_set() else None

    @property
    def auto_stopped(self) -> bool:
        """True when the consumer stopped because its topic was terminated or deleted."""
        return self.stop_reason in (StopReason.TERMINATED, StopReason.DELETED)

    @property
    def error(self) -> BaseException | None:
        """The exception behind :attr:`StopReason.FAILED`."""
        return self._error

    @property
    def stats(self) -> ConsumerStats:
        held = len(self._dispatcher.held) if self._dispatcher else 0
        return self._counters.snapshot(held)

    async def done(self) -> StopReason:
        """Wait until the loops have exited and acks are flushed; awaitable by
        any number of tasks, any number of times."""
        await self._done.wait()
        assert self._stop_reason is not None
        return self._stop_reason

    # -- lifecycle ------------------------------------------------------------
    async def __aenter__(self) -> StreamConsumer:
        if self._started:
            raise ConsumerStateError(f"{self!r} was already started; create a new consumer")
        if not self._router:
            raise ConfigurationError(f"{self!r} has no handlers")
        self._started = True
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            await tg.start(self._main)
        except BaseException:
            # The start-up error itself is what the caller should see, not
            # the task group's wrapping of it.
            tg.cancel_scope.cancel()
            with contextlib.suppress(BaseException):
                await tg.__aexit__(None, None, None)
            raise
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        self.request_stop()
        if exc_type is None or not isinstance(exc, anyio.get_cancelled_exc_class()):
            with anyio.CancelScope(shield=True):
                await self._done.wait()
            await self._tg.__aexit__(None, None, None)
            return None
        return await self._tg.__aexit__(exc_type, exc, tb)

    async def run(self) -> StopReason:
        """Run until stopped (or the topic goes away); returns the reason."""
        async with self:
            await self._done.wait()
        return await self.done()

    async def stop(self) -> StopReason:
        """Stop gracefully and wait until done. From inside a handler use
        :meth:`request_stop`, which does not wait for the handler itself."""
        self.request_stop()
        if not self._started:
            return StopReason.STOPPED
        return await self.done()

    def request_stop(
        self,
        reason: StopReason = StopReason.STOPPED,
        error: BaseException | None = None,
        *,
        hard: bool = False,
    ) -> None:
        """Ask the consumer to stop; returns at once. ``hard`` cancels running
        handlers now instead of giving them ``shutdown_timeout``."""
        if self._done.is_set():
            return
        if self._stop_reason is None:
            self._stop_reason = reason
            self._error = error
        if not self._started:
            self._started = True
            self._stop_reason = self._stop_reason or reason
            self._done.set()
            return
        if self._feed_scope is not None:
            self._feed_scope.cancel()
        if self._dispatcher is not None:
            self._dispatcher.close()
        if self._batcher is not None:
            self._batcher.flush_all()
        if hard:
            if self._work_scope is not None:
                self._work_scope.cancel()
        elif self._services is not None and not self._watchdog_started:
            self._watchdog_started = True
            self._services.start_soon(self._watchdog)

    async def _watchdog(self) -> None:
        await anyio.sleep(self.shutdown_timeout)
        if self._work_scope is not None and not self._work_scope.cancel_called:
            logger.warning(
                "%s: shutdown_timeout (%.1fs) passed; cancelling the handlers still running, "
                "their messages stay pending",
                self,
                self.shutdown_timeout,
            )
            self._work_scope.cancel()

    # -- the loops ------------------------------------------------------------
    async def _main(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        redis = self._redis
        member = self._member
        dead = DeadLetterWriter(redis, self.keys, self.group, self.name, call=member.call)
        self._acker = acker = Acker(member)
        self._control = control = ControlListener(
            redis,
            self.keys,
            on_stop=self._on_stop_message,
            on_resume=self._on_resume_message,
            on_terminate=self._on_terminate,
        )
        dispatcher = Dispatcher(
            stream=self.stream,
            router=self._router,
            ack=acker.add,
            dead=dead,
            counters=self._counters,
            max_deliveries=self.max_deliveries,
            batcher=None,
            is_stopped=control.is_stopped,
            prefetch=self._effective_prefetch(),
        )
        if self._router.batch_types:
            self._batcher = Batcher(self.batch, dispatcher.enqueue_batch)
            dispatcher.batcher = self._batcher
        self._dispatcher = dispatcher
        started = False
        try:
            await self._create_group()
            await self._fit_block_to_server()
            async with anyio.create_task_group() as services:
                await services.start(self._listen_for_control, control)
                started = True
                task_status.started()
                self._services = services
                services.start_soon(self._guard, acker.run)
                lease = LeaseKeeper(member, dispatcher, interval=self.claim_idle / 3)
                services.start_soon(self._guard, lease.run)
                recounter = Recounter(member, dispatcher)
                services.start_soon(self._guard, recounter.run)
                services.start_soon(
                    self._guard, prune_idle_consumers, member, self.consumer_idle_timeout
                )
                if self._batcher is not None:
                    services.start_soon(self._guard, self._batcher.run)
                if self.cleanup is not None and self.cleanup.auto:
                    cleaner = AutoCleaner(Topic(redis, self.stream), self.cleanup, self.name)
                    services.start_soon(self._guard, cleaner.run)
                if self._stop_reason is not None:  # stopped before it got going
                    self.request_stop(self._stop_reason, self._error)
                try:
                    with anyio.CancelScope() as self._work_scope:
                        async with anyio.create_task_group() as work:
                            for _ in range(self.concurrency):
                                work.start_soon(self._guard, dispatcher.worker)
                            work.start_soon(self._feed, dispatcher)
                finally:
                    # Also when the host cancels us: what was handled gets acked.
                    await self._final_flush(acker, lease, recounter)
                self._services = None
                services.cancel_scope.cancel()
        except Exception as exc:
            if not started:
                raise  # from __aenter__: the caller sees why it could not start
            # Never let a failure escape into the host's task group, where it
            # would cancel the code running inside ``async with consumer``.
            logger.exception("%s: unrecoverable error; stopped", self)
            self._stop_reason = self._stop_reason or StopReason.FAILED
            self._error = self._error or exc
        finally:
            if self._stop_reason is None:
                self._stop_reason = StopReason.STOPPED
            if self._owns_client and isinstance(self._redis, aredis.Redis):
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await self._redis.connection_pool.disconnect()
            logger.info("%s stopped: %s", self, self._stop_reason.value)
            self._done.set()

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
        about a second" true, at about one more command per second."""
        self._block = self.block
        version = await self._member.server_version()
        if version is not None and version < (7, 0):
            self._block = min(self.block, _PRE_7_BLOCK)
            if self._block < self.block:
                logger.info(
                    "%s: Redis %s does not wake blocked reads on DEL; blocking %.2fs at a time",
                    self,
                    ".".join(map(str, version)),
                    self._block,
                )

    async def _create_group(self) -> None:
        start = self.start.value if isinstance(self.start, StartFrom) else str(self.start)
        if await self._member.create_group(start):
            logger.info("%s: created group %r at %r", self, self.group, start)
        else:
            logger.info(
                "%s: group %r exists; it keeps its position (start=%r applies to new groups only)",
                self,
                self.group,
                start,
            )

    def _effective_prefetch(self) -> int:
        """Room for a few full batches besides the single messages: a batch
        can only fill from what the consumer may hold. Batch handlers are there
        for throughput, so by default they also get room to read ahead."""
        sizes = [r.size or self.batch.size for r in self._router.routes.values() if r.batch]
        if not sizes:
            return self.prefetch
        floor = 4 * max(sizes)
        if not self._prefetch_given:
            floor = max(floor, _BATCH_PREFETCH)
        return max(self.prefetch, floor)

    async def _feed(self, dispatcher: Dispatcher) -> None:
        """Own pending first, then claims and new entries side by side."""
        member = self._member
        with anyio.CancelScope() as self._feed_scope:
            if self._stop_reason is not None:
                return
            claimer = Claimer(
                member,
                dispatcher,
                claim_idle=self.claim_idle,
                interval=max(0.05, self.claim_idle / 2),
            )
            reader = Reader(
                member, dispatcher, block=self._block, count=min(500, dispatcher.prefetch)
            )
            await self._guard(recover_own_pending, member, dispatcher)
            async with anyio.create_task_group() as feeders:
                feeders.start_soon(self._guard, claimer.run)
                feeders.start_soon(self._guard, reader.run)

    async def _final_flush(self, acker: Acker, lease: LeaseKeeper, recounter: Recounter) -> None:
        """Send the last acks, then hand back what was never finished so that
        other consumers need not wait ``claim_idle`` for it."""
        problem = "the shutdown time ran out"
        with anyio.CancelScope(shield=True), anyio.move_on_after(max(1.0, self.shutdown_timeout)):
            try:
                await acker.flush()
                if self._stop_reason is StopReason.STOPPED:
                    await recounter.flush()
                    await lease.hand_back(self.claim_idle)
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
            if self._stop_reason is None:
                logger.warning("%s: %s; stopping (%s)", self, exc.detail, reason.value)
            self.request_stop(reason, exc, hard=True)
        except Exception as exc:
            logger.exception("%s: unrecoverable error; stopping", self)
            self.request_stop(StopReason.FAILED, exc, hard=True)

    # -- control notifications -----------------------------------------------
    def _on_stop_message(self, entry_id: str) -> None:
        if self._dispatcher is not None and self._dispatcher.stop_running(entry_id):
            logger.info("%s: cancelled the handler of stopped message %s", self, entry_id)

    def _on_resume_message(self, entry_id: str) -> None:
        if self._dispatcher is not None:
            self._dispatcher.resume(entry_id)

    def _on_terminate(self) -> None:
        logger.warning("%s: topic terminated; stopping", self)
        self.request_stop(StopReason.TERMINATED, hard=True)


_UNSET = object()
_PRE_7_BLOCK = 0.6
_BATCH_PREFETCH = 1024


def _block_within_socket_timeout(redis: AnyRedis, block: float) -> float:
    """A blocking read must return before the client's socket timeout fires.

    redis-py >= 6 gives connections a 5 s socket timeout by default without
    writing it into the pool's ``connection_kwargs`` when the client comes
    from ``from_url``, so the class default is consulted too.
    """
    pool = getattr(redis, "connection_pool", None)
    if pool is None:
        return block
    kwargs = pool.connection_kwargs
    timeout = kwargs.get("socket_timeout", kwargs.get("orig_socket_timeout", _UNSET))
    if timeout is _UNSET:
        timeout = None
        for cls in pool.connection_class.__mro__:
            parameter = inspect.signature(cls.__init__).parameters.get("socket_timeout")
            if parameter is not None:
                timeout = parameter.default
                break
    if isinstance(timeout, int | float) and timeout > 0:
        return min(block, max(0.05, float(timeout) * 0.8))
    return block
