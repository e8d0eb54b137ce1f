"""StreamConsumer: one member of a consumer group.

This module is the public face: configuration, handler registration and the
lifecycle (``async with``, ``run``, ``stop``, ``done``). The loops themselves
run in :class:`redcurrent._runtime.Runtime`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import secrets
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc
import redis.asyncio as aredis

from ._batch import BatchConfig
from ._limits import DEFAULT_MAX_PAYLOAD_BYTES, check_limit
from ._redis import AnyRedis, bytes_client, check_client
from ._routes import BatchHandlerObject, HandlerObject, Router
from ._runtime import Runtime, Settings
from .cleanup import CleanupPolicy, check_policy
from .errors import ConfigurationError, ConsumerStateError, StartTimeoutError
from .keys import TopicKeys, check_name
from .message import ConsumerStats, StartFrom, StopReason

__all__ = ["StreamConsumer"]


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_ID = re.compile(r"^\d+(-\d+)?$")


def default_consumer_name() -> str:
    """Unique per process, readable in XINFO: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class StreamConsumer:
    """Consume one stream as one member of a consumer group.

    Semantics (at-least-once): a message leaves the group's pending list only
    when its handler finished without error, or when it is moved to the
    topic's dead-letter stream with the reason. Durations are float seconds.

    - ``start``: where a *new* group starts (an existing one keeps its
      position): :attr:`StartFrom.LATEST` (default), :attr:`StartFrom.EARLIEST`
      or an entry id (delivery starts after it).
    - ``claim_idle`` (30 s): entries left idle this long by any consumer are
      taken over; a failed message is retried after it. Running and waiting
      messages are leased, so slow handlers are not robbed.
    - ``concurrency`` (16): the most handlers running at once.
    - ``max_deliveries`` (5): deliveries before a failing message becomes a
      dead letter.
    - ``prefetch`` (``max(4 * concurrency, 256)``; with batch handlers at
      least ``max(4 * largest batch, 1024)``): the most entries held in memory
      (running plus waiting); bounds memory and how much one consumer takes
      from its peers.
    - ``batch``: defaults for batch handlers (:class:`BatchConfig`).
    - ``cleanup``: a :class:`CleanupPolicy` with ``auto=True`` makes this
      consumer take part in trimming processed entries.
    - ``shutdown_timeout`` (10 s): how long a graceful stop waits for the
      messages in hand before cancelling them (they stay pending).
    - ``block`` (5 s): how long one XREADGROUP waits for new entries; an idle
      consumer sends about one command per ``block``.
    - ``consumer_idle_timeout`` (1 h): other consumers of the group idle this
      long and holding nothing are deleted from the group.
    - ``start_timeout`` (30 s): how long ``async with consumer`` / :meth:`run`
      keep trying to reach Redis and set up the group before they raise
      :class:`StartTimeoutError`. Wrong credentials or a missing ACL
      permission raise :class:`AccessDeniedError` at once.
    - ``recreate_group`` (False): when the group vanishes under a running
      consumer, re-create it (where this consumer last read) and go on,
      instead of stopping with :attr:`StopReason.DELETED`. For servers that
      may restart without persistence; a terminated topic still stops.
    - ``max_payload_bytes`` (8 MiB; ``None``: no limit): an entry heavier
      than this (the bytes of its field names and values) is moved to the
      dead letters undecoded, with a reason naming its size and the limit.

    ``stream``, ``group`` and ``name`` are any non-empty str (braces, spaces,
    newlines, Unicode); ``name=None`` picks a unique one. Bad options raise
    :class:`ConfigurationError` here, before anything touches Redis.
    """

    def __init__(
        self,
        redis: AnyRedis,
        stream: str,
        group: str,
        name: str | None = None,
        *,
        start: StartFrom | str = StartFrom.LATEST,
        claim_idle: float = 30.0,
        concurrency: int = 16,
        max_deliveries: int = 5,
        prefetch: int | None = None,
        batch: BatchConfig | None = None,
        cleanup: CleanupPolicy | None = None,
        shutdown_timeout: float = 10.0,
        block: float = 5.0,
        consumer_idle_timeout: float = 3600.0,
        start_timeout: float = 30.0,
        recreate_group: bool = False,
        max_payload_bytes: int | None = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        check_client(redis, "StreamConsumer")
        stream = check_name(stream, "a stream name")
        group = check_name(group, "a group name")
        if name is not None:
            name = check_name(name, "a consumer name")
        check_policy(cleanup)
        if not isinstance(start, StartFrom) and not _ID.match(str(start)):
            raise ConfigurationError(
                f"start must be StartFrom.LATEST, StartFrom.EARLIEST or an entry id, got {start!r}"
            )
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, got {concurrency}")
        if max_deliveries < 1:
            raise ConfigurationError(f"max_deliveries must be >= 1, got {max_deliveries}")
        if not claim_idle > 0 or not block > 0 or shutdown_timeout < 0:
            raise ConfigurationError("claim_idle and block must be > 0, shutdown_timeout >= 0")
        if not start_timeout > 0:
            raise ConfigurationError(f"start_timeout must be > 0, got {start_timeout!r}")
        if prefetch is not None and prefetch < concurrency:
            raise ConfigurationError(
                f"prefetch ({prefetch}) must be >= concurrency ({concurrency})"
            )
        client = bytes_client(redis)
        self.stream = stream
        self.group = group
        self.name = name or default_consumer_name()
        self.keys = TopicKeys(stream)
        self.start = start
        self.claim_idle = claim_idle
        self.concurrency = concurrency
        self.max_deliveries = max_deliveries
        self.prefetch = prefetch or max(4 * concurrency, 256)
        self.batch = batch or BatchConfig()
        self.cleanup = cleanup
        self.shutdown_timeout = shutdown_timeout
        self.block = _block_within_socket_timeout(client, block)
        self.consumer_idle_timeout = consumer_idle_timeout
        self.start_timeout = start_timeout
        self.recreate_group = recreate_group
        self.max_payload_bytes = check_limit(max_payload_bytes)
        self._router = Router()
        settings = Settings(
            stream=stream,
            group=group,
            name=self.name,
            start=start.value if isinstance(start, StartFrom) else str(start),
            claim_idle=claim_idle,
            concurrency=concurrency,
            max_deliveries=max_deliveries,
            prefetch=self.prefetch,
            prefetch_given=prefetch is not None,
            batch=self.batch,
            cleanup=cleanup,
            shutdown_timeout=shutdown_timeout,
            block=self.block,
            consumer_idle_timeout=consumer_idle_timeout,
            start_timeout=start_timeout,
            recreate_group=recreate_group,
            max_payload_bytes=self.max_payload_bytes,
        )
        # A sibling client made for a decode_responses one is ours to close.
        self._run = Runtime(
            client, settings, self._router, owns_client=client is not redis, label=repr(self)
        )
        self._tg: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        return f"StreamConsumer({self.stream!r}, group={self.group!r}, name={self.name!r})"

    # -- registration -------------------------------------------------------
    def handler(self, message_type: str, model: type[Any] | None = None) -> Callable[[F], F]:
        """Register ``async def fn(msg: Message) -> None`` for a type (``"*"``:
        every type without a handler of its own). With ``model``, ``msg.data``
        is decoded and validated into that type; entries that do not fit
        become dead letters."""

        def register(fn: F) -> F:
            self._check_not_started()
            self._router.add(message_type, fn, model)
            return fn

        return register

    def batch_handler(
        self,
        message_type: str,
        size: int | None = None,
        timeout: float | None = None,
        model: type[Any] | None = None,
    ) -> Callable[[F], F]:
        """Register ``async def fn(msgs: list[Message]) -> None`` for a type.

        It gets up to ``size`` messages (default: ``BatchConfig.size``), or
        fewer once the oldest waited ``timeout`` seconds. Raise
        :class:`BatchError` naming failed ids to acknowledge the others.
        """

        def register(fn: F) -> F:
            self._check_not_started()
            self._router.add(message_type, fn, model, batch=True, size=size, timeout=timeout)
            return fn

        return register

    def register(self, obj: HandlerObject, model: type[Any] | None = None) -> None:
        """Register an object with ``message_type`` and ``async handle(msg)``."""
        self._check_not_started()
        self._router.add(obj.message_type, obj.handle, model)

    def register_batch(self, obj: BatchHandlerObject, model: type[Any] | None = None) -> None:
        """Register an object with ``message_type``, ``batch_size`` (0: the
        consumer's default) and ``async handle_batch(msgs)``."""
        self._check_not_started()
        size = obj.batch_size or None
        self._router.add(obj.message_type, obj.handle_batch, model, batch=True, size=size)

    def _check_not_started(self) -> None:
        if self._run.started:
            raise ConsumerStateError("handlers must be registered before the consumer starts")

    # -- state ----------------------------------------------------------------
    @property
    def stop_reason(self) -> StopReason | None:
        """None while running; why it stopped afterwards."""
        return self._run.stop_reason if self._run.done.is_set() else None

    @property
    def auto_stopped(self) -> bool:
        """True when the consumer stopped because its topic was terminated or deleted."""
        return self.stop_reason in (StopReason.TERMINATED, StopReason.DELETED)

    @property
    def error(self) -> BaseException | None:
        """The exception behind :attr:`StopReason.FAILED`."""
        return self._run.error

    @property
    def stats(self) -> ConsumerStats:
        dispatcher = self._run.dispatcher
        return self._run.counters.snapshot(len(dispatcher.held) if dispatcher else 0)

    async def done(self) -> StopReason:
        """Wait until the loops have exited and acks are flushed; awaitable by
        any number of tasks, any number of times."""
        await self._run.done.wait()
        assert self._run.stop_reason is not None
        return self._run.stop_reason

    # -- lifecycle ------------------------------------------------------------
    async def __aenter__(self) -> StreamConsumer:
        if self._run.started:
            raise ConsumerStateError(f"{self!r} was already started; create a new consumer")
        if not self._router:
            raise ConfigurationError(f"{self!r} has no handlers")
        self._run.started = True
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            with anyio.move_on_after(self.start_timeout) as waited:
                await tg.start(self._run.main)
            if waited.cancelled_caught:
                raise self._start_timed_out()
        except BaseException:
            # The start-up error itself is what the caller should see, not
            # the task group's wrapping of it.
            tg.cancel_scope.cancel()
            with contextlib.suppress(BaseException):
                await tg.__aexit__(None, None, None)
            raise
        self._tg = tg
        return self

    def _start_timed_out(self) -> StartTimeoutError:
        last = self._run.member.outage.last_error
        cause = f"{type(last).__name__}: {last}" if last is not None else "no answer"
        # A TLS server drops a client whose certificate it refuses as it would
        # drop any connection: only the hint can point there.
        tls = (
            " Over TLS, also the certificates: ssl_ca_certs must hold the CA that signed"
            " the server's, and a server that verifies clients (tls-auth-clients) needs"
            " an ssl_certfile and ssl_keyfile signed by its CA."
            if _uses_tls(self._run.redis)
            else ""
        )
        return StartTimeoutError(
            f"{self!r} could not start within start_timeout={self.start_timeout:g}s: "
            f"Redis unreachable ({cause}); is the server up and the address right?{tls}"
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        self.request_stop()
        if exc_type is None or not isinstance(exc, anyio.get_cancelled_exc_class()):
            with anyio.CancelScope(shield=True):
                await self._run.done.wait()
            await self._tg.__aexit__(None, None, None)
            return None
        return await self._tg.__aexit__(exc_type, exc, tb)

    async def run(self) -> StopReason:
        """Run until stopped (or the topic goes away); returns the reason."""
        async with self:
            await self._run.done.wait()
        return await self.done()

    async def stop(self) -> StopReason:
        """Stop gracefully and wait until done. From inside a handler use
        :meth:`request_stop`, which does not wait for the handler itself."""
        self.request_stop()
        return await self.done()

    def request_stop(self, *, hard: bool = False) -> None:
        """Ask the consumer to stop; returns at once. ``hard`` cancels running
        handlers now instead of giving them ``shutdown_timeout``."""
        self._run.request_stop(StopReason.STOPPED, hard=hard)


_UNSET = object()


def _block_within_socket_timeout(redis: AnyRedis, block: float) -> float:
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


def _uses_tls(client: AnyRedis) -> bool:
    pool = getattr(client, "connection_pool", None)
    kind = getattr(pool, "connection_class", None)
    if kind is None:  # a cluster keeps its nodes' connection class in its kwargs
        kind = getattr(client, "connection_kwargs", {}).get("connection_class")
    return isinstance(kind, type) and issubclass(kind, aredis.SSLConnection)
