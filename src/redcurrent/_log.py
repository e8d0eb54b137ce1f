"""Every record a consumer logs carries its ``stream``, ``group`` and
``consumer`` (as record attributes, for structured log formatters), whichever
of its tasks logs it.

The names live in a context variable set when the consumer's run begins; the
tasks it starts inherit it. A filter on each of the library's loggers copies
them onto the record, leaving attributes a call already gave (``extra=``)
alone. Records logged outside a consumer (a ``Topic`` call) carry none.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

__all__ = ["LOGGERS", "in_consumer"]

#: every logger of the library (``redcurrent.handler`` is the handlers' own,
#: through ``Context.logger``, which sets the same fields itself).
LOGGERS = (
    "redcurrent.consumer",
    "redcurrent.cleanup",
    "redcurrent.control",
    "redcurrent.publish",
    "redcurrent.worker",
)
_FIELDS = ("stream", "group", "consumer")
_NAMES: ContextVar[tuple[str, str, str] | None] = ContextVar("redcurrent_consumer", default=None)


class _ConsumerFields(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        names = _NAMES.get()
        if names is not None:
            fields = record.__dict__
            for key, value in zip(_FIELDS, names, strict=True):
                fields.setdefault(key, value)
        return True


_FILTER = _ConsumerFields()
for _name in LOGGERS:
    logging.getLogger(_name).addFilter(_FILTER)


def in_consumer(stream: str, group: str, consumer: str) -> None:
    """The current task (and the tasks it starts from now on) logs for this consumer."""
    _NAMES.set((stream, group, consumer))
