"""Which handler gets which message type: the registry behind the decorators."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from ._codec import PayloadDecoder, check_message_type, payload_decoder
from ._message import Message
from .errors import ConfigurationError

__all__ = ["BatchHandlerObject", "HandlerObject", "Route", "Router"]

CATCH_ALL = "*"

SingleFn = Callable[[Message[Any]], Awaitable[Any]]
BatchFn = Callable[[list[Message[Any]]], Awaitable[Any]]


@runtime_checkable
class HandlerObject(Protocol):
    """What :meth:`StreamConsumer.register` accepts."""

    message_type: str

    async def handle(self, msg: Message[Any], /) -> Any: ...


@runtime_checkable
class BatchHandlerObject(Protocol):
    """What :meth:`StreamConsumer.register_batch` accepts (``batch_size`` 0 =
    the consumer's :class:`BatchConfig` size)."""

    message_type: str
    batch_size: int

    async def handle_batch(self, msgs: list[Message[Any]], /) -> Any: ...


class Route:
    """One registered handler with what it needs to run: decoder and batching."""

    __slots__ = ("batch", "decoder", "fn", "name", "size", "timeout")

    def __init__(
        self,
        fn: Callable[..., Awaitable[Any]],
        decoder: PayloadDecoder,
        *,
        batch: bool,
        size: int | None = None,
        timeout: float | None = None,
    ) -> None:
        self.fn = fn
        self.decoder = decoder
        self.batch = batch
        self.size = size
        self.timeout = timeout
        self.name = getattr(fn, "__qualname__", repr(fn))


class Router:
    __slots__ = ("catch_all", "routes")

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.catch_all: Route | None = None

    def add(
        self,
        message_type: str,
        fn: Callable[..., Awaitable[Any]],
        model: type[Any] | None,
        *,
        batch: bool = False,
        size: int | None = None,
        timeout: float | None = None,
    ) -> None:
        check_message_type(message_type)
        if not callable(fn):
            raise ConfigurationError(f"handler for {message_type!r} is not callable: {fn!r}")
        if inspect.isfunction(fn) and not inspect.iscoroutinefunction(fn):
            raise ConfigurationError(
                f"handler {fn.__qualname__} for {message_type!r} must be an async function "
                "(async def); run blocking work with anyio.to_thread.run_sync inside it"
            )
        if size is not None and size < 1:
            raise ConfigurationError(f"batch size for {message_type!r} must be >= 1, got {size}")
        if timeout is not None and timeout <= 0:
            raise ConfigurationError(f"batch timeout for {message_type!r} must be > 0")
        route = Route(
            fn,
            payload_decoder(model),  # type: ignore[arg-type]
            batch=batch,
            size=size,
            timeout=timeout,
        )
        if message_type == CATCH_ALL:
            if batch:
                raise ConfigurationError('the catch-all "*" takes a single-message handler')
            if self.catch_all is not None:
                raise ConfigurationError('a catch-all "*" handler is already registered')
            self.catch_all = route
            return
        if message_type in self.routes:
            raise ConfigurationError(f"a handler for {message_type!r} is already registered")
        self.routes[message_type] = route

    def get(self, message_type: str) -> Route | None:
        return self.routes.get(message_type, self.catch_all)

    @property
    def batch_types(self) -> Sequence[str]:
        return [t for t, r in self.routes.items() if r.batch]

    def __bool__(self) -> bool:
        return bool(self.routes) or self.catch_all is not None
