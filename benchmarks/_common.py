"""Shared pieces of the benchmark suite: the private server, the payload, stream filling.

Every benchmark runs against a private ``redis-server`` started through
:func:`redcurrent.testing.redis_url_for_demo` (``REDCURRENT_TEST_REDIS_URL`` and containers are
switched off for the suite), never against a shared server.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import msgspec

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

# Run from a checkout without installing the package.
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

TYPE = "order.created"
PAYLOAD: dict[str, Any] = {
    "user_id": 123456,
    "action": "checkout",
    "amount": 42.5,
    "currency": "EUR",
    "items": ["sku-1", "sku-2"],
}
GROUP = "bench"
#: XREADGROUP COUNT of the raw baseline loop.
RAW_COUNT = 500

_encode = msgspec.json.encode

# Server-side filling: one EVAL adds ``ARGV[1]`` identical entries. Much faster than
# pipelining a million XADDs from Python, and the content does not matter to a
# throughput or memory run.
_FILL = """
local n = tonumber(ARGV[1])
for i = 1, n do
  redis.call('XADD', KEYS[1], '*', 'type', ARGV[2], 'data', ARGV[3], 'metadata', '{}')
end
return n
"""
_FILL_CHUNK = 10_000


def _is_shared(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.hostname in {"127.0.0.1", "localhost", "::1"} and (parsed.port or 6379) == 6379


@contextlib.contextmanager
def private_redis_url() -> Iterator[str]:
    """A private redis-server for the whole suite, stopped on exit.

    ``REDCURRENT_TEST_REDIS_URL`` and Docker are ignored on purpose: benchmark numbers from
    a shared or containerised server are neither safe to produce nor comparable between runs.
    """
    from redcurrent.testing import redis_url_for_demo

    saved = {k: os.environ.get(k) for k in ("REDCURRENT_TEST_REDIS_URL", "REDCURRENT_DOCKER")}
    os.environ["REDCURRENT_TEST_REDIS_URL"] = ""
    os.environ["REDCURRENT_DOCKER"] = "0"
    try:
        with redis_url_for_demo() as url:
            if _is_shared(url):
                raise RuntimeError(f"refusing to benchmark against a shared server at {url}")
            yield url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


async def fill_stream(client: Any, stream: str, count: int) -> None:
    """Append ``count`` entries of the wire format (type, data, metadata) to ``stream``."""
    data = _encode(PAYLOAD)
    done = 0
    while done < count:
        n = min(_FILL_CHUNK, count - done)
        await client.eval(_FILL, 1, stream, n, TYPE, data)
        done += n


async def fresh_copy(client: Any, template: str, stream: str) -> None:
    """``stream`` as a fresh copy of ``template`` (no groups), replacing any old one."""
    await client.delete(stream)
    await client.execute_command("COPY", template, stream)


async def pending_count(client: Any, stream: str, group: str) -> int:
    summary = await client.xpending(stream, group)
    return int(summary["pending"])


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ratio(value: float, base: float) -> float:
    if base == 0 or math.isnan(base) or math.isnan(value):
        return math.nan
    return value / base
