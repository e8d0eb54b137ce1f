"""``redcurrent.prometheus``: the metrics a scrape of an instrumented process serves."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest
import redis.asyncio as aredis

from helpers import pending_count, spawn_consumer, wait_until
from redcurrent import Message, RetryPolicy, StartFrom, StreamConsumer, Topic
from redcurrent.errors import ConfigurationError
from redcurrent.testing import RedisServer

prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry  # noqa: E402

from redcurrent.prometheus import instrument, uninstrument  # noqa: E402

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
Instrument = Callable[..., CollectorRegistry]


@pytest.fixture
def instrumented() -> Iterator[Instrument]:
    """``instrumented(**options)``: a fresh registry, instrumented until the test ends."""
    made: list[Any] = []

    def make(**options: Any) -> CollectorRegistry:
        registry = CollectorRegistry()
        made.append(instrument(registry, **options))
        return registry

    yield make
    for instrumentation in made:
        instrumentation.uninstrument()


def _collect(registry: CollectorRegistry) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in registry.collect()
        for sample in metric.samples
    }


async def scrape(registry: CollectorRegistry) -> Samples:
    """Every sample, collected on another thread, as ``start_http_server`` does."""
    return await anyio.to_thread.run_sync(_collect, registry)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@contextlib.asynccontextmanager
async def holding(
    client: aredis.Redis, stream: str, group: str, **options: Any
) -> AsyncIterator[StreamConsumer]:
    """A running consumer whose handlers block until the block is left."""
    release = anyio.Event()
    consumer = StreamConsumer(client, stream, group, start=StartFrom.EARLIEST, **options)

    @consumer.handler("job")
    async def hold(msg: Message[Any]) -> None:
        await release.wait()

    async with consumer:
        try:
            yield consumer
        finally:
            release.set()


def counters(samples: Samples, stream: str, group: str) -> dict[str, float | None]:
    names = ("received", "handled", "failed", "claimed", "retried", "dead_lettered")
    return {
        name: value(samples, f"redcurrent_messages_{name}_total", stream=stream, group=group)
        for name in names
    }


async def test_counters_and_durations_equal_what_the_consumer_did(
    redis_client: aredis.Redis, instrumented: Instrument
) -> None:
    registry = instrumented()
    topic = Topic(redis_client, "orders")
    await topic.publish_many([("ok", {"n": n}) for n in range(5)])
    await topic.publish_many([("flaky", {"n": n}) for n in range(2)])
    await topic.publish("bad", {})
    calls: collections.Counter[str] = collections.Counter()
    consumer = StreamConsumer(
        redis_client,
        "orders",
        "billing",
        start=StartFrom.EARLIEST,
        block=0.2,
        max_deliveries=2,
        retry=RetryPolicy(delay=0.01, jitter=0),
    )

    @consumer.handler("ok")
    async def ok(msg: Message[Any]) -> None:
        calls["ok"] += 1

    @consumer.handler("flaky")
    async def flaky(msg: Message[Any]) -> None:
        calls["flaky"] += 1
        if msg.delivery_count == 1:
            raise ValueError("fails the first time")

    @consumer.handler("bad")
    async def bad(msg: Message[Any]) -> None:
        calls["bad"] += 1
        raise ValueError("always fails")

    async with consumer:
        await wait_until(lambda: consumer.stats.handled == 7 and consumer.stats.dead_lettered == 1)
        samples = await scrape(registry)
        stats = consumer.stats
        assert value(samples, "redcurrent_consumers_running", stream="orders", group="billing") == 1
    assert counters(samples, "orders", "billing") == {
        "received": stats.received,
        "handled": 7,
        "failed": 4,  # flaky twice, bad twice
        "claimed": 0,
        "retried": 3,  # flaky twice, bad once (then dead-lettered)
        "dead_lettered": 1,
    }
    assert (stats.handled, stats.failed, stats.retried) == (7, 4, 3)
    assert calls == {"ok": 5, "flaky": 4, "bad": 2}
    total = 0.0
    for message_type, count in calls.items():
        labels = {"stream": "orders", "group": "billing", "message_type": message_type}
        observed = value(samples, "redcurrent_handler_duration_seconds_count", **labels)
        assert observed == count, message_type
        total += count
        slowest = value(samples, "redcurrent_handler_duration_seconds_bucket", **labels, le="+Inf")
        assert slowest == count
    assert total == stats.handled + stats.failed

    after = await scrape(registry)  # stopped: counted all the same, nothing running
    assert counters(after, "orders", "billing") == counters(samples, "orders", "billing")
    assert value(after, "redcurrent_consumers_running", stream="orders", group="billing") == 0
    assert value(after, "redcurrent_handlers_running", stream="orders", group="billing") == 0
    assert value(after, "redcurrent_messages_held", stream="orders", group="billing") == 0


async def test_a_batch_is_one_handler_call(
    redis_client: aredis.Redis, instrumented: Instrument
) -> None:
    registry = instrumented()
    await Topic(redis_client, "orders").publish_many([("sms", {"n": n}) for n in range(10)])
    sizes: list[int] = []
    consumer = StreamConsumer(redis_client, "orders", "texts", start=StartFrom.EARLIEST)

    @consumer.batch_handler("sms", size=5, timeout=0.1)
    async def send(msgs: list[Message[Any]]) -> None:
        sizes.append(len(msgs))

    async with consumer:
        await wait_until(lambda: consumer.stats.handled == 10)
    samples = await scrape(registry)
    labels = {"stream": "orders", "group": "texts", "message_type": "sms"}
    assert sum(sizes) == 10
    assert value(samples, "redcurrent_handler_duration_seconds_count", **labels) == len(sizes)
    handled = value(samples, "redcurrent_messages_handled_total", stream="orders", group="texts")
    assert handled == 10


async def test_counters_never_go_down_when_a_consumer_is_replaced(
    redis_client: aredis.Redis, instrumented: Instrument
) -> None:
    registry = instrumented()
    topic = Topic(redis_client, "orders")

    def make() -> StreamConsumer:
        consumer = StreamConsumer(
            redis_client, "orders", "billing", start=StartFrom.EARLIEST, block=0.2
        )

        @consumer.handler("job")
        async def job(msg: Message[Any]) -> None:
            return None

        return consumer

    await topic.publish_many([("job", {"n": n}) for n in range(3)])
    first = make()
    async with first:
        await wait_until(lambda: first.stats.handled == 3)
    handled = "redcurrent_messages_handled_total"
    assert value(await scrape(registry), handled, stream="orders", group="billing") == 3

    second = make()
    async with second:
        await topic.publish_many([("job", {"n": n}) for n in range(2)])
        await wait_until(lambda: second.stats.handled == 2)
        assert value(await scrape(registry), handled, stream="orders", group="billing") == 5
    assert value(await scrape(registry), handled, stream="orders", group="billing") == 5


async def _group_row(client: aredis.Redis, stream: str, group: str) -> dict[str, Any]:
    rows = await client.xinfo_groups(stream)
    (row,) = [r for r in rows if r["name"] in (group, group.encode())]
    return dict(row)


@pytest.mark.slow
async def test_group_lag_and_pending_are_the_whole_groups_across_processes(
    redis_client: aredis.Redis, redis_url: str, instrumented: Instrument
) -> None:
    """Another process holds most of the group's entries: this process still
    reports the group's lag and pending, as XINFO GROUPS gives them."""
    registry = instrumented(lag_cache_seconds=0)
    topic = Topic(redis_client, "jobs")
    await topic.publish_many([("job", {"n": n}) for n in range(400)])
    # tests/_consumer_proc.py: every handler blocks; concurrency 32, so it
    # holds its prefetch, 256 entries, once it is full.
    other = spawn_consumer(redis_url, "jobs", "workers", "other", "held-by-other")
    try:
        await wait_until(lambda: redis_client.exists("held-by-other"), timeout=20)
        async with holding(
            redis_client, "jobs", "workers", name="here", concurrency=2, prefetch=8, block=0.2
        ) as consumer:
            # Both full: nothing more is read until a handler returns.
            await wait_until(
                lambda: _both_full(redis_client, consumer, "jobs", "workers"), timeout=20
            )
            samples = await scrape(registry)
            row = await _group_row(redis_client, "jobs", "workers")
            labels = {"stream": "jobs", "group": "workers"}
            assert value(samples, "redcurrent_group_pending", **labels) == row["pending"] == 264
            assert consumer.stats.held == 8  # this process's share
            info = {g.name: g for g in (await topic.info()).groups}
            assert info["workers"].lag == 400 - 264
            assert value(samples, "redcurrent_group_lag", **labels) == 400 - 264
            if row.get("lag") is not None:  # Redis >= 7 gives it
                assert row["lag"] == 400 - 264
            age = value(samples, "redcurrent_group_info_age_seconds", **labels)
            assert age is not None
            assert 0 <= age < 1

            await topic.publish_many([("job", {"n": n}) for n in range(10)])
            samples = await scrape(registry)
            assert value(samples, "redcurrent_group_lag", **labels) == 400 - 264 + 10
            assert value(samples, "redcurrent_group_pending", **labels) == 264
    finally:
        other.kill()
        other.communicate()


