"""What a handler can reach besides its message, without closing over the consumer."""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from ._topic import Topic

__all__ = ["Context"]

#: The logger behind every :attr:`Context.logger`.
HANDLER_LOGGER = "redcurrent.handler"

if TYPE_CHECKING:
    _Adapter = logging.LoggerAdapter[logging.Logger]
else:  # LoggerAdapter is subscriptable at run time only from Python 3.11
    _Adapter = logging.LoggerAdapter


class _HandlerLog(_Adapter):
    """Adds the consumer's names to each record and keeps the caller's ``extra``
    (a plain adapter replaces it before Python 3.13)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = kwargs.get("extra")
        kwargs["extra"] = {**(self.extra or {}), **extra} if extra else self.extra
        return msg, kwargs


class Context:
    """The optional second parameter of a handler: ``async def h(msg, ctx: Context)``.

    One per consumer, made before it starts and shared by all its handlers, so
    asking for it costs nothing per message. ``topic`` publishes follow-ups and
    stops messages on the consumer's stream (through the client the consumer was
    given); ``logger`` writes to ``redcurrent.handler`` with ``stream``,
    ``group`` and ``consumer`` in every record. Build one yourself to call a
    handler in a unit test.
    """

    __slots__ = ("_consumer", "_group", "_logger", "_topic")

    _topic: Topic
    _consumer: str
    _group: str
    _logger: logging.LoggerAdapter[logging.Logger]

    def __init__(self, topic: Topic, *, consumer: str, group: str) -> None:
        self._topic = topic
        self._consumer = consumer
        self._group = group
        names: Mapping[str, object] = {"stream": topic.name, "group": group, "consumer": consumer}
        self._logger = _HandlerLog(logging.getLogger(HANDLER_LOGGER), names)

    def _rename(self, consumer: str) -> None:
        """The consumer was given its worker name before it started."""
        self.__init__(self._topic, consumer=consumer, group=self._group)  # type: ignore[misc]

    @property
    def topic(self) -> Topic:
        """The consumer's topic: ``await ctx.topic.publish(...)``,
        ``await ctx.topic.stop_message(msg.id)``."""
        return self._topic

    @property
    def stream(self) -> str:
        return self._topic.name

    @property
    def group(self) -> str:
        return self._group

    @property
    def consumer(self) -> str:
        """The consumer's name in its group."""
        return self._consumer

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        return self._logger

    def __repr__(self) -> str:
        return f"Context({self.stream!r}, group={self._group!r}, consumer={self._consumer!r})"
