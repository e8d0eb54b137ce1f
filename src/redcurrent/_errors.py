"""The one place that decides what an error from Redis means for a consumer.

redis-py reports ``NOGROUP``, ``BUSYGROUP`` and friends as a bare
``ResponseError``; loops ask :func:`classify` instead of matching strings.
"""

from __future__ import annotations

import enum

from redis import exceptions as rex

__all__ = ["Fault", "classify", "is_busygroup", "is_wrongtype"]


class Fault(enum.Enum):
    GONE = "gone"
    """The stream or the group no longer exists: stop, do not retry."""
    TRANSIENT = "transient"
    """The server is unreachable, loading, read-only or failing over: retry."""
    FATAL = "fatal"
    """Anything else: a bug or a misconfiguration that retrying will not fix."""


# ``UNBLOCKED`` alone is not enough: ``CLIENT UNBLOCK ... ERROR`` answers with
# it too, and an operator unblocking a client must not stop the consumer.
_GONE_PREFIXES = ("NOGROUP",)
_GONE_TEXT = ("no such key", "the stream key no longer exists", "consumer group was destroyed")
_TRANSIENT_PREFIXES = (
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "MOVED",
    "ASK",
    "BUSY ",
    "NOREPLICAS",
    "UNBLOCKED",
)


# redis-py strips the error code from these, so their text cannot be matched.
_TRANSIENT_CLASSES = (
    rex.ReadOnlyError,
    rex.MasterDownError,
    rex.ClusterDownError,
    rex.ClusterError,
    rex.TryAgainError,
    rex.MovedError,
    rex.AskError,
    rex.OutOfMemoryError,
)


def classify(exc: BaseException) -> Fault:
    if isinstance(
        exc,
        rex.ConnectionError | rex.TimeoutError | TimeoutError | ConnectionError | OSError,
    ):
        return Fault.TRANSIENT
    if isinstance(exc, _TRANSIENT_CLASSES):
        return Fault.TRANSIENT
    if isinstance(exc, rex.ResponseError):
        text = str(exc)
        if text.startswith(_GONE_PREFIXES) or any(t in text for t in _GONE_TEXT):
            return Fault.GONE
        if text.startswith(_TRANSIENT_PREFIXES):
            return Fault.TRANSIENT
        return Fault.FATAL
    return Fault.FATAL


def is_busygroup(exc: BaseException) -> bool:
    return isinstance(exc, rex.ResponseError) and str(exc).startswith("BUSYGROUP")


def is_wrongtype(exc: BaseException) -> bool:
    """The key holds another type than the command needs (e.g. not a stream)."""
    return isinstance(exc, rex.ResponseError) and str(exc).startswith("WRONGTYPE")
