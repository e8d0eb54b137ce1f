"""Small adapters over redis-py's asyncio client, kept in one place.

The library always talks to Redis with a client that returns bytes: payloads
need not be UTF-8, and a client built with ``decode_responses=True`` would
fail on such an entry inside redis-py's parser, taking the whole reply down.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeAlias

import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

try:
    import hiredis
except ImportError:  # pragma: no cover - a dependency (redis[hiredis]), yet optional to redis-py
    hiredis = None  # type: ignore[assignment]

from .errors import ConfigurationError

__all__ = [
    "AnyRedis",
    "Entry",
    "as_str",
    "block_within_socket_timeout",
    "check_client",
    "execute_pipeline",
    "bytes_client",
    "packed_pipeline",
    "packed_sender",
    "entries_of",
    "raw_reply_client",
    "uses_tls",
]

AnyRedis: TypeAlias = aredis.Redis | RedisCluster
Entry: TypeAlias = tuple[bytes, dict[bytes, bytes]]


def check_client(client: object, who: str) -> AnyRedis:
    """``client`` if it is an asyncio client, else a :class:`ConfigurationError`
    now, rather than an AttributeError or "can't be used in 'await'" at the
    first command (a synchronous ``redis.Redis`` is the usual mistake)."""
    if isinstance(client, aredis.Redis | RedisCluster):
        return client
    hint = ""
    if type(client).__module__.startswith("redis."):
        hint = "; the synchronous client cannot be awaited: use redis.asyncio"
    raise ConfigurationError(
        f"{who} needs a redis.asyncio.Redis or redis.asyncio.RedisCluster client, "
        f"got {type(client).__qualname__}{hint}"
    )


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


def raw_reply_client(client: AnyRedis, *commands: str) -> AnyRedis:
    """A client on ``client``'s connection pool whose replies to ``commands`` skip
    redis-py's response callbacks, so the parser's plain lists come back.

    For an XREADGROUP of hundreds of entries the RESP2 callback builds a tuple and
    a dict per entry that :func:`entries_of` would only unpack again. Connections,
    retries and health checks stay redis-py's: only the parsing step is dropped.
    Anything but a plain :class:`redis.asyncio.Redis` on a connection pool (a
    subclass, a single-connection client, a cluster) is returned as it is;
    :func:`entries_of` reads both forms.
    """
    if type(client) is not aredis.Redis or client.single_connection_client:
        return client
    sibling = aredis.Redis(connection_pool=client.connection_pool)
    for command in commands:
        if command in sibling.response_callbacks:
            del sibling.response_callbacks[command]
    return sibling


def _packing_pool(client: AnyRedis) -> tuple[Any, bool] | None:
    """The connection pool to send hiredis-packed commands through, and whether
    its ``get_connection`` wants a command name; None where that does not apply."""
    if hiredis is None:  # pragma: no cover
        return None
    if type(client) is not aredis.Redis or client.single_connection_client:
        return None
    pool = client.connection_pool
    if not isinstance(pool, aredis.ConnectionPool):
        return None
    # redis-py < 5.3 wants the command's name, later ones warn when given it.
    parameter = inspect.signature(pool.get_connection).parameters.get("command_name")
    return pool, parameter is not None and parameter.default is inspect.Parameter.empty


def packed_sender(client: AnyRedis) -> Callable[..., Awaitable[Any]]:
    """``client.execute_command`` for a command whose reply needs no callback
    and has many arguments (an XACK of hundreds of ids), with the arguments
    packed by ``hiredis.pack_command`` (about 0.1 µs an argument against
    redis-py's 0.35 in pure Python), sent and read through redis-py's
    connection API: the pool's ``get_connection``, the connection's
    ``send_packed_command`` and ``read_response`` (which disconnect on any
    error or cancellation, so a connection with an unread reply never goes back
    to the pool), the pool's ``release``. Errors are redis-py's own types;
    redis-py's own retry is not applied (callers retry transient faults
    themselves). Arguments: ``bytes`` or ASCII ``str``. Anything but a plain
    :class:`redis.asyncio.Redis` on a connection pool gets ``execute_command``.
    """
    found = _packing_pool(client)
    if found is None:
        return client.execute_command
    pool, named = found
    pack_command = hiredis.pack_command

    async def send(*args: Any) -> Any:
        conn = await (pool.get_connection(args[0]) if named else pool.get_connection())
        try:
            await conn.send_packed_command(pack_command(args))
            return await conn.read_response()
        finally:
            await pool.release(conn)

    return send


def packed_pipeline(client: AnyRedis) -> Callable[..., Awaitable[list[Any]]]:
    """Send ``commands`` (tuples of arguments) in one round trip and return
    their raw replies, raising the first error reply as the server sent it
    (as :func:`execute_pipeline` does), once every reply is read. Packed and
    sent as :func:`packed_sender` does; other clients get a redis-py pipeline
    (whose replies go through the client's callbacks)."""
    found = _packing_pool(client)
    if found is None:

        async def fallback(*commands: tuple[Any, ...]) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return await execute_pipeline(pipe)

        return fallback
    pool, named = found
    pack_command = hiredis.pack_command

    async def send(*commands: tuple[Any, ...]) -> list[Any]:
        packed = b"".join([pack_command(command) for command in commands])
        conn = await (pool.get_connection(commands[0][0]) if named else pool.get_connection())
        replies: list[Any] = []
        try:
            await conn.send_packed_command(packed)
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:  # raised after the reply was read
                    replies.append(exc)
        finally:
            await pool.release(conn)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    return send


def entries_of(reply: Any) -> list[Entry]:
    """The entries of a one-stream XREAD/XREADGROUP reply: RESP2 or RESP3, parsed
    by redis-py's callbacks (``(id, dict)``) or raw (``[id, [k, v, ...]]``).

    A pending entry whose stream entry was deleted comes back with no fields
    (an empty dict); callers treat that as "gone".
    """
    if not reply:
        return []
    if isinstance(reply, dict):
        # RESP3. redis-py's callback wraps each stream's entries in one more list.
        streams: Iterable[Any] = (
            v[0] if v and v[0].__class__ is list and (not v[0] or v[0][0].__class__ is tuple) else v
            for v in reply.values()
        )
    else:
        streams = (s[1] for s in reply)
    out: list[Entry] = []
    append = out.append
    for entries in streams:
        for entry_id, f in entries:
            if f.__class__ is list and len(f) == 6:
                # The wire format's three fields: the common case, spelled out.
                append((entry_id, {f[0]: f[1], f[2]: f[3], f[4]: f[5]}))
            elif isinstance(f, dict):
                append((entry_id, f))
            else:
                append((entry_id, _pairs(f)))
    return out


def _pairs(flat: Any) -> dict[bytes, bytes]:
    if not flat:
        return {}
    it = iter(flat)
    return dict(zip(it, it, strict=False))


async def execute_pipeline(pipe: Any) -> list[Any]:
    """Run a pipeline and raise the first error as the server sent it: redis-py's
    own raising rewords it ("Command # 2 ... of pipeline caused error"), which
    hides the error code :func:`redcurrent._faults.classify` reads."""
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


_UNSET = object()


def block_within_socket_timeout(redis: AnyRedis, block: float) -> float:
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


def uses_tls(client: AnyRedis) -> bool:
    """Whether ``client`` connects over TLS (``rediss://``, ``ssl=True``)."""
    pool = getattr(client, "connection_pool", None)
    kind = getattr(pool, "connection_class", None)
    if kind is None:  # a cluster keeps its nodes' connection class in its kwargs
        kind = getattr(client, "connection_kwargs", {}).get("connection_class")
    return isinstance(kind, type) and issubclass(kind, aredis.SSLConnection)