async def _both_full(
    client: aredis.Redis, consumer: StreamConsumer, stream: str, group: str
) -> bool:
    return consumer.stats.held == 8 and await pending_count(client, stream, group) == 256 + 8


async def test_group_figures_are_cached_and_aged(
    redis_client: aredis.Redis, instrumented: Instrument
) -> None:
    registry = instrumented(lag_cache_seconds=60)
    topic = Topic(redis_client, "jobs")
    await topic.publish_many([("job", {"n": n}) for n in range(3)])
    labels = {"stream": "jobs", "group": "workers"}
    async with holding(redis_client, "jobs", "workers", concurrency=1, prefetch=1) as consumer:
        await wait_until(lambda: consumer.stats.running == 1)
        first = await scrape(registry)
        assert value(first, "redcurrent_group_lag", **labels) == 2
        assert value(first, "redcurrent_group_pending", **labels) == 1
        await topic.publish("job", {"n": 3})
        again = await scrape(registry)  # within lag_cache_seconds: not read again
        assert value(again, "redcurrent_group_lag", **labels) == 2
        first_age = value(first, "redcurrent_group_info_age_seconds", **labels)
        again_age = value(again, "redcurrent_group_info_age_seconds", **labels)
        assert first_age is not None
        assert again_age is not None
        assert again_age > first_age
    # No consumer of the group runs here any more: no figures to vouch for.
    assert value(await scrape(registry), "redcurrent_group_lag", **labels) is None


