"""A FastAPI service that publishes orders and consumes them in the same process.

    REDIS_URL=redis://localhost:6379/0 uvicorn --factory examples.fastapi_app:create_app

- ``POST /orders`` publishes an order (an ``Idempotency-Key`` header makes a
  client's retry safe);
- the lifespan runs a :class:`StreamConsumer` that fulfils orders, stopped
  gracefully when the server shuts down (uvicorn on SIGTERM);
- ``GET /orders/info`` shows the topic (length, groups, pending, lag);
- ``GET /healthz`` is 200 while the consumer runs and 503 once it stopped, so
  a liveness probe restarts a replica whose consumer is gone (docs/deployment.md).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import msgspec
import redis.asyncio as aredis
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request, status
from fastapi.responses import JSONResponse

from redcurrent import Message, StartFrom, StreamConsumer, Topic

STREAM = "orders"
GROUP = "fulfilment"


class Order(msgspec.Struct, forbid_unknown_fields=True):
    order_id: str
    sku: str
    quantity: Annotated[int, msgspec.Meta(gt=0)]


def create_app(url: str | None = None) -> FastAPI:
    """A factory rather than a module-level app, so that tests (and a second
    replica in one process) get their own Redis URL, client and consumer."""
    redis_url = url or os.environ.get("REDIS_URL", "redis://localhost:6379/0")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = aredis.Redis.from_url(redis_url)
        # EARLIEST: orders published before the group first existed are fulfilled
        # too (the group is created by the first consumer that starts; later
        # starts keep its position).
        consumer = StreamConsumer(client, STREAM, GROUP, start=StartFrom.EARLIEST)

        @consumer.handler("order")
        async def fulfil(msg: Message[Order]) -> None:
            # At-least-once: a real handler is idempotent (key its writes on
            # msg.data.order_id or msg.id).
            app.state.fulfilled.append(msg.data.order_id)

        app.state.topic = Topic(client, STREAM)
        app.state.consumer = consumer
        app.state.fulfilled = []  # stands in for your database
        try:
            # Start-up waits until the consumer reached Redis (or raises
            # StartTimeoutError, failing the server's start-up). Leaving the block
            # stops it gracefully: running handlers get shutdown_timeout, and what
            # it still holds is handed back for the other replicas at once.
            async with consumer:
                yield
        finally:
            await client.aclose()

    app = FastAPI(lifespan=lifespan)
    app.include_router(router)
    return app


def get_topic(request: Request) -> Topic:
    topic: Topic = request.app.state.topic
    return topic


def get_consumer(request: Request) -> StreamConsumer:
    consumer: StreamConsumer = request.app.state.consumer
    return consumer


router = APIRouter()


@router.post("/orders", status_code=status.HTTP_202_ACCEPTED)
async def publish_order(
    request: Request,
    topic: Annotated[Topic, Depends(get_topic)],
    idempotency_key: Annotated[str | None, Header()] = None,
) -> dict[str, str]:
    # FastAPI validates bodies with pydantic and refuses a msgspec Struct as a
    # body parameter, and redcurrent handlers refuse pydantic models. Decoding
    # the raw body with the same Struct the handler uses keeps one schema: what
    # passes here cannot become a dead letter for failing the handler's model.
    # The price: the body is missing from the OpenAPI docs.
    try:
        order = msgspec.json.decode(await request.body(), type=Order)
    except msgspec.DecodeError as exc:  # also msgspec.ValidationError, a subclass
        raise HTTPException(422, str(exc)) from exc
    entry_id = await topic.publish("order", order, idempotency_key=idempotency_key)
    return {"id": entry_id}


@router.get("/orders/info")
async def topic_info(topic: Annotated[Topic, Depends(get_topic)]) -> Any:
    # TopicInfo is a msgspec Struct, which FastAPI cannot serialise: plain
    # dicts and lists it can.
    return msgspec.to_builtins(await topic.info())


@router.get("/healthz")
async def health(consumer: Annotated[StreamConsumer, Depends(get_consumer)]) -> JSONResponse:
    reason = consumer.stop_reason  # None while running
    if reason is None:
        return JSONResponse({"status": "running", "consumer": consumer.name})
    # Stopped on its own (topic terminated or deleted, or FAILED): this
    # replica no longer consumes, so let the orchestrator replace it.
    error = None if consumer.error is None else repr(consumer.error)
    return JSONResponse(
        {"status": "stopped", "reason": reason.value, "error": error},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
    )
