"""Stopping single messages, terminating a topic, and hearing about both.

State lives in keys (the stopped-id set); pub/sub only makes changes act at
once. A :class:`ControlListener` therefore subscribes *before* it reads the
set, so nothing changed between the two is lost, and it re-reads the set
periodically and after every reconnect, so a consumer that missed a
notification (pub/sub is fire-and-forget) still converges.

Notifications on ``TopicKeys.control_channel`` are plain text, an action
word and at most one argument after the first space:
``stop <id>``, ``resume <id>``, ``terminate``, ``scheduled <due ms>``
(a scheduled message became the earliest: see ``_schedule``) and
``handback <group>`` (a stopping consumer of that group made its pending
entries claimable: see :func:`announce_hand_back`). A listener ignores an
action it does not know (logged at DEBUG), so a new kind of notice never
troubles an older consumer (every version has ignored unknown actions).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Final

import anyio
import anyio.abc
from redis import exceptions as rex
from redis.asyncio.cluster import RedisCluster

from ._backoff import Backoff, Outage
from ._faults import Fault, access_denied, classify
from ._ids import normalize_id
from ._keys import TopicKeys
from ._redis import AnyRedis, as_str
from ._scripts import SET_STOPPED, TERMINATE
from .errors import ConfigurationError

__all__ = [
    "HAND_BACK",
    "ControlListener",
    "announce_hand_back",
    "resume_message",
    "stop_message",
    "terminate",
]

logger = logging.getLogger("redcurrent.control")


_BACKOFF_BASE: Final = 0.05
# One connection, one cheap command: retry often, so that after an outage
# stop/resume notices act again as soon as the work loops do.
_BACKOFF_CAP: Final = 1.0
_SUBSCRIBE_TIMEOUT: Final = 10.0
_CLOSE_TIMEOUT: Final = 2.0
_WAKE_INTERVAL: Final = 1.0
#: The action word of a hand-back notice.
HAND_BACK: Final = "handback"
#: The action word of a partitioned topic's membership notice: a member of the
#: named group joined, left or released a partition (see ``_partitioned``).
MEMBERS: Final = "members"


async def _set_stopped(redis: AnyRedis, keys: TopicKeys, action: str, entry_id: str) -> None:
    script = redis.register_script(SET_STOPPED)
    await script(keys=[keys.stopped], args=[keys.control_channel, action, entry_id])


async def stop_message(redis: AnyRedis, keys: TopicKeys, entry_id: str) -> None:
    """Record the id in the topic's stopped set and announce it, atomically.

    The id need not exist yet; it is honoured whenever an entry with that id
    is delivered, until :func:`resume_message`.
    """
    await _set_stopped(redis, keys, "stop", normalize_id(entry_id))


async def resume_message(redis: AnyRedis, keys: TopicKeys, entry_id: str) -> None:
    """Remove the id from the stopped set and announce it, atomically."""
    await _set_stopped(redis, keys, "resume", normalize_id(entry_id))


async def terminate(redis: AnyRedis, keys: TopicKeys) -> None:
    """Announce ``terminate``, then delete the stream and every owned key, atomically.

    Deleting the stream destroys its consumer groups. Consumers learn about
    it from the ``terminate`` notification on the control channel (a
    :class:`ControlListener`); one that missed it (disconnected at that
    moment, or on a client without pub/sub) still stops, because its next
    stream command fails with ``NOGROUP`` or its blocked XREADGROUP with
    ``UNBLOCKED``. Without the notification it cannot tell a termination
    from a deletion, and reports ``DELETED``.

    The topic can be used again afterwards: publishing re-creates the stream.
    """
    script = redis.register_script(TERMINATE)
    await script(keys=list(keys.owned()), args=[keys.control_channel])


async def announce_members(redis: AnyRedis, keys: TopicKeys, group: str) -> None:
    """Tell the members of a partitioned topic's ``group`` that its member set or
    an owner changed, so that they recompute the map now rather than at their
    next heartbeat. Only a hint, like the hand-back notice."""
    await redis.publish(keys.control_channel, f"{MEMBERS} {group}")


async def announce_hand_back(redis: AnyRedis, keys: TopicKeys, group: str) -> int:
    """Tell the running consumers of ``group`` that a stopping peer has just
    made its pending entries claimable, so that they claim them now rather
    than at their next periodic pass (``claim_idle / 2`` away). Sent after the
    hand-back, so any claim pass a listener starts on hearing it finds them.
    Only a hint: a peer that misses it claims them at its next pass all the
    same. Returns how many subscribers heard it (consumers of every group)."""
    heard = await redis.publish(keys.control_channel, f"{HAND_BACK} {group}")
    return int(heard)


class ControlListener:
    """A consumer's live view of the topic's stopped ids and of its termination.

    Run :meth:`run` in a task group with ``await tg.start(listener.run)``: it
    returns once the stopped set is loaded (and keeps waiting while Redis is
    unreachable, so wrap it in a timeout if the caller must not wait). After
    that :meth:`is_stopped` answers from memory.

    Callbacks are plain functions called from the listener's task; they must
    not block and should not raise (an exception ends :meth:`run`). They fire
    only on a *change* after the initial load: ``on_stop``/``on_resume`` once
    the local set is updated, ``on_terminate`` once. ``on_scheduled`` gets the
    due time (server ms) of every ``scheduled`` notice, and None after every
    (re)subscription, when notices may have been missed. ``on_hand_back``
    gets the group named by every ``handback`` notice (any group: the
    callback tells whether it is its own), ``on_members`` that of every
    ``members`` notice (a partitioned topic's member joined, left or released
    a partition).

    Cost while idle: one blocking read on a dedicated pub/sub connection and
    one SMEMBERS per ``resync_interval``.

    On a cluster client without pub/sub support (redis-py before async
    ``RedisCluster.pubsub``), it polls the set every ``resync_interval``
    instead: stop/resume then act within that interval, and a termination is
    noticed only through the stream errors (so it looks like a deletion).
    """

    def __init__(
        self,
        redis: AnyRedis,
        keys: TopicKeys,
        *,
        on_stop: Callable[[str], None],
        on_resume: Callable[[str], None],
        on_terminate: Callable[[], None],
        on_scheduled: Callable[[int | None], None] | None = None,
        on_hand_back: Callable[[str], None] | None = None,
        on_members: Callable[[str], None] | None = None,
        resync_interval: float = 5.0,
    ) -> None:
        if not resync_interval > 0:
            raise ConfigurationError(f"resync_interval must be > 0, got {resync_interval!r}")
        self._redis = redis
        self._keys = keys
        self._on_stop = on_stop
        self._on_resume = on_resume
        self._on_terminate = on_terminate
        self._on_scheduled = on_scheduled
        self._on_hand_back = on_hand_back
        self._on_members = on_members
        self._interval = float(resync_interval)
        self._stopped: set[str] = set()
        self._loaded = False
        self._terminated = False
        self._terminated_event = anyio.Event()
        self._reconnected = False

    def is_stopped(self, entry_id: str) -> bool:
        return entry_id in self._stopped

    @property
    def stopped(self) -> frozenset[str]:
        return frozenset(self._stopped)

    @property
    def terminated(self) -> bool:
        return self._terminated

    async def wait_terminated(self, timeout: float) -> bool:  # noqa: ASYNC109
        """True if a terminate notification arrived, or arrives within ``timeout``.

        A consumer whose stream command failed with ``NOGROUP``/``UNBLOCKED``
        asks this to tell TERMINATED from DELETED: the notification travels on
        another connection and may be a moment behind the error.
        """
        if self._terminated:
            return True
        with anyio.move_on_after(timeout):
            await self._terminated_event.wait()
        return self._terminated

    # -- the loop ---------------------------------------------------------
    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen until cancelled, or until the topic is terminated.

        Connection faults never escape: it reconnects with capped, jittered
        exponential backoff and re-reads the set once back. Errors that a
        retry cannot fix (permissions, a wrong key type) do escape.
        """
        started = False
        backoff = Backoff(_BACKOFF_BASE, _BACKOFF_CAP)
        outage = Outage(logger, f"control channel of stream {self._keys.stream!r}")
        while not self._terminated:
            try:
                factory = getattr(self._redis, "pubsub", None)
                if factory is None:
                    await self._resync()
                else:
                    if isinstance(self._redis, RedisCluster):
                        # ClusterPubSub routes by slot but does not load the
                        # slot table itself; a fresh client has none yet.
                        await self._redis.initialize()
                    pubsub = factory()
                    try:
                        await self._subscribe(pubsub)
                        await self._resync()
                        self._scheduled()
                        if not started:
                            started = True
                            task_status.started()
                        outage.recovered()
                        backoff.reset()
                        await self._listen(pubsub)
                    finally:
                        await self._close(pubsub)
                    continue
                # Polling: no notifications to wait for, only the set.
                if not started:
                    started = True
                    task_status.started()
                outage.recovered()
                backoff.reset()
                await anyio.sleep(self._interval)
            except Exception as exc:  # classify() tells faults from bugs
                fault = classify(exc)
                if fault is Fault.DENIED:
                    raise access_denied(
                        exc, f"the control channel of {self._keys.stream!r}"
                    ) from exc
                if fault is not Fault.TRANSIENT:
                    raise
                outage.failed(exc, "subscribe/resync")
                await self._drop_idle_connections()
                await backoff.sleep()

    async def _drop_idle_connections(self) -> None:
        """After a fault, pooled connections are likely dead too (a server
        restart): drop the idle ones, so that the next resync does not fail
        on them one by one, each failure adding to the backoff."""
        pool = getattr(self._redis, "connection_pool", None)
        if pool is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
            try:
                await pool.disconnect(inuse_connections=False)
            except (rex.RedisError, OSError) as exc:
                logger.debug("dropping idle connections failed: %r", exc)

    async def _subscribe(self, pubsub: Any) -> None:
        """Subscribe and wait for the server's confirmation.

        Only once the server has confirmed is every later change certain to
        reach us; reading the set before that could miss one in between.
        """
        await pubsub.subscribe(self._keys.control_channel)
        with anyio.fail_after(_SUBSCRIBE_TIMEOUT):
            while True:
                message = await pubsub.get_message(timeout=_SUBSCRIBE_TIMEOUT)
                if message is not None and as_str(message["type"]) == "subscribe":
                    break
        # redis-py reconnects and resubscribes silently inside get_message when
        # its retry policy allows; messages sent meanwhile are lost, so we want
        # to re-read the set when that happens. The connection keeps a weak
        # reference to this bound method.
        connection = getattr(pubsub, "connection", None)
        register = getattr(connection, "register_connect_callback", None)
        if register is not None:
            register(self._note_reconnect)

    def _note_reconnect(self, _connection: Any) -> None:
        self._reconnected = True

    async def _listen(self, pubsub: Any) -> None:
        next_resync = anyio.current_time() + self._interval
        while not self._terminated:
            remaining = next_resync - anyio.current_time()
            if remaining <= 0 or self._reconnected:
                reconnected, self._reconnected = self._reconnected, False
                await self._resync()
                if reconnected:
                    self._scheduled()
                next_resync = anyio.current_time() + self._interval
                continue
            # The read timeout costs no command; capping it bounds how long a
            # silent reconnect inside redis-py goes without a resync.
            message = await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=min(remaining, _WAKE_INTERVAL)
            )
            if message is not None and as_str(message["type"]) == "message":
                data = message["data"]
                self._handle(data.decode(errors="replace") if isinstance(data, bytes) else data)

    def _handle(self, text: str) -> None:
        # The argument is everything after the first space: a group name may
        # hold spaces of its own.
        action, _, entry_id = text.partition(" ")
        if action == "stop" and entry_id:
            if entry_id not in self._stopped:
                self._stopped.add(entry_id)
                self._on_stop(entry_id)
        elif action == "resume" and entry_id:
            if entry_id in self._stopped:
                self._stopped.discard(entry_id)
                self._on_resume(entry_id)
        elif action == "scheduled":
            self._scheduled(int(entry_id) if entry_id.isdigit() else None)
        elif action == "terminate":
            if not self._terminated:
                self._terminated = True
                self._terminated_event.set()
                self._on_terminate()
        elif action == HAND_BACK and entry_id:
            if self._on_hand_back is not None and not self._terminated:
                self._on_hand_back(entry_id)
        elif action == MEMBERS and entry_id:
            if self._on_members is not None and not self._terminated:
                self._on_members(entry_id)
        else:
            logger.debug("ignoring unknown control message %r", text)

    def _scheduled(self, due_ms: int | None = None) -> None:
        if self._on_scheduled is not None and not self._terminated:
            self._on_scheduled(due_ms)

    async def _resync(self) -> None:
        """Replace the local set with the stored one, announcing the differences."""
        members: Iterable[bytes | str] = await self._redis.smembers(self._keys.stopped)
        fresh = {as_str(m) for m in members}
        if self._terminated:
            return
        if not self._loaded:
            self._stopped = fresh
            self._loaded = True
            return
        added = fresh - self._stopped
        removed = self._stopped - fresh
        self._stopped = fresh
        for entry_id in sorted(removed):
            self._on_resume(entry_id)
        for entry_id in sorted(added):
            self._on_stop(entry_id)

    async def _close(self, pubsub: Any) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
            try:
                await pubsub.aclose()
            except (rex.RedisError, OSError) as exc:
                logger.debug("closing the control subscription failed: %r", exc)
