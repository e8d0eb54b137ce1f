"""Stable consumer names for workers: ``<host>-<n>``, the lowest ``n`` free.

A consumer named after its pid and a random suffix leaves its pending entries
to ``claim_idle`` when it dies, and its name behind in XINFO CONSUMERS. A
worker instead takes ``<host>-0``, ``<host>-1``, ... for its group: the lowest
index no live process holds. A worker restarted on the same host (a container
restart keeps the pod's host name) gets its old name back, so it finishes its
own pending entries at once, and the group keeps a few names per host.

Who holds a name is kept in the topic's ``workers`` hash (field: group and
name; value: ``<pid>:<nonce> <expires ms>``), renewed every ``TTL / 3`` and
deleted on a graceful stop. A name is free when nobody holds it, when its
holder stopped renewing it, or when its holder ran on this host and its pid is
gone, or is our own pid (a restarted container reuses pids). Only processes on
one host ever write that host's names, so the expiry is read on that host's
clock.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence

import anyio

from ._faults import Fault, classify
from ._redis import AnyRedis
from .errors import RedcurrentError

__all__ = ["NameLostError", "WorkerName", "claim_worker_name", "worker_host"]

logger = logging.getLogger("redcurrent.worker")

#: how long a name stays taken without renewal (seconds).
TTL = 60.0

# Take a name (or, ARGV[3] empty, delete an expired one) only from the holder
# we saw: a concurrent claimer makes this return 0 and the caller looks again.
_CLAIM = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if (current or '') ~= ARGV[2] then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"""
# Renew (ARGV[3] set) or release (ARGV[3] empty) a name this holder still has.
_KEEP = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current or string.sub(current, 1, #ARGV[2] + 1) ~= ARGV[2] .. ' ' then return 0 end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"""

#: this process's holder token: the pid, and a nonce telling this process
#: from an earlier one that had the same pid.
_TOKEN = f"{os.getpid()}:{secrets.token_hex(4)}"


class NameLostError(RedcurrentError):
    """Another process took this worker's consumer name: this one did not
    renew it for longer than its lifetime (frozen or cut off from Redis)."""


def worker_host() -> str:
    """The host part of worker names: ``REDCURRENT_WORKER_HOST``, else the host
    name (a Kubernetes pod's name)."""
    return os.environ.get("REDCURRENT_WORKER_HOST") or socket.gethostname()


def _field(group: str, name: str) -> str:
    return json.dumps([group, name])


def _free(value: bytes | None, now_ms: int) -> bool:
    """Whether a name of this host whose holder record is ``value`` may be taken."""
    if value is None or _expired(value, now_ms):
        return True
    token = value.decode().partition(" ")[0]
    pid = token.partition(":")[0]
    if token == _TOKEN or not pid.isdigit():
        return False  # another consumer of this process; or a holder we cannot check
    if int(pid) == os.getpid():
        return True  # an earlier process with our pid (a restarted container): gone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _expired(value: bytes, now_ms: int) -> bool:
    expires = value.decode().partition(" ")[2]
    return not expires.isdigit() or int(expires) < now_ms


class WorkerName:
    """A claimed name, renewed until :meth:`release`."""

    def __init__(self, redis: AnyRedis, key: str, group: str, name: str) -> None:
        self._redis = redis
        self._key = key
        self.group = group
        self.name = name
        self._keep = redis.register_script(_KEEP)

    def __repr__(self) -> str:
        return f"WorkerName({self.group!r}, {self.name!r})"

    async def keep(self, *, interval: float = TTL / 3) -> None:
        """Renew the name until cancelled; raises :class:`NameLostError` once
        another process has it. Transient Redis faults are retried: the name
        lives ``TTL`` seconds unrenewed."""
        while True:
            await anyio.sleep(interval)
            try:
                kept = await self._keep(
                    keys=[self._key],
                    args=[_field(self.group, self.name), _TOKEN, _value(time.time())],
                )
            except Exception as exc:
                if classify(exc) is Fault.TRANSIENT:
                    continue
                raise
            if not kept:
                raise NameLostError(
                    f"consumer name {self.name!r} of group {self.group!r} was taken by "
                    f"another process: this one did not renew it for {TTL:g}s"
                )

    async def release(self) -> None:
        """Free the name (on a graceful stop), if this process still holds it."""
        try:
            await self._keep(keys=[self._key], args=[_field(self.group, self.name), _TOKEN, ""])
        except Exception as exc:
            if classify(exc) is not Fault.TRANSIENT:
                raise
            # Unreachable: the name expires by itself after TTL.


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _raw(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _value(now: float) -> str:
    return f"{_TOKEN} {int((now + TTL) * 1000)}"


async def claim_worker_name(
    redis: AnyRedis, key: str, group: str, *, host: str | None = None, taken: Sequence[str] = ()
) -> WorkerName:
    """Claim the lowest free ``<host>-<n>`` of ``group`` in the hash ``key``;
    ``taken``: names this process already uses for the group."""
    prefix = f"{host or worker_host()}-"
    claim = redis.register_script(_CLAIM)
    while True:
        now = time.time()
        held = await redis.hgetall(key)
        current = {_text(k): _raw(v) for k, v in held.items()}
        now_ms = int(now * 1000)
        for stale in [f for f, v in current.items() if _expired(v, now_ms - int(TTL * 1000))]:
            # Names of any host left unrenewed for long (pods gone for good).
            await claim(keys=[key], args=[stale, current.pop(stale), ""])
        for index in range(len(current) + len(taken) + 1):
            name = f"{prefix}{index}"
            field = _field(group, name)
            holder = current.get(field)
            if name in taken or not _free(holder, now_ms):
                continue
            if await claim(keys=[key], args=[field, holder or b"", _value(now)]):
                logger.info("worker consumer name %r for group %r", name, group)
                return WorkerName(redis, key, group, name)
            break  # someone else took it meanwhile: look again
