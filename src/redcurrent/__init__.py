"""redcurrent: reliable, asyncio-native message processing on Redis Streams."""

from __future__ import annotations

from ._config import BatchConfig, CleanupPolicy, ConsumerConfig, RetryPolicy
from ._consumer import StreamConsumer
from ._context import Context
from ._keys import TopicKeys
from ._message import (
    ConsumerHealth,
    ConsumerStats,
    DeadLetter,
    GroupInfo,
    Message,
    PartitionInfo,
    StartFrom,
    StopReason,
    TopicInfo,
)
from ._router import Router
from ._routes import BatchHandlerObject, HandlerObject
from ._serve import run, serve
from ._topic import Topic
from ._version import __version__
from .errors import (
    AccessDeniedError,
    BatchError,
    ConfigurationError,
    ConsumerStateError,
    DecodeError,
    EncodeError,
    NoHandlerError,
    PartitionCountError,
    PayloadTooLargeError,
    RedcurrentError,
    Retry,
    StartTimeoutError,
    TopicGoneError,
    ValidationError,
)

__all__ = [
    "AccessDeniedError",
    "BatchConfig",
    "BatchError",
    "BatchHandlerObject",
    "CleanupPolicy",
    "ConfigurationError",
    "ConsumerConfig",
    "ConsumerHealth",
    "ConsumerStateError",
    "ConsumerStats",
    "Context",
    "DeadLetter",
    "DecodeError",
    "EncodeError",
    "GroupInfo",
    "HandlerObject",
    "Message",
    "NoHandlerError",
    "PartitionCountError",
    "PartitionInfo",
    "PayloadTooLargeError",
    "RedcurrentError",
    "Retry",
    "RetryPolicy",
    "Router",
    "StartFrom",
    "StartTimeoutError",
    "StopReason",
    "StreamConsumer",
    "Topic",
    "TopicGoneError",
    "TopicInfo",
    "TopicKeys",
    "ValidationError",
    "__version__",
    "run",
    "serve",
]

# Show ``redcurrent.X`` in reprs, tracebacks and docs rather than the private
# module each name lives in; every name here is importable from this package.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith(f"{__name__}."):
        _obj.__module__ = __name__
del _name, _obj
