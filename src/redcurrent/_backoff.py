"""Retrying transient Redis faults: capped exponential backoff with jitter,
and one log line per outage instead of one per failed call."""

from __future__ import annotations

import logging
import random
import time

import anyio

__all__ = ["Backoff", "Outage"]


class Backoff:
    """Delays of ``base * 2**n``, capped, with full jitter so that many
    consumers reconnecting after a restart do not stampede the server."""

    __slots__ = ("_attempt", "base", "cap")

    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self.base = base
        self.cap = cap
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 30)
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0

    async def sleep(self) -> None:
        await anyio.sleep(self.next_delay())


class Outage:
    """Shared by a consumer's loops: the first failure of an outage is logged
    as a warning, the recovery as info, everything between at debug level."""

    __slots__ = ("_logger", "_since", "_what", "last_error")

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._since: float | None = None
        #: the most recent failure (kept after recovery, for error messages).
        self.last_error: BaseException | None = None

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    @property
    def since(self) -> float | None:
        """When (monotonic) the outage in progress began; None without one."""
        return self._since

    def failed(self, exc: BaseException, during: str) -> None:
        self.last_error = exc
        if self._since is None:
            self._since = time.monotonic()
            self._logger.warning(
                "%s: Redis unavailable during %s (%s: %s); retrying with backoff",
                self._what,
                during,
                type(exc).__name__,
                exc,
            )
        else:
            self._logger.debug("%s: still unavailable during %s: %r", self._what, during, exc)

    def recovered(self) -> None:
        if self._since is not None:
            self._logger.warning(
                "%s: Redis reachable again after %.1fs",
                self._what,
                time.monotonic() - self._since,
            )
            self._since = None
