"""StreamConsumer: one member of a consumer group.

This module is the public face: configuration, handler registration and the
lifecycle (``async with``, ``run``, ``stop``, ``done``). The loops themselves
run in :class:`redcurrent._runtime.Runtime`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from types import TracebackType

import anyio
import anyio.abc
import msgspec

from ._config import DEFAULT_RETRY, BatchConfig, CleanupPolicy, ConsumerConfig, RetryPolicy
from ._context import Context
from ._handlers import HandlerSpec
from ._instrument import CONSUMER_OBSERVERS, MIDDLEWARE, ConsumerObserver
from ._keys import TopicKeys, check_name
from ._limits import DEFAULT_MAX_PAYLOAD_BYTES
from ._message import ConsumerHealth, ConsumerStats, StartFrom, StopReason
from ._partitioned import PartitionedRuntime
from ._partitions import load_layout
from ._redis import AnyRedis, bytes_client, check_client, uses_tls
from ._router import Registrar
from ._routes import RouteTable
from ._runtime import Runtime
from ._topic import Topic
from .errors import ConfigurationError, ConsumerStateError, StartTimeoutError

__all__ = ["StreamConsumer"]


def default_consumer_name() -> str:
    """Unique per process, readable in XINFO: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class StreamConsumer(Registrar):
    """Consume one stream as one member of a consumer group.

    Semantics (at-least-once): a message leaves the group's pending list only
    when its handler finished without error, or when it is moved to the
    topic's dead-letter stream with the reason. Durations are float seconds.

    The keyword options are the fields of :class:`ConsumerConfig`, where each
    one's default and meaning is documented; the consumer keeps them, frozen,
    as :attr:`config`. ``name`` defaults to one unique per process and
    consumer (host, pid, random suffix).
    """

    # Slots: setting an option after construction (``consumer.claim_idle = 1``)
    # is an AttributeError instead of a silent no-op; options live in ``config``.
    __slots__ = ("_config", "_keys", "_named", "_routes", "_run", "_tg")

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
        retry: RetryPolicy | None = DEFAULT_RETRY,
        member_ttl: float = 10.0,
    ) -> None:
        # Plain str names (a str enum becomes the value redis-py sends).
        config = ConsumerConfig(
            stream=check_name(stream, "a stream name"),
            group=check_name(group, "a group name"),
            name=default_consumer_name() if name is None else check_name(name, "a consumer name"),
            start=start,
            claim_idle=claim_idle,
            concurrency=concurrency,
            max_deliveries=max_deliveries,
            prefetch=prefetch,
            batch=batch or BatchConfig(),
            cleanup=cleanup,
            shutdown_timeout=shutdown_timeout,
            block=block,
            consumer_idle_timeout=consumer_idle_timeout,
            start_timeout=start_timeout,
            recreate_group=recreate_group,
            max_payload_bytes=max_payload_bytes,
            retry=retry,
            member_ttl=member_ttl,
        )
        self._setup(redis, config)
        self._named = name is not None

    @classmethod
    def from_config(cls, redis: AnyRedis, config: ConsumerConfig) -> StreamConsumer:
        """A consumer with options read elsewhere (a file, a worker's command
        line), validated once by :class:`ConsumerConfig`."""
        consumer = cls.__new__(cls)
        consumer._setup(redis, config)
        consumer._named = True
        return consumer

    def _setup(self, redis: AnyRedis, config: ConsumerConfig) -> None:
        check_client(redis, "StreamConsumer")
        self._config = config
        self._keys = TopicKeys(config.stream)
        # One Context for all handlers: the optional second parameter costs
        # nothing per message.
        context = Context(Topic(redis, config.stream), consumer=config.name, group=config.group)
        self._routes = RouteTable(context)
        client = bytes_client(redis)
        # A sibling client made for a decode_responses one is ours to close.
        self._run: Runtime | PartitionedRuntime = Runtime(
            client, config, self._routes, owns_client=client is not redis, label=repr(self)
        )
        self._tg: anyio.abc.TaskGroup | None = None

    def _rename(self, name: str) -> None:
        """Before start: a worker gives a consumer whose name was left to the
        default its stable one (see ``_names``); handlers stay registered."""
        run = self._run
        if run.started:
            raise ConsumerStateError(f"{self!r} is started: it cannot be renamed")
        config = msgspec.structs.replace(self._config, name=check_name(name, "a consumer name"))
        self._config = config
        if self._routes.context is not None:
            self._routes.context._rename(name)
        self._run = Runtime(
            run.redis, config, self._routes, owns_client=run.owns_client, label=repr(self)
        )

    @property
    def config(self) -> ConsumerConfig:
        """The options this consumer runs with (frozen: build a new consumer to change them)."""
        return self._config

    @property
    def stream(self) -> str:
        return self._config.stream

    @property
    def group(self) -> str:
        return self._config.group

    @property
    def name(self) -> str:
        """This consumer's name in the group."""
        return self._config.name

    @property
    def keys(self) -> TopicKeys:
        """The Redis keys of the topic (all in the stream's cluster slot)."""
        return self._keys

    def __repr__(self) -> str:
        return f"StreamConsumer({self.stream!r}, group={self.group!r}, name={self.name!r})"

    # -- registration -------------------------------------------------------
    # handler, batch_handler, register, register_batch and include_router come
    # from Registrar; each checked handler lands here.
    def _add_spec(self, spec: HandlerSpec) -> None:
        self._check_not_started()
        self._routes.include(spec)

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
        return self._run.stats()

    def health(self, *, outage_tolerance: float = 60.0) -> ConsumerHealth:
        """For a liveness or readiness probe: running, outage in progress, last
        contact with Redis. ``healthy`` turns False once an outage lasts longer
        than ``outage_tolerance`` seconds, or when the consumer stopped."""
        run = self._run
        now = time.monotonic()
        running = run.started and not run.done.is_set()
        since = run.member.outage.since
        outage = None if since is None else now - since
        last = run.member.last_ok
        return ConsumerHealth(
            healthy=running and (outage is None or outage <= outage_tolerance),
            running=running,
            stop_reason=self.stop_reason,
            outage_seconds=outage,
            last_contact_seconds=None if last is None else now - last,
        )

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
        if not self._routes:
            raise ConfigurationError(f"{self!r} has no handlers")
        await self._open_partitions()
        self._run.started = True
        if MIDDLEWARE:
            self._routes.wrap(MIDDLEWARE, self.stream, self.group, self.name)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            with anyio.move_on_after(self._config.start_timeout) as waited:
                await tg.start(self._run.main)
            if waited.cancelled_caught:
                raise self._start_timed_out()
            if CONSUMER_OBSERVERS:
                tg.start_soon(self._observe, list(CONSUMER_OBSERVERS))
        except BaseException:
            # The start-up error itself is what the caller should see, not
            # the task group's wrapping of it.
            tg.cancel_scope.cancel()
            with contextlib.suppress(BaseException):
                await tg.__aexit__(None, None, None)
            raise
        self._tg = tg
        return self

    async def _open_partitions(self) -> None:
        """A partitioned topic (its layout is stored in Redis) is consumed by
        a :class:`PartitionedRuntime` instead: same handlers, same face."""
        run = self._run
        if not isinstance(run, Runtime):
            return
        config = self._config
        layout = None
        with anyio.move_on_after(config.start_timeout) as waited:
            layout = await run.member.call(
                "reading the topic's layout", lambda: load_layout(run.redis, config.stream, None)
            )
        if waited.cancelled_caught:
            raise self._start_timed_out()
        if layout is not None:
            self._run = PartitionedRuntime(
                run.redis,
                config,
                self._routes,
                layout,
                owns_client=run.owns_client,
                label=repr(self),
            )

    @property
    def partitions(self) -> list[int] | None:
        """The partitions this consumer reads now (None: the topic is not partitioned)."""
        run = self._run
        return run.owned if isinstance(run, PartitionedRuntime) else None

    async def _observe(self, observers: list[ConsumerObserver]) -> None:
        for observer in observers:
            observer.started(self)
        await self._run.done.wait()
        for observer in observers:
            observer.stopped(self)

    def _start_timed_out(self) -> StartTimeoutError:
        last = self._run.member.outage.last_error
        cause = f"{type(last).__name__}: {last}" if last is not None else "no answer"
        # A TLS server drops a client whose certificate it refuses as it would
        # drop any connection: only the hint can point there.
        tls = (
            " Over TLS, also the certificates: ssl_ca_certs must hold the CA that signed"
            " the server's, and a server that verifies clients (tls-auth-clients) needs"
            " an ssl_certfile and ssl_keyfile signed by its CA."
            if uses_tls(self._run.redis)
            else ""
        )
        return StartTimeoutError(
            f"{self!r} could not start within start_timeout={self._config.start_timeout:g}s: "
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

    async def stop(self, *, hard: bool = False) -> StopReason:
        """Stop and wait until done: gracefully (running handlers get
        ``shutdown_timeout``), or with ``hard`` cancelling them now (their
        messages stay pending). From inside a handler use :meth:`request_stop`,
        which does not wait for the handler itself."""
        self.request_stop(hard=hard)
        return await self.done()

    def request_stop(self, *, hard: bool = False) -> None:
        """Ask the consumer to stop; returns at once. ``hard`` cancels running
        handlers now instead of giving them ``shutdown_timeout``."""
        self._run.request_stop(StopReason.STOPPED, hard=hard)
