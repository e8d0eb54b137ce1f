"""One command to a key of a cluster slot under migration, despite redis-py's ASK bug.

redis-py's asyncio cluster client (seen in 5.0.2 and 8.1.0) answers an ``ASK``
redirect by sending ``ASKING`` to the importing node as a command of its own,
on a pooled connection it then releases, and the real command on the next free
connection (``RedisCluster._execute_command``, ``await
target_node.execute_command("ASKING")``). With two or more idle connections to
that node the command goes out without ASKING, the node answers ``MOVED`` back
to the migrating one, which says ``ASK`` again, until the request TTL runs out
(``ClusterError("TTL exhausted.")``); every 5th MOVED on the way closes all the
client's connections. Reproduction: ``tools/repro_redis_py_ask.py``.

:func:`execute_command` runs a command as ``redis.execute_command`` does
(:func:`run_script` a registered script, as calling it does) and,
when redis-py gives up that way, sends it again itself: to the slot's owner
without following redirects, and on an ``ASK`` reply sends ``ASKING`` and the
command together on one connection of the importing node, as Redis requires.
Once a slot has shown the bug, its commands take that path first for
:data:`ASK_WINDOW` seconds (the ping-pong costs 16 round trips and three
reconnects of the whole client); a ``MOVED`` from the owner (the migration
finished) hands the slot back to redis-py at once. Sending the command again
is safe also for a write: redis-py's loop only goes round on MOVED, ASK and
TRYAGAIN, replies of a server that did not run it.

Nothing of redis-py is patched: this uses ``RedisCluster.keyslot`` and
``get_node``, ``NodesManager.get_node_from_slot``, and ``ClusterNode.execute_command``,
``acquire_connection``, ``release`` and ``parse_response``.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from redis import exceptions as rex
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript
from redis.typing import EncodableT, KeyT

from ._redis import AnyRedis, packed_sender

__all__ = ["ASK_WINDOW", "execute_command", "is_ask_ping_pong", "run_script"]

ASK_WINDOW = 10.0
"""Seconds a slot that showed the ping-pong keeps taking the direct path."""

# Per single-server client: its packed EVALSHA sender.
_senders: weakref.WeakKeyDictionary[Any, Callable[..., Awaitable[Any]]] = (
    weakref.WeakKeyDictionary()
)

# Per client: slot -> monotonic time until which its commands go direct.
_asking_slots: weakref.WeakKeyDictionary[RedisCluster, dict[int, float]] = (
    weakref.WeakKeyDictionary()
)


def is_ask_ping_pong(exc: BaseException) -> bool:
    """redis-py's cluster client ran out of redirects (``TTL exhausted``).

    Told by type: that is the one place redis-py raises a bare
    :class:`~redis.exceptions.ClusterError`; its subclasses
    (``ClusterDownError``, ``MasterDownError``) are other faults."""
    return type(exc) is rex.ClusterError


async def execute_command(redis: AnyRedis, key: KeyT, *args: EncodableT, **options: Any) -> Any:
    """``redis.execute_command(*args, **options)`` for a command on ``key`` (which
    picks the slot), that also succeeds while that slot is being migrated.

    Anything but a :class:`RedisCluster` just runs the command. Errors are
    redis-py's, as ``execute_command`` raises them."""
    if not isinstance(redis, RedisCluster):
        single: Any = redis  # redis-py leaves Redis.execute_command untyped
        return await single.execute_command(*args, **options)
    slot = redis.keyslot(key)
    slots = _asking_slots.get(redis)
    if slots is not None and slots.get(slot, 0.0) > time.monotonic():
        return await _direct(redis, slot, args, options)
    try:
        return await redis.execute_command(*args, **options)
    except rex.ClusterError as exc:
        if not is_ask_ping_pong(exc):
            raise
    _asking_slots.setdefault(redis, {})[slot] = time.monotonic() + ASK_WINDOW
    return await _direct(redis, slot, args, options)


async def run_script(
    redis: AnyRedis,
    script: AsyncScript,
    keys: Sequence[KeyT],
    args: Iterable[EncodableT] = (),
) -> Any:
    """``script(keys=keys, args=args)`` (EVALSHA, loading the script on
    ``NOSCRIPT`` as redis-py does) through :func:`execute_command`: the first
    key picks the slot, so every key must share its slot, as on any cluster."""
    if not keys:
        return await script(keys=keys, args=args, client=redis)
    argv = (*keys, *args)
    if not isinstance(redis, RedisCluster):
        # One server: no redirects to survive. Packed by hiredis (the publish
        # scripts carry thousands of arguments; see ``_redis.packed_sender``).
        send = _senders.get(redis)
        if send is None:
            send = _senders[redis] = packed_sender(redis)
        try:
            return await send("EVALSHA", script.sha, len(keys), *argv)
        except rex.NoScriptError:
            script.sha = await redis.script_load(script.script)
            return await send("EVALSHA", script.sha, len(keys), *argv)
    try:
        return await execute_command(redis, keys[0], "EVALSHA", script.sha, len(keys), *argv)
    except rex.NoScriptError:
        script.sha = await redis.script_load(script.script)
        return await execute_command(redis, keys[0], "EVALSHA", script.sha, len(keys), *argv)


def _forget(redis: RedisCluster, slot: int) -> None:
    slots = _asking_slots.get(redis)
    if slots is not None:
        slots.pop(slot, None)
        if not slots:
            _asking_slots.pop(redis, None)


async def _direct(
    redis: RedisCluster, slot: int, args: tuple[Any, ...], options: dict[str, Any]
) -> Any:
    """The command to the slot's owner, an ASK answered on one connection, a
    MOVED left to redis-py (which then refreshes its slot table)."""
    owner = redis.nodes_manager.get_node_from_slot(slot)
    if owner is None:
        _forget(redis, slot)
        return await redis.execute_command(*args, **options)
    try:
        return await owner.execute_command(*args, **options)
    except rex.MovedError:  # a subclass of AskError: first
        _forget(redis, slot)
        return await redis.execute_command(*args, **options)
    except rex.AskError as ask:
        target = redis.get_node(host=ask.host, port=ask.port)
        if target is None:  # a node the client does not know yet: let it learn
            _forget(redis, slot)
            return await redis.execute_command(*args, **options)
        return await asking(target, args, options)


async def asking(node: ClusterNode, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
    """``ASKING`` and the command written together on one connection of ``node``;
    the command's reply, parsed as redis-py's cluster client parses it."""
    connection = node.acquire_connection()
    try:
        reconnect = getattr(node, "disconnect_if_needed", None)  # redis-py 8: stale state
        if reconnect is not None:
            await reconnect(connection)
        await connection.send_packed_command(connection.pack_commands([("ASKING",), args]))
        refused: rex.ResponseError | None = None
        try:
            await connection.read_response()
        except rex.ResponseError as exc:  # the command's reply is still to be read
            refused = exc
        reply = await node.parse_response(connection, args[0], **options)
        if refused is not None:
            raise refused
        return reply
    finally:
        _release(node, connection)


def _release(node: ClusterNode, connection: Any) -> None:
    release = getattr(node, "release", None)  # newer redis-py; 5.0 appends to _free
    if release is not None:
        release(connection)
    else:
        node._free.append(connection)
