"""Who reads which partition: a heartbeat member set, a capped rendezvous map,
owner entries that make a takeover explicit.

Every consumer of a group computes the same map from the same sorted list of
live members, so nobody has to coordinate an assignment. The map alone is not
trusted to keep two members off one partition (their views of the list differ
for a moment after a join or a crash): a member reads a partition only after
a compare-and-set put its ``name#incarnation`` in the partition's owner hash
(in the partition's own slot), with a lease it renews every heartbeat. That
succeeds only when the partition is free, released, already its own (a
restart of the same name), or its holder's lease ran out. A member that
cannot renew a lease stops reading that partition by itself (fences) after
two thirds of it, before anyone may take it over.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from typing import TYPE_CHECKING

from ._redis import AnyRedis, as_str

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["assign", "member_id", "Membership"]

# KEYS: the topic's member set. ARGV: member id, ttl ms, 'beat' or 'leave'.
# Expiry on the server's clock, so that members' clocks need not agree.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == 'leave' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ttl * 6)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# KEYS: a partition's owner hash. ARGV: group, holder ('name#incarnation'),
# name, lease ms, 'take' or 'renew' (renew only a lease we hold now). Fields
# per group: 'h:<group>' the holder, 'u:<group>' until when (server ms) its
# lease runs. Takes the partition when it is free,
# released, ours, held by an earlier run of our name (a restart), or held by a
# member that let its lease run out; renews it when it is ours.
# 1: the partition is ours (until now + lease); 0: someone else holds it.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hf = 'h:' .. ARGV[1]
local uf = 'u:' .. ARGV[1]
local cur = redis.call('HGET', KEYS[1], hf)
local free = cur == ARGV[2]
if ARGV[5] ~= 'renew' and not free then
  free = (not cur) or string.sub(cur, 1, 9) == 'released:'
end
if ARGV[5] ~= 'renew' and not free then
  local holder = string.match(cur, '^(.*)#[^#]*$') or cur
  free = holder == ARGV[3] or tonumber(redis.call('HGET', KEYS[1], uf) or '0') < now
end
if free then
  redis.call('HSET', KEYS[1], hf, ARGV[2], uf, now + tonumber(ARGV[4]))
  return 1
end
return 0
"""

# KEYS: a partition's owner hash. ARGV: group, holder, name.
# Marks the partition released if we still hold it, so that its next owner
# need not wait for our heartbeat to expire.
RELEASE = """
if redis.call('HGET', KEYS[1], 'h:' .. ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], 'h:' .. ARGV[1], 'released:' .. ARGV[3])
  return 1
end
return 0
"""


def member_id(group: str, name: str) -> str:
    """A member's entry in the topic's member set: every group's members
    share the set, so the group is part of it (length-prefixed: names may
    hold any character)."""
    return f"{len(group)}:{group}:{name}"


def _weight(name: str, partition: int) -> int:
    digest = hashlib.blake2b(f"{name}|{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(members: list[str], count: int) -> dict[int, str]:
    """Partition -> member: each partition goes to its highest-weighted member
    that has fewer than ``ceil(count / members)`` already. Plain rendezvous
    hashing leaves the busiest member up to twice its share; the cap keeps
    every member within one partition of it, and a join still moves only
    about the new member's share."""
    if not members:
        return {}
    ordered = sorted(set(members))
    cap = math.ceil(count / len(ordered))
    load = dict.fromkeys(ordered, 0)
    result: dict[int, str] = {}
    for partition in range(count):
        ranked = sorted(ordered, key=lambda m: _weight(m, partition), reverse=True)
        for member in ranked:
            if load[member] < cap:
                result[partition] = member
                load[member] += 1
                break
    return result


_scripts: weakref.WeakKeyDictionary[object, tuple[AsyncScript, ...]] = weakref.WeakKeyDictionary()


class Membership:
    """The scripts of one group's membership on one client."""

    def __init__(self, redis: AnyRedis, members_key: str, group: str, name: str, holder: str):
        self.redis = redis
        self.members_key = members_key
        self.group = group
        self.name = name
        self.holder = holder
        self.entry = member_id(group, name)
        scripts = _scripts.get(redis)
        if scripts is None:
            scripts = _scripts[redis] = (
                redis.register_script(HEARTBEAT),
                redis.register_script(ACQUIRE),
                redis.register_script(RELEASE),
            )
        self._beat, self._acquire, self._release = scripts

    async def beat(self, ttl: float, *, leave: bool = False) -> list[str]:
        """Renew (or end) our membership; the group's live members' names, sorted."""
        reply = await self._beat(
            keys=[self.members_key],
            args=[self.entry, max(1, int(ttl * 1000)), "leave" if leave else "beat"],
        )
        prefix = member_id(self.group, "")
        names = [as_str(m) for m in reply]
        return sorted(m[len(prefix) :] for m in names if m.startswith(prefix))

    async def acquire(self, owners_key: str, lease: float, *, renew_only: bool = False) -> bool:
        """Take (or renew) a partition; with ``renew_only``, only renew a lease
        we hold now (a partition we are handing over: never take it back)."""
        reply = await self._acquire(
            keys=[owners_key],
            args=[
                self.group,
                self.holder,
                self.name,
                int(lease * 1000),
                "renew" if renew_only else "take",
            ],
        )
        return bool(int(reply))

    async def release(self, owners_key: str) -> bool:
        reply = await self._release(keys=[owners_key], args=[self.group, self.holder, self.name])
        return bool(int(reply))
