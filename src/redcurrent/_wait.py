"""Polling a condition with a deadline: how a test waits for what a consumer does in the
background, instead of sleeping for a guessed time."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import anyio

__all__ = ["wait_until"]


async def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,  # noqa: ASYNC109 - a deadline is the point of this function
    interval: float = 0.02,
) -> None:
    """Call ``predicate`` every ``interval`` seconds until it returns something true.

    ``predicate`` is a plain or an async function (its awaitable is awaited). After
    ``timeout`` seconds, a call still running included, raises :class:`TimeoutError`
    naming the predicate, where it is defined and what it last returned, so a failed
    test says which condition never came true. Exceptions the predicate raises propagate
    at once: a broken check is not reported as a slow one. Runs on any anyio backend.
    """
    if timeout < 0 or interval < 0:
        raise ValueError(f"timeout and interval must be >= 0, got {timeout!r} and {interval!r}")
    polls = 0
    last: object = None
    with anyio.move_on_after(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            polls += 1
            if result:
                return
            last = result
            await anyio.sleep(interval)
    # Only the deadline leaves the loop without returning.
    outcome = f"last returned {_short_repr(last)}" if polls else "its first call did not finish"
    raise TimeoutError(
        f"wait_until: {_describe(predicate)} was not true within {timeout:g} s "
        f"({polls} call(s); {outcome})"
    )


def _describe(predicate: Callable[[], object]) -> str:
    """``module.qualname (file:line)``: a lambda's name alone does not say which one."""
    target = inspect.unwrap(predicate)
    name = getattr(target, "__qualname__", None) or repr(target)
    code = getattr(target, "__code__", None)
    if code is None:
        return name
    return f"{name} ({code.co_filename}:{code.co_firstlineno})"


def _short_repr(value: object, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
