"""redcurrent.otel: producer and consumer spans on a real Redis, exported to
the OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

pytest.importorskip("opentelemetry.sdk.trace", reason="needs opentelemetry-sdk")

import redis.asyncio as aredis
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from helpers import SRC, wait_until
from redcurrent import (
    CleanupPolicy,
    Context,
    Message,
    Retry,
    RetryPolicy,
    StartFrom,
    StreamConsumer,
    Topic,
    otel,
)


@dataclass
class Traced:
    provider: TracerProvider
    exporter: InMemorySpanExporter

    def spans(self, kind: SpanKind | None = None) -> list[ReadableSpan]:
        found = self.exporter.get_finished_spans()
        return [s for s in found if kind is None or s.kind is kind]

    def sends(self) -> list[ReadableSpan]:
        return self.spans(SpanKind.PRODUCER)

    def processes(self) -> list[ReadableSpan]:
        return self.spans(SpanKind.CONSUMER)


@pytest.fixture
def traced() -> Iterator[Traced]:
    """Instrumented with a provider of the test's own, uninstrumented after it
    whatever happens, so nothing leaks into other tests."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel.instrument(tracer_provider=provider)
    try:
        yield Traced(provider, exporter)
    finally:
        otel.uninstrument()
        provider.shutdown()


def _consumer(client: aredis.Redis, **options: Any) -> StreamConsumer:
    options.setdefault("block", 0.1)
    return StreamConsumer(client, "orders", "billing", "c1", start=StartFrom.EARLIEST, **options)


