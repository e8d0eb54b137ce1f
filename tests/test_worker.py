"""``redcurrent worker`` and ``redcurrent.run``: real processes, real signals.

A worker is what a container runs: these tests start it as a subprocess, send
it SIGTERM (and SIGKILL), and check what an operator would: the exit code,
that every message a handler finished is acknowledged, that what it still held
is taken by a peer at once, and that a restarted worker keeps its name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis

from redcurrent import Topic
from redcurrent.testing import wait_until

SRC = Path(__file__).resolve().parent.parent / "src"
WORKER = [sys.executable, "-m", "redcurrent._cli", "worker"]

JOBS = """
import os

import anyio

from redcurrent import Message, Router

router = Router()


def _log(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\\n").encode())
    finally:
        os.close(fd)


@router.handler("job")
async def job(msg: Message[dict]) -> None:
    _log(os.environ["JOBS_STARTED"], msg.id)
    await anyio.sleep(float(os.environ.get("JOBS_DELAY", "0.05")))
    _log(os.environ["JOBS_LOG"], msg.id)
"""

SCRIPT = """
import sys

import redis.asyncio as aredis

import redcurrent
from jobs import router

consumer = redcurrent.StreamConsumer(
    aredis.Redis.from_url(sys.argv[1]), sys.argv[2], "g", start="earliest", concurrency=4
)
consumer.include_router(router)
raise SystemExit(redcurrent.run(consumer))
"""


class Worker:
    def __init__(self, tmp: Path, url: str, stream: str, *args: str, **env: str) -> None:
        self.started_log = tmp / "started.log"
        self.log = tmp / "handled.log"
        self.stderr = tmp / f"worker-{os.urandom(3).hex()}.err"
        environ = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(SRC), str(tmp)]),
            "JOBS_LOG": str(self.log),
            "JOBS_STARTED": str(self.started_log),
            "REDCURRENT_WORKER_HOST": "testhost",
            "REDCURRENT_URL": url,
            **env,
        }
        argv = [*WORKER, "jobs:router", "--stream", stream, "--group", "g", *args]
        with self.stderr.open("wb") as err:
            self.popen = subprocess.Popen(argv, env=environ, cwd=tmp, stderr=err)

    def output(self) -> str:
        return self.stderr.read_text()

    def running(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(f"worker exited {self.popen.returncode}:\n{self.output()}")
        return "running StreamConsumer" in self.output()

    def handled(self) -> list[str]:
        return _lines(self.log)

    def started(self) -> list[str]:
        return _lines(self.started_log)

    def wait(self, timeout: float = 30) -> int:
        return self.popen.wait(timeout)


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.fixture
def jobs(tmp_path: Path) -> Path:
    (tmp_path / "jobs.py").write_text(JOBS)
    return tmp_path


@pytest.fixture
def reap() -> Iterator[list[Worker]]:
    workers: list[Worker] = []
    yield workers
    for w in workers:
        if w.popen.poll() is None:
            w.popen.kill()
            w.popen.wait()


async def _pending(client: aredis.Redis, stream: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = await client.xpending_range(stream, "g", "-", "+", 10_000)
    return rows


async def test_sigterm_drains_the_worker_and_hands_back_what_it_held(
    redis_client: aredis.Redis, redis_url: str, jobs: Path, reap: list[Worker]
) -> None:
    """SIGTERM: handlers running finish, their messages are acknowledged; what
    the worker held beyond them is claimable at once (its idle time is set to
    claim_idle), so nobody waits claim_idle; exit code 0."""
    stream = "drain"
    ids = await Topic(redis_client, stream).publish_many([("job", {"n": i}) for i in range(300)])
    worker = Worker(
        jobs,
        redis_url,
        stream,
        "--concurrency",
        "4",
        "--claim-idle",
        "60",
        "--start",
        "earliest",
        JOBS_DELAY="0.2",
    )
    reap.append(worker)
    await wait_until(lambda: len(worker.handled()) >= 8, timeout=30)
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.output()
    assert "SIGTERM: stopping gracefully" in worker.output()

    handled = worker.handled()
    started = worker.started()
    assert set(started) == set(handled)  # every handler it started finished
    rows = await _pending(redis_client, stream)
    pending = {r["message_id"].decode() for r in rows}
    assert not pending & set(handled)  # finished means acknowledged
    # Nothing else left the group: the rest was never read.
    group = (await redis_client.xinfo_groups(stream))[0]
    last = tuple(map(int, group["last-delivered-id"].decode().split("-")))
    delivered = {i for i in ids if tuple(map(int, i.split("-"))) <= last}
    assert pending == delivered - set(handled)
    assert pending  # it held more than it ran: those were let go, not handled
    # What it held is claimable now: a peer with claim_idle=60 takes it at once.
    claimed = await redis_client.xautoclaim(
        stream, "g", "peer", 60_000, "0-0", count=10_000, justid=True
    )
    assert {i.decode() for i in claimed} == {
        r["message_id"].decode() for r in rows if r["consumer"] == b"testhost-0"
    }


async def test_a_second_signal_stops_at_once(
    redis_client: aredis.Redis, redis_url: str, jobs: Path, reap: list[Worker]
) -> None:
    stream = "hard"
    await Topic(redis_client, stream).publish_many([("job", {"n": i}) for i in range(20)])
    worker = Worker(
        jobs,
        redis_url,
        stream,
        "--concurrency",
        "2",
        "--shutdown-timeout",
        "60",
        "--start",
        "earliest",
        JOBS_DELAY="3600",
    )
    reap.append(worker)
    await wait_until(lambda: len(worker.started()) == 2, timeout=30)
    worker.popen.send_signal(signal.SIGTERM)
    await wait_until(lambda: "stopping gracefully" in worker.output(), timeout=10)
    worker.popen.send_signal(signal.SIGINT)
    assert worker.wait(timeout=20) == 0, worker.output()  # not shutdown_timeout=60
    assert "SIGINT: stopping at once" in worker.output()
    assert worker.handled() == []
    rows = await _pending(redis_client, stream)
    assert len(rows) == 20  # cancelled and queued messages all stay in the group


async def test_a_restarted_worker_keeps_its_name_and_finishes_its_own_pending_at_once(
    redis_client: aredis.Redis, redis_url: str, jobs: Path, reap: list[Worker]
) -> None:
    """SIGKILL (no hand-back): the restarted worker gets the same name back
    (its pid is gone) and recovers its own pending entries at start-up,
    instead of leaving them to claim_idle (an hour here)."""
    stream = "restart"
    ids = await Topic(redis_client, stream).publish_many([("job", {"n": i}) for i in range(50)])
    first = Worker(
        jobs,
        redis_url,
        stream,
        "--concurrency",
        "2",
        "--claim-idle",
        "3600",
        "--start",
        "earliest",
        JOBS_DELAY="0.1",
    )
    reap.append(first)
    await wait_until(lambda: len(first.handled()) >= 4, timeout=30)
    first.popen.kill()
    first.wait()
    held = {r["message_id"].decode() for r in await _pending(redis_client, stream)}
    assert held  # it died holding messages

    second = Worker(jobs, redis_url, stream, "--claim-idle", "3600", JOBS_DELAY="0")
    reap.append(second)
    await wait_until(lambda: set(second.handled()) >= set(ids) - set(first.handled()), timeout=30)
    second.popen.send_signal(signal.SIGTERM)
    assert second.wait() == 0, second.output()
    consumers = await redis_client.xinfo_consumers(stream, "g")
    assert [c["name"] for c in consumers] == [b"testhost-0"]
    assert await _pending(redis_client, stream) == []


async def test_two_workers_on_one_host_get_distinct_names(
    redis_client: aredis.Redis, redis_url: str, jobs: Path, reap: list[Worker]
) -> None:
    stream = "pair"
    await Topic(redis_client, stream).publish("job", {"n": 0})
    a = Worker(jobs, redis_url, stream)
    reap.append(a)
    await wait_until(a.running, timeout=30)
    b = Worker(jobs, redis_url, stream)
    reap.append(b)
    await wait_until(b.running, timeout=30)
    for w in (a, b):
        w.popen.send_signal(signal.SIGTERM)
        assert w.wait() == 0, w.output()
    assert "'testhost-0'" in a.output()
    assert "'testhost-1'" in b.output()
    # A graceful stop frees the name: the next worker takes testhost-0 again.
    assert await redis_client.hlen(Topic(redis_client, stream).keys.workers) == 0


async def test_exit_code_3_when_the_stream_is_deleted(
    redis_client: aredis.Redis, redis_url: str, jobs: Path, reap: list[Worker]
) -> None:
    stream = "gone"
    await Topic(redis_client, stream).publish("job", {"n": 0})
    worker = Worker(jobs, redis_url, stream, "--start", "earliest")
    reap.append(worker)
    await wait_until(lambda: len(worker.handled()) == 1, timeout=30)
    await redis_client.delete(stream)
    assert worker.wait() == 3, worker.output()


async def test_exit_code_0_when_the_topic_is_terminated(
    redis_client: aredis.Redis, redis_url: str, jobs: Path, reap: list[Worker]
) -> None:
    stream = "ended"
    topic = Topic(redis_client, stream)
    await topic.publish("job", {"n": 0})
    worker = Worker(jobs, redis_url, stream, "--start", "earliest")
    reap.append(worker)
    await wait_until(lambda: len(worker.handled()) == 1, timeout=30)
    await topic.terminate()
    assert worker.wait() == 0, worker.output()


def _run(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(tmp)]), **env}
    return subprocess.run(
        [*WORKER, *args], env=environ, cwd=tmp, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuchmodule:router", "--stream", "s", "--group", "g"], "no module 'nosuchmodule'"),
        (["jobs:nothing", "--stream", "s", "--group", "g"], "has no 'nothing'"),
        (["jobs", "--stream", "s", "--group", "g"], "expected pkg.module:obj"),
        (["jobs:router"], "--stream and --group are required"),
        (["jobs:os", "--stream", "s", "--group", "g"], "is a module"),
        (["jobs:router", "--stream", "s", "--group", "g", "--concurrency", "0"], "concurrency"),
        (["jobs:router", "--stream", "s", "--group", "g", "--start", "soon"], "start must be"),
    ],
)
def test_bad_targets_and_options_are_one_line_errors(
    jobs: Path, redis_url: str, args: list[str], message: str
) -> None:
    done = _run(jobs, *args, REDCURRENT_URL=redis_url)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unreachable_server_fails_the_worker_with_one_line(jobs: Path) -> None:
    done = _run(
        jobs,
        *("jobs:router", "--stream", "s", "--group", "g"),
        REDCURRENT_URL="redis://127.0.0.1:1/0",  # nothing listens on port 1
        REDCURRENT_START_TIMEOUT="1",
    )
    assert done.returncode == 1, done.stderr
    assert "could not start" in done.stderr
    assert "Traceback" not in done.stderr


async def test_redcurrent_run_in_a_script(
    redis_client: aredis.Redis, redis_url: str, jobs: Path
) -> None:
    """``raise SystemExit(redcurrent.run(consumer))``: the same drain and exit code."""
    stream = "script"
    await Topic(redis_client, stream).publish_many([("job", {"n": i}) for i in range(10)])
    (jobs / "main.py").write_text(SCRIPT)
    log, started = jobs / "handled.log", jobs / "started.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), str(jobs)]),
        "JOBS_LOG": str(log),
        "JOBS_STARTED": str(started),
        "REDCURRENT_WORKER_HOST": "scripthost",
    }
    proc = subprocess.Popen(  # noqa: ASYNC220 - a process to signal, not to wait on
        [sys.executable, "main.py", redis_url, stream],
        env=env,
        cwd=jobs,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await wait_until(lambda: len(_lines(log)) == 10, timeout=30)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    consumers = await redis_client.xinfo_consumers(stream, "g")
    assert [c["name"] for c in consumers] == [b"scripthost-0"]


def test_worker_command_help_names_the_exit_codes() -> None:
    done = subprocess.run(
        [*WORKER, "--help"],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "SIGTERM" in done.stdout
    assert "3 stream or group" in textwrap.dedent(done.stdout).replace("\n", " ").replace("  ", " ")
