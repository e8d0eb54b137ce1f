"""Retries with backoff (issue 16): the schedule of attempts, the same id and a
rising delivery count, other groups untouched, ``Retry``, per-handler policies,
dead letters, a consumer that dies or stops during a backoff, and many waiting
retries that must not stall new messages."""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import time
from typing import Any

import anyio
import msgspec
import pytest
import redis.asyncio

from helpers import SRC, Recorder, nothing_pending, pel_of, wait_until
from redcurrent import (
    ConfigurationError,
    ConsumerConfig,
    Message,
    Retry,
    RetryPolicy,
    Router,
    StartFrom,
    StreamConsumer,
    Topic,
)

STREAM = "retries"
GROUP = "workers"
#: slack on top of the jitter for a loaded machine (event loop, Redis round trips).
SLACK = 0.3


def make_consumer(
    client: redis.asyncio.Redis, name: str = "worker-1", **kwargs: Any
) -> StreamConsumer:
    options: dict[str, Any] = {
        "start": StartFrom.EARLIEST,
        "claim_idle": 0.5,
        "block": 0.2,
        "shutdown_timeout": 1.0,
    }
    options.update(kwargs)
    group = options.pop("group", GROUP)
    return StreamConsumer(client, STREAM, group, name, **options)


class Attempts:
    """A handler that records (monotonic time, id, delivery count) of each call
    and fails the first ``fail`` deliveries of every message."""

    def __init__(self, fail: int = 10**9, exc: BaseException | None = None) -> None:
        self.fail = fail
        self.exc = exc
        self.calls: list[tuple[float, str, int]] = []
        self.seen = Recorder()

    async def __call__(self, msg: Message[Any]) -> None:
        self.calls.append((time.monotonic(), msg.id, msg.delivery_count))
        self.seen.record(msg)
        if msg.delivery_count <= self.fail:
            raise self.exc or RuntimeError(f"attempt {msg.delivery_count} failed")

    def gaps(self) -> list[float]:
        times = [t for t, _, _ in self.calls]
        return [b - a for a, b in itertools.pairwise(times)]


def assert_gap(gap: float, expected: float, jitter: float) -> None:
    low = expected * (1 - jitter) - 0.02  # timer granularity
    high = expected * (1 + jitter) + SLACK
    assert low <= gap <= high, f"gap {gap:.3f}s, expected {expected}s ± {jitter:.0%}"


@pytest.fixture
def topic(redis_client: redis.asyncio.Redis) -> Topic:
    return Topic(redis_client, STREAM)


def test_policy_is_validated_and_decodes_from_a_file() -> None:
    assert RetryPolicy() == RetryPolicy(delay=1.0, factor=2.0, max_delay=300.0, jitter=0.1)
    for bad in (
        {"delay": -1},
        {"factor": 0.5},
        {"jitter": 1.0},
        {"max_delay": float("inf")},
        {"delay": True},
    ):
        with pytest.raises(ConfigurationError):
            RetryPolicy(**bad)
    with pytest.raises(ConfigurationError):
        Retry(delay=-1)
    config = msgspec.convert(
        {"stream": "s", "group": "g", "name": "n", "retry": {"delay": 2.5, "jitter": 0}},
        ConsumerConfig,
    )
    assert config.retry == RetryPolicy(delay=2.5, jitter=0)
    assert ConsumerConfig(stream="s", group="g", name="n").retry == RetryPolicy()
    policy = RetryPolicy(delay=1, factor=3, max_delay=20, jitter=0)
    assert [policy.delay_for(n) for n in (1, 2, 3, 4, 500)] == [1, 3, 9, 20, 20]
    with pytest.raises(ConfigurationError):
        make_consumer(None, retry="fast")  # type: ignore[arg-type]


