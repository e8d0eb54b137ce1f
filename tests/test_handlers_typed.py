"""Handlers typed by their model, against a real Redis: a Router's handlers
included into consumers, models read from annotations, handlers checked at
registration, the Context, and the running/held counters."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import anyio
import msgspec
import pytest
import redis.asyncio

from helpers import nothing_pending, wait_until
from redcurrent import (
    ConfigurationError,
    Context,
    Message,
    Router,
    StartFrom,
    StreamConsumer,
    Topic,
)

STREAM = "typed"


class Email(msgspec.Struct):
    to: str
    subject: str = ""


class Sms(msgspec.Struct):
    number: str


def make_consumer(
    client: redis.asyncio.Redis, group: str = "g", name: str = "c1", **kwargs: Any
) -> StreamConsumer:
    options: dict[str, Any] = {
        "start": StartFrom.EARLIEST,
        "claim_idle": 0.5,
        "block": 0.2,
        "shutdown_timeout": 1.0,
    }
    options.update(kwargs)
    return StreamConsumer(client, STREAM, group, name, **options)


@pytest.fixture
def topic(redis_client: redis.asyncio.Redis) -> Topic:
    return Topic(redis_client, STREAM)


# -- Router ---------------------------------------------------------------------------


async def test_router_handlers_run_in_every_consumer_that_includes_them(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    router = Router()
    seen: list[tuple[str, str, Email]] = []

    @router.handler("email")
    async def send(msg: Message[Email], ctx: Context) -> None:
        seen.append((ctx.group, msg.id, msg.data))

    assert router.message_types == ["email"]
    ids = await topic.publish_many([("email", {"to": "a@x"}), ("email", {"to": "b@x"})])
    mailer, audit = make_consumer(redis_client, "mailer"), make_consumer(redis_client, "audit")
    mailer.include_router(router)
    audit.include_router(router)
    async with mailer, audit:
        await wait_until(lambda: len(seen) == 4)
        await wait_until(nothing_pending(redis_client, STREAM, "mailer"))
        await wait_until(nothing_pending(redis_client, STREAM, "audit"))
    for group in ("mailer", "audit"):
        got = [(i, data) for g, i, data in seen if g == group]
        assert sorted(got, key=lambda t: t[0]) == [
            (ids[0], Email(to="a@x")),
            (ids[1], Email(to="b@x")),
        ]


async def test_routers_nest_and_type_conflicts_are_refused(
    redis_client: redis.asyncio.Redis,
) -> None:
    emails, sms = Router(), Router()

    @emails.handler("email")
    async def send(msg: Message[Email]) -> None: ...

    @sms.batch_handler("sms", size=5)
    async def text(msgs: list[Message[Sms]]) -> None: ...

    both = Router()
    both.include_router(emails)
    both.include_router(sms)
    assert both.message_types == ["email", "sms"]
    with pytest.raises(ConfigurationError, match="'email'"):
        both.include_router(emails)

    consumer = make_consumer(redis_client)

    @consumer.handler("email")
    async def other(msg: Message[Any]) -> None: ...

    with pytest.raises(ConfigurationError, match="'email' is already registered"):
        consumer.include_router(both)


# -- models from annotations ------------------------------------------------------------


async def test_model_from_the_annotation_and_a_payload_that_fails_it(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    class Receipt(msgspec.Struct):  # local: resolved in the registering scope
        total: int

    got: list[Any] = []
    consumer = make_consumer(redis_client)

    @consumer.handler("receipt")  # no model=: Message[Receipt] says it
    async def keep(msg: Message[Receipt]) -> None:
        got.append(msg.data)

    good = await topic.publish("receipt", {"total": 12})
    bad = await topic.publish("receipt", {"total": "twelve"})
    async with consumer:
        await wait_until(lambda: consumer.stats.dead_lettered == 1 and got)
        await wait_until(nothing_pending(redis_client, STREAM, "g"))
    assert got == [Receipt(total=12)]
    assert consumer.stats.handled == 1
    [letter] = await topic.dead_letters()
    assert letter.original_id == bad != good
    assert letter.error_type == "ValidationError"
    assert "Receipt" in letter.reason
    assert letter.delivery_count == 1  # at once, not after max_deliveries failures


async def test_batch_model_from_the_annotation(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    batches: list[list[Sms]] = []
    consumer = make_consumer(redis_client)

    @consumer.batch_handler("sms", size=3, timeout=0.1)
    async def text(msgs: list[Message[Sms]]) -> None:
        batches.append([m.data for m in msgs])

    await topic.publish_many([("sms", {"number": str(n)}) for n in range(3)])
    async with consumer:
        await wait_until(lambda: sum(map(len, batches)) == 3)
    assert [s for batch in batches for s in batch] == [Sms(number=str(n)) for n in range(3)]


async def test_message_any_and_unannotated_handlers_get_plain_json(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    got: list[object] = []
    consumer = make_consumer(redis_client)

    @consumer.handler("a")
    async def typed_any(msg: Message[Any]) -> None:
        got.append(msg.data)

    @consumer.handler("b")
    async def bare(msg: Message) -> None:  # type: ignore[type-arg]
        got.append(msg.data)

    @consumer.handler("c")
    async def untyped(msg):  # type: ignore[no-untyped-def]
        got.append(msg.data)

    await topic.publish_many([("a", {"n": 1}), ("b", {"n": 2}), ("c", {"n": 3})])
    async with consumer:
        await wait_until(lambda: len(got) == 3)
    assert sorted(got, key=str) == [{"n": 1}, {"n": 2}, {"n": 3}]


# -- checked at registration -------------------------------------------------------------


async def _none() -> None: ...


async def _three(a: Message[Any], b: Context, c: int) -> None: ...


async def _keyword(msg: Message[Any], *, retries: int) -> None: ...


def _sync(msg: Message[Any]) -> None: ...


async def _sms(msg: Message[Sms]) -> None: ...


async def _sms_batch(msgs: list[Message[Sms]]) -> None: ...


async def _second_not_context(msg: Message[Any], other: int) -> None: ...


class _Plain:
    """A class msgspec has no idea how to build from JSON."""


class _Holds(msgspec.Struct):
    inner: _Plain


@pytest.mark.parametrize(
    ("register", "words"),
    [
        (lambda r: r.handler("t")(_none), "takes no parameters"),
        (lambda r: r.handler("t")(_three), "requires 3 parameters"),
        (lambda r: r.handler("t")(_keyword), "keyword-only"),
        (lambda r: r.handler("t")(_sync), "must be an async function"),
        (
            lambda r: r.handler("t", model=Email)(_sms),
            r"annotated Message\[Sms\] but registered with model=Email",
        ),
        (
            lambda r: r.batch_handler("t")(_sms),
            r"_sms takes Message\[Sms\]: a batch handler takes list",
        ),
        (lambda r: r.handler("t")(_sms_batch), "use batch_handler"),
        (lambda r: r.handler("t")(_second_not_context), "receives the Context"),
        (lambda r: r.handler("t", model=_Plain)(_none_msg), "cannot decode JSON into model"),
        (lambda r: r.handler("t", model=_Holds)(_none_msg), "it contains _Plain"),
    ],
    ids=[
        "no-parameter",
        "three-parameters",
        "required-keyword",
        "not-async",
        "model-disagrees",
        "single-to-batch",
        "batch-to-single",
        "second-not-context",
        "undecodable-model",
        "undecodable-field",
    ],
)
def test_a_wrong_handler_fails_at_registration(
    redis_client: redis.asyncio.Redis, register: Any, words: str
) -> None:
    for registry in (Router(), make_consumer(redis_client)):
        with pytest.raises(ConfigurationError, match=words) as caught:
            register(registry)
        assert "'t'" in str(caught.value) or "handler _" in str(caught.value)


async def _none_msg(msg: Message[Any]) -> None: ...


def test_an_annotation_that_cannot_resolve_names_the_handler() -> None:
    router = Router()
    code = (
        "from __future__ import annotations\n"
        "from redcurrent import Message\n"
        "async def late(msg: Message[Later]) -> None: ...\n"
    )
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    with pytest.raises(ConfigurationError, match=r"Message\[Later\].* handler late.*model=") as exc:
        router.handler("t")(namespace["late"])
    assert "NameError" in str(exc.value)
    router.handler("t", model=Email)(namespace["late"])  # given: nothing to resolve


@pytest.mark.skipif(importlib.util.find_spec("pydantic") is None, reason="pydantic not installed")
def test_pydantic_models_are_refused_with_the_way_out() -> None:
    import pydantic

    class User(pydantic.BaseModel):
        name: str

    with pytest.raises(ConfigurationError, match="pydantic models are not supported"):
        Router().handler("user", model=User)(_none_msg)


# -- the Context ---------------------------------------------------------------------------


async def test_the_context_reaches_topic_names_and_logger(
    redis_client: redis.asyncio.Redis, topic: Topic, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = make_consumer(redis_client, name="worker-7")
    contexts: list[Context] = []

    @consumer.handler("email", model=Email)
    async def send(msg: Message[Email], ctx: Context) -> None:
        contexts.append(ctx)
        await ctx.topic.publish("sent", {"to": msg.data.to})
        ctx.logger.info("sent %s", msg.data.to, extra={"message_id": msg.id})

    sent: list[Message[Any]] = []

    @consumer.handler("sent")
    async def record(msg: Message[Any]) -> None:
        sent.append(msg)

    caplog.set_level(logging.INFO, logger="redcurrent.handler")
    first = await topic.publish("email", {"to": "a@x"})
    await topic.publish("email", {"to": "b@x"})
    async with consumer:
        await wait_until(lambda: len(sent) == 2)
    assert sorted(m.data["to"] for m in sent) == ["a@x", "b@x"]
    assert contexts[0] is contexts[1]  # one per consumer
    ctx = contexts[0]
    assert (ctx.stream, ctx.group, ctx.consumer) == (STREAM, "g", "worker-7")
    records = [r for r in caplog.records if r.name == "redcurrent.handler"]
    assert len(records) == 2
    assert {(r.__dict__["group"], r.__dict__["consumer"]) for r in records} == {("g", "worker-7")}
    assert first in {r.__dict__["message_id"] for r in records}


async def test_a_handler_can_stop_its_own_message_through_the_context(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    consumer = make_consumer(redis_client)
    calls: list[str] = []

    @consumer.handler("job")
    async def job(msg: Message[Any], ctx: Context) -> None:
        calls.append(msg.id)
        await ctx.topic.stop_message(msg.id)
        await anyio.sleep_forever()  # cancelled by the stop

    entry = await topic.publish("job", {})
    async with consumer:
        await wait_until(lambda: consumer.stats.held == 1 and consumer.stats.running == 0)
        assert calls == [entry]
        assert await topic.dead_letters() == []


def test_a_context_can_be_built_to_unit_test_a_handler(redis_client: redis.asyncio.Redis) -> None:
    ctx = Context(Topic(redis_client, "orders"), consumer="c", group="g")
    assert ctx.topic.name == ctx.stream == "orders"
    assert repr(ctx) == "Context('orders', group='g', consumer='c')"


# -- stats: running and held -----------------------------------------------------------------


async def test_stats_tell_running_handlers_from_held_entries(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    release = anyio.Event()
    consumer = make_consumer(redis_client, concurrency=2)

    @consumer.handler("slow")
    async def slow(msg: Message[Any]) -> None:
        await release.wait()

    await topic.publish_many([("slow", {"n": n}) for n in range(5)])
    async with consumer:
        await wait_until(lambda: consumer.stats.held == 5 and consumer.stats.running == 2)
        with pytest.warns(DeprecationWarning, match="held"):
            assert consumer.stats.in_flight == 5
        release.set()
        await wait_until(lambda: consumer.stats.handled == 5)
        await wait_until(lambda: consumer.stats.held == 0)
    assert consumer.stats.running == 0
