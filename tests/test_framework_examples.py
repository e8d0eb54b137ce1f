"""The framework examples (examples/fastapi_app.py, aiohttp_app.py, worker_app.py)
run as a user runs them: the app's own lifespan or cleanup context, real HTTP
requests through the framework's test client, a real Redis."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis.asyncio as aredis
from aiohttp.test_utils import TestClient, TestServer

from helpers import load_example
from redcurrent import StartFrom, StreamConsumer, Topic
from redcurrent.testing import wait_until

N = 200


FASTAPI_APP = load_example("fastapi_app")
AIOHTTP_APP = load_example("aiohttp_app")


@dataclass
class Replica:
    """One running app as a client sees it, whichever the framework."""

    request: Callable[[str, str, bytes | None, dict[str, str]], Awaitable[tuple[int, Any]]]
    fulfilled: list[str]  # what its consumer handled, in order
    consumer: StreamConsumer

    async def post_order(self, body: Any, key: str | None = None) -> tuple[int, Any]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.request("POST", "/orders", raw, {"Idempotency-Key": key} if key else {})

    async def get(self, path: str) -> tuple[int, Any]:
        return await self.request("GET", path, None, {})


@asynccontextmanager
async def fastapi_replica(url: str) -> AsyncIterator[Replica]:
    app = FASTAPI_APP.create_app(url)
    transport = httpx.ASGITransport(app=app)
    # ASGITransport sends no lifespan events: run the app's lifespan around the
    # client, as uvicorn does around serving.
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://app") as http,
    ):

        async def request(
            method: str, path: str, body: bytes | None, headers: dict[str, str]
        ) -> tuple[int, Any]:
            response = await http.request(method, path, content=body, headers=headers)
            return response.status_code, response.json()

        yield Replica(request, app.state.fulfilled, app.state.consumer)


@asynccontextmanager
async def aiohttp_replica(url: str) -> AsyncIterator[Replica]:
    app = AIOHTTP_APP.create_app(url)
    # TestServer runs the cleanup context on start and close, as web.run_app does.
    async with TestClient(TestServer(app)) as http:

        async def request(
            method: str, path: str, body: bytes | None, headers: dict[str, str]
        ) -> tuple[int, Any]:
            async with http.request(method, path, data=body, headers=headers) as response:
                if response.content_type == "application/json":
                    return response.status, await response.json()
                return response.status, await response.text()

        yield Replica(request, app[AIOHTTP_APP.FULFILLED], app[AIOHTTP_APP.CONSUMER])


Serve = Callable[[str], AbstractAsyncContextManager[Replica]]


@pytest.fixture(params=["fastapi", "aiohttp"])
def serve(request: pytest.FixtureRequest) -> Serve:
    return fastapi_replica if request.param == "fastapi" else aiohttp_replica


def order(n: int) -> dict[str, Any]:
    return {"order_id": f"o-{n}", "sku": "tea", "quantity": 1 + n % 3}


async def group_settled(replica: Replica, length: int) -> bool:
    """The info endpoint shows every order appended and acknowledged by the group."""
    status, info = await replica.get("/orders/info")
    assert status == 200
    groups = {g["name"]: (g["pending"], g["lag"]) for g in info["groups"]}
    return bool(info["length"] == length and groups.get("fulfilment") == (0, 0))


async def test_orders_posted_are_fulfilled_once_and_shown_in_info(
    serve: Serve, redis_url: str, redis_client: aredis.Redis
) -> None:
    async with serve(redis_url) as app:
        assert await app.get("/healthz") == (
            200,
            {"status": "running", "consumer": app.consumer.name},
        )
        ids = []
        for n in range(N):
            status, body = await app.post_order(order(n))
            assert status == 202, body
            ids.append(body["id"])
        assert len(set(ids)) == N

        await wait_until(lambda: group_settled(app, N))
        status, info = await app.get("/orders/info")
        assert info["first_id"] == ids[0]
        assert info["last_id"] == ids[-1]
        assert [(g["name"], g["consumers"]) for g in info["groups"]] == [("fulfilment", 1)]
    # Stopped: nothing more can arrive, so the count is final.
    assert sorted(app.fulfilled) == sorted(f"o-{n}" for n in range(N))
    assert app.consumer.stats.handled == N


async def test_two_replicas_in_one_group_split_the_orders(
    serve: Serve, redis_url: str, redis_client: aredis.Redis
) -> None:
    async with serve(redis_url) as first, serve(redis_url) as second:
        for n in range(N):
            status, _ = await (first, second)[n % 2].post_order(order(n))
            assert status == 202
        await wait_until(lambda: group_settled(first, N))
        _, info = await second.get("/orders/info")
        assert [(g["name"], g["consumers"]) for g in info["groups"]] == [("fulfilment", 2)]
    handled = Counter(first.fulfilled + second.fulfilled)
    assert sorted(handled) == sorted(f"o-{n}" for n in range(N))
    assert set(handled.values()) == {1}  # no order fulfilled twice
    # Both blocked on XREADGROUP while orders arrived one by one: Redis hands each
    # new entry to the reader that waited longest, so each replica got a share.
    assert first.fulfilled
    assert second.fulfilled


async def test_health_is_503_with_the_reason_once_the_consumer_stopped(
    serve: Serve, redis_url: str, redis_client: aredis.Redis
) -> None:
    async with serve(redis_url) as app:
        status, _ = await app.get("/healthz")
        assert status == 200
        await Topic(redis_client, "orders").terminate()  # every consumer stops at once

        async def unhealthy() -> bool:
            return (await app.get("/healthz"))[0] == 503

        await wait_until(unhealthy)
        assert await app.get("/healthz") == (
            503,
            {"status": "stopped", "reason": "terminated", "error": None},
        )
    # Shutting the app down after its consumer stopped on its own is clean.
    assert app.consumer.stop_reason == "terminated"


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"{not json", "malformed"),
        (b"", "truncated"),
        (b'["o-1", "tea", 1]', "Expected `object`"),
        ({"order_id": "o-1", "quantity": 1}, "missing required field `sku`"),
        ({"order_id": "o-1", "sku": "tea", "quantity": 0}, "Expected `int` >= 1"),
        ({"order_id": "o-1", "sku": "tea", "quantity": "1"}, "Expected `int`, got `str`"),
        ({"order_id": "o-1", "sku": "tea", "quantity": 1, "extra": 1}, "unknown field"),
    ],
)
async def test_bad_bodies_are_422_and_publish_nothing(
    serve: Serve, redis_url: str, redis_client: aredis.Redis, body: Any, complaint: str
) -> None:
    async with serve(redis_url) as app:
        status, reply = await app.post_order(body)
        assert status == 422
        assert complaint in str(reply)
        _, info = await app.get("/orders/info")
        assert info["length"] == 0


async def test_a_retried_post_with_its_idempotency_key_publishes_once(
    serve: Serve, redis_url: str, redis_client: aredis.Redis
) -> None:
    async with serve(redis_url) as app:
        first = await app.post_order(order(1), key="order-1")
        again = await app.post_order(order(1), key="order-1")
        assert first == again
        await wait_until(lambda: group_settled(app, 1))
    assert app.fulfilled == ["o-1"]


async def test_worker_router_handles_each_type_and_retries_when_rate_limited(
    redis_client: aredis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="redcurrent")
    worker = load_example("worker_app")
    assert worker.router.message_types == ["payment", "shipment"]
    # The provider answers 429 once, then accepts.
    calls: list[str] = []
    real_charge = worker.charge

    async def charge(payment: Any, *, idempotency_key: str) -> None:
        calls.append(idempotency_key)
        if len(calls) == 1:
            raise worker.RateLimited(retry_after=0.05)
        await real_charge(payment, idempotency_key=idempotency_key)

    monkeypatch.setattr(worker, "charge", charge)
    consumer = StreamConsumer(redis_client, "orders", "billing", start=StartFrom.EARLIEST)
    consumer.include_router(worker.router)
    topic = Topic(redis_client, "orders")
    payment_id = await topic.publish("payment", {"order_id": "o-1", "amount_cents": 1250})
    await topic.publish("shipment", {"order_id": "o-1", "address": "1 Main St"})
    async with consumer:
        await wait_until(lambda: consumer.stats.handled == 2)
    # Stopped: the figures are final.
    assert worker.charged == ["o-1"]
    assert worker.shipped == ["o-1"]
    assert calls == [payment_id, payment_id]  # the same message, run again
    assert consumer.stats.retried == 1
    assert consumer.stats.dead_lettered == 0
    assert consumer.stats.failed == 0  # a Retry is no failure
    # ... nor does the log: a Retry is an INFO line, no warning, no traceback.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "payment o-1: rate limited; retry after 0.05s" in caplog.messages