async def test_a_scrape_on_the_consumers_loop_serves_what_the_previous_one_asked_for(
    redis_client: aredis.Redis, instrumented: Instrument
) -> None:
    """``make_asgi_app`` mounted in the consumers' own application collects on
    their loop, which cannot wait for itself: the scrape returns at once."""
    import httpx
    from prometheus_client import make_asgi_app

    registry = instrumented()
    topic = Topic(redis_client, "jobs")
    await topic.publish_many([("job", {"n": n}) for n in range(3)])
    transport = httpx.ASGITransport(app=make_asgi_app(registry))
    lag = 'redcurrent_group_lag{group="workers",stream="jobs"} 2.0'
    async with (
        holding(redis_client, "jobs", "workers", concurrency=1, prefetch=1) as consumer,
        httpx.AsyncClient(transport=transport, base_url="http://app") as http,
    ):
        await wait_until(lambda: consumer.stats.running == 1)
        first = (await http.get("/metrics")).text
        assert 'redcurrent_consumers_running{group="workers",stream="jobs"} 1.0' in first
        assert "redcurrent_group_lag{" not in first  # asked for, not read yet

        async def served() -> bool:
            return lag in (await http.get("/metrics")).text

        await wait_until(served)


@pytest.mark.private_server
@pytest.mark.parametrize("outage", ["killed", "frozen"])
async def test_a_scrape_while_redis_is_down_serves_the_last_figures_at_once(
    private_redis: RedisServer, instrumented: Instrument, outage: str
) -> None:
    registry = instrumented(lag_cache_seconds=0, refresh_timeout=0.5)
    client = aredis.Redis.from_url(private_redis.url, socket_timeout=1.0)
    topic = Topic(client, "jobs")
    await topic.publish_many([("job", {"n": n}) for n in range(3)])
    labels = {"stream": "jobs", "group": "workers"}
    try:
        async with holding(
            client, "jobs", "workers", concurrency=1, prefetch=1, block=0.2
        ) as consumer:
            await wait_until(lambda: consumer.stats.running == 1)
            before = await scrape(registry)
            assert value(before, "redcurrent_group_lag", **labels) == 2
            assert value(before, "redcurrent_group_pending", **labels) == 1
            pid = private_redis.pid
            assert pid is not None
            if outage == "killed":
                private_redis.kill()
            else:
                os.kill(pid, signal.SIGSTOP)
            try:
                for _ in range(2):  # the second finds the first's read still going (frozen)
                    started = time.perf_counter()
                    during = await scrape(registry)
                    assert time.perf_counter() - started < 2.0
                    assert value(during, "redcurrent_group_lag", **labels) == 2
                    assert value(during, "redcurrent_group_pending", **labels) == 1
                    assert value(during, "redcurrent_messages_held", **labels) == 1
                age = value(during, "redcurrent_group_info_age_seconds", **labels)
                before_age = value(before, "redcurrent_group_info_age_seconds", **labels)
                assert age is not None
                assert before_age is not None
                assert age > before_age  # and it says how stale they are
                if outage == "frozen":  # each scrape waited refresh_timeout in vain
                    assert age > before_age + 2 * 0.5 * 0.9
            finally:
                if outage == "killed":
                    private_redis.restart()
                else:
                    os.kill(pid, signal.SIGCONT)

            async def fresh_again() -> bool:
                samples = await scrape(registry)
                age = value(samples, "redcurrent_group_info_age_seconds", **labels)
                return age is not None and age < 0.5

            await wait_until(fresh_again, timeout=30)
    finally:
        await client.aclose()


