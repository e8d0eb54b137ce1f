"""The FastAPI example's service with aiohttp: publish orders, fulfil them in a
consumer that lives as long as the application, report health.

    REDIS_URL=redis://localhost:6379/0 python -m examples.aiohttp_app

Routes: ``POST /orders``, ``GET /orders/info``, ``GET /healthz`` (200 while the
consumer runs, 503 once it stopped; see docs/deployment.md).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Annotated

import msgspec
import redis.asyncio as aredis
from aiohttp import web

from redcurrent import Message, StartFrom, StreamConsumer, Topic

STREAM = "orders"
GROUP = "fulfilment"


class Order(msgspec.Struct, forbid_unknown_fields=True):
    order_id: str
    sku: str
    quantity: Annotated[int, msgspec.Meta(gt=0)]


# Typed application keys: aiohttp warns about plain string keys, and these let
# a type checker know what app[TOPIC] holds.
TOPIC = web.AppKey("topic", Topic)
CONSUMER = web.AppKey("consumer", StreamConsumer)
FULFILLED = web.AppKey("fulfilled", list[str])  # stands in for your database


def create_app(url: str | None = None) -> web.Application:
    """A factory, so that tests (and a second replica in one process) get their
    own Redis URL, client and consumer."""
    redis_url = url or os.environ.get("REDIS_URL", "redis://localhost:6379/0")

    async def consumer_ctx(app: web.Application) -> AsyncIterator[None]:
        # A cleanup context, not on_startup/on_cleanup: one generator holds the
        # `async with`, and aiohttp runs its two halves in the same task
        # (web.run_app, the test server), as the consumer's task group requires.
        client = aredis.Redis.from_url(redis_url)
        consumer = StreamConsumer(client, STREAM, GROUP, start=StartFrom.EARLIEST)
        fulfilled = app[FULFILLED]

        @consumer.handler("order")
        async def fulfil(msg: Message[Order]) -> None:
            fulfilled.append(msg.data.order_id)  # at-least-once: make it idempotent

        app[TOPIC] = Topic(client, STREAM)
        app[CONSUMER] = consumer
        try:
            # Waits until the consumer reached Redis (StartTimeoutError fails the
            # start-up); leaving stops it gracefully (shutdown_timeout for running
            # handlers, the rest handed back to the other replicas at once).
            async with consumer:
                yield
        finally:
            await client.aclose()

    app = web.Application()
    app[FULFILLED] = []
    app.cleanup_ctx.append(consumer_ctx)
    app.add_routes(routes)
    return app


routes = web.RouteTableDef()


@routes.post("/orders")
async def publish_order(request: web.Request) -> web.Response:
    # The handler's own Struct validates the body, so what is accepted here
    # cannot become a dead letter for failing the handler's model.
    try:
        order = msgspec.json.decode(await request.read(), type=Order)
    except msgspec.DecodeError as exc:  # also msgspec.ValidationError, a subclass
        raise web.HTTPUnprocessableEntity(text=str(exc)) from exc
    key = request.headers.get("Idempotency-Key")  # a client's retry appends nothing
    entry_id = await request.app[TOPIC].publish("order", order, idempotency_key=key)
    return web.json_response({"id": entry_id}, status=202)


@routes.get("/orders/info")
async def topic_info(request: web.Request) -> web.Response:
    # msgspec encodes its own Structs; aiohttp's json.dumps could not.
    info = await request.app[TOPIC].info()
    return web.Response(body=msgspec.json.encode(info), content_type="application/json")


@routes.get("/healthz")
async def health(request: web.Request) -> web.Response:
    consumer = request.app[CONSUMER]
    reason = consumer.stop_reason  # None while running
    if reason is None:
        return web.json_response({"status": "running", "consumer": consumer.name})
    # Stopped on its own (topic terminated or deleted, or FAILED): this replica
    # no longer consumes, so let the orchestrator replace it.
    error = None if consumer.error is None else repr(consumer.error)
    return web.json_response(
        {"status": "stopped", "reason": reason.value, "error": error}, status=503
    )


if __name__ == "__main__":
    # run_app stops on SIGINT and SIGTERM, running the cleanup context.
    web.run_app(create_app())
