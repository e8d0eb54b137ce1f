"""The one place that decides what an error from Redis means for a consumer.

redis-py reports ``NOGROUP``, ``BUSYGROUP`` and friends as a bare
``ResponseError``; loops ask :func:`classify` instead of matching strings.
Server errors are told apart by their error code (the first word of the
server's reply), found by :func:`error_code` also where Redis 6.2 wraps the
error of a command inside a script (``Error running script ...:
@user_script:5: NOGROUP ...``), and by redis-py's exception classes where
redis-py strips the code.
"""

from __future__ import annotations

import contextlib
import enum
import re
from collections.abc import Iterator

from redis import exceptions as rex

from .errors import AccessDeniedError

__all__ = [
    "Fault",
    "access_denied",
    "classify",
    "denials_explained",
    "error_code",
    "is_busygroup",
    "is_wrongtype",
    "woken_by_deletion",
]


class Fault(enum.Enum):
    GONE = "gone"
    """The stream or the group no longer exists: stop, do not retry."""
    TRANSIENT = "transient"
    """The server is unreachable, loading, read-only or failing over: retry."""
    DENIED = "denied"
    """Wrong credentials or a missing ACL permission: a configuration error,
    retrying will not fix it."""
    FATAL = "fatal"
    """Anything else: a bug or a misconfiguration that retrying will not fix."""


# ``UNBLOCKED`` alone is not enough: ``CLIENT UNBLOCK ... ERROR`` answers with
# it too, and an operator unblocking a client must not stop the consumer.
_GONE_CODES = frozenset({"NOGROUP"})
# Redis 7 answers a blocked XREADGROUP whose stream was deleted with
# ``UNBLOCKED the stream key no longer exists``; the code alone is shared with
# CLIENT UNBLOCK, so this one reply is recognised whole.
_KEY_DELETED = "the stream key no longer exists"
_GONE_UNBLOCKED = (_KEY_DELETED, "consumer group was destroyed")
# A plain ``ERR`` has no code of its own: XINFO on a missing stream says this.
_GONE_ERR = "no such key"
_TRANSIENT_CODES = frozenset(
    {
        "LOADING",
        "READONLY",
        "MASTERDOWN",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "MOVED",
        "ASK",
        "BUSY",
        "NOREPLICAS",
        "UNBLOCKED",
        "OOM",
    }
)
_DENIED_CODES = frozenset({"NOPERM", "NOAUTH", "WRONGPASS"})

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
    rex.BusyLoadingError,
)
# Where redis-py raises on a connection closed under a command (see classify).
_CONNECTION_MODULES = frozenset({"redis.asyncio.connection", "redis.connection"})
# Subclasses of ConnectionError in redis-py: they must be tested before it.
_DENIED_CLASSES = (rex.AuthenticationError, rex.AuthorizationError, rex.NoPermissionError)

# Redis < 7 reports an error raised by redis.call() inside a script as
# "Error running script (call to f_...): @user_script:5: NOGROUP ...", and one
# coming from the server's own checks as "... @user_script: 1: -READONLY ...".
_SCRIPT_ERROR = re.compile(r"@user_script:\s*\d+:\s*-?(?=[A-Z])")
_CODE = re.compile(r"[A-Z][A-Z_]+")


def error_code(exc: BaseException) -> str | None:
    """The server's error code of a Redis error reply (``NOGROUP``, ``READONLY``
    ...), unwrapped from a script error, or None when it has none."""
    if not isinstance(exc, rex.ResponseError):
        return None
    text = str(exc)
    *_, last = _SCRIPT_ERROR.split(text) if "@user_script:" in text else ("", text)
    match = _CODE.match(last)
    if match is not None and (match.end() == len(last) or last[match.end()] == " "):
        return match.group()
    status = getattr(exc, "status_code", None)  # redis-py >= 6 keeps the stripped code
    return status if isinstance(status, str) and status != "ERR" else None


def _torn_down_under_a_command(exc: BaseException) -> bool:
    """redis-py's cluster client (8.1) disconnects every pooled connection from
    a background task when it re-initialises (every 5th MOVED, CLUSTERDOWN),
    also one a command is connecting or writing on at that moment, which then
    fails inside redis-py's connection module with ``AttributeError`` on the
    writer it just lost. Told by type and by the module that raised it."""
    if not isinstance(exc, AttributeError):
        return False
    tb, module = exc.__traceback__, None
    while tb is not None:
        module, tb = tb.tb_frame.f_globals.get("__name__"), tb.tb_next
    return module in _CONNECTION_MODULES


def classify(exc: BaseException) -> Fault:
    if isinstance(exc, _DENIED_CLASSES):
        return Fault.DENIED
    if isinstance(
        exc,
        rex.ConnectionError | rex.TimeoutError | TimeoutError | ConnectionError | OSError,
    ):
        return Fault.TRANSIENT
    if isinstance(exc, _TRANSIENT_CLASSES):
        return Fault.TRANSIENT
    if isinstance(exc, rex.ResponseError):
        code = error_code(exc)
        if code in _GONE_CODES:
            return Fault.GONE
        if code == "UNBLOCKED" and any(t in str(exc) for t in _GONE_UNBLOCKED):
            return Fault.GONE
        if code is None and str(exc).startswith(_GONE_ERR):
            return Fault.GONE
        if code in _DENIED_CODES:
            return Fault.DENIED
        if code in _TRANSIENT_CODES:
            return Fault.TRANSIENT
        return Fault.FATAL
    if _torn_down_under_a_command(exc):
        return Fault.TRANSIENT
    return Fault.FATAL


def woken_by_deletion(exc: BaseException) -> bool:
    """A blocked read woken because its stream key left the node: deleted, or
    moved to another node of a cluster by MIGRATE (resharding), which deletes
    it on the source with the same reply. Only asking again tells them apart:
    a deleted stream then answers ``NOGROUP``, a moved one is redirected."""
    return error_code(exc) == "UNBLOCKED" and _KEY_DELETED in str(exc)


def is_busygroup(exc: BaseException) -> bool:
    return error_code(exc) == "BUSYGROUP"


def is_wrongtype(exc: BaseException) -> bool:
    """The key holds another type than the command needs (e.g. not a stream)."""
    return error_code(exc) == "WRONGTYPE"


def access_denied(exc: BaseException, what: str) -> AccessDeniedError:
    """The library's error for a :attr:`Fault.DENIED` one, saying what to check."""
    if error_code(exc) == "NOPERM" or isinstance(exc, rex.NoPermissionError):
        hint = "the ACL user lacks a permission the library needs (see the README's ACL section)"
    else:
        hint = "check the username and password of the Redis client"
    return AccessDeniedError(f"Redis denied {what}: {type(exc).__name__}: {exc}; {hint}")


@contextlib.contextmanager
def denials_explained(what: str) -> Iterator[None]:
    """Raise a :attr:`Fault.DENIED` error of the block as :class:`AccessDeniedError`.

    For calls made once on the caller's behalf (``Topic`` methods): a refused
    key, command or channel is the caller's configuration to fix, and should
    read as the library's error with what to check, not as a bare redis-py one.
    """
    try:
        yield
    except Exception as exc:
        if classify(exc) is Fault.DENIED:
            raise access_denied(exc, what) from exc
        raise
