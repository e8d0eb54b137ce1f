"""Removing consumers that left the group for good.

Default consumer names are unique per process, so without this every
restart would add a consumer to the group forever. A consumer is deleted only
when it holds no pending entry and has been idle long enough, checked and
done in one script so that no entry it just read is lost.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import anyio

from ._member import GroupMember
from ._redis import as_str
from ._scripts import DELETE_IDLE_CONSUMER

__all__ = ["prune_idle_consumers"]

logger = logging.getLogger("redcurrent.consumer")


async def prune_idle_consumers(member: GroupMember, idle_timeout: float) -> None:
    """Forever: every ``idle_timeout / 4`` (1 s to 15 min), delete the idle ones."""
    script = member.redis.register_script(DELETE_IDLE_CONSUMER)
    idle_ms = int(idle_timeout * 1000)
    interval = min(max(idle_timeout / 4, 1.0), 900.0)
    while True:
        rows: list[dict[str, Any]] = await member.call(
            "XINFO CONSUMERS",
            functools.partial(member.redis.xinfo_consumers, member.stream, member.group),
        )
        for row in rows:
            name = as_str(row["name"])
            if name == member.name or row["pending"] or row["idle"] < idle_ms:
                continue
            deleted = await member.call(
                "XGROUP DELCONSUMER",
                functools.partial(script, keys=[member.stream], args=[member.group, name, idle_ms]),
            )
            if deleted == 0:
                logger.info("%r: deleted idle consumer %r from the group", member, name)
        await anyio.sleep(interval)
