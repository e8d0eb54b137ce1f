"""Where the optional instrumentation plugs in (``redcurrent.prometheus``,
``redcurrent.otel``): handler middleware, publish observers, consumer
observers.

Registered process-wide, as OpenTelemetry instrumentors and Prometheus
registries are. Nothing here costs anything while nothing is registered: a
consumer wraps its handlers once, when it starts, and a publish checks one
list. Only a running handler or a publish is ever observed, never the idle
polling or the housekeeping, so an idle worker produces no spans.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._consumer import StreamConsumer

__all__ = [
    "CONSUMER_OBSERVERS",
    "MIDDLEWARE",
    "PUBLISH_OBSERVERS",
    "ConsumerObserver",
    "Handler",
    "HandlerInfo",
    "Middleware",
    "PublishObservation",
    "PublishObserver",
]

#: what a route calls: one message, or the list of a batch.
Handler = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True)
class HandlerInfo:
    """One route of one consumer, as middleware sees it."""

    stream: str
    group: str
    consumer: str
    message_type: str  #: ``"*"`` for a catch-all handler
    handler: str  #: the handler's qualified name
    batch: bool


#: wraps a route's handler once, when its consumer starts; the wrapper gets
#: each message (or batch) and must call (and await) the handler with it,
#: letting its exceptions through: ``Retry``, failures and cancellation decide
#: the message's fate after it.
Middleware = Callable[[HandlerInfo, Handler], Handler]


class PublishObservation(Protocol):
    """One publish (one message, or a ``publish_many`` call) being observed."""

    #: metadata added to every message published (e.g. ``traceparent``); a
    #: key the caller set in a message's metadata wins.
    headers: Mapping[str, str]

    def finish(self, ids: list[str] | None, error: BaseException | None) -> None: ...


class PublishObserver(Protocol):
    def __call__(
        self, stream: str, message_type: str | None, count: int, scheduled: bool
    ) -> PublishObservation | None:
        """A publish of ``count`` messages to ``stream`` begins
        (``message_type`` None when a ``publish_many`` mixes types)."""


class ConsumerObserver(Protocol):
    def started(self, consumer: StreamConsumer) -> None: ...

    def stopped(self, consumer: StreamConsumer) -> None: ...


MIDDLEWARE: list[Middleware] = []
PUBLISH_OBSERVERS: list[PublishObserver] = []
CONSUMER_OBSERVERS: list[ConsumerObserver] = []
