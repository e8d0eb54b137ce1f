"""OpenTelemetry tracing for redcurrent (the ``otel`` extra).

``instrument()`` makes every :meth:`Topic.publish` / :meth:`Topic.publish_many`
call a PRODUCER span ``send <stream>`` and every handler call a CONSUMER span
``process <stream>``, following the OpenTelemetry messaging semantic
conventions (v1.44). Nothing else is traced: idle polling, claims, leases,
cleanup and the other housekeeping make no spans.

The producer's trace context travels in the message's metadata, as W3C
``traceparent`` (and ``tracestate``, and whatever else the global propagator
writes, such as ``baggage``), so a consumer continues the trace of any
producer that writes ``traceparent`` there, redcurrent or not. A "process"
span of a single message is a child of the context found in its metadata
(the semantic conventions allow this for single messages) and links to it; a
message without one gets a root span. A batch handler's span is a root span
that links to the context of each message. The context a consumer was
started in is never a parent (it says nothing about a message); it is a link
when it holds a span.

Attributes outside the semantic conventions use the ``redcurrent.`` prefix:
``messaging.system`` has no well-known value for Redis Streams, so it is the
custom value ``redis``, and the conventions reserve ``messaging.*`` names for
themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
    from opentelemetry.util.types import AttributeValue
except ImportError as _missing:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "redcurrent.otel needs opentelemetry-api: pip install 'redcurrent[otel]'"
    ) from _missing

from . import _instrument
from ._instrument import Handler, HandlerInfo
from ._message import Message
from ._version import __version__
from .errors import Retry

__all__ = ["instrument", "uninstrument"]

#: the semantic conventions these spans follow.
_SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"
_SYSTEM = "redis"

#: the tracer while instrumented; the hooks stay registered in consumers that
#: started meanwhile, so they look here on every call and do nothing when None.
_tracer: Tracer | None = None


def instrument(tracer_provider: trace.TracerProvider | None = None) -> None:
    """Trace publishes and handler calls from now on, with spans from
    ``tracer_provider`` (the global one when None).

    Consumers started before this call are not traced until restarted: a
    consumer wraps its handlers when it starts. Calling it again only changes
    the tracer provider; no call makes a publish or a message traced twice.
    """
    global _tracer
    _tracer = trace.get_tracer(
        __name__, __version__, tracer_provider=tracer_provider, schema_url=_SCHEMA_URL
    )
    if _middleware not in _instrument.MIDDLEWARE:
        _instrument.MIDDLEWARE.append(_middleware)
    if _observe_publish not in _instrument.PUBLISH_OBSERVERS:
        _instrument.PUBLISH_OBSERVERS.append(_observe_publish)


def uninstrument() -> None:
    """Stop tracing: no new spans, from consumers already running too (their
    handlers stay wrapped until they stop, but the wrapper only calls through).
    Does nothing when not instrumented."""
    global _tracer
    _tracer = None
    if _middleware in _instrument.MIDDLEWARE:
        _instrument.MIDDLEWARE.remove(_middleware)
    if _observe_publish in _instrument.PUBLISH_OBSERVERS:
        _instrument.PUBLISH_OBSERVERS.remove(_observe_publish)


# --- producer ---------------------------------------------------------------


class _Send:
    """The span of one publish call, current while the call runs (so the
    spans of an instrumented Redis client nest under it), and the headers
    that carry its context into every message's metadata."""

    __slots__ = ("_count", "_scheduled", "_span", "_token", "headers")

    def __init__(
        self, tracer: Tracer, stream: str, message_type: str | None, count: int, scheduled: bool
    ) -> None:
        attributes: dict[str, AttributeValue] = {
            "messaging.system": _SYSTEM,
            "messaging.destination.name": stream,
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
        }
        if count != 1:  # the conventions keep it off spans of a single message
            attributes["messaging.batch.message_count"] = count
        if message_type is not None:
            attributes["redcurrent.message.type"] = message_type
        if scheduled:
            attributes["redcurrent.message.scheduled"] = True
        self._span = span = tracer.start_span(
            f"send {stream}", kind=SpanKind.PRODUCER, attributes=attributes
        )
        self._count = count
        self._scheduled = scheduled
        ctx = trace.set_span_in_context(span)
        headers: dict[str, str] = {}
        propagate.inject(headers, context=ctx)
        self.headers: Mapping[str, str] = headers
        self._token = otel_context.attach(ctx)

    def finish(self, ids: list[str] | None, error: BaseException | None) -> None:
        otel_context.detach(self._token)
        span = self._span
        if ids is not None and self._count == 1 and len(ids) == 1:
            # A scheduled message gets its stream id only when it is moved in.
            key = "redcurrent.message.schedule_id" if self._scheduled else "messaging.message.id"
            span.set_attribute(key, ids[0])
        if error is not None:
            _record_error(span, error)
        span.end()


