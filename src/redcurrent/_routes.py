"""Which handler gets which message type: the registry behind the decorators."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from ._codec import PayloadDecoder, payload_decoder
from ._context import Context
from ._handlers import HandlerSpec
from ._instrument import HandlerInfo, Middleware
from ._message import Message
from .errors import ConfigurationError

__all__ = ["BatchHandlerObject", "HandlerObject", "Route", "RouteTable"]

CATCH_ALL = "*"


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

    __slots__ = ("batch", "decoder", "fn", "max_deliveries", "name", "retry", "size", "timeout")

    def __init__(self, spec: HandlerSpec, context: Context | None) -> None:
        #: what the dispatcher calls with the message (or list of messages).
        self.fn: Callable[[Any], Awaitable[Any]] = _bind(spec, context)
        self.decoder: PayloadDecoder = payload_decoder(spec.model)
        self.batch = spec.batch
        self.size = spec.size
        self.timeout = spec.timeout
        self.name = spec.name
        self.retry = spec.retry
        self.max_deliveries = spec.max_deliveries


def _bind(spec: HandlerSpec, context: Context | None) -> Callable[[Any], Awaitable[Any]]:
    """The handler as the dispatcher calls it: with the message alone, so that
    only handlers that ask for the Context pay for passing it."""
    fn = spec.fn
    if not spec.takes_context:
        return fn
    if context is None:
        raise ConfigurationError(f"handler {spec.name} asks for a Context, and there is none")
    return lambda msg: fn(msg, context)


class RouteTable:
    """A consumer's handlers by message type (the public :class:`Router` only
    collects handlers; this is where they are bound to one consumer)."""

    __slots__ = ("catch_all", "context", "routes")

    def __init__(self, context: Context | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.catch_all: Route | None = None
        self.context = context

    def wrap(
        self, middleware: Sequence[Middleware], stream: str, group: str, consumer: str
    ) -> None:
        """Wrap every handler in ``middleware`` (the first outermost), once,
        as the consumer starts."""
        named = [*self.routes.items()]
        if self.catch_all is not None:
            named.append((CATCH_ALL, self.catch_all))
        for message_type, route in named:
            info = HandlerInfo(stream, group, consumer, message_type, route.name, route.batch)
            fn = route.fn
            for wrapper in reversed(middleware):
                fn = wrapper(info, fn)
            route.fn = fn

    def include(self, spec: HandlerSpec) -> None:
        message_type = spec.message_type
        if message_type == CATCH_ALL:
            if spec.batch:
                raise ConfigurationError('the catch-all "*" takes a single-message handler')
            if self.catch_all is not None:
                raise ConfigurationError(
                    f'a catch-all "*" handler is already registered ({self.catch_all.name}); '
                    f"cannot add {spec.name}"
                )
            self.catch_all = Route(spec, self.context)
            return
        if message_type in self.routes:
            raise ConfigurationError(
                f"a handler for {message_type!r} is already registered "
                f"({self.routes[message_type].name}); cannot add {spec.name}"
            )
        self.routes[message_type] = Route(spec, self.context)

    def get(self, message_type: str) -> Route | None:
        return self.routes.get(message_type, self.catch_all)

    @property
    def batch_types(self) -> Sequence[str]:
        return [t for t, r in self.routes.items() if r.batch]

    def __bool__(self) -> bool:
        return bool(self.routes) or self.catch_all is not None