async def test_instrument_is_idempotent_and_uninstrument_removes_it(
    redis_client: aredis.Redis,
) -> None:
    registry = CollectorRegistry()
    first = instrument(registry)
    try:
        assert instrument(registry) is first
        with pytest.raises(ConfigurationError, match="already instrumented"):
            instrument(registry, lag_cache_seconds=1)
        names = {metric.name for metric in registry.collect()}
        assert {
            "redcurrent_messages_handled",
            "redcurrent_handler_duration_seconds",
            "redcurrent_group_lag",
            "redcurrent_group_pending",
            "redcurrent_group_info_age_seconds",
        } <= names
    finally:
        uninstrument(registry)
    assert not [metric for metric in registry.collect() if metric.name.startswith("redcurrent")]
    first.uninstrument()  # again: nothing happens

    # Not instrumented any more: a consumer starting now is not counted anywhere.
    other = CollectorRegistry()
    consumer = StreamConsumer(redis_client, "orders", "billing", start=StartFrom.EARLIEST)

    @consumer.handler("job")
    async def job(msg: Message[Any]) -> None:
        return None

    await Topic(redis_client, "orders").publish("job", {})
    async with consumer:
        await wait_until(lambda: consumer.stats.handled == 1)
        again = instrument(other)  # too late for the running consumer
        try:
            assert again is not first
            assert value(await scrape(other), "redcurrent_messages_handled_total") is None
        finally:
            again.uninstrument()


@pytest.mark.parametrize(
    "options",
    [{"lag_cache_seconds": -1}, {"refresh_timeout": float("nan")}, {"lag_cache_seconds": "5"}],
)
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        instrument(CollectorRegistry(), **options)
