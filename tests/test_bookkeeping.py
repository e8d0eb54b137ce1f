"""Property-based test of a consumer's in-memory bookkeeping (issue 13).

A hypothesis state machine drives a real :class:`~redcurrent._dispatch.Dispatcher` and
its :class:`~redcurrent._inflight.InFlight` state, wired as ``Runtime.main`` wires them,
with a real :class:`Reader`, :class:`Claimer`,
:class:`Acker`, :class:`DeadLetterWriter`, :class:`LeaseKeeper` and :class:`Recounter`
on a real Redis: one stream of 24 entries and one group of its own per example. The
event loop runs in a blocking portal; after every rule the test waits until the loop is
quiet (every worker idle or in a handler that waits for the test, the reader waiting
for its next turn or for room), so every step is deterministic.

Rules: a turn of the reader loop (reserve -> the acks it carries -> XREADGROUP ->
submit -> unreserve); some pending entries going idle for ``claim_idle`` and a step of
the claimer (XAUTOCLAIM through a reservation); a handler finishing (success, failure,
part of a batch failing, or its own ``CancelledError``); failed messages kept for
their retry (a :class:`RetryPolicy` in half the examples) coming due; a message stopped (the
stopped-set predicate plus ``stop_running``) or resumed; another consumer taking
entries over and a lease refresh finding out (``lose``); the acker sending its XACKs;
the batch timeout passing; shutdown (``close()``, then the drain) and the shutdown
timeout cutting the drain short. Handlers never finish on their own.

Invariants, after every step:

- a message is acknowledged only after its handler finished without error, once;
  dead-lettered only after its last allowed delivery failed (or it came in over
  ``max_deliveries``), once; never both;
- a handler runs only for an entry the consumer holds, not stopped, not already running;
- a failed message waiting for its retry is held, neither parked, queued nor running,
  pending for this consumer with the count of the delivery that failed; at most half
  of ``prefetch`` waits, and the room a read waits for leaves them out;
- ``active`` (held minus parked), and with it the acknowledgements not sent yet, never
  exceed ``prefetch``, except by messages resumed while held (a resume puts a parked
  message back at once, whatever the room) and by the late ack of an entry lost while
  its handler ran (its room was given back when it was lost);
- nothing is held for ever: every held entry is parked, queued, in an open batch or
  running; everything queued, batched or running is held (or known lost); no lost id
  lingers; a read or claim waiting for room never waits while half the room is free;
  ``reserved`` is 0 whenever no read or claim is in flight;
- the server agrees: nothing acknowledged or dead-lettered is pending, everything held
  is pending, and an entry pending for this consumer that it does not hold is one whose
  handler failed (pending for a retry) or whose XACK waits; the counters match what
  handlers did.

After shutdown and the drain, every entry is exactly one of: acknowledged,
dead-lettered, parked, held (to be handed back), lost to the other consumer, pending
for a retry, or never delivered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import math
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
import anyio.from_thread
import pytest
import redis.asyncio as aredis
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from redcurrent import Message, RetryPolicy
from redcurrent._ack import Acker
from redcurrent._batch import Batch, BatchConfig, Batcher
from redcurrent._claim import Claimer
from redcurrent._codec import encode_fields
from redcurrent._dead import DeadLetterWriter
from redcurrent._dispatch import Counters, Dispatcher
from redcurrent._handlers import handler_spec
from redcurrent._inflight import InFlight
from redcurrent._keys import TopicKeys
from redcurrent._lease import LeaseKeeper
from redcurrent._member import GroupMember
from redcurrent._read import Reader
from redcurrent._recount import Recounter
from redcurrent._routes import RouteTable
from redcurrent.errors import BatchError

GROUP = "g"
ME = "me"
OTHER = "other"
#: entries in each example's stream; every third is of the batch type.
ENTRIES = 24
BATCH_SIZE = 3
OUTCOMES = ("ok", "fail", "cancel", "partial")
#: indices into the entries a rule may act on (taken modulo their number).
PICKS = st.lists(st.integers(0, 63), min_size=1, max_size=4)
#: rules before a shutdown may come, so that most runs build up some state first.
WARM_UP = 15
#: the consumer's claim_idle (ms); the claim rule makes chosen entries twice as idle.
CLAIM_IDLE_MS = 3_600_000
#: seconds after which a call on the loop counts as hung (a deadlock, not slowness).
HANG = 30

SETTINGS = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    report_multiple_bugs=False,
    # No "explain" phase: it re-runs failing cases to name covered lines, at a
    # real server's pace; the shrunk sequence of rules is the explanation.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class HandlerFailure(Exception):
    """What a handler told to fail raises."""


@dataclass(eq=False)
class Call:
    """One handler call, waiting for a rule to say how it ends."""

    ids: list[bytes]
    counts: list[int]
    event: anyio.Event
    outcome: str = ""
    failed: frozenset[bytes] = frozenset()
    released: bool = False


@dataclass(eq=False)
class Feeder:
    """The read loop, or a claim step: waits for a turn, then for room, then
    talks to Redis."""

    kind: str
    turns: int = 0
    #: "starting", "idle" (waiting for a turn), "reserving" (for room), "io"
    phase: str = "starting"
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    turn: anyio.Event = field(default_factory=anyio.Event)


class WatchedAcker(Acker):
    """The acker, telling the test which ids the reader takes to send itself."""

    def __init__(
        self, member: GroupMember, inflight: InFlight, on_take: Callable[[list[bytes]], None]
    ) -> None:
        super().__init__(member, inflight)
        self.on_take = on_take

    def take(self) -> list[bytes]:
        ids = super().take()
        self.on_take(ids)
        return ids


def _id_key(raw: bytes) -> tuple[int, ...]:
    return tuple(int(part) for part in raw.split(b"-"))


class BookkeepingMachine(RuleBasedStateMachine):
    portal: ClassVar[anyio.from_thread.BlockingPortal]
    redis: ClassVar[aredis.Redis]

    def __init__(self) -> None:
        super().__init__()
        self.ready = False
        self.broken = False
        self.steps = 0
        self.ids: list[bytes] = []
        self.calls: list[Call] = []
        self.feeders: dict[str, Feeder] = {}
        self.stopped: set[bytes] = set()
        self.errors: list[BaseException] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.violations: list[str] = []
        # What handlers did and what the dispatcher did about it.
        self.successes: Counter[bytes] = Counter()
        self.taken_over: set[bytes] = set()
        self.failures: list[tuple[bytes, int, str]] = []
        self.acks: Counter[bytes] = Counter()
        #: acknowledged by the dispatcher, XACK not sent yet (the acker's batch).
        self.unsent: list[bytes] = []
        #: acknowledged after another consumer took it over (its room was given back).
        self.stale_acks: set[bytes] = set()
        self.delivered: set[bytes] = set()
        #: the last thing that happened to an entry here: delivered, ok, fail, interrupted
        self.last: dict[bytes, str] = {}
        #: entries put back by a resume while held (they may exceed prefetch).
        self.resumed: set[bytes] = set()
        #: entries resumed after close(): dropped from parked, left held for hand-back.
        self.dropped: set[bytes] = set()
        #: ids queued or batched when the stop came: let go, still pending.
        self.let_go: set[bytes] = set()
        self.closing = False
        self.hard = False
        self.workers_done = False
        # The server's view, read after every step.
        self.pel: dict[bytes, tuple[bytes, int]] = {}
        self.dead: list[tuple[bytes, str, int]] = []

    # -- running things on the loop ------------------------------------------------
    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the loop; a hang fails with the stacks of every task."""
        future = self.portal.start_task_soon(fn, *args)
        try:
            future.result(timeout=HANG)
        except concurrent.futures.TimeoutError:
            stacks = self.portal.call(_task_stacks)
            future.cancel()
            raise AssertionError(f"hung for {HANG}s; tasks:\n{stacks}") from None

    def _step(self, fn: Callable[[], Awaitable[None] | None]) -> None:
        self.steps += 1
        try:
            self._call(self._run_and_settle, fn)
        except BaseException:
            self.broken = True
            raise

    async def _run_and_settle(self, fn: Callable[[], Awaitable[None] | None]) -> None:
        result = fn()
        if result is not None:
            await result
        await self._settle()

    def _quiet(self) -> bool:
        d, inf = self.d, self.inflight
        if self.errors:
            return True  # reported by the invariant
        if self.hard and not self.workers_done:
            return False
        if not self.closing and not self.workers_done and len(d.slots) != self.concurrency:
            return False  # still starting
        if any(c.released for c in self.calls):
            return False  # a handler was let go and has not run yet
        busy = 0
        for slot in d.slots:
            if slot.current is None:
                if d.queue or d.closing:
                    return False  # about to take the next item, or to exit
                continue
            if not slot.in_handler or slot.scope.cancel_called:
                return False  # screening, acking, burying, or being stopped
            busy += 1
        if busy != len(self.calls):
            return False
        reserving = 0
        for feeder in self.feeders.values():
            if feeder.phase == "idle" and not feeder.turn.is_set():
                continue
            if feeder.phase != "reserving":
                return False
            reserving += 1
        return not reserving or inf.waiting_for_space() >= reserving

    def _taken(self, ids: list[bytes]) -> None:
        for raw in ids:
            self.unsent.remove(raw)  # sent ahead of the reader's XREADGROUP

    async def _settle(self) -> None:
        spins = 0
        with anyio.move_on_after(10) as scope:
            while not self._quiet():
                await anyio.sleep(0 if spins < 100 else 0.001)
                spins += 1
        if scope.cancelled_caught:
            raise AssertionError(f"the consumer never settled: {self._describe()}")
        await self.recounter.flush()
        rows = await self.redis.xpending_range(self.stream, GROUP, "-", "+", 10 * ENTRIES)
        self.pel = {r["message_id"]: (r["consumer"], int(r["times_delivered"])) for r in rows}
        letters = await self.redis.xrange(self.keys.dead_letters)
        self.dead = [
            (f[b"dlq:original_id"], f[b"dlq:error_type"].decode(), int(f[b"dlq:delivery_count"]))
            for _, f in letters
        ]

    def _describe(self) -> str:
        d, inf = self.d, self.inflight
        slots = [
            (s.current if isinstance(s.current, tuple | type(None)) else "batch", s.in_handler)
            for s in d.slots
        ]
        return (
            f"slots={slots} queue={len(d.queue)} calls={len(self.calls)} "
            f"feeders={[(f.kind, f.phase) for f in self.feeders.values()]} "
            f"held={len(inf.held)} parked={len(inf.parked)} reserved={inf.reserved} "
            f"waiting for room={inf.waiting_for_space()}"
        )

    # -- set-up ----------------------------------------------------------------------
    @initialize(
        prefetch=st.integers(1, 8),
        concurrency=st.sampled_from([1, 2, 4]),
        max_deliveries=st.integers(1, 3),
        read_count=st.integers(1, 8),
        retry=st.booleans(),
    )
    def setup(
        self, prefetch: int, concurrency: int, max_deliveries: int, read_count: int, retry: bool
    ) -> None:
        # Retries never come due by the clock: the retry_due rule is the clock.
        self.retry = RetryPolicy(delay=3600, jitter=0) if retry else None
        self.prefetch = prefetch
        self.read_count = read_count
        self.concurrency = concurrency
        self.max_deliveries = max_deliveries
        self.stream = f"bookkeeping-{uuid.uuid4().hex}"
        self.keys = TopicKeys(self.stream)
        self._step(self._setup)
        self.ready = True

    async def _setup(self) -> None:
        redis = self.redis
        await redis.xgroup_create(self.stream, GROUP, "0", mkstream=True)
        for n in range(ENTRIES):
            kind = "many" if n % 3 == 2 else "one"
            fields = encode_fields(kind, {"n": n}, None)
            # The same ids in every example: replays iterate sets of ids alike.
            entry_id = f"1-{n + 1}"
            self.ids.append(await redis.execute_command("XADD", self.stream, entry_id, *fields))
        router = RouteTable()
        router.include(handler_spec("one", self._handle_one))
        router.include(handler_spec("many", self._handle_many, batch=True, size=BATCH_SIZE))
        self.member = member = GroupMember(redis, self.keys, GROUP, ME)
        # No timed waits: every step must be deterministic.
        self.inflight = inflight = InFlight(self.prefetch, batch_wait=0)
        self.acker = acker = WatchedAcker(member, inflight, self._taken)

        def ack(raw_id: bytes) -> None:
            self.acks[raw_id] += 1
            if raw_id not in inflight.held:
                self.stale_acks.add(raw_id)  # settled after it was lost
            self.unsent.append(raw_id)
            acker.add(raw_id)

        # The batch timeout is the "clock passes" rule, never the wall clock.
        self.batcher = Batcher(BatchConfig(size=BATCH_SIZE, timeout=3600))
        self.d = d = Dispatcher(
            stream=self.stream,
            router=router,
            inflight=inflight,
            ack=ack,
            dead=DeadLetterWriter(redis, self.keys, GROUP, ME, call=member.call),
            counters=Counters(),
            max_deliveries=self.max_deliveries,
            retry=self.retry,
            batcher=self.batcher,
            is_stopped=lambda entry_id: entry_id.encode() in self.stopped,
        )
        # Wired as Runtime.main wires them. The acker's timer is the send_acks rule.
        self._instrument(d, inflight)
        reader = Reader(member, inflight, d.submit, block=0.001, count=self.read_count, acker=acker)
        self.claimer = Claimer(
            member,
            inflight,
            d.submit,
            d.counters,
            claim_idle=CLAIM_IDLE_MS / 1000,
            interval=CLAIM_IDLE_MS / 2000,
            count=4,
            flush_acks=self._send_acks,  # as Runtime wires it: acker.flush
        )
        self.lease = LeaseKeeper(member, inflight, interval=3600)
        self.recounter = Recounter(member, inflight)
        self.work_scope = anyio.CancelScope()
        self._spawn(self._run_workers())
        self._feed("reader", reader.run)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Start a task on the loop (we are on it: the portal cannot start it)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run_workers(self) -> None:
        try:
            with self.work_scope:
                async with anyio.create_task_group() as tg:
                    for _ in range(self.concurrency):
                        tg.start_soon(self.d.worker)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.workers_done = True

    # -- handlers --------------------------------------------------------------------
    async def _handle_one(self, msg: Message[Any]) -> None:
        await self._handle([msg], batch=False)

    async def _handle_many(self, msgs: list[Message[Any]]) -> None:
        await self._handle(msgs, batch=True)

    async def _handle(self, msgs: list[Message[Any]], *, batch: bool) -> None:
        ids = [m.id.encode() for m in msgs]
        running = {i for c in self.calls for i in c.ids}
        for raw in ids:
            if raw in self.stopped:
                self.violations.append(f"handler ran for stopped message {raw!r}")
            if raw not in self.inflight.held:
                self.violations.append(f"handler ran for {raw!r}, which is not held")
            if raw in running:
                self.violations.append(f"two handlers ran {raw!r} at once")
        call = Call(ids, [m.delivery_count for m in msgs], anyio.Event())
        self.calls.append(call)
        try:
            await call.event.wait()
        except BaseException:
            for raw in ids:
                self.last[raw] = "interrupted"
            raise
        finally:
            self.calls.remove(call)
        # A single-message handler raising BatchError simply failed.
        whole = call.outcome in ("fail", "cancel") or (call.outcome == "partial" and not batch)
        failed = set(ids) if whole else set(call.failed)
        error = {"fail": "HandlerFailure", "cancel": "CancelledError"}.get(call.outcome)
        for raw, count in zip(ids, call.counts, strict=True):
            if raw in failed:
                self.failures.append((raw, count, error or "BatchError"))
                self.last[raw] = "fail"
            else:
                self.successes[raw] += 1
                self.last[raw] = "ok"
        if call.outcome == "fail":
            raise HandlerFailure("told to fail")
        if call.outcome == "cancel":
            raise asyncio.CancelledError  # by itself: nobody cancelled this task
        if call.outcome == "partial":
            raise BatchError([raw.decode() for raw in failed])

    # -- intake ----------------------------------------------------------------------
    def _instrument(self, d: Dispatcher, inflight: InFlight) -> None:
        """Watch the intake without changing what it does: which entries arrive
        fresh, which acknowledgements the reader sends with its read, and whether a
        read or claim waits for its turn (a rule), for room, or talks to Redis."""
        submit, reserve = d.submit, inflight.reserve

        def watched_submit(
            entries: list[tuple[bytes, dict[bytes, bytes]]],
            counts: dict[bytes, int] | None = None,
        ) -> None:
            fresh = [raw for raw, _ in entries if raw not in inflight.held]
            submit(entries, counts)
            for raw in fresh:
                self.delivered.add(raw)
                self.last[raw] = "delivered"

        async def watched_reserve(want: int, *, reader: bool = False) -> int:
            feeder = self.feeders["reader" if reader else "claimer"]
            while not feeder.turns:
                feeder.phase = "idle"
                feeder.turn = anyio.Event()
                await feeder.turn.wait()
            feeder.turns -= 1
            feeder.phase = "reserving"
            try:
                return await reserve(want, reader=reader)
            finally:
                feeder.phase = "io"

        d.submit = watched_submit  # type: ignore[method-assign]
        inflight.reserve = watched_reserve  # type: ignore[method-assign]

    def _feed(self, kind: str, loop: Callable[[], Awaitable[Any]], turns: int = 0) -> None:
        """Run a read or claim loop; it waits at each ``reserve`` for a rule to
        give it a turn (on the loop: a cancel scope belongs to it)."""
        feeder = self.feeders[kind] = Feeder(kind, turns=turns)

        async def run() -> None:
            try:
                with feeder.scope:
                    await loop()
            except BaseException as exc:
                self.errors.append(exc)
            finally:
                del self.feeders[kind]

        self._spawn(run())

    def _turn(self, kind: str) -> None:
        feeder = self.feeders[kind]
        feeder.turns += 1
        feeder.turn.set()

    async def _claim(self) -> None:
        """One turn of ``Claimer.run``: a real XAUTOCLAIM step from its cursor."""
        inflight, claimer = self.inflight, self.claimer
        inflight.claim_share = min(claimer.count, inflight.prefetch // 4)
        await claimer.claim_once()
        if claimer.cursor == b"0-0":
            inflight.claim_share = 0

    @precondition(
        lambda self: (
            self.ready
            and not self.closing
            and "reader" in self.feeders
            and self.feeders["reader"].phase == "idle"
        )
    )
    @rule()
    def read(self) -> None:
        """One turn of the real ``Reader.run``: room, the acks it carries, XREADGROUP."""
        self._step(lambda: self._turn("reader"))

    async def _age(self, ids: list[bytes]) -> None:
        """Let ``claim_idle`` pass for these pending entries (and only these)."""
        for raw in ids:
            owner = self.pel[raw][0]
            await self.redis.xclaim(
                self.stream, GROUP, owner, 0, [raw], idle=2 * CLAIM_IDLE_MS, justid=True
            )

    @precondition(
        lambda self: self.ready and self.pel and not self.closing and "claimer" not in self.feeders
    )
    @rule(picks=PICKS)
    def claim(self, picks: list[int]) -> None:
        """Some pending entries go idle for ``claim_idle`` (theirs or another
        consumer's, held or not: a lease refresh may be late); the claimer's
        next XAUTOCLAIM step finds what it finds."""
        ids = self._pick(list(self.pel), picks)
        self._step(lambda: self._age(ids))
        self._step(lambda: self._feed("claimer", self._claim, turns=1))

    def _running(self, which: int) -> Call:
        """One of the waiting handler calls (ordered by their ids, not by which
        worker happened to start first)."""
        ordered = sorted(self.calls, key=lambda c: [_id_key(raw) for raw in c.ids])
        return ordered[which % len(ordered)]

    @staticmethod
    def _pick(candidates: list[bytes], picks: list[int]) -> list[bytes]:
        """Some of ``candidates`` (an empty list if there are none)."""
        ordered = sorted(candidates, key=_id_key)
        chosen = {ordered[i % len(ordered)] for i in picks} if ordered else set()
        return sorted(chosen, key=_id_key)

    # -- handlers finishing -----------------------------------------------------------
    @precondition(lambda self: self.ready and self.calls)
    @rule(which=st.integers(0, 63), outcome=st.sampled_from(OUTCOMES), mask=st.integers(0, 7))
    def finish(self, which: int, outcome: str, mask: int) -> None:
        call = self._running(which)
        call.outcome = outcome
        if outcome == "partial":
            call.failed = frozenset(raw for n, raw in enumerate(call.ids) if mask >> n & 1)
        call.released = True
        self._step(call.event.set)

    # -- stop and resume --------------------------------------------------------------
    def _stop(self, raw: bytes) -> None:
        self.stopped.add(raw)
        self.d.stop_running(raw.decode())

    @precondition(lambda self: self.ready)
    @rule(which=st.integers(0, 63))
    def stop(self, which: int) -> None:
        """Stop a message delivered already or one of the next few to come."""
        coming = [raw for raw in self.ids if raw not in self.delivered][:3]
        candidates = sorted(self.delivered, key=_id_key) + coming
        raw = candidates[which % len(candidates)]
        self._step(lambda: self._stop(raw))

    @precondition(lambda self: self.ready and self.calls)
    @rule(which=st.integers(0, 63), pos=st.integers(0, BATCH_SIZE - 1))
    def stop_running(self, which: int, pos: int) -> None:
        call = self._running(which)
        raw = call.ids[pos % len(call.ids)]
        self._step(lambda: self._stop(raw))

    def _resume(self, raw: bytes) -> None:
        d = self.d
        self.stopped.discard(raw)
        was_parked = raw in self.inflight.parked
        d.resume(raw.decode())
        if was_parked:
            (self.dropped if d.closing else self.resumed).add(raw)

    @precondition(lambda self: self.ready and self.stopped)
    @rule(which=st.integers(0, 63))
    def resume(self, which: int) -> None:
        ordered = sorted(self.stopped, key=_id_key)
        raw = ordered[which % len(ordered)]
        self._step(lambda: self._resume(raw))

    # -- leases ------------------------------------------------------------------------
    async def _take_over(self, picks: list[bytes]) -> None:
        rows = await self.redis.xpending_range(
            self.stream, GROUP, "-", "+", 10 * ENTRIES, consumername=ME
        )
        mine = {r["message_id"] for r in rows}
        ids = [raw for raw in picks if raw in mine]
        if ids:
            await self.redis.xclaim(self.stream, GROUP, OTHER, 0, ids)
            self.taken_over.update(ids)

    @precondition(lambda self: self.ready and ME.encode() in {o for o, _ in self.pel.values()})
    @rule(picks=PICKS)
    def take_over(self, picks: list[int]) -> None:
        """Another consumer claims some of this consumer's pending entries."""
        ids = self._pick(
            [raw for raw, (owner, _) in self.pel.items() if owner == ME.encode()], picks
        )
        self._step(lambda: self._take_over(ids))

    @precondition(lambda self: self.ready and self.inflight.held)
    @rule()
    def refresh_lease(self) -> None:
        """The lease keeper renews what is held and learns what was taken (``lose``)."""
        self._step(self.lease.refresh)

    async def _send_acks(self) -> None:
        await self.acker.flush()
        self.unsent.clear()

    @precondition(lambda self: self.ready and self.unsent)
    @rule()
    def send_acks(self) -> None:
        """The acker sends its batch of XACKs (room comes back only then)."""
        self._step(self._send_acks)

    @precondition(lambda self: self.ready and self.inflight.waiting)
    @rule()
    def retry_due(self) -> None:
        """The retries kept here come due: the timer's step, with the clock at the end."""
        self._step(lambda: self.d.requeue(self.d.retries.take_due(math.inf)))

    # -- time and shutdown ---------------------------------------------------------------
    @precondition(lambda self: self.ready and self.batcher.held())
    @rule()
    def clock_passes(self) -> None:
        """The batch timeout expires: open batches are handed to the workers."""

        def expire() -> None:
            # What Batcher.run does when a batch's timeout passes.
            for batch in self.batcher.flush_all():
                self.d.enqueue_batch(batch)

        self._step(expire)

    def _close(self) -> None:
        # What Runtime.request_stop does: no more intake; what is queued or in
        # an open batch is let go (stays pending, for the hand-back).
        for feeder in self.feeders.values():
            feeder.scope.cancel()
        waiting, _ = self._whereabouts()
        self.let_go |= waiting - set(self.inflight.parked)
        self.d.close()
        self.closing = True

    @precondition(lambda self: self.ready and not self.closing and self.steps >= WARM_UP)
    @rule()
    def shutdown(self) -> None:
        self._step(self._close)

    @precondition(lambda self: self.ready and self.closing and not self.hard and self.calls)
    @rule()
    def shutdown_timeout(self) -> None:
        """The watchdog cancels whatever still runs: those entries stay held."""

        def cut() -> None:
            self.hard = True
            self.work_scope.cancel()

        self._step(cut)

    # -- invariants -----------------------------------------------------------------------
    @invariant()
    def bookkeeping(self) -> None:
        if not self.ready:
            return
        try:
            self._call(self._check)
        except BaseException:
            self.broken = True
            raise

    def _whereabouts(self) -> tuple[set[bytes], set[bytes]]:
        """Ids waiting in the queue or an open batch, and ids in a running handler."""
        waiting: set[bytes] = set()
        for item in self.d.queue:
            if isinstance(item, Batch):
                waiting.update(i[0] for i in item.items)
            else:
                waiting.add(item[0])
        waiting.update(i[0] for i in self.batcher.held())
        running = {raw for call in self.calls for raw in call.ids}
        return waiting, running

    def _check(self) -> None:
        d, inf = self.d, self.inflight
        assert not self.errors, f"a worker, read or claim raised: {self.errors!r}"
        assert not self.violations, self.violations
        held, parked, retrying = inf.held, set(inf.parked), set(inf.waiting)

        # -- acknowledgements and dead letters
        twice = {raw for raw, n in self.acks.items() if n > 1}
        assert not twice, f"acknowledged more than once: {twice}"
        unearned = {raw for raw in self.acks if not self.successes[raw]}
        assert not unearned, f"acknowledged without a successful handler: {unearned}"
        # An entry another consumer took over is its own: a handler of ours that
        # finishes it after the loss is known must not acknowledge it.
        unacked = {raw for raw in self.successes if not self.acks[raw]} - self.taken_over
        assert not unacked, f"handled successfully but never acknowledged: {unacked}"
        many = {raw for raw, n in self.successes.items() if n > 1}
        assert not many, f"handled successfully more than once: {many}"
        letters = Counter(raw for raw, _, _ in self.dead)
        assert all(n == 1 for n in letters.values()), f"dead-lettered twice: {letters}"
        both = set(letters) & set(self.acks)
        assert not both, f"both acknowledged and dead-lettered: {both}"
        failed_at = {(raw, count, kind) for raw, count, kind in self.failures}
        for raw, kind, count in self.dead:
            if kind == "MaxDeliveriesExceeded":
                assert count > self.max_deliveries, (raw, count)
            else:
                why = f"dead letter {raw!r} ({kind}, delivery {count}) without a final failure"
                assert count >= self.max_deliveries, why
                assert (raw, count, kind) in failed_at, why
        final = {raw for raw, count, _ in self.failures if count >= self.max_deliveries}
        assert final <= set(letters), f"failed for the last time, no dead letter: {final}"
        counters = d.counters
        assert counters.handled == sum(self.successes.values())
        assert counters.failed == len(self.failures)
        assert counters.dead_lettered == len(self.dead)

        # -- room
        assert inf.reserved == 0, f"room still reserved with no read or claim: {inf.reserved}"
        assert inf.unacked == len(self.unsent), (inf.unacked, self.unsent)
        # A resumed message keeps its excess until its XACK is sent.
        self.resumed &= (held - parked) | set(self.unsent)
        extra = len(self.resumed) + len(self.dropped & held)
        assert inf.active <= inf.prefetch + extra, (
            f"active {inf.active} > prefetch {inf.prefetch} (+{extra} resumed)"
        )
        # Acks not sent yet hold room too; a lost entry's late ack holds it a second
        # time (its room was given back when it was lost): allowed, it is brief.
        stale = sum(1 for raw in self.unsent if raw in self.stale_acks)
        assert inf.active + inf.unacked - stale <= inf.prefetch + extra, (
            f"active {inf.active} + unacked {inf.unacked} > "
            f"prefetch {inf.prefetch} (+{extra} resumed)"
        )
        waiting_for_room = [f.kind for f in self.feeders.values() if f.phase == "reserving"]
        budget = inf.prefetch - len(retrying)  # what waiting retries leave to reads
        assert len(retrying) <= inf.prefetch // 2, (len(retrying), inf.prefetch)
        if waiting_for_room and not self.closing:
            assert inf.free() < budget - budget // 2, (
                f"{waiting_for_room} wait for room with {inf.free()} of {inf.prefetch} free"
            )

        # -- nothing held for ever, nothing handled uncounted
        assert parked <= held, f"parked but not held: {parked - held}"
        assert parked <= self.stopped, f"parked but not stopped: {parked - self.stopped}"
        assert retrying <= held - parked, f"waiting for a retry, not held: {retrying - held}"
        if not self.hard:
            waiting, running = self._whereabouts()
            both = retrying & (waiting | running)
            assert not both, f"waiting for a retry and queued or running: {both}"
        if not self.hard:
            waiting, running = self._whereabouts()
            nowhere = held - parked - retrying - waiting - running - self.dropped
            assert not nowhere, f"held, but neither parked, queued nor running: {nowhere}"
            uncounted = (waiting | running) - held - inf.lost
            assert not uncounted, f"queued or running but not held: {uncounted}"
            lingering = inf.lost - waiting - running - self.dropped
            assert not lingering, f"lost ids that nothing will clear: {lingering}"

        # -- the server agrees
        pending = set(self.pel)
        sent = set(self.acks) - set(self.unsent)
        assert not (sent & pending), f"XACK sent, yet pending: {sent & pending}"
        assert not (set(letters) & pending), "dead-lettered yet pending"
        assert held <= pending, f"held but not pending: {held - pending}"
        for raw, (item, _) in inf.waiting.items():
            if self.pel[raw][0] == OTHER.encode():
                assert raw in self.taken_over  # the next lease refresh finds out
            else:
                # The count of the delivery that failed; a claim pass that met the
                # entry while its handler ran (it skips held ones) raised it.
                owner, count = self.pel[raw]
                assert owner == ME.encode(), (raw, owner)
                assert count >= item[2], (raw, count, item[2])
        for raw, (owner, _) in self.pel.items():
            let_go = raw in self.let_go
            if owner == ME.encode() and raw not in held and raw not in self.unsent and not let_go:
                assert self.last.get(raw) == "fail", (
                    f"{raw!r} is pending for this consumer, which neither holds it nor "
                    f"saw its handler fail (last: {self.last.get(raw)})"
                )

    # -- shutdown and the final account --------------------------------------------------
    def teardown(self) -> None:
        if not self.ready:
            return
        try:
            if not self.broken:
                self._drain()
                self._call(self._final_check)
        finally:
            self._call(self._cleanup)

    def _drain(self) -> None:
        if not self.closing:
            self._step(self._close)
        for _ in range(10 * ENTRIES):
            if self.workers_done:
                self._step(self._send_acks)  # Runtime._final_flush: the last acks
                return
            self._step(self._release_all)
            self.bookkeeping()
        raise AssertionError(f"the workers never finished the drain: {self._describe()}")

    def _release_all(self) -> None:
        for call in self.calls:
            call.outcome = "ok"
            call.released = True
            call.event.set()

    def _final_check(self) -> None:
        self._check()
        inf = self.inflight
        assert inf.reserved == 0
        if not self.hard:
            # Left in the queue or a batch (a stopped batch's other messages are
            # batched again after close): held, handed back like the rest.
            waiting, _ = self._whereabouts()
            assert waiting <= inf.held | inf.lost, f"left behind, not held: {waiting - inf.held}"
            lingering = inf.lost - waiting - self.dropped
            assert not lingering, f"lost ids linger after the drain: {lingering}"
        letters = {raw for raw, _, _ in self.dead}
        for raw in self.ids:
            owner = self.pel.get(raw, (None, 0))[0]
            places = []
            if self.acks[raw]:
                places.append("acknowledged")
            if raw in letters:
                places.append("dead-lettered")
            if raw in inf.parked:
                places.append("parked")
            elif raw in inf.held:
                places.append("held, to be handed back")
            if owner == OTHER.encode() and raw not in inf.held:
                places.append("lost to the other consumer")
            if owner == ME.encode() and raw not in inf.held and self.last.get(raw) == "fail":
                places.append("pending for a retry")
            elif owner == ME.encode() and raw not in inf.held and raw in self.let_go:
                places.append("let go at the stop, to be handed back")
            if raw not in self.delivered and owner is None:
                places.append("never delivered")
            assert len(places) == 1, f"entry {raw!r} ends {places or 'nowhere'}"

    async def _cleanup(self) -> None:
        if not self.workers_done:
            self.work_scope.cancel()
        for feeder in list(self.feeders.values()):
            feeder.scope.cancel()
        with anyio.move_on_after(5):
            await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.redis.delete(self.stream, self.keys.dead_letters)


def _task_stacks() -> str:
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(file=out)
    return out.getvalue()


async def _client(url: str) -> aredis.Redis:
    return aredis.Redis.from_url(url)


# About 6 s when it passes; shrinking a failure to its shortest sequence of rules
# replays hundreds of them against the server, which takes minutes.
@pytest.mark.timeout(600)
def test_bookkeeping_under_random_interleavings(redis_url: str) -> None:
    """Random reads, claims, handler outcomes, stops, resumes, take-overs, lease
    refreshes, batch timeouts and shutdowns never lose, duplicate or overfill."""
    with anyio.from_thread.start_blocking_portal() as portal:
        client = portal.call(_client, redis_url)
        try:
            machine = type(
                "Bookkeeping", (BookkeepingMachine,), {"portal": portal, "redis": client}
            )
            run_state_machine_as_test(machine, settings=SETTINGS)
        finally:
            portal.call(client.aclose)
