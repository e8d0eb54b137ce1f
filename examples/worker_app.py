"""Handlers of a billing worker, declared on a Router and run by the command line:

    redcurrent worker examples.worker_app:router --stream orders --group billing

Nothing here knows about Redis, streams or groups: the worker command builds
the consumer (from its options) and includes this router, and a test or
another process can include the same router into a consumer of its own.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from redcurrent import Context, Message, Retry, RetryPolicy, Router

router = Router()


class Payment(msgspec.Struct):
    order_id: str
    amount_cents: Annotated[int, msgspec.Meta(gt=0)]
    currency: str = "EUR"


class Shipment(msgspec.Struct):
    order_id: str
    address: str


class RateLimited(Exception):
    """What a payment provider's client raises on HTTP 429 Too Many Requests."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limited; retry after {retry_after:g}s")
        self.retry_after = retry_after


# Stand-ins for your payment provider's and warehouse's clients.
charged: list[str] = []
shipped: list[str] = []


async def charge(payment: Payment, *, idempotency_key: str) -> None:
    charged.append(payment.order_id)


# A payment that keeps failing is a dead letter after 8 deliveries instead of
# the consumer's max_deliveries: rate limits can last a while.
@router.handler("payment", max_deliveries=8, retry=RetryPolicy(delay=1.0, max_delay=60.0))
async def take_payment(msg: Message[Payment], ctx: Context) -> None:
    try:
        # msg.id as the provider's idempotency key: delivery is at-least-once,
        # so a message may run again (a crash before the ack, a takeover).
        await charge(msg.data, idempotency_key=msg.id)
    except RateLimited as exc:
        # Transient, and the provider says when to come back: Retry is logged at
        # INFO without a traceback, and runs the message again after that delay
        # (it still counts towards max_deliveries).
        ctx.logger.info("payment %s: %s", msg.data.order_id, exc)
        raise Retry(delay=exc.retry_after) from exc


@router.handler("shipment")
async def ship(msg: Message[Shipment], ctx: Context) -> None:
    # Any other exception is a failure: retried with the consumer's RetryPolicy,
    # a dead letter after its max_deliveries.
    shipped.append(msg.data.order_id)
    ctx.logger.info("shipped %s (delivery %d)", msg.data.order_id, msg.delivery_count)
