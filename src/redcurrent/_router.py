"""Registering handlers: the decorators shared by :class:`StreamConsumer` and
:class:`Router`, and the Router itself.

The overloads tie ``model: type[T]`` to handlers of ``Message[T]`` (as
msgspec's ``Decoder`` ties its type to what ``decode`` returns), so a type
checker rejects a handler whose annotation disagrees with its model, a
single-message function given to ``batch_handler``, and a handler with the
wrong parameters. Without ``model`` the handler's own annotation is the model,
found again at run time by :mod:`redcurrent._handlers`.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from ._config import RetryPolicy
from ._context import Context
from ._handlers import HandlerSpec, handler_spec
from ._message import Message
from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._routes import BatchHandlerObject, HandlerObject

__all__ = [
    "AnyBatchHandlerDecorator",
    "AnyHandlerDecorator",
    "BatchHandlerDecorator",
    "HandlerDecorator",
    "Registrar",
    "Router",
]

T = TypeVar("T")
A = TypeVar("A", bound=Awaitable[object])


class HandlerDecorator(Protocol[T]):
    """``handler(type, model=M)``: takes ``async (msg: Message[M])`` or
    ``async (msg: Message[M], ctx: Context)`` and returns it."""

    @overload
    def __call__(self, fn: Callable[[Message[T]], A], /) -> Callable[[Message[T]], A]: ...
    @overload
    def __call__(
        self, fn: Callable[[Message[T], Context], A], /
    ) -> Callable[[Message[T], Context], A]: ...


class AnyHandlerDecorator(Protocol):
    """``handler(type)``: the model is whatever the handler is annotated with."""

    @overload
    def __call__(self, fn: Callable[[Message[T]], A], /) -> Callable[[Message[T]], A]: ...
    @overload
    def __call__(
        self, fn: Callable[[Message[T], Context], A], /
    ) -> Callable[[Message[T], Context], A]: ...


class BatchHandlerDecorator(Protocol[T]):
    """``batch_handler(type, model=M)``: takes ``async (msgs: list[Message[M]])``
    (and optionally the Context) and returns it."""

    @overload
    def __call__(
        self, fn: Callable[[list[Message[T]]], A], /
    ) -> Callable[[list[Message[T]]], A]: ...
    @overload
    def __call__(
        self, fn: Callable[[list[Message[T]], Context], A], /
    ) -> Callable[[list[Message[T]], Context], A]: ...


class AnyBatchHandlerDecorator(Protocol):
    """``batch_handler(type)``: the model is whatever the handler is annotated with."""

    @overload
    def __call__(
        self, fn: Callable[[list[Message[T]]], A], /
    ) -> Callable[[list[Message[T]]], A]: ...
    @overload
    def __call__(
        self, fn: Callable[[list[Message[T]], Context], A], /
    ) -> Callable[[list[Message[T]], Context], A]: ...


def _registering_scope() -> Mapping[str, Any]:
    """The local names of the code that applies the decorator (two frames up
    from the decorator's inner function): where a model defined in a function
    next to its handler lives."""
    return sys._getframe(2).f_locals


class Registrar:
    """The registration methods of :class:`StreamConsumer` and :class:`Router`.

    Handlers are checked when they are registered (see ``handler``); what
    happens to a checked one is the subclass's ``_add_spec``.
    """

    __slots__ = ()

    def _add_spec(self, spec: HandlerSpec) -> None:
        raise NotImplementedError

    @overload
    def handler(
        self,
        message_type: str,
        model: type[T],
        *,
        retry: RetryPolicy | None = None,
        max_deliveries: int | None = None,
    ) -> HandlerDecorator[T]: ...
    @overload
    def handler(
        self,
        message_type: str,
        model: None = None,
        *,
        retry: RetryPolicy | None = None,
        max_deliveries: int | None = None,
    ) -> AnyHandlerDecorator: ...
    @overload
    def handler(
        self,
        message_type: str,
        model: object,
        *,
        retry: RetryPolicy | None = None,
        max_deliveries: int | None = None,
    ) -> HandlerDecorator[Any]: ...
    def handler(
        self,
        message_type: str,
        model: Any = None,
        *,
        retry: RetryPolicy | None = None,
        max_deliveries: int | None = None,
    ) -> Any:
        """Register ``async def fn(msg: Message[M]) -> None`` for a message type
        (``"*"``: every type without a handler of its own).

        ``msg.data`` is decoded and validated into ``M``, taken from ``model`` or,
        when that is omitted, from the annotation (``Message`` or ``Message[Any]``:
        plain JSON values); entries that do not fit become dead letters. A
        required second parameter gets the consumer's :class:`Context`. A handler
        that cannot take a message, or a model msgspec cannot decode, raises
        :class:`ConfigurationError` here.

        ``retry`` (a :class:`RetryPolicy`) and ``max_deliveries`` replace the
        consumer's for this handler's messages.
        """

        def register(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            spec = handler_spec(
                message_type,
                fn,
                model,
                localns=_registering_scope(),
                retry=retry,
                max_deliveries=max_deliveries,
            )
            self._add_spec(spec)
            return fn

        return register

    @overload
    def batch_handler(
        self,
        message_type: str,
        size: int | None = None,
        timeout: float | None = None,
        *,
        model: type[T],
        retry: RetryPolicy | None = None,
        max_deliveries: int | None = None,
    ) -> BatchHandlerDecorator[T]: ...
    @overload
    def batch_handler(
        self,
        message_type: str,
        size: int | None = None,
        timeout: float | None = None,
        model: None = None,
        *,
        retry: RetryPolicy | None = None,
        max_deliveries: int | None = None,
    ) -> AnyBatchHandlerDecorator: ...
    @overload
    def batch_handler(
        self,
        message_type: str,
        size: int | None = None,
        timeout: float | None = None,
        *,
        model: object,
        retry: RetryPolicy | None = None,
        max_deliveries: int | None = None,
    ) -> BatchHandlerDecorator[Any]: ...
    def batch_handler(
        self,
        message_type: str,
        size: int | None = None,
        timeout: float | None = None,
        model: Any = None,
        *,
        retry: RetryPolicy | None = None,
        max_deliveries: int | None = None,
    ) -> Any:
        """Register ``async def fn(msgs: list[Message[M]]) -> None`` for a type.

        It gets up to ``size`` messages (default: ``BatchConfig.size``), or
        fewer once the oldest waited ``timeout`` seconds. Raise
        :class:`BatchError` naming failed ids to acknowledge the others. The
        model, the optional :class:`Context`, ``retry`` and ``max_deliveries``
        work as for :meth:`handler` (a retry runs the message in a later batch).
        """

        def register(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            spec = handler_spec(
                message_type,
                fn,
                model,
                batch=True,
                size=size,
                timeout=timeout,
                localns=_registering_scope(),
                retry=retry,
                max_deliveries=max_deliveries,
            )
            self._add_spec(spec)
            return fn

        return register

    def register(
        self,
        obj: HandlerObject,
        model: type[Any] | None = None,
        *,
        retry: RetryPolicy | None = None,
        max_deliveries: int | None = None,
    ) -> None:
        """Register an object with ``message_type`` and ``async handle(msg)``
        (``retry`` and ``max_deliveries`` as for :meth:`handler`)."""
        locals_ = sys._getframe(1).f_locals
        self._add_spec(
            handler_spec(
                obj.message_type,
                obj.handle,
                model,
                localns=locals_,
                retry=retry,
                max_deliveries=max_deliveries,
            )
        )

    def register_batch(
        self,
        obj: BatchHandlerObject,
        model: type[Any] | None = None,
        *,
        retry: RetryPolicy | None = None,
        max_deliveries: int | None = None,
    ) -> None:
        """Register an object with ``message_type``, ``batch_size`` (0: the
        consumer's default) and ``async handle_batch(msgs)``."""
        size = obj.batch_size or None
        locals_ = sys._getframe(1).f_locals
        spec = handler_spec(
            obj.message_type,
            obj.handle_batch,
            model,
            batch=True,
            size=size,
            localns=locals_,
            retry=retry,
            max_deliveries=max_deliveries,
        )
        self._add_spec(spec)

    def include_router(self, router: Router) -> None:
        """Add every handler declared on ``router`` so far (later ones are not
        added). A message type registered twice is a :class:`ConfigurationError`."""
        for spec in list(router._specs.values()):
            self._add_spec(spec)


class Router(Registrar):
    """Handlers declared without a consumer (FastAPI's ``APIRouter`` habit).

    ::

        router = Router()

        @router.handler("email")
        async def send(msg: Message[Email]) -> None: ...

        consumer.include_router(router)  # into any number of consumers

    The same handlers can be included into several consumers; each call of a
    handler gets the :class:`Context` of the consumer that runs it.
    """

    __slots__ = ("_specs",)

    def __init__(self) -> None:
        self._specs: dict[str, HandlerSpec] = {}

    @property
    def message_types(self) -> list[str]:
        """The message types this router has handlers for, in order."""
        return list(self._specs)

    def _add_spec(self, spec: HandlerSpec) -> None:
        held = self._specs.get(spec.message_type)
        if held is not None:
            raise ConfigurationError(
                f"router already has a handler for {spec.message_type!r} "
                f"({held.name}); cannot add {spec.name}"
            )
        self._specs[spec.message_type] = spec

    def __repr__(self) -> str:
        return f"Router({self.message_types!r})"
