"""Delayed and scheduled messages: a due-time index per topic, moved into the
stream by whichever consumer gets there first.

Layout (keys under the topic's hash tag, see ``TopicKeys``): a sorted set
``...:scheduled`` (schedule id -> due time in ms) and a hash
``...:scheduled-data`` (schedule id -> the entry's fields as a msgpack array).
Three scripts are the only writers: :data:`SCHEDULE` adds, :data:`MOVE_DUE`
moves what is due into the stream and removes it in the same step, and
:data:`CANCEL_SCHEDULED` removes one. Since each runs atomically, a message
enters the stream once, whichever consumers of whichever groups race to move
it, and a cancel that answers True means it never will.

Clock: every due time is compared with the *server's* ``TIME``, read inside
the scripts; a ``delay`` is added to that same clock by :data:`SCHEDULE`. So a
delay never depends on the client's clock, and consumers on hosts whose
clocks disagree agree on what is due. Only ``at=`` is a wall-clock instant
that the caller chose: it is due when the server's clock reaches it.

The mover (:class:`Mover`, one per consumer) sleeps until the earliest due
time, which the move script returns, at most :data:`MOVER_CAP` seconds, and is
woken early by the ``scheduled <ms>`` notice :data:`SCHEDULE` publishes on the
topic's control channel when a message becomes the earliest.
"""

from __future__ import annotations

import math
import secrets
import struct
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Final

import anyio

from ._cluster_ask import run_script
from ._keys import TopicKeys
from ._member import GroupMember
from ._redis import AnyRedis, as_str
from .errors import ConfigurationError

__all__ = [
    "CANCEL_SCHEDULED",
    "MOVER_CAP",
    "MOVER_IDLE_CAP",
    "MOVE_BATCH",
    "MOVE_DUE",
    "SCHEDULE",
    "Mover",
    "cancel",
    "due_spec",
    "schedule_entries",
]

#: The most messages one run of :data:`MOVE_DUE` moves. A run blocks the
#: server; more due messages take further runs, back to back.
MOVE_BATCH: Final = 100
#: The longest a mover sleeps without looking. Notices wake it for earlier
#: messages, and the control listener wakes it after every reconnect (notices
#: may have been missed), so this only bounds the delay when a notice is lost
#: otherwise: it costs one script call per this many seconds per idle consumer.
MOVER_CAP: Final = 5.0
#: ... and when nothing is scheduled at all: a schedule announces itself (a
#: notice wakes the mover), so this only bounds a lost notice's delay, and an
#: idle consumer pays one script call per this many seconds.
MOVER_IDLE_CAP = 30.0
#: Without pub/sub (a cluster client that lacks it) nothing wakes a mover: look
#: every second, so that messages still arrive within about a second.
MOVER_CAP_WITHOUT_NOTICES: Final = 1.0
#: The most messages one :data:`SCHEDULE` call adds.
SCHEDULE_CHUNK: Final = 1000

# KEYS: due set, payload hash. ARGV: channel, "delay"|"at", ms, then (schedule
# id, packed fields) pairs. A delay counts from the server's TIME. Announces
# ``scheduled <due ms>`` only when the new due time is earlier than every one
# waiting, so that sleeping movers wake for it (and only for it). Permissions
# are checked before the first write, as in SET_STOPPED: a refused PUBLISH
# must not leave behind a message the caller was told failed. Returns the
# due time.
SCHEDULE: Final = """
if redis.acl_check_cmd and not (
    redis.acl_check_cmd('ZADD', KEYS[1], '0', 'x')
    and redis.acl_check_cmd('HSET', KEYS[2], 'x', 'x')
    and redis.acl_check_cmd('PUBLISH', ARGV[1], 'scheduled')) then
  return redis.error_reply('NOPERM this user may not schedule messages: ZADD ' .. KEYS[1] ..
                           ', HSET ' .. KEYS[2] .. ' or PUBLISH to ' .. ARGV[1])
end
local due = tonumber(ARGV[3])
if ARGV[2] == 'delay' then
  local now = redis.call('TIME')
  due = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + due
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
for i = 4, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], due, ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
if not first[2] or due < tonumber(first[2]) then
  redis.call('PUBLISH', ARGV[1], string.format('scheduled %d', due))
end
return due
"""

