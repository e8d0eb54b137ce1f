"""The processes of one chaos scenario, and the condition it ends on.

A :class:`Fleet` starts chaos workers and producers (``conftest.spawn``) and
reaps every one of them when the scenario leaves its ``with`` block, whatever
happened: a frozen process is thawed first, then each gets SIGINT (a graceful
stop) and, if it lingers, SIGKILL.

:func:`drained` is the end condition of a scenario: every acknowledged
publish handled or dead-lettered, nothing pending, nothing unread.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import redis.asyncio
from _ledger import _dead_seqs, read_handled, read_published

from conftest import spawn
from redcurrent import Topic

__all__ = ["Fleet", "Proc", "drained"]

STOP_TIMEOUT = 10.0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    may_exit: bool = False
    """A producer exits when done; a worker exiting on its own is a failure."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class Fleet:
    def __init__(self, root: Path, logs: Path, *, stream: str, group: str) -> None:
        self.root = root
        self.logs = logs
        self.stream = stream
        self.group = group
        self.procs: list[Proc] = []

    def worker(self, name: str, **options: Any) -> Proc:
        """A consumer process (``_worker.py``); ``name`` is its consumer name."""
        opts = {
            "stream": self.stream,
            "group": self.group,
            "name": name,
            "root": str(self.root),
            **options,
        }
        return self._start(name, "_worker.py", opts, may_exit=False)

    def producer(self, name: str, **options: Any) -> Proc:
        opts = {"stream": self.stream, "root": str(self.root), "name": name, **options}
        return self._start(name, "_producer.py", opts, may_exit=True)

    def _start(self, name: str, script: str, options: dict[str, Any], *, may_exit: bool) -> Proc:
        log = self.logs / f"{name}-{len(self.procs)}.out"
        proc = Proc(name, spawn(script, options, log), log, may_exit)
        self.procs.append(proc)
        return proc

    def check(self) -> None:
        """Fail at once, with its output, when a process died that must not."""
        for proc in self.procs:
            code = proc.popen.poll()
            if code is not None and (code != 0 or not proc.may_exit):
                raise AssertionError(f"{proc.name} exited with {code}:\n{proc.tail()}")

    def ready(self, *procs: Proc) -> bool:
        """A predicate: every one of ``procs`` printed ``ready``."""
        self.check()
        return all("ready" in p.output().splitlines() for p in procs)

    def finished(self, proc: Proc) -> bool:
        """A predicate: the producer ``proc`` exited after its last publish."""
        self.check()
        return proc.popen.poll() == 0

    def stop(self, proc: Proc) -> None:
        """A graceful stop (SIGINT), SIGKILL if it takes too long."""
        popen = proc.popen
        proc.may_exit = True
        if popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGCONT)
            popen.send_signal(signal.SIGINT)
        try:
            popen.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=STOP_TIMEOUT)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                if proc.popen.poll() is None:
                    proc.popen.send_signal(signal.SIGCONT)
                    proc.popen.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()


async def drained(client: redis.asyncio.Redis, root: Path, stream: str, group: str) -> bool:
    """Every acknowledged publish handled or dead-lettered, the group's
    pending list empty and nothing left unread (lag 0)."""
    topic = Topic(client, stream)
    info = await topic.info()
    mine = [g for g in info.groups if g.name == group]
    if not mine or mine[0].pending or mine[0].lag:
        return False
    missing = read_published(root) - set(read_handled(root))
    if missing and info.dead_letters:
        missing -= (await _dead_seqs(topic))[0]
    return not missing
