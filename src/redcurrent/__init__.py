"""redcurrent: reliable, asyncio-native message processing on Redis Streams."""

from __future__ import annotations

from ._version import __version__
from .errors import (
    BatchError,
    ConfigurationError,
    ConsumerStateError,
    DecodeError,
    NoHandlerError,
    RedcurrentError,
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
    "BatchError",
    "ConfigurationError",
    "ConsumerStateError",
    "ConsumerStats",
    "DeadLetter",
    "DecodeError",
    "GroupInfo",
    "Message",
    "NoHandlerError",
    "RedcurrentError",
    "StartFrom",
    "StopReason",
    "Topic",
    "TopicGoneError",
    "TopicInfo",
    "TopicKeys",
    "ValidationError",
    "__version__",
]