# KEYS: due set, payload hash, stream. ARGV: batch size, "check"|"".
# Moves up to a batch of messages due by the server's TIME into the stream,
# in due order (ties in schedule-id order, which follows publish order), and
# removes them from the index in the same step. Returns {moved, server ms,
# next due ms or false}. With "check" (a consumer's first run, at start-up) it
# first asks the ACL about what it sends, so that a refusal is NOPERM, which
# fails the start, rather than a script error later.
MOVE_DUE: Final = """
if ARGV[2] == 'check' and redis.acl_check_cmd and not (
    redis.acl_check_cmd('ZRANGEBYSCORE', KEYS[1], '0', '1')
    and redis.acl_check_cmd('ZRANGE', KEYS[1], '0', '0')
    and redis.acl_check_cmd('ZREM', KEYS[1], 'x')
    and redis.acl_check_cmd('HGET', KEYS[2], 'x')
    and redis.acl_check_cmd('HDEL', KEYS[2], 'x')
    and redis.acl_check_cmd('XADD', KEYS[3], '*', 'f', 'v')) then
  return redis.error_reply('NOPERM this user may not move scheduled messages: ' ..
                           'ZRANGEBYSCORE, ZRANGE, ZREM ' .. KEYS[1] .. ', HGET, HDEL ' ..
                           KEYS[2] .. ' or XADD ' .. KEYS[3])
end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if not first[2] or tonumber(first[2]) > ms then
  return {0, ms, first[2] or false}  -- nothing due: the idle case, two reads
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(due) do
  local packed = redis.call('HGET', KEYS[2], id)
  if packed then
    redis.call('XADD', KEYS[3], '*', unpack(cmsgpack.unpack(packed)))
  end
end
if #due > 0 then
  redis.call('ZREM', KEYS[1], unpack(due))
  redis.call('HDEL', KEYS[2], unpack(due))
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, ms, nxt[2] or false}
"""

# KEYS: due set, payload hash. ARGV: schedule id.
# 1 if the message was still waiting (now it never will be delivered), else 0.
CANCEL_SCHEDULED: Final = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


def _pack(fields: tuple[bytes, ...]) -> bytes:
    """The fields as a msgpack array of str32 values, the one shape Redis's
    ``cmsgpack`` reads as Lua strings on every version (6.2's and 7.0's read
    no ``bin`` type), byte for byte: msgpack's str needs no UTF-8 there."""
    parts = [_HEADER.pack(0xDD, len(fields))]
    for value in fields:
        parts += (_HEADER.pack(0xDB, len(value)), value)
    return b"".join(parts)


_HEADER: Final = struct.Struct(">BI")  # a msgpack type byte and a 32-bit length

# -- when -------------------------------------------------------------------


def due_spec(delay: float | None, at: datetime | float | None) -> tuple[str, int]:
    """``("delay", ms)`` or ``("at", epoch ms)``, checked."""
    if delay is not None and at is not None:
        raise ConfigurationError("give delay= or at=, not both")
    if delay is not None:
        return "delay", _millis(delay, "delay", "seconds >= 0")
    if isinstance(at, datetime):
        if at.tzinfo is None or at.utcoffset() is None:
            raise ConfigurationError(
                f"at= must be an aware datetime (with a tzinfo, e.g. UTC), got naive {at!r}: "
                "a naive time means a different instant on every host"
            )
        return "at", _millis(at.timestamp(), "at", "an aware datetime or epoch seconds >= 0")
    return "at", _millis(at, "at", "an aware datetime or epoch seconds >= 0")


