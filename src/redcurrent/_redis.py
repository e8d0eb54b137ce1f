"""Small adapters over redis-py's asyncio client, kept in one place.

The library always talks to Redis with a client that returns bytes: payloads
need not be UTF-8, and a client built with ``decode_responses=True`` would
fail on such an entry inside redis-py's parser, taking the whole reply down.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeAlias

import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster

from .errors import ConfigurationError

__all__ = [
    "AnyRedis",
    "Entry",
    "as_str",
    "bytes_client",
    "entries_of",
]

AnyRedis: TypeAlias = "aredis.Redis | RedisCluster"
Entry: TypeAlias = tuple[bytes, dict[bytes, bytes]]


def _decodes(client: AnyRedis) -> bool:
    return bool(client.get_encoder().decode_responses)


def bytes_client(client: AnyRedis) -> AnyRedis:
    """``client`` itself, or a sibling on the same server that returns bytes."""
    if not _decodes(client):
        return client
    if isinstance(client, aredis.Redis):
        pool = client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["decode_responses"] = False
        sibling_pool = aredis.ConnectionPool(
            connection_class=pool.connection_class,
            max_connections=pool.max_connections,
            **kwargs,
        )
        return aredis.Redis(connection_pool=sibling_pool)
    raise ConfigurationError(
        "redcurrent needs a RedisCluster client created with decode_responses=False"
    )


def as_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def entries_of(reply: Any) -> list[Entry]:
    """The entries of a one-stream XREAD/XREADGROUP reply, RESP2 or RESP3.

    A pending entry whose stream entry was deleted comes back with no fields
    (an empty dict); callers treat that as "gone".
    """
    if not reply:
        return []
    streams: Iterable[Any] = reply.values() if isinstance(reply, dict) else (s[1] for s in reply)
    out: list[Entry] = []
    for entries in streams:
        for entry_id, fields in entries:
            out.append((entry_id, fields if isinstance(fields, dict) else _pairs(fields)))
    return out


def _pairs(flat: Any) -> dict[bytes, bytes]:
    if not flat:
        return {}
    it = iter(flat)
    return dict(zip(it, it, strict=False))
