"""What a handler takes, found once when it is registered.

A handler is checked at registration rather than at its first message: one
that cannot take a message, or a model msgspec cannot decode, would otherwise
fail every delivery until the messages end up in the dead letters. When no
``model`` is given it comes from the annotation of the first parameter
(``Message[Email]``, or ``list[Message[Email]]`` for a batch handler), the way
FastAPI reads a request body's type.

String annotations (``from __future__ import annotations``) are resolved with
:func:`typing.get_type_hints` in the handler's module and in the scope that
registered it, so a model defined in a function next to its handler resolves
too. An annotation that still does not resolve is a :class:`ConfigurationError`
unless ``model=`` was given: silently handing raw data to a handler that
expects a model is the failure this module exists to prevent.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import msgspec

from ._codec import check_message_type
from ._config import RetryPolicy, check_retry
from ._context import Context
from ._message import Message
from .errors import ConfigurationError

__all__ = ["HandlerSpec", "check_model", "handler_spec"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_SEQUENCES = (list, collections.abc.Sequence, collections.abc.Iterable)
_NO_MODEL = (Any, object)


class HandlerSpec:
    """A checked handler, not yet bound to a consumer (a :class:`Router` keeps these)."""

    __slots__ = (
        "batch",
        "fn",
        "max_deliveries",
        "message_type",
        "model",
        "name",
        "retry",
        "size",
        "takes_context",
        "timeout",
    )

    def __init__(
        self,
        message_type: str,
        fn: Callable[..., Awaitable[Any]],
        model: Any,
        *,
        batch: bool,
        size: int | None,
        timeout: float | None,
        takes_context: bool,
        retry: RetryPolicy | None = None,
        max_deliveries: int | None = None,
    ) -> None:
        self.message_type = message_type
        self.fn = fn
        self.model = model
        self.batch = batch
        self.size = size
        self.timeout = timeout
        self.takes_context = takes_context
        #: this handler's own retry policy and limit (None: the consumer's).
        self.retry = retry
        self.max_deliveries = max_deliveries
        self.name: str = getattr(fn, "__qualname__", None) or repr(fn)


def handler_spec(
    message_type: str,
    fn: Callable[..., Awaitable[Any]],
    model: Any = None,
    *,
    batch: bool = False,
    size: int | None = None,
    timeout: float | None = None,
    localns: Mapping[str, Any] | None = None,
    retry: RetryPolicy | None = None,
    max_deliveries: int | None = None,
) -> HandlerSpec:
    """Check ``fn`` as a handler of ``message_type`` and find its model.

    ``localns``: the namespace of the code that registers the handler, where
    string annotations may name locally defined models.
    """
    check_message_type(message_type)
    if not callable(fn):
        raise ConfigurationError(f"handler for {message_type!r} is not callable: {fn!r}")
    name = getattr(fn, "__qualname__", None) or repr(fn)
    if _is_sync(fn):
        raise ConfigurationError(
            f"handler {name} for {message_type!r} must be an async function "
            "(async def); run blocking work with anyio.to_thread.run_sync inside it"
        )
    if size is not None and size < 1:
        raise ConfigurationError(f"batch size for {message_type!r} must be >= 1, got {size}")
    if timeout is not None and timeout <= 0:
        raise ConfigurationError(f"batch timeout for {message_type!r} must be > 0")
    check_retry(retry)
    if max_deliveries is not None and (
        isinstance(max_deliveries, bool)
        or not isinstance(max_deliveries, int)
        or max_deliveries < 1
    ):
        raise ConfigurationError(
            f"max_deliveries for {message_type!r} must be None or an int >= 1, "
            f"got {max_deliveries!r}"
        )
    params = _parameters(fn)
    takes_context = False
    if params is not None:
        first, second = _check_arity(name, params, batch)
        takes_context = second is not None
        hints = _hints(fn, name, first, model, localns)
        if first is not None and first.name in hints:
            found = _model_of(name, hints[first.name], batch)
            if model is None:
                model = found
            elif found is not None and found != model:
                raise ConfigurationError(
                    f"handler {name} is annotated {_show(hints[first.name])} "
                    f"but registered with model={_show(model)}"
                )
        if second is not None and second.name in hints:
            _check_context_annotation(name, hints[second.name])
    check_model(model, f"handler {name} for {message_type!r}")
    return HandlerSpec(
        message_type,
        fn,
        model,
        batch=batch,
        size=size,
        timeout=timeout,
        takes_context=takes_context,
        retry=retry,
        max_deliveries=max_deliveries,
    )


def _is_sync(fn: Callable[..., Any]) -> bool:
    if inspect.isfunction(fn) or inspect.ismethod(fn):
        return not inspect.iscoroutinefunction(fn)
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - a callable object's method
    if inspect.isfunction(call):
        return not inspect.iscoroutinefunction(call)
    return False  # a partial, a builtin: nothing to tell from outside


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some callables have no signature to read
        return None


def _check_arity(
    name: str, params: list[inspect.Parameter], batch: bool
) -> tuple[inspect.Parameter | None, inspect.Parameter | None]:
    """The parameter that takes the message(s), and the one that takes the
    :class:`Context` if the handler asks for it (a required second parameter)."""
    what = "a list of messages" if batch else "one message"
    positional = [p for p in params if p.kind in _POSITIONAL]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    keyword = [
        p.name
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    ]
    takes_any = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    if keyword:
        raise ConfigurationError(
            f"handler {name} has required keyword-only parameters {keyword}: "
            f"it is called with {what} (and optionally the Context)"
        )
    if not positional and not takes_any:
        raise ConfigurationError(f"handler {name} takes no parameters: it must take {what}")
    if len(required) > 2:
        raise ConfigurationError(
            f"handler {name} requires {len(required)} parameters: it is called with "
            f"{what}, and with the Context when it asks for it as a second parameter"
        )
    first = positional[0] if positional else None
    return first, required[1] if len(required) == 2 else None


def _hints(
    fn: Callable[..., Any],
    name: str,
    first: inspect.Parameter | None,
    model: Any,
    localns: Mapping[str, Any] | None,
) -> dict[str, Any]:
    target: Any = fn
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        target = getattr(type(fn), "__call__", None)  # noqa: B004
        if not inspect.isfunction(target):
            return {}
    try:
        return typing.get_type_hints(target, localns=dict(localns) if localns else None)
    except Exception as exc:  # NameError, or a TypeError from a bad annotation
        if model is None and first is not None and first.annotation is not first.empty:
            raise ConfigurationError(
                f"cannot resolve the annotation {first.annotation!r} of handler {name} "
                f"({type(exc).__name__}: {exc}): define the model where the handler's "
                "module can see it, or pass model= explicitly"
            ) from exc
        return {}  # the model is given: nothing here is needed


def _model_of(name: str, annotation: Any, batch: bool) -> Any:
    """The payload type named by a handler's first annotation (None: raw data)."""
    if annotation in _NO_MODEL:
        return None
    origin = typing.get_origin(annotation)
    if batch:
        if annotation is Message or origin is Message:
            raise ConfigurationError(
                f"batch handler {name} takes {_show(annotation)}: a batch handler "
                "takes list[Message[...]]; use handler() for one message at a time"
            )
        if annotation in _SEQUENCES:
            return None
        if origin not in _SEQUENCES:
            return None  # not ours to judge; the type checker is
        (annotation,) = typing.get_args(annotation) or (Any,)
        if annotation in _NO_MODEL:
            return None
        origin = typing.get_origin(annotation)
    elif annotation in _SEQUENCES or origin in _SEQUENCES:
        raise ConfigurationError(
            f"handler {name} takes {_show(annotation)}: a handler takes one "
            "Message; use batch_handler() for lists of messages"
        )
    if annotation is Message or origin is not Message:
        return None
    (payload,) = typing.get_args(annotation)
    if payload in _NO_MODEL or isinstance(payload, TypeVar):
        return None
    return payload


