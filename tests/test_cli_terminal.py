"""The command line on a real terminal: ``python -m redcurrent._cli`` in a pty.

What only a terminal shows: the confirmation ``terminate`` asks for, answered
by typing, and the progress bar of a long cleanup.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

import anyio
import redis.asyncio as aredis

from helpers import SRC
from redcurrent import Topic

PROMPT = b"[y/N]"


def in_a_terminal(
    args: list[str], url: str, answer: bytes | None = None, timeout: float = 30.0
) -> tuple[int, str]:
    """Run the command with a pty as its stdin, stdout and stderr, typing
    ``answer`` once it asks; returns its exit code and everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = dict(os.environ)
    env.update(REDCURRENT_URL=url, PYTHONPATH=str(SRC), TERM="xterm-256color", COLUMNS="120")
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "REDIS_URL"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "redcurrent._cli", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
    )
    os.close(slave)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise AssertionError(f"no end within {timeout}s; it wrote {bytes(output)!r}")
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other side closed it
                break
            if not chunk:
                break
            output += chunk
            if answer is not None and PROMPT in output:
                os.write(master, answer)
                answer = None
        return proc.wait(timeout=max(deadline - time.monotonic(), 1)), output.decode(
            errors="replace"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


async def terminal(args: list[str], url: str, answer: bytes | None = None) -> tuple[int, str]:
    return await anyio.to_thread.run_sync(lambda: in_a_terminal(args, url, answer))


async def test_terminate_asks_on_a_terminal(redis_url: str, redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    await topic.publish_many([("job", {"n": n}) for n in range(5)])
    await redis_client.xgroup_create("orders", "workers", "0")

    code, output = await terminal(["terminate", "orders"], redis_url, answer=b"n\n")
    assert code == 1, output
    assert "Terminate 'orders'?" in output
    assert "5 entries and 1 group ('workers')" in output
    assert "Aborted" in output
    assert await redis_client.xlen("orders") == 5

    code, output = await terminal(["terminate", "orders"], redis_url, answer=b"y\n")
    assert code == 0, output
    assert "terminated 'orders': removed 5 entries and 1 group ('workers')" in output
    assert await redis_client.exists("orders") == 0


async def test_cleanup_draws_a_progress_bar_on_a_terminal(
    redis_url: str, redis_client: aredis.Redis
) -> None:
    topic = Topic(redis_client, "orders")
    await topic.publish_many([("job", {"n": n}) for n in range(20_000)])
    await redis_client.xgroup_create("orders", "workers", "$")  # everything acknowledged

    code, output = await terminal(["cleanup", "orders", "--min-retention", "0"], redis_url)
    assert code == 0, output
    assert "cleaning orders" in output
    assert "100%" in output
    assert "━" in output  # the bar itself
    assert "20000/20000" in output
    assert "removed 20000 of 20000 entries from 'orders' (0 left)" in output
    assert await redis_client.xlen("orders") == 0


async def test_a_short_cleanup_on_a_terminal_has_no_bar(
    redis_url: str, redis_client: aredis.Redis
) -> None:
    topic = Topic(redis_client, "orders")
    await topic.publish_many([("job", {"n": n}) for n in range(50)])
    await redis_client.xgroup_create("orders", "workers", "$")
    code, output = await terminal(["cleanup", "orders", "--min-retention", "0"], redis_url)
    assert code == 0, output
    assert "%" not in output
    assert output.strip() == "removed 50 of 50 entries from 'orders' (0 left)"