async def test_attempts_follow_the_policy_and_end_in_the_dead_letters(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    policy = RetryPolicy(delay=0.3, factor=2.0, max_delay=1.0, jitter=0.1)
    consumer = make_consumer(redis_client, retry=policy, max_deliveries=5)
    attempts = Attempts()
    consumer.handler("job")(attempts)
    others = Recorder()
    other = make_consumer(redis_client, "other-1", group="auditors")
    other.handler("job")(others)
    entry_id = await topic.publish("job", {"n": 1})
    async with consumer, other:
        await attempts.seen.wait_for(5)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
        await others.wait_for(1)

    assert [(i, c) for _, i, c in attempts.calls] == [(entry_id, n) for n in range(1, 6)]
    for gap, expected in zip(attempts.gaps(), [0.3, 0.6, 1.0, 1.0], strict=True):
        assert_gap(gap, expected, policy.jitter)
    [letter] = await topic.dead_letters()
    assert letter.original_id == entry_id
    assert letter.delivery_count == 5
    assert letter.reason == "RuntimeError: attempt 5 failed"  # the last error
    # Retried in place: one entry in the stream, the other group saw it once.
    assert await redis_client.xlen(STREAM) == 1
    assert others.ids == [entry_id]
    assert [m.delivery_count for m in others.messages] == [1]
    assert (consumer.stats.dead_lettered, consumer.stats.retried) == (1, 4)


async def test_the_delivery_count_is_written_to_the_pending_list(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    """While a retry waits, the message stays this consumer's, leased, with the
    count of the delivery that failed; the next delivery raises it."""
    counts: list[int] = []
    pels: list[tuple[str, int, int]] = []
    consumer = make_consumer(redis_client, retry=RetryPolicy(delay=0.4, jitter=0))

    @consumer.handler("job")
    async def handle(msg: Message[Any]) -> None:
        pels.append((await pel_of(redis_client, STREAM, GROUP))[msg.id])
        counts.append(msg.delivery_count)
        if msg.delivery_count < 3:
            raise RuntimeError("not yet")

    entry_id = await topic.publish("job", {})
    async with consumer:
        await wait_until(lambda: len(counts) >= 1)
        await wait_until(lambda: consumer.stats.failed == 1)
        assert consumer.stats.held == 1  # kept, waiting for its retry
        owner, _, count = (await pel_of(redis_client, STREAM, GROUP))[entry_id]
        assert (owner, count) == ("worker-1", 1)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert counts == [1, 2, 3]
    # The PEL reached each count by the time (or soon after) the handler ran.
    assert [p[0] for p in pels] == ["worker-1"] * 3
    assert pels[0][2] == 1
    assert consumer.stats.handled == 1


async def test_retry_raised_by_a_handler_honours_its_delay_and_logs_at_info(
    redis_client: redis.asyncio.Redis, topic: Topic, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = make_consumer(redis_client, retry=RetryPolicy(delay=5.0))
    attempts = Attempts(fail=1, exc=Retry(delay=0.5))
    consumer.handler("job")(attempts)
    entry_id = await topic.publish("job", {})
    with caplog.at_level(logging.INFO, logger="redcurrent"):
        async with consumer:
            await attempts.seen.wait_for(2)
            await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert [(i, c) for _, i, c in attempts.calls] == [(entry_id, 1), (entry_id, 2)]
    [gap] = attempts.gaps()
    assert_gap(gap, 0.5, 0)
    about = [r for r in caplog.records if entry_id in r.getMessage()]
    assert about
    assert all(r.levelno == logging.INFO for r in about), [
        (r.levelname, r.getMessage()) for r in about
    ]
    assert await topic.dead_letters() == []


async def test_retry_without_delay_uses_the_policy_and_max_deliveries_still_applies(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    consumer = make_consumer(
        redis_client, retry=RetryPolicy(delay=0.2, factor=1, jitter=0), max_deliveries=3
    )
    attempts = Attempts(exc=Retry())
    consumer.handler("job")(attempts)
    entry_id = await topic.publish("job", {})
    async with consumer:
        await attempts.seen.wait_for(3)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert [c for _, _, c in attempts.calls] == [1, 2, 3]
    for gap in attempts.gaps():
        assert_gap(gap, 0.2, 0)
    [letter] = await topic.dead_letters()
    assert (letter.original_id, letter.delivery_count) == (entry_id, 3)
    assert letter.error_type == "Retry"


async def test_per_handler_policy_and_max_deliveries(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    consumer = make_consumer(redis_client, retry=RetryPolicy(delay=1.5, jitter=0), max_deliveries=5)
    quick = Attempts()
    patient = Attempts(fail=1)
    router = Router()
    router.handler("quick", retry=RetryPolicy(delay=0.2, jitter=0), max_deliveries=2)(quick)
    consumer.include_router(router)
    consumer.handler("patient")(patient)
    quick_id = await topic.publish("quick", {})
    patient_id = await topic.publish("patient", {})
    async with consumer:
        await quick.seen.wait_for(2)
        await patient.seen.wait_for(2)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP), timeout=15)
    assert [(i, c) for _, i, c in quick.calls] == [(quick_id, 1), (quick_id, 2)]
    assert_gap(quick.gaps()[0], 0.2, 0)
    assert [(i, c) for _, i, c in patient.calls] == [(patient_id, 1), (patient_id, 2)]
    assert_gap(patient.gaps()[0], 1.5, 0)
    [letter] = await topic.dead_letters()
    assert (letter.original_id, letter.delivery_count) == (quick_id, 2)


async def test_a_batch_handler_retries_its_failed_messages(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    consumer = make_consumer(redis_client)
    batches: list[list[tuple[str, int]]] = []

    @consumer.batch_handler("many", size=3, timeout=0.05, retry=RetryPolicy(delay=0.2, jitter=0.5))
    async def handle(msgs: list[Message[Any]]) -> None:
        batches.append([(m.id, m.delivery_count) for m in msgs])
        if len(batches) == 1:
            raise Retry()

    ids = [await topic.publish("many", {"n": n}) for n in range(3)]
    async with consumer:
        await wait_until(lambda: sum(len(b) for b in batches) >= 6)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    # Failed together, back together: one due time for the batch, jitter or not.
    assert [sorted(b) for b in batches] == [sorted((i, n) for i in ids) for n in (1, 2)]


async def test_a_graceful_stop_hands_waiting_retries_back(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    first = make_consumer(redis_client, retry=RetryPolicy(delay=60))
    failing = Attempts()
    first.handler("job")(failing)
    entry_id = await topic.publish("job", {})
    async with first:
        await failing.seen.wait_for(1)
        await wait_until(lambda: first.stats.failed == 1)
    # No wait for claim_idle, no wait for the 60 s backoff: handed back.
    second = make_consumer(redis_client, "worker-2", claim_idle=30.0)
    done = Recorder()
    second.handler("job")(done)
    async with second:
        await done.wait_for(1)
    assert [(m.id, m.delivery_count) for m in done.messages] == [(entry_id, 2)]


_DYING_CONSUMER = """
import logging, sys
import anyio, redis.asyncio
from redcurrent import Message, RetryPolicy, StartFrom, StreamConsumer

async def main(url, stream, group):
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    client = redis.asyncio.Redis.from_url(url)
    consumer = StreamConsumer(client, stream, group, "doomed", start=StartFrom.EARLIEST,
                              claim_idle=0.6, block=0.2, retry=RetryPolicy(delay=60))

    @consumer.handler("*")
    async def fail(msg: Message) -> None:
        raise RuntimeError("fails")

    await consumer.run()

anyio.run(main, *sys.argv[1:4])
"""


def _spawn_dying_consumer(url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _DYING_CONSUMER, url, STREAM, GROUP],
        env=dict(os.environ, PYTHONPATH=str(SRC)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def test_a_consumer_killed_during_a_backoff_loses_nothing(
    redis_client: redis.asyncio.Redis, redis_url: str, topic: Topic
) -> None:
    entry_id = await topic.publish("job", {})
    proc = _spawn_dying_consumer(redis_url)
    try:
        assert proc.stdout is not None
        with anyio.fail_after(20):
            while True:  # the log line that says the retry waits
                line = await anyio.to_thread.run_sync(proc.stdout.readline)
                assert line, "the consumer exited"
                if b"retrying in" in line:
                    break
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    owner, _, count = (await pel_of(redis_client, STREAM, GROUP))[entry_id]
    assert (owner, count) == ("doomed", 1)
    survivor = make_consumer(redis_client, "survivor", claim_idle=0.6)
    done = Recorder()
    survivor.handler("job")(done)
    async with survivor:
        await done.wait_for(1)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP))
    assert [(m.id, m.delivery_count) for m in done.messages] == [(entry_id, 2)]


@pytest.mark.timeout(120)
async def test_many_waiting_retries_do_not_stall_new_messages(
    redis_client: redis.asyncio.Redis, topic: Topic
) -> None:
    """200 messages fail at once; new messages published while their retries
    wait are all handled before any retry is due, and every failed message is
    delivered a second time (those beyond what may wait in memory after
    ``claim_idle``)."""
    delay = 5.0
    consumer = make_consumer(
        redis_client, retry=RetryPolicy(delay=delay, jitter=0.1), claim_idle=2.0
    )
    failing = Attempts(fail=1)
    fresh = Recorder()
    consumer.handler("fail")(failing)
    consumer.handler("new")(fresh)
    await topic.publish_many([("fail", {"n": n}) for n in range(200)])
    async with consumer:
        await failing.seen.wait_for(200, timeout=30)
        new_ids = await topic.publish_many([("new", {"n": n}) for n in range(50)])
        await fresh.wait_for(50, timeout=30)
        # No retry has come due yet: the new ones did not wait for them.
        assert all(c == 1 for _, _, c in failing.calls)
        assert consumer.stats.held <= 256
        await wait_until(nothing_pending(redis_client, STREAM, GROUP), timeout=60)
    assert sorted(fresh.ids) == sorted(new_ids)
    by_id: dict[str, list[int]] = {}
    for _, i, c in failing.calls:
        by_id.setdefault(i, []).append(c)
    assert len(by_id) == 200
    assert all(counts == [1, 2] for counts in by_id.values()), by_id
    assert await topic.dead_letters() == []