def _traceparent(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _ids(ctx: trace.SpanContext | None) -> tuple[int, int] | None:
    """A span context as trace and span id: one read back from a message is
    remote, the producer's own is not, and SpanContext equality tells them apart."""
    return None if ctx is None else (ctx.trace_id, ctx.span_id)


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_a_message_carries_the_trace_from_producer_to_consumer(
    redis_client: aredis.Redis, traced: Traced
) -> None:
    seen: list[Message[Any]] = []
    current: list[trace.SpanContext] = []
    consumer = _consumer(redis_client)

    @consumer.handler("invoice")
    async def bill(msg: Message[Any]) -> None:
        current.append(trace.get_current_span().get_span_context())
        seen.append(msg)

    entry_id = await Topic(redis_client, "orders").publish("invoice", {"n": 1})
    async with consumer:
        await wait_until(lambda: len(traced.processes()) == 1)

    [send] = traced.sends()
    [process] = traced.processes()
    assert send.name == "send orders"
    assert send.parent is None
    assert _attrs(send) == {
        "messaging.system": "redis",
        "messaging.destination.name": "orders",
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.message.id": entry_id,
        "redcurrent.message.type": "invoice",
    }
    assert send.status.status_code is StatusCode.UNSET
    # The context rides in the metadata, where any consumer can read it.
    assert seen[0].metadata == {"traceparent": _traceparent(send)}

    assert process.name == "process orders"
    assert process.context.trace_id == send.context.trace_id
    assert _ids(process.parent) == _ids(send.context)
    assert [_ids(link.context) for link in process.links] == [_ids(send.context)]
    assert _attrs(process) == {
        "messaging.system": "redis",
        "messaging.destination.name": "orders",
        "messaging.consumer.group.name": "billing",
        "messaging.client.id": "c1",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.message.id": entry_id,
        "redcurrent.message.type": "invoice",
        "redcurrent.message.delivery_count": 1,
        "redcurrent.handler": bill.__qualname__,
    }
    assert process.status.status_code is StatusCode.UNSET
    # The handler runs inside its span: its own spans and logs join the trace.
    assert current == [process.context]


async def test_a_follow_up_published_by_a_handler_continues_the_trace(
    redis_client: aredis.Redis, traced: Traced
) -> None:
    consumer = _consumer(redis_client)

    @consumer.handler("invoice")
    async def bill(msg: Message[Any], ctx: Context) -> None:
        await ctx.topic.publish("receipt", {})

    @consumer.handler("receipt")
    async def mail(msg: Message[Any]) -> None:
        return None

    await Topic(redis_client, "orders").publish("invoice", {})
    async with consumer:
        await wait_until(lambda: len(traced.processes()) == 2)

    first, follow_up = sorted(traced.sends(), key=lambda s: s.start_time or 0)
    by_type = {_attrs(s)["redcurrent.message.type"]: s for s in traced.processes()}
    # send invoice -> process invoice -> send receipt -> process receipt: one trace
    assert _ids(by_type["invoice"].parent) == _ids(first.context)
    assert _ids(follow_up.parent) == _ids(by_type["invoice"].context)
    assert _ids(by_type["receipt"].parent) == _ids(follow_up.context)
    assert len({s.context.trace_id for s in traced.spans()}) == 1


def test_without_opentelemetry_the_import_error_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "try:\n    import redcurrent.otel\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert "pip install 'redcurrent[otel]'" in out.stdout


async def test_a_publish_inside_a_span_is_its_child_and_leaves_it_current(
    redis_client: aredis.Redis, traced: Traced
) -> None:
    tracer = traced.provider.get_tracer("app")
    with tracer.start_as_current_span("request") as request:
        await Topic(redis_client, "orders").publish("invoice", {})
        assert trace.get_current_span() is request
    [send] = traced.sends()
    assert send.parent == request.get_span_context()
    assert send.context.trace_id == request.get_span_context().trace_id


async def test_a_failing_handler_makes_an_error_span(
    redis_client: aredis.Redis, traced: Traced
) -> None:
    consumer = _consumer(redis_client, retry=RetryPolicy(delay=0.05, jitter=0.0))

    @consumer.handler("*")
    async def anything(msg: Message[Any]) -> None:
        if msg.delivery_count == 1:
            raise ValueError("card declined")

    await Topic(redis_client, "orders").publish("invoice", {})
    async with consumer:
        await wait_until(lambda: len(traced.processes()) == 2)

    [send] = traced.sends()
    failed, retried = sorted(
        traced.processes(), key=lambda s: _attrs(s)["redcurrent.message.delivery_count"]
    )
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "card declined"
    assert _attrs(failed)["error.type"] == "ValueError"
    assert _attrs(failed)["redcurrent.message.type"] == "invoice"  # from the message, not "*"
    [event] = failed.events
    assert event.name == "exception"
    assert dict(event.attributes or {})["exception.type"] == "ValueError"
    # The second delivery belongs to the same trace and is no error.
    assert retried.status.status_code is StatusCode.UNSET
    assert "error.type" not in _attrs(retried)
    assert _attrs(retried)["redcurrent.message.delivery_count"] == 2
    assert _ids(failed.parent) == _ids(retried.parent) == _ids(send.context)


async def test_retry_is_an_event_not_an_error(redis_client: aredis.Redis, traced: Traced) -> None:
    consumer = _consumer(redis_client)

    @consumer.handler("invoice")
    async def bill(msg: Message[Any]) -> None:
        if msg.delivery_count == 1:
            raise Retry(delay=0.05)

    await Topic(redis_client, "orders").publish("invoice", {})
    async with consumer:
        await wait_until(lambda: len(traced.processes()) == 2)

    first, second = sorted(
        traced.processes(), key=lambda s: _attrs(s)["redcurrent.message.delivery_count"]
    )
    for span in (first, second):
        assert span.status.status_code is StatusCode.UNSET
        assert "error.type" not in _attrs(span)
    [event] = first.events
    assert event.name == "redcurrent.retry"
    assert dict(event.attributes or {}) == {"redcurrent.retry.delay": 0.05}
    assert list(second.events) == []


async def test_publish_many_and_a_batch_handler(redis_client: aredis.Redis, traced: Traced) -> None:
    batches: list[list[str]] = []
    consumer = _consumer(redis_client)

    @consumer.batch_handler("sms", size=3, timeout=5.0)
    async def send_sms(msgs: list[Message[Any]]) -> None:
        batches.append([m.id for m in msgs])

    ids = await Topic(redis_client, "orders").publish_many([("sms", {"n": n}) for n in range(3)])
    async with consumer:
        await wait_until(lambda: len(traced.processes()) == 1)

    [send] = traced.sends()
    assert _attrs(send) == {
        "messaging.system": "redis",
        "messaging.destination.name": "orders",
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.batch.message_count": 3,
        "redcurrent.message.type": "sms",
    }
    [process] = traced.processes()
    assert batches == [ids]
    # A batch has no single parent: a root span linked to every message's producer.
    assert process.parent is None
    assert [(_ids(link.context), dict(link.attributes or {})) for link in process.links] == [
        (_ids(send.context), {"messaging.message.id": entry_id}) for entry_id in ids
    ]
    attributes = _attrs(process)
    assert attributes["messaging.batch.message_count"] == 3
    assert attributes["redcurrent.message.type"] == "sms"
    assert "messaging.message.id" not in attributes


async def test_publish_many_of_mixed_types_names_no_type(
    redis_client: aredis.Redis, traced: Traced
) -> None:
    await Topic(redis_client, "orders").publish_many([("sms", {}), ("email", {})])
    [send] = traced.sends()
    assert _attrs(send)["messaging.batch.message_count"] == 2
    assert "redcurrent.message.type" not in _attrs(send)


async def test_a_failed_publish_is_an_error_span_and_restores_the_context(
    redis_client: aredis.Redis, traced: Traced
) -> None:
    with pytest.raises(TypeError):  # EncodeError is also a TypeError
        await Topic(redis_client, "orders").publish("invoice", object())
    [send] = traced.sends()
    assert send.status.status_code is StatusCode.ERROR
    assert _attrs(send)["error.type"] == "redcurrent.EncodeError"
    assert "messaging.message.id" not in _attrs(send)
    assert not trace.get_current_span().get_span_context().is_valid


async def test_a_scheduled_message_keeps_its_trace(
    redis_client: aredis.Redis, traced: Traced
) -> None:
    consumer = _consumer(redis_client)

    @consumer.handler("invoice")
    async def bill(msg: Message[Any]) -> None:
        return None

    async with consumer:
        schedule_id = await Topic(redis_client, "orders").publish("invoice", {}, delay=0.1)
        await wait_until(lambda: len(traced.processes()) == 1)

    [send] = traced.sends()
    assert _attrs(send)["redcurrent.message.scheduled"] is True
    assert _attrs(send)["redcurrent.message.schedule_id"] == schedule_id
    assert "messaging.message.id" not in _attrs(send)  # it gets one when it enters the stream
    [process] = traced.processes()
    assert _ids(process.parent) == _ids(send.context)


async def test_a_message_without_trace_context_gets_a_root_span(
    redis_client: aredis.Redis, traced: Traced
) -> None:
    otel.uninstrument()
    entry_id = await Topic(redis_client, "orders").publish("invoice", {})
    otel.instrument(tracer_provider=traced.provider)
    seen: list[Message[Any]] = []
    consumer = _consumer(redis_client)

    @consumer.handler("invoice")
    async def bill(msg: Message[Any]) -> None:
        seen.append(msg)

    async with consumer:
        await wait_until(lambda: len(traced.processes()) == 1)

    assert seen[0].metadata == {}
    assert traced.sends() == []
    [process] = traced.processes()
    assert process.parent is None
    assert list(process.links) == []
    assert _attrs(process)["messaging.message.id"] == entry_id


async def test_any_producer_writing_traceparent_into_the_metadata_is_continued(
    redis_client: aredis.Redis, traced: Traced
) -> None:
    """A producer that is not redcurrent's (another language, say) writes W3C
    ``traceparent`` into the metadata field; a consumer continues its trace."""
    trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    traceparent = f"00-{trace_id:032x}-{span_id:016x}-01"
    otel.uninstrument()
    await Topic(redis_client, "orders").publish(
        "invoice", {}, metadata={"traceparent": traceparent}
    )
    otel.instrument(tracer_provider=traced.provider)
    consumer = _consumer(redis_client)

    @consumer.handler("invoice")
    async def bill(msg: Message[Any]) -> None:
        return None

    async with consumer:
        await wait_until(lambda: len(traced.processes()) == 1)

    [process] = traced.processes()
    assert _ids(process.parent) == (trace_id, span_id)
    assert process.context.trace_id == trace_id


async def test_the_context_a_consumer_runs_in_is_a_link_not_the_parent(
    redis_client: aredis.Redis, traced: Traced
) -> None:
    consumer = _consumer(redis_client)

    @consumer.handler("invoice")
    async def bill(msg: Message[Any]) -> None:
        return None

    topic = Topic(redis_client, "orders")
    otel.uninstrument()
    untraced = await topic.publish("invoice", {})
    otel.instrument(tracer_provider=traced.provider)
    traced_id = await topic.publish("invoice", {})
    tracer = traced.provider.get_tracer("app")
    with tracer.start_as_current_span("worker main") as main:
        async with consumer:
            await wait_until(lambda: len(traced.processes()) == 2)
    [send] = traced.sends()
    by_id = {_attrs(s)["messaging.message.id"]: s for s in traced.processes()}
    # Without context in its metadata a message still gets a root span.
    assert by_id[untraced].parent is None
    assert [_ids(link.context) for link in by_id[untraced].links] == [_ids(main.get_span_context())]
    process = by_id[traced_id]
    assert _ids(process.parent) == _ids(send.context)
    assert [_ids(link.context) for link in process.links] == [
        _ids(send.context),
        _ids(main.get_span_context()),
    ]


async def test_an_idle_consumer_makes_no_spans(redis_client: aredis.Redis, traced: Traced) -> None:
    """Polling, claims, leases, cleanup and the other housekeeping are never
    traced: after its one message, a consumer that reads every 0.1 s and
    trims the stream adds no span in a second."""
    cleanup = CleanupPolicy(auto=True, interval=0.1, max_length=0, min_retention=0)
    consumer = _consumer(redis_client, claim_idle=0.3, cleanup=cleanup)

    @consumer.handler("invoice")
    async def bill(msg: Message[Any]) -> None:
        return None

    async with consumer:
        await Topic(redis_client, "orders").publish("invoice", {})
        await wait_until(lambda: len(traced.processes()) == 1)
        await wait_until(lambda: _length_is_zero(redis_client))  # cleanup ran
        before = len(traced.spans())
        await anyio.sleep(1.0)  # ten block periods: the idle time is what is tested
        contact = consumer.health().last_contact_seconds
    assert contact is not None
    assert contact < 0.5  # it kept polling all along
    assert len(traced.spans()) == before == 2


async def _length_is_zero(client: aredis.Redis) -> bool:
    return bool(await client.xlen("orders") == 0)


async def test_uninstrument_stops_new_spans_of_running_consumers(
    redis_client: aredis.Redis, traced: Traced
) -> None:
    handled: list[str] = []
    consumer = _consumer(redis_client)

    @consumer.handler("invoice")
    async def bill(msg: Message[Any]) -> None:
        handled.append(msg.id)

    topic = Topic(redis_client, "orders")
    async with consumer:
        await topic.publish("invoice", {})
        await wait_until(lambda: len(handled) == 1)
        otel.uninstrument()
        otel.uninstrument()  # idempotent
        await topic.publish("invoice", {})
        await wait_until(lambda: len(handled) == 2)
    assert len(traced.sends()) == len(traced.processes()) == 1


async def test_instrument_twice_traces_once(redis_client: aredis.Redis, traced: Traced) -> None:
    otel.instrument(tracer_provider=traced.provider)
    await Topic(redis_client, "orders").publish("invoice", {})
    assert len(traced.sends()) == 1
