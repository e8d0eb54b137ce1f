"""The payload size limit, ``max_payload_bytes``, for publishers and consumers.

One measure on both sides: the bytes of an entry's field names and values as
the stream stores them. A publisher and a consumer with the same limit
therefore agree on every entry, and a consumer can weigh an entry from the raw
field bytes without decoding anything (an oversized entry is dead-lettered
unread, so a huge value never reaches the JSON decoder).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from .errors import ConfigurationError

__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "FIELD_NAME_BYTES", "check_limit", "entry_size"]

#: The default limit: 8 MiB, far above a sensible message and far below what
#: makes Redis (512 MB per value) or a consumer's memory suffer.
DEFAULT_MAX_PAYLOAD_BYTES: Final = 8 * 1024 * 1024

#: ``type``, ``data`` and ``metadata``: the names of the fields a publisher writes.
FIELD_NAME_BYTES: Final = len(b"type") + len(b"data") + len(b"metadata")


def check_limit(value: object) -> int | None:
    """A valid ``max_payload_bytes``: an int > 0, or None for no limit."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(
            f"max_payload_bytes must be an int > 0 (bytes) or None for no limit, got {value!r}"
        )
    return value


def entry_size(fields: Mapping[bytes, bytes]) -> int:
    """What an entry weighs: the bytes of its field names and values."""
    size = 0
    for key, value in fields.items():
        size += len(key) + len(value)
    return size
