"""A walk through every feature of redcurrent, printing what happens.

    pip install nox && nox -s demo          # or: python examples/demo.py [redis://host:port/db]

Without a URL it starts a private redis-server (or the one bundled with
``redcurrent[embedded]``) and stops it at the end.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import redis.asyncio as aredis

from redcurrent import (
    BatchConfig,
    CleanupPolicy,
    Message,
    StartFrom,
    StopReason,
    StreamConsumer,
    Topic,
)

FAST: dict[str, Any] = {"claim_idle": 0.5, "block": 0.5, "shutdown_timeout": 2.0}


class Email(msgspec.Struct):
    to: str
    subject: str = ""


def step(title: str) -> None:
    print(f"\n== {title}")


async def until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll a condition the demo is waiting for (a real app would await an event)."""
    with anyio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def basics(r: aredis.Redis) -> None:
    step("publish and consume, with a typed payload")
    topic = Topic(r, "demo:orders")
    consumer = StreamConsumer(r, "demo:orders", "mailer", "mailer-1", **FAST)
    sent: list[str] = []

    @consumer.handler("email", model=Email)
    async def send_email(msg: Message[Email]) -> None:
        sent.append(msg.data.to)
        print(f"  handled {msg.id}: email to {msg.data.to} (metadata {msg.metadata})")

    async with consumer:
        await topic.publish("email", {"to": "ada@example.com"}, metadata={"priority": "high"})
        await topic.publish_many([("email", {"to": f"user{i}@example.com"}) for i in range(3)])
        await until(lambda: len(sent) == 4)
    print(f"  stopped: {await consumer.done()}, stats {consumer.stats}")


async def start_positions(r: aredis.Redis) -> None:
    step("start positions: LATEST (default), EARLIEST, or after a given id")
    topic = Topic(r, "demo:positions")
    ids = await topic.publish_many([("tick", {"n": n}) for n in range(3)])
    starts = [("latest", StartFrom.LATEST), ("earliest", StartFrom.EARLIEST), ("after", ids[0])]
    for marker, (group, start) in enumerate(starts, start=100):
        seen: list[int] = []
        consumer = StreamConsumer(r, "demo:positions", group, start=start, **FAST)

        @consumer.handler("tick")
        async def tick(msg: Message[Any], seen: list[int] = seen) -> None:
            seen.append(msg.data["n"])

        async with consumer:
            await topic.publish("tick", {"n": marker})
            await until(lambda seen=seen, marker=marker: marker in seen)
        print(f"  group {group!r:10} got {seen}")


async def retries_and_dead_letters(r: aredis.Redis) -> None:
    step("a failing handler: retried with rising delivery_count, then a dead letter")
    topic = Topic(r, "demo:payments")
    consumer = StreamConsumer(r, "demo:payments", "billing", max_deliveries=3, **FAST)
    fixed = False

    @consumer.handler("charge")
    async def charge(msg: Message[Any]) -> None:
        if msg.data["card"] == "declined" and not fixed:
            print(f"  {msg.id} delivery {msg.delivery_count}: card declined")
            raise RuntimeError("card declined")
        print(f"  {msg.id} delivery {msg.delivery_count}: charged {msg.data['card']}")

    async with consumer:
        await topic.publish("charge", {"card": "declined"})
        await topic.publish("charge", {"card": "ok"})
        await topic.publish("refund", {"card": "ok"})  # no handler: dead letter at once
        await until(lambda: consumer.stats.dead_lettered == 2)
        for letter in await topic.dead_letters():
            print(f"  dead letter {letter.original_id} ({letter.type}): {letter.reason}")
        fixed = True
        replayed = await topic.replay_dead_letters()
        print(f"  replayed as {replayed}")
        await until(lambda: consumer.stats.handled == 2)


async def competing_consumers_and_crash_recovery(r: aredis.Redis) -> None:
    step("competing consumers, and a crashed consumer's messages taken over")
    topic = Topic(r, "demo:jobs")
    await topic.publish_many([("job", {"n": n}) for n in range(30)])
    done: dict[str, int] = {}

    def make(name: str) -> StreamConsumer:
        c = StreamConsumer(
            r,
            "demo:jobs",
            "workers",
            name,
            start=StartFrom.EARLIEST,
            concurrency=4,
            prefetch=8,
            **FAST,
        )

        @c.handler("job")
        async def job(msg: Message[Any]) -> None:
            await anyio.sleep(0.005)
            done[name] = done.get(name, 0) + 1

        return c

    # A consumer that "crashes": it reads 5 entries and never acknowledges them.
    await r.xgroup_create("demo:jobs", "workers", id="0")
    await r.xreadgroup("workers", "crashed", {"demo:jobs": ">"}, count=5)
    print("  consumer 'crashed' took 5 messages and died")
    a, b = make("worker-a"), make("worker-b")
    async with a, b:
        await until(lambda: sum(done.values()) == 30)
    claimed = a.stats.claimed + b.stats.claimed
    print(f"  handled per consumer: {done}; claimed from the dead: {claimed}")


