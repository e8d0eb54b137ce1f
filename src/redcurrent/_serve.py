"""Consumers as a worker process: run until SIGTERM or SIGINT, then drain.

A container orchestrator stops a process with SIGTERM and, a grace period
later, SIGKILL. Killed outright, a consumer leaves what it held to
``claim_idle``; stopped gracefully, it finishes the handlers in hand (up to
``shutdown_timeout``) and hands back the rest at once, so its peers take it
immediately. A second signal stops at once: running handlers are cancelled,
their messages handed back.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
from collections.abc import Iterable

import anyio
import anyio.abc

from ._consumer import StreamConsumer
from ._message import StopReason
from ._names import NameLostError, WorkerName, claim_worker_name
from .errors import ConfigurationError, RedcurrentError

__all__ = ["exit_code", "run", "serve"]

logger = logging.getLogger("redcurrent.worker")

#: exit codes, worst last: a failure outranks a deleted topic.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_DELETED = 3


def exit_code(reasons: Iterable[StopReason | None]) -> int:
    """The process exit code for consumers that stopped for ``reasons``: 0 when
    each was stopped or its topic terminated, 3 when a stream or group was
    deleted under it, 1 when one failed (or never ran)."""
    code = EXIT_OK
    for reason in reasons:
        if reason is StopReason.FAILED or reason is None:
            return EXIT_FAILED
        if reason is StopReason.DELETED:
            code = EXIT_DELETED
    return code


def run(*consumers: StreamConsumer, stable_names: bool = True) -> int:
    """Run ``consumers`` in a new event loop until SIGINT or SIGTERM, stop them
    gracefully, and return the process exit code (see :func:`serve`).

    For a worker script: ``raise SystemExit(redcurrent.run(consumer))``. Logs
    at INFO to stderr when logging was not configured.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    return anyio.run(functools.partial(serve, *consumers, stable_names=stable_names))


async def serve(*consumers: StreamConsumer, stable_names: bool = True) -> int:
    """Run ``consumers`` until SIGINT or SIGTERM (or until one of them stops by
    itself), stop them all gracefully, and return the exit code: 0 stopped (or
    topic terminated), 1 failed (also a start-up failure), 3 stream or group
    deleted. A second signal stops them at once.

    With ``stable_names``, consumers whose name was left to the default get a
    worker name: ``<host>-<n>``, the lowest ``n`` no live process of this host
    uses in the group (``REDCURRENT_WORKER_HOST`` overrides the host name). A
    worker restarted on the same host thus gets its old name back and finishes
    its own pending entries at once.
    """
    if not consumers:
        raise ConfigurationError("serve() needs at least one consumer")
    if len({id(c) for c in consumers}) != len(consumers):
        raise ConfigurationError("serve() got the same consumer twice")
    signals = _Signals()
    async with anyio.create_task_group() as tg:
        await tg.start(signals.watch)
        try:
            if not await _run_all(consumers, signals, tg, stable_names=stable_names):
                return EXIT_FAILED
        finally:
            tg.cancel_scope.cancel()  # the signal watcher and the name keepers
    reasons = [c.stop_reason for c in consumers]
    for consumer in consumers:
        if consumer.stop_reason is StopReason.FAILED:
            logger.error("%s failed: %s", consumer, consumer.error)
    code = exit_code(reasons)
    logger.info("stopped (exit code %d)", code)
    return code


async def _run_all(
    consumers: tuple[StreamConsumer, ...],
    signals: _Signals,
    tg: anyio.abc.TaskGroup,
    *,
    stable_names: bool,
) -> bool:
    """Start every consumer, wait for a signal or for one to stop, stop all
    and wait for them; False when one could not start."""
    async with contextlib.AsyncExitStack() as stack:
        names = await _name_workers(consumers) if stable_names else {}
        for name in names.values():
            stack.push_async_callback(name.release)  # after the consumers stopped
        try:
            for consumer in consumers:
                await stack.enter_async_context(consumer)
                signals.started.append(consumer)
                if signals.count:
                    consumer.request_stop(hard=signals.count > 1)
        except (RedcurrentError, OSError) as exc:
            logger.error("could not start %s: %s", consumer, exc)
            signals.stop_all()
            return False
        for consumer, name in names.items():
            tg.start_soon(_keep_name, consumer, name)
        logger.info("running %s", ", ".join(map(str, consumers)))
        first = await _first_to_stop(consumers)
        if not signals.count:
            logger.info("%s stopped (%s): stopping the others", first, first.stop_reason)
        signals.stop_all()
        for consumer in consumers:
            await consumer.done()
    return True


class _Signals:
    """SIGINT and SIGTERM: the first stops gracefully, the next at once."""

    def __init__(self) -> None:
        self.count = 0
        self.started: list[StreamConsumer] = []

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            receiver = anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
            with receiver as received:
                task_status.started()
                async for signum in received:
                    self.count += 1
                    hard = self.count > 1
                    logger.warning(
                        "%s: stopping %s",
                        signal.Signals(signum).name,
                        "at once" if hard else "gracefully (a second signal stops at once)",
                    )
                    for consumer in self.started:
                        consumer.request_stop(hard=hard)
        except (NotImplementedError, RuntimeError, ValueError) as exc:
            # Windows, or not the main thread: the host handles signals.
            logger.debug("no signal handling here: %s", exc)
            task_status.started()

    def stop_all(self) -> None:
        for consumer in self.started:
            consumer.request_stop(hard=self.count > 1)


async def _first_to_stop(consumers: Iterable[StreamConsumer]) -> StreamConsumer:
    stopped: list[StreamConsumer] = []
    event = anyio.Event()

    async def wait(consumer: StreamConsumer) -> None:
        await consumer.done()
        stopped.append(consumer)
        event.set()

    async with anyio.create_task_group() as tg:
        for consumer in consumers:
            tg.start_soon(wait, consumer)
        await event.wait()
        tg.cancel_scope.cancel()
    return stopped[0]


async def _name_workers(consumers: Iterable[StreamConsumer]) -> dict[StreamConsumer, WorkerName]:
    """Stable names for the consumers whose name was left to the default."""
    names: dict[StreamConsumer, WorkerName] = {}
    for consumer in consumers:
        if consumer._named:
            continue
        taken = [
            n.name
            for c, n in names.items()
            if (c.stream, c.group) == (consumer.stream, consumer.group)
        ]
        redis = consumer._run.redis
        try:
            with anyio.fail_after(consumer.config.start_timeout):
                name = await claim_worker_name(
                    redis, consumer.keys.workers, consumer.group, taken=taken
                )
        except Exception as exc:
            # A name is a convenience: never the reason a worker does not run.
            logger.warning("%s: no stable worker name (%r); keeping its own", consumer, exc)
            continue
        consumer._rename(name.name)
        names[consumer] = name
    return names


async def _keep_name(consumer: StreamConsumer, name: WorkerName) -> None:
    try:
        await name.keep()
    except NameLostError as exc:
        if consumer.stop_reason is not None:
            return  # released on the way out, just before this renewal
        logger.error("%s: %s; stopping", consumer, exc)
        consumer._run.request_stop(StopReason.FAILED, exc)
    except Exception as exc:
        logger.error("%s: keeping its worker name failed: %r; stopping", consumer, exc)
        consumer._run.request_stop(StopReason.FAILED, exc)
