"""redcurrent: reliable, asyncio-native message processing on Redis Streams."""

from __future__ import annotations

from ._batch import BatchConfig
from ._routes import BatchHandlerObject, HandlerObject
from ._version import __version__
from .cleanup import CleanupPolicy
from .consumer import StreamConsumer
from .errors import (
    AccessDeniedError,
    BatchError,
    ConfigurationError,
    ConsumerStateError,
    DecodeError,
    EncodeError,
    NoHandlerError,
    PayloadTooLargeError,
    RedcurrentError,
    StartTimeoutError,
    TopicGoneError,
    ValidationError,
)
from .keys import TopicKeys
from .message import (
    ConsumerStats,
    DeadLetter,
    GroupInfo,
    Message,
    StartFrom,
    StopReason,
    TopicInfo,
)
from .topic import Topic

__all__ = [
    "AccessDeniedError",
    "BatchConfig",
    "BatchError",
    "BatchHandlerObject",
    "CleanupPolicy",
    "ConfigurationError",
    "ConsumerStateError",
    "ConsumerStats",
    "DeadLetter",
    "DecodeError",
    "EncodeError",
    "GroupInfo",
    "HandlerObject",
    "Message",
    "NoHandlerError",
    "PayloadTooLargeError",
    "RedcurrentError",
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
]

# Show ``redcurrent.X`` in reprs, tracebacks and docs rather than the private
# module each name lives in; every name here is importable from this package.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith(f"{__name__}."):
        _obj.__module__ = __name__
del _name, _obj
