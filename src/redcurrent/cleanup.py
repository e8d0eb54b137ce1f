"""Removing processed entries from a stream: the safe point and the trimming.

A stream grows for ever unless someone removes entries. redcurrent removes
only what no consumer group can still need, exactly and in small steps:

* **Safe point.** For every group, the entries it still needs start at the
  lower of its oldest pending id (the smallest id of its pending entries
  list, XPENDING summary) and the id just after its last-delivered id. The
  safe point is the lowest of these over all groups, and also of the
  retention bound (ids whose millisecond part is later than the start of the
  run minus ``min_retention``) and of every stopped id that is still in the
  stream. Everything strictly below it may go; nothing at or above it does.
  A stream without groups is trimmed by age (and stopped ids) alone.

* **Ids are compared numerically**, as ``(ms, seq)`` pairs. goStream
  compared them as strings, so with ten or more entries in one millisecond
  (``…-10`` < ``…-9`` as text) it deleted unacknowledged entries.

* **One Lua script per step.** Each step computes the safe point from
  ``XINFO GROUPS`` and ``XPENDING`` *inside* the script, reads at most
  ``batch_size`` ids below it with ``XRANGE - (safe COUNT n`` and removes
  exactly those with ``XTRIM MINID <id after the last of them>``. Because a
  script is atomic, a group that is created, reads or claims between two
  steps is seen by the next step: there is no window between computing the
  safe point and trimming in which an entry someone just became responsible
  for could be removed. Several cleaners running at once (two consumers, an
  operator and a consumer) therefore never remove anything twice nor
  anything unsafe; they just share the work.

* **Why ``XTRIM MINID`` and not ``XDEL``.** Both were measured with
  ``benchmarks/bench_cleanup.py`` (1 M acknowledged entries, Redis 7.0.15,
  one script per step, the same safe-point code). ``XTRIM MINID`` removed
  them in 2.6 s with batches of 1000 (median step 1.8 ms seen from the
  client) and 7.0 s with batches of 100 (median step 0.53 ms); ``XDEL`` of
  the same ids took 4.1 s and 9.5 s, its steps about twice as long, its
  slowest 26 ms. ``XTRIM`` frees whole radix-tree nodes at once and updates
  the stream's first id and length once, while ``XDEL`` looks every id up
  again and leaves tombstones in half-emptied nodes. Sending ``XRANGE`` and
  ``XTRIM`` from the client instead of a script cost 3.4 s / 6.4 s (a round
  trip more per step) and would reopen the race above. With an exact bound
  ``XTRIM`` removes exactly the entries below it, so unlike ``XTRIM ~`` it
  also removes the processed part of a partly processed node.

* **Server-side guard on Redis 8.2+.** Where ``XTRIM`` knows ``ACKED``
  (detected once per client by trying a harmless ``XTRIM … MINID 0-0 ACKED``,
  a feature test that also gives the right answer on Valkey, which reports
  version 7.2 and lacks it), the trim carries ``ACKED`` too whenever the stream has groups, so the
  server itself refuses to remove anything a group has not acknowledged.
  With no group ``ACKED`` protects nothing, and with ``~`` it trims nothing
  on 8.2.3, so it is used only with exact ``MINID`` and only with groups.

Removal is final: a group created later (even at id ``0``) or a consumer
that rewinds its group with ``XGROUP SETID`` cannot get removed entries back.

:class:`AutoCleaner` runs :func:`cleanup` from consumers, one at a time per
topic under a lock, when the stream is longer than ``max_length``.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from redis.exceptions import ResponseError

from ._errors import Fault, classify
from ._redis import AnyRedis
from .errors import ConfigurationError

if TYPE_CHECKING:
    from .topic import Topic

__all__ = ["AutoCleaner", "CleanupPolicy", "cleanup"]

logger = logging.getLogger("redcurrent.cleanup")


class CleanupPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How and when processed entries are removed from a stream.

    ``CleanupPolicy(auto=False, interval=300.0, max_length=10000,
    min_retention=3600.0, batch_size=100)``; fields may be given by position
    or keyword. Cleanup removes only entries every group has acknowledged
    (see :func:`cleanup`). Removal is final: a group created afterwards, even
    at id ``0``, does not see removed entries, so keep ``min_retention`` long
    enough for late groups that must replay history.
    """

    auto: bool = False
    """Let consumers run cleanup by themselves (one at a time per topic).
    Off by default because removing entries is a decision of the operator."""
    interval: float = 300.0
    """Seconds between two checks of an automatic cleaner. Each check costs
    one XLEN, so this is about how stale the stream may get, not about load."""
    max_length: int = 10000
    """Automatic cleanup runs only while the stream has more entries than
    this. It is a trigger, not a cap: entries some group still needs stay
    even if the stream is longer."""
    min_retention: float = 3600.0
    """Seconds an entry is kept at least, judged by the time in its id, so
    operators can still inspect or replay recent history after processing."""
    batch_size: int = 100
    """The most entries one step removes. Each step is one short Lua script,
    so this bounds how long Redis is busy with cleanup at a time."""

    def __post_init__(self) -> None:
        if not _is_number(self.interval) or not self.interval > 0:
            raise ConfigurationError(f"cleanup interval must be > 0 seconds, got {self.interval!r}")
        if not _is_int(self.batch_size) or self.batch_size <= 0:
            raise ConfigurationError(
                f"cleanup batch_size must be an int > 0, got {self.batch_size!r}"
            )
        if not _is_int(self.max_length) or self.max_length < 0:
            raise ConfigurationError(
                f"cleanup max_length must be an int >= 0, got {self.max_length!r}"
            )
        if (
            not _is_number(self.min_retention)
            or not self.min_retention >= 0
            or math.isinf(self.min_retention)
        ):
            raise ConfigurationError(
                f"cleanup min_retention must be finite seconds >= 0, got {self.min_retention!r}"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --------------------------------------------------------------------------- Lua

# Shared by every variant of a step (the benchmark swaps the tail to compare
# XDEL). KEYS: stream, stopped ids. ARGV: age bound (exclusive id, or '' for
# none), batch size, '1' to add ACKED to XTRIM.
# Ids are compared as (ms, seq) decimal strings: by length, then byte by
# byte, which is exact for the 64-bit unsigned parts (Lua numbers are doubles
# and would round sequence numbers above 2^53; Lua's own string '<' follows
# the server's collation locale).
_LUA_PRELUDE = """
local function split(id)
  local ms, seq = string.match(id, '^(%d+)%-(%d+)$')
  return ms, seq
end
local function num_lt(a, b)
  if #a ~= #b then return #a < #b end
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return false
end
local function id_lt(a, b)
  local am, as = split(a)
  local bm, bs = split(b)
  if am ~= bm then return num_lt(am, bm) end
  return num_lt(as, bs)
end
local function incr(n)
  local digits = {}
  for i = 1, #n do digits[i] = string.byte(n, i) - 48 end
  local i = #digits
  while i >= 1 do
    if digits[i] < 9 then digits[i] = digits[i] + 1; break end
    digits[i] = 0
    i = i - 1
  end
  local out = {}
  if i == 0 then out[1] = '1' end
  for j = 1, #digits do out[#out + 1] = tostring(digits[j]) end
  return table.concat(out)
end
local function succ(id)
  local ms, seq = split(id)
  if seq == '18446744073709551615' then return incr(ms) .. '-0' end
  return ms .. '-' .. incr(seq)
end
local function lower(a, b)
  if a == nil then return b end
  if b == nil or id_lt(a, b) then return a end
  return b
end

local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then return {0, 0} end
local batch = tonumber(ARGV[2])
local safe = nil
if ARGV[1] ~= '' then safe = ARGV[1] end

local groups = redis.call('XINFO', 'GROUPS', stream)
for _, g in ipairs(groups) do
  local name, last, pending
  for j = 1, #g, 2 do
    local k = g[j]
    if k == 'name' then name = g[j + 1]
    elseif k == 'last-delivered-id' then last = g[j + 1]
    elseif k == 'pending' then pending = g[j + 1] end
  end
  safe = lower(safe, succ(last))
  if pending > 0 then
    local summary = redis.call('XPENDING', stream, name)
    if summary[2] then safe = lower(safe, summary[2]) end
  end
end

local kind = redis.call('TYPE', KEYS[2])
if type(kind) == 'table' then kind = kind['ok'] end
if kind ~= 'none' then
  local members
  if kind == 'set' then members = redis.call('SMEMBERS', KEYS[2])
  elseif kind == 'zset' then members = redis.call('ZRANGE', KEYS[2], 0, -1)
  elseif kind == 'hash' then members = redis.call('HKEYS', KEYS[2])
  else members = {} end
  for _, m in ipairs(members) do
    if split(m) and (safe == nil or id_lt(m, safe)) then
      if #redis.call('XRANGE', stream, m, m) > 0 then safe = m end
    end
  end
end

local stop = '+'
if safe ~= nil then
  if safe == '0-0' then return {0, 0} end
  stop = '(' .. safe
end
local entries = redis.call('XRANGE', stream, '-', stop, 'COUNT', batch)
if #entries == 0 then return {0, 0} end
"""

# Removes exactly the entries just read: every id below the one right after
# the last of them (the stream holds nothing between the two).
_LUA_TRIM_TAIL = """
local args = {'XTRIM', stream, 'MINID', '=', succ(entries[#entries][1])}
if ARGV[3] == '1' and #groups > 0 then args[#args + 1] = 'ACKED' end
return {redis.call(unpack(args)), #entries}
"""

#: One cleanup step. Returns ``{removed, examined}``: ``examined`` equals the
#: batch size when more removable entries may follow.
STEP_SCRIPT = _LUA_PRELUDE + _LUA_TRIM_TAIL

# KEYS: lock. ARGV: owner. Deletes the lock only if we still hold it, so a
# cleaner whose lock expired never removes the lock a successor took.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lock. ARGV: owner, ttl ms. Extends the lock only if we still hold it.
_RENEW_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


# --------------------------------------------------------------------------- feature detection

_ACKED_SUPPORT: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


async def trim_acked_supported(redis: AnyRedis, stream: str) -> bool:
    """Whether this server's XTRIM takes ``ACKED`` (Redis 8.2+), tried once per client.

    A feature test, not a version test: Valkey 9 reports ``redis_version``
    7.2 and has no ACKED, and a future server may report anything. The probe
    ``XTRIM <stream> MINID 0-0 ACKED`` can remove nothing (no id is below
    ``0-0``); servers without the option answer ``ERR syntax error``. It uses
    the stream's own key so that it reaches the right node of a cluster, and
    the command itself rather than ``COMMAND DOCS``, which 6.2 lacks and
    ACLs may forbid.
    """
    known = _ACKED_SUPPORT.get(redis)
    if known is not None:
        return known
    try:
        await redis.execute_command("XTRIM", stream, "MINID", "0-0", "ACKED")
    except ResponseError as exc:
        if classify(exc) is not Fault.FATAL:
            raise
        if "syntax" not in str(exc).lower():
            return False  # e.g. WRONGTYPE: undecided, ask again next time
        supported = False
    else:
        supported = True
    _ACKED_SUPPORT[redis] = supported
    return supported


# --------------------------------------------------------------------------- cleanup


class _Cleaner:
    """One cleanup run: fixed age bound, one script call per step."""

    def __init__(self, topic: Topic, policy: CleanupPolicy, script: str = STEP_SCRIPT) -> None:
        self.topic = topic
        self.policy = policy
        self._script = topic.redis.register_script(script)
        self._age_bound = ""
        self._acked = "0"

    async def prepare(self) -> None:
        """Fix the age bound from the server's clock (ids carry server time)
        once per run, so a run ends even while producers keep adding."""
        redis = self.topic.redis
        seconds, micros = await redis.time()
        now_ms = seconds * 1000 + micros // 1000
        retention_ms = math.ceil(self.policy.min_retention * 1000)
        # Exclusive bound: an entry at least min_retention old may go.
        self._age_bound = f"{max(now_ms - retention_ms + 1, 0)}-0"
        self._acked = "1" if await trim_acked_supported(redis, self.topic.keys.stream) else "0"

    async def step(self) -> tuple[int, bool]:
        """Remove up to ``batch_size`` entries; returns (removed, more may follow)."""
        keys = self.topic.keys
        reply = await self._script(
            keys=[keys.stream, keys.stopped],
            args=[self._age_bound, self.policy.batch_size, self._acked],
        )
        removed, examined = int(reply[0]), int(reply[1])
        return removed, removed > 0 and examined >= self.policy.batch_size

    async def run(self, keep_going: Callable[[], Awaitable[bool]] | None = None) -> int:
        await self.prepare()
        total = 0
        while True:
            removed, more = await self.step()
            total += removed
            if not more or (keep_going is not None and not await keep_going()):
                return total


async def cleanup(topic: Topic, policy: CleanupPolicy | None = None) -> int:
    """Remove, now, every entry that no consumer group still needs; returns how many.

    An entry goes when it is below every group's oldest pending entry, at or
    below every group's last-delivered id, not stopped (nor behind a stopped
    entry) and at least ``policy.min_retention`` seconds old by the time in
    its id, counted from the start of the run. All such entries go, in steps
    of at most ``policy.batch_size`` (each one atomic Lua script that
    recomputes the safe point, see the module docstring), so Redis is never
    busy for long and concurrent runs share the work instead of repeating
    it. A stream without groups is trimmed by age alone; a missing stream
    gives 0.

    Removal is final: a group created later, even at id ``0``, cannot get
    the removed entries back.
    """
    return await _Cleaner(topic, policy or CleanupPolicy()).run()


# --------------------------------------------------------------------------- automatic cleanup

#: Lifetime of the cleanup lock. Far above one step (milliseconds) and renewed
#: between steps, so it expires only when its holder died; then another
#: consumer takes over within one interval plus this.
LOCK_TTL = 60.0


class AutoCleaner:
    """Runs :func:`cleanup` for a consumer every ``policy.interval`` seconds.

    Every interval it checks the stream's length; when it exceeds
    ``policy.max_length`` it takes the topic's cleanup lock (``SET NX PX``,
    value ``owner``) and runs cleanup, renewing the lock between steps and
    releasing it afterwards only if it still holds it. The lock keeps many
    consumers of a topic from scanning the same entries at once; safety does
    not depend on it (every step is atomic). Transient Redis errors are
    logged and retried at the next interval; when the stream is gone,
    :meth:`run` returns; other errors propagate.
    """

    def __init__(self, topic: Topic, policy: CleanupPolicy, owner: str) -> None:
        self.topic = topic
        self.policy = policy
        self.owner = owner
        self.removed = 0
        """Entries this cleaner removed so far (a counter for stats and tests)."""
        self.runs = 0
        """Cleanup runs this cleaner completed under the lock."""
        redis = topic.redis
        self._release = redis.register_script(_RELEASE_LOCK)
        self._renew = redis.register_script(_RENEW_LOCK)

    def __repr__(self) -> str:
        return f"AutoCleaner({self.topic.name!r}, owner={self.owner!r})"

    async def run(self) -> None:
        """Loop until cancelled or until the stream vanishes."""
        while True:
            await anyio.sleep(self.policy.interval)
            try:
                removed = await self._once()
            except Exception as exc:
                fault = classify(exc)
                if fault is Fault.GONE:
                    logger.debug("stream %r is gone; automatic cleanup ends", self.topic.name)
                    return
                if fault is Fault.TRANSIENT:
                    logger.warning(
                        "automatic cleanup of %r failed, retrying in %.3gs: %s",
                        self.topic.name,
                        self.policy.interval,
                        exc,
                    )
                    continue
                raise
            if removed is None:
                logger.debug("stream %r is gone; automatic cleanup ends", self.topic.name)
                return

    async def _once(self) -> int | None:
        """One check: clean up if the stream is too long and the lock is free.

        Returns the number of entries removed (0 when not due or locked),
        ``None`` when the stream no longer exists.
        """
        redis = self.topic.redis
        keys = self.topic.keys
        length = int(await redis.xlen(keys.stream))
        if length == 0 and not await redis.exists(keys.stream):
            return None
        if length <= self.policy.max_length:
            return 0
        ttl_ms = int(LOCK_TTL * 1000)
        if not await redis.set(keys.cleanup_lock, self.owner, nx=True, px=ttl_ms):
            return 0
        renewed_at = time.monotonic()

        async def keep_going() -> bool:
            nonlocal renewed_at
            if time.monotonic() - renewed_at < LOCK_TTL / 3:
                return True
            renewed_at = time.monotonic()
            # Someone else holds the lock now (ours expired): let them finish.
            return bool(await self._renew(keys=[keys.cleanup_lock], args=[self.owner, ttl_ms]))

        removed = 0
        try:
            cleaner = _Cleaner(self.topic, self.policy)
            await cleaner.prepare()
            while True:
                step_removed, more = await cleaner.step()
                removed += step_removed
                self.removed += step_removed
                if not more or not await keep_going():
                    break
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                try:
                    await self._release(keys=[keys.cleanup_lock], args=[self.owner])
                except Exception as exc:  # the lock expires by itself
                    logger.debug("could not release the cleanup lock of %r: %s", keys.stream, exc)
        self.runs += 1
        if removed:
            logger.info("automatic cleanup removed %d entries from %r", removed, keys.stream)
        return removed
