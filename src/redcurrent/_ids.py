"""Stream entry ids given by users: one validator for every place that takes one."""

from __future__ import annotations

import re
from typing import Final

from .errors import ConfigurationError

__all__ = ["normalize_id"]

_ID: Final = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
_U64_MAX: Final = 2**64 - 1


def normalize_id(entry_id: object) -> str:
    """The canonical ``<ms>-<seq>`` form of a stream entry id, as the server writes it.

    Stopped ids are compared as strings with ids read from the stream, so
    ``"0017-0"`` must become ``"17-0"`` or it would never match. A bare
    ``"<ms>"`` means ``"<ms>-0"``, as it does to XGROUP CREATE and XRANGE, so a
    consumer's ``start`` and ``stop_message`` accept the same spellings.
    """
    if not isinstance(entry_id, str):
        raise ConfigurationError(
            f"a message id must be a str like '1700000000000-0', got {entry_id!r}"
        )
    match = _ID.fullmatch(entry_id.strip())
    if match is None:
        raise ConfigurationError(
            f"not a stream entry id: {entry_id!r} (expected '<milliseconds>-<sequence>')"
        )
    ms, seq = int(match[1]), int(match[2] or 0)
    if ms > _U64_MAX or seq > _U64_MAX:
        raise ConfigurationError(f"stream entry id out of range: {entry_id!r}")
    return f"{ms}-{seq}"