def _observe_publish(
    stream: str, message_type: str | None, count: int, scheduled: bool
) -> _Send | None:
    tracer = _tracer
    if tracer is None:
        return None
    return _Send(tracer, stream, message_type, count, scheduled)


# --- consumer ---------------------------------------------------------------


def _middleware(info: HandlerInfo, handler: Handler) -> Handler:
    name = f"process {info.stream}"
    base: dict[str, AttributeValue] = {
        "messaging.system": _SYSTEM,
        "messaging.destination.name": info.stream,
        "messaging.consumer.group.name": info.group,
        "messaging.client.id": info.consumer,
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "redcurrent.handler": info.handler,
    }

    async def process_one(msg: Message[Any]) -> Any:
        tracer = _tracer
        if tracer is None:
            return await handler(msg)
        parent = _creation_context(msg)
        creation = trace.get_current_span(parent).get_span_context()
        links = [Link(creation)] if creation.is_valid else []
        attributes = {
            **base,
            "messaging.message.id": msg.id,
            "redcurrent.message.type": msg.type,
            "redcurrent.message.delivery_count": msg.delivery_count,
        }
        span = tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=_with_ambient(links),
        )
        return await _run(span, parent, handler, msg)

    async def process_batch(msgs: list[Message[Any]]) -> Any:
        tracer = _tracer
        if tracer is None:
            return await handler(msgs)
        links: list[Link] = []
        for msg in msgs:
            creation = trace.get_current_span(_creation_context(msg)).get_span_context()
            if creation.is_valid:
                links.append(Link(creation, {"messaging.message.id": msg.id}))
        attributes = {
            **base,
            "messaging.batch.message_count": len(msgs),
            "redcurrent.message.type": info.message_type,
        }
        root = Context()
        span = tracer.start_span(
            name,
            context=root,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=_with_ambient(links),
        )
        return await _run(span, root, handler, msgs)

    return process_batch if info.batch else process_one


def _creation_context(msg: Message[Any]) -> Context:
    """What the producer put in the metadata, on an empty context: a message
    without ``traceparent`` gives a context without a span (a root span)."""
    return propagate.extract(msg.metadata, context=Context())


def _with_ambient(links: list[Link]) -> Sequence[Link]:
    ambient = trace.get_current_span().get_span_context()
    if ambient.is_valid:
        links.append(Link(ambient))
    return links


async def _run(span: Span, parent: Context, handler: Handler, arg: Any) -> Any:
    """Call the handler with ``span`` current; a ``Retry`` is an event, not an
    error (the message runs again as asked)."""
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        return await handler(arg)
    except Retry as exc:
        event: dict[str, AttributeValue] = {}
        if exc.delay is not None:
            event["redcurrent.retry.delay"] = exc.delay
        span.add_event("redcurrent.retry", event)
        raise
    except BaseException as exc:
        _record_error(span, exc)
        raise
    finally:
        otel_context.detach(token)
        span.end()


def _record_error(span: Span, error: BaseException) -> None:
    span.record_exception(error)
    span.set_attribute("error.type", _type_name(error))
    span.set_status(Status(StatusCode.ERROR, str(error)))


def _type_name(error: BaseException) -> str:
    cls = type(error)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
