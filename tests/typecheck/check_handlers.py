"""Handlers typed by their model: checked by ``mypy --strict`` and pyright, never run.

The lines marked ``type: ignore[...]`` / ``pyright: ignore[...]`` are the wrong
handlers: both checkers must report an error there. mypy's
``warn_unused_ignores`` (on under ``--strict``) and pyright's
``reportUnnecessaryTypeIgnoreComment`` fail the check when one stops being an
error, so a loosened overload cannot slip through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import redis.asyncio as aredis
from typing_extensions import assert_type

from redcurrent import Context, Message, Router, StreamConsumer, Topic


class Email(msgspec.Struct):
    to: str


class Sms(msgspec.Struct):
    number: str


router = Router()


# -- right ------------------------------------------------------------------------------


@router.handler("email", model=Email)
async def send(msg: Message[Email]) -> None:
    assert_type(msg.data, Email)


@router.handler("email-inferred")  # the model comes from the annotation
async def send_inferred(msg: Message[Email]) -> None:
    assert_type(msg.data.to, str)


@router.handler("raw")
async def raw(msg: Message[Any]) -> None: ...


@router.handler("with-context", model=Email)
async def with_context(msg: Message[Email], ctx: Context) -> None:
    assert_type(ctx.topic, Topic)
    assert_type(ctx.consumer, str)
    assert_type(ctx.group, str)
    await ctx.topic.publish("sent", {"to": msg.data.to})
    ctx.logger.info("sent to %s", msg.data.to, extra={"message_id": msg.id})


@router.batch_handler("sms", size=10, model=Sms)
async def send_sms(msgs: list[Message[Sms]]) -> None:
    assert_type(msgs[0].data, Sms)


@router.batch_handler("sms-inferred")
async def send_sms_inferred(msgs: list[Message[Sms]], ctx: Context) -> None: ...


# The decorators hand back a callable of the same signature.
keep: Callable[[Message[Email]], Awaitable[None]] = send
keep_batch: Callable[[list[Message[Sms]]], Awaitable[None]] = send_sms


def consume(r: aredis.Redis) -> StreamConsumer:
    consumer = StreamConsumer(r, "orders", "g")
    consumer.include_router(router)

    @consumer.handler("sms", model=Sms)
    async def one_sms(msg: Message[Sms]) -> None: ...

    return consumer


# -- wrong: each line below must be an error for both checkers --------------------------


async def sms_handler(msg: Message[Sms]) -> None: ...


async def no_message() -> None: ...


async def two_messages(msg: Message[Email], other: Message[Email]) -> None: ...


def not_async(msg: Message[Email]) -> None: ...


# model=Email on a handler of Message[Sms]
router.handler("e1", model=Email)(sms_handler)  # type: ignore[arg-type]  # pyright: ignore[reportCallIssue, reportArgumentType]

# a single-message function given to batch_handler
router.batch_handler("e2")(sms_handler)  # type: ignore[arg-type]  # pyright: ignore[reportCallIssue, reportArgumentType]

# a single-message function given to batch_handler, with a model
router.batch_handler("e3", model=Sms)(sms_handler)  # type: ignore[arg-type]  # pyright: ignore[reportCallIssue, reportArgumentType]

# no parameter
router.handler("e4")(no_message)  # type: ignore[arg-type]  # pyright: ignore[reportCallIssue, reportArgumentType]

# a second parameter that is not the Context
router.handler("e5", model=Email)(two_messages)  # type: ignore[arg-type]  # pyright: ignore[reportCallIssue, reportArgumentType]

# not async
router.handler("e6")(not_async)  # type: ignore[type-var]  # pyright: ignore[reportCallIssue, reportArgumentType]


def wrong_on_a_consumer(consumer: StreamConsumer) -> None:
    consumer.handler("e7", model=Email)(sms_handler)  # type: ignore[arg-type]  # pyright: ignore[reportCallIssue, reportArgumentType]
    consumer.batch_handler("e8", model=Sms)(sms_handler)  # type: ignore[arg-type]  # pyright: ignore[reportCallIssue, reportArgumentType]