async def stop_and_resume(r: aredis.Redis) -> None:
    step("stop one message for every consumer of every group, then resume it")
    topic = Topic(r, "demo:control")
    msg_id = await topic.publish("job", {"n": 1})
    await topic.stop_message(msg_id)
    print(f"  stopped {msg_id}; stopped ids now {(await topic.info()).stopped}")
    handled: list[str] = []
    consumers = [
        StreamConsumer(r, "demo:control", g, start=StartFrom.EARLIEST, **FAST) for g in "ab"
    ]
    for c in consumers:

        @c.handler("job")
        async def job(msg: Message[Any], group: str = c.group) -> None:
            handled.append(group)

    async with consumers[0], consumers[1]:
        await anyio.sleep(1.0)
        print(f"  after 1 s, handled by groups: {handled} (none: it is stopped)")
        await topic.resume_message(msg_id)
        await until(lambda: len(handled) == 2)
        print(f"  resumed; handled by groups: {sorted(handled)}")


async def batches(r: aredis.Redis) -> None:
    step("batch handlers: by size or timeout, per type, beside single handlers")
    topic = Topic(r, "demo:notify")
    consumer = StreamConsumer(
        r, "demo:notify", "notifier", batch=BatchConfig(size=4, timeout=0.3), **FAST
    )

    @consumer.batch_handler("sms")
    async def sms(msgs: list[Message[Any]]) -> None:
        print(f"  sms batch of {len(msgs)}: {[m.data['to'] for m in msgs]}")

    @consumer.handler("email")
    async def email(msg: Message[Any]) -> None:
        print(f"  single email to {msg.data['to']}")

    async with consumer:
        await topic.publish_many(
            [("sms", {"to": f"+1555{i}"}) for i in range(6)] + [("email", {"to": "x@y.z"})]
        )
        await until(lambda: consumer.stats.handled == 7)


async def cleanup_and_info(r: aredis.Redis) -> None:
    step("info, and cleanup of entries every group has acknowledged")
    topic = Topic(r, "demo:orders")
    info = await topic.info()
    print(f"  length {info.length}, groups {[(g.name, g.pending, g.lag) for g in info.groups]}")
    removed = await topic.cleanup(CleanupPolicy(min_retention=0, batch_size=100))
    print(f"  cleanup removed {removed}; length now {(await topic.info()).length}")


async def terminate_and_auto_stop(r: aredis.Redis) -> None:
    step("terminate a topic: running consumers stop at once; the name can be reused")
    topic = Topic(r, "demo:orders")
    consumer = StreamConsumer(r, "demo:orders", "mailer", block=5.0)
    consumer.handler("*")(_ignore)
    async with consumer:
        await topic.terminate()
        reason = await consumer.done()
    print(f"  consumer stopped: {reason.value}, auto_stopped={consumer.auto_stopped}")
    print(f"  keys left: {await r.exists(*topic.keys.owned())}")
    await topic.publish("email", {"to": "again@example.com"})
    print(f"  published again: length {(await topic.info()).length}")

    step("auto-stop when someone deletes the stream")
    consumer = StreamConsumer(r, "demo:orders", "mailer", block=5.0)
    consumer.handler("*")(_ignore)
    async with consumer:
        await r.delete("demo:orders")
        reason = await consumer.done()
    assert reason is StopReason.DELETED
    print(f"  consumer stopped: {reason.value}, auto_stopped={consumer.auto_stopped}")


async def _ignore(msg: Message[Any]) -> None:
    return None


async def main(url: str) -> None:
    r = aredis.Redis.from_url(url)
    try:
        await basics(r)
        await start_positions(r)
        await retries_and_dead_letters(r)
        await competing_consumers_and_crash_recovery(r)
        await stop_and_resume(r)
        await batches(r)
        await cleanup_and_info(r)
        await terminate_and_auto_stop(r)
        print("\nDone.")
    finally:
        await r.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="  [%(levelname)s %(name)s] %(message)s")
    if len(sys.argv) > 1:
        anyio.run(main, sys.argv[1])
    else:
        from redcurrent.testing import redis_url_for_demo

        with redis_url_for_demo() as demo_url:
            print(f"Redis at {demo_url}")
            anyio.run(main, demo_url)