def _millis(value: object, name: str, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{name}= must be {expected}, got {value!r}")
    if value < 0:
        raise ConfigurationError(f"{name}= must be {expected}, got {value!r}")
    return round(value * 1000)


# -- schedule ids ---------------------------------------------------------------

_id_lock = threading.Lock()
_last_stamp = 0


def _new_ids(count: int) -> list[str]:
    """Schedule ids: a microsecond stamp that never repeats or goes back in this
    process, so that messages due at the same time enter the stream in the
    order they were scheduled (the sorted set breaks ties by member), and a
    random tail, so that other processes (forks too) never collide with it."""
    global _last_stamp
    with _id_lock:
        stamp = max(time.time_ns() // 1000, _last_stamp + 1)
        _last_stamp = stamp + count - 1
    return [f"{stamp + i:016x}-{secrets.token_hex(6)}" for i in range(count)]


# -- producer side ----------------------------------------------------------------


async def _send(
    redis: AnyRedis, keys: TopicKeys, when: tuple[str, int], entries: list[tuple[bytes, ...]]
) -> list[str]:
    ids = _new_ids(len(entries))
    args: list[Any] = [keys.control_channel, when[0], when[1]]
    for schedule_id, fields in zip(ids, entries, strict=True):
        args += (schedule_id, _pack(fields))
    script = redis.register_script(SCHEDULE)
    await run_script(redis, script, [keys.scheduled, keys.scheduled_data], args)
    return ids


def _fields(raw_type: bytes, body: bytes, meta: bytes) -> tuple[bytes, ...]:
    return (b"type", raw_type, b"data", body, b"metadata", meta)


async def schedule_entries(
    redis: AnyRedis,
    keys: TopicKeys,
    when: tuple[str, int],
    entries: Iterable[tuple[bytes, bytes, bytes]],
) -> list[str]:
    """Schedule checked ``(type, data, metadata)`` entries for one due time, in
    chunks; their schedule ids in order. ``entries`` may be a generator that
    checks items as it goes: an invalid item raises before its chunk is sent."""
    ids: list[str] = []
    chunk: list[tuple[bytes, ...]] = []
    for entry in entries:
        chunk.append(_fields(*entry))
        if len(chunk) >= SCHEDULE_CHUNK:
            ids += await _send(redis, keys, when, chunk)
            chunk = []
    if chunk:
        ids += await _send(redis, keys, when, chunk)
    return ids


async def cancel(redis: AnyRedis, keys: TopicKeys, schedule_id: str) -> bool:
    """True if the message was still waiting; it will not be delivered."""
    if not isinstance(schedule_id, str) or not schedule_id:
        raise ConfigurationError(
            f"a schedule id is the non-empty str publish(delay=/at=) returned, got {schedule_id!r}"
        )
    script = redis.register_script(CANCEL_SCHEDULED)
    removed = await script(keys=[keys.scheduled, keys.scheduled_data], args=[schedule_id])
    return bool(int(removed))


# -- consumer side ------------------------------------------------------------------


class Mover:
    """A consumer's loop that moves due messages into the stream.

    Every consumer of every group runs one; the script makes it safe (a
    message moves once) and cheap when another consumer got there first (an
    empty run: a few reads). Idle, it costs one script call per
    :data:`MOVER_IDLE_CAP` seconds (:data:`MOVER_CAP` while messages wait).
    A ``scheduled <ms>`` notice costs nothing: it only brings the wake-up
    forward, converted to this host's clock with the offset the last run
    measured (off by at most that run's round trip), so each consumer runs
    the script once per due time, when it comes.
    """

    def __init__(self, member: GroupMember, *, notices: bool = True) -> None:
        self._member = member
        keys = member.keys
        self._keys = [keys.scheduled, keys.scheduled_data, keys.stream]
        self._script = member.redis.register_script(MOVE_DUE)
        self._cap = MOVER_CAP if notices else MOVER_CAP_WITHOUT_NOTICES
        self._idle_cap = MOVER_IDLE_CAP if notices else MOVER_CAP_WITHOUT_NOTICES
        self._woken = anyio.Event()
        self._look = False
        self._noticed: int | None = None
        #: the server's clock minus ours (seconds), as the last run saw it.
        self._offset = 0.0
        self._checked = False

    def wake(self, due_ms: int | None = None) -> None:
        """A message now due at ``due_ms`` (server ms) was announced; None: look
        again now (notices may have been missed)."""
        if due_ms is None:
            self._look = True
        elif self._noticed is None or due_ms < self._noticed:
            self._noticed = due_ms
        self._woken.set()

    async def move_due(self) -> float:
        """Move everything due, batch by batch; seconds until the next due
        time by the server's clock, capped (the cap when none is waiting)."""
        while True:
            check = "" if self._checked else "check"
            reply: Any = await self._member.call(
                "move scheduled messages",
                lambda: self._script(keys=self._keys, args=[MOVE_BATCH, check]),  # noqa: B023
            )
            self._checked = True
            moved, now_ms, next_ms = int(reply[0]), int(reply[1]), reply[2]
            self._offset = now_ms / 1000 - anyio.current_time()
            if moved >= MOVE_BATCH:
                continue  # more may be due
            if next_ms is None:
                return self._idle_cap
            # A duration on the server's clock, slept on ours: the two clocks'
            # offset cancels out. At least 1 ms, so that rounding never spins.
            wait = (float(as_str(next_ms)) - now_ms) / 1000
            return min(max(wait, 0.001), self._cap)

    async def run(self) -> None:
        while True:
            # Reset before looking: a notice that comes meanwhile counts.
            self._woken, self._look, self._noticed = anyio.Event(), False, None
            deadline = anyio.current_time() + await self.move_due()
            while True:
                with anyio.move_on_after(deadline - anyio.current_time()):
                    await self._woken.wait()
                if not self._woken.is_set() or self._look:
                    break  # due (or the cap), or asked to look
                noticed, self._noticed, self._woken = self._noticed, None, anyio.Event()
                if noticed is not None:
                    deadline = min(deadline, noticed / 1000 - self._offset)