def _check_context_annotation(name: str, annotation: Any) -> None:
    if annotation in (Context, Any):
        return
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    if union and Context in typing.get_args(annotation):
        return
    raise ConfigurationError(
        f"handler {name}'s second parameter is annotated {_show(annotation)}: a required "
        "second parameter receives the Context"
    )


def check_model(model: Any, owner: str) -> None:
    """A model must be something msgspec decodes JSON into, all the way down."""
    if model is None:
        return
    try:
        info = msgspec.inspect.type_info(model)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{owner}: model {_show(model)} is not a type: {exc}") from None
    bad = _custom_type(info, set())
    if bad is None:
        return
    hint = ""
    if any(c.__module__.partition(".")[0] == "pydantic" for c in getattr(bad, "__mro__", ())):
        hint = (
            ": pydantic models are not supported as model=; use a msgspec.Struct, "
            "or take Message[Any] and call YourModel.model_validate(msg.data)"
        )
    where = "" if bad is model else f" (it contains {_show(bad)})"
    raise ConfigurationError(
        f"{owner}: msgspec cannot decode JSON into model {_show(model)}{where}{hint}"
    )


def _custom_type(info: msgspec.inspect.Type, seen: set[int]) -> Any:
    """The first type inside ``info`` that msgspec only knows as a custom class."""
    if isinstance(info, msgspec.inspect.CustomType):
        return info.cls
    if id(info) in seen:
        return None  # a recursive Struct
    seen.add(id(info))
    inner: list[msgspec.inspect.Type] = []
    for attr in ("type", "item_type", "key_type", "value_type"):
        child = getattr(info, attr, None)
        if isinstance(child, msgspec.inspect.Type):
            inner.append(child)
    inner.extend(getattr(info, "item_types", ()))
    inner.extend(getattr(info, "types", ()))
    inner.extend(field.type for field in getattr(info, "fields", ()))
    for child in inner:
        bad = _custom_type(child, seen)
        if bad is not None:
            return bad
    return None


def _show(annotation: Any) -> str:
    """An annotation as written in code: ``Message[Email]``, not its module path."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and not args:
        return annotation.__qualname__
    if isinstance(origin, type) and args:
        return f"{origin.__qualname__}[{', '.join(_show(a) for a in args)}]"
    return repr(annotation).replace("typing.", "")
