"""Cluster scaling: one topic's partitions over 1 shard, then over 3 CPU-capped shards.

Usage::

    python benchmarks/cluster.py [--quick] [--cap 0.025] [--period-us 20000]
        [--partitions 12] [--messages N] [--repeat R] [--producers P] [--consumers K]
        [--shards 1,3] [--only raw,redcurrent,idle] [--local-keys] [--tag NAME]

On a two-core machine an uncapped 3-shard cluster is slower than one shard: servers and
clients share the same cores. So each ``redis-server`` runs in a cgroup of its own capped
to ``--cap`` of a core (cgroup v1 ``cpu.cfs_quota_us``, or v2 ``cpu.max``); the servers
then behave like separate small machines and the client processes get the rest. Where no
writable cpu controller exists the script prints a ``SKIP`` line and exits 0
(``--cap 0`` runs uncapped instead).

Both cluster sizes (``--shards``) are started once and take turns in each of ``R``
repetitions (medians reported); each turn starts from empty shards:

* **raw publish**: ``P`` processes pipeline pre-encoded ``XADD`` s over the ``N``
  partition streams (keys spread evenly over the slots, so over the shards), ``--depth``
  batches in flight per node, refilled per node; replies parsed with hiredis. The client
  is made as cheap as possible on purpose: this row measures the servers.
* **raw consume**: ``K`` processes, one asyncio read loop per partition stream
  (``XREADGROUP COUNT 500``, the ``XACK`` of a batch sent with the next read, ``data``
  decoded with msgspec, as in ``bench_consumer``'s raw loop) drain what was published.
* **redcurrent**: ``Topic(cluster, name, partitions=N).publish_many`` with keys, then
  ``K`` :class:`redcurrent.StreamConsumer` processes, each with its own ``RedisCluster``
  client, drain it (timed to the last handled message; the steady 10%..90% rate too).
* **idle**: the consumers of the previous row on the drained topic: commands per second
  per consumer over a quiet window, on the servers (``INFO commandstats``, commands run
  inside scripts included) and as the clients send them.

Each row reports: messages/s, per-shard calls of the commands that carry the messages
and their balance (max/mean; also of ``usec`` and of server CPU), server CPU per message
(``used_cpu_sys + used_cpu_user`` deltas over all shards / messages), the cgroups'
throttled share, the client processes' own CPU time (``getrusage`` in each over the
measured window), the CPU the rest of the machine used, and ``uptime``'s load. Then
T3/T1 and the efficiency T3/(3*T1). Results go to ``results/cluster-latest.{json,md}``
(``--quick``: ``results/quick-cluster.*``; ``--tag NAME``: ``results/cluster-NAME.*``).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec
from _cluster_harness import (
    BenchCluster,
    CpuCgroups,
    effective_period,
    snapshot_delta,
    spread_keys,
)
from _common import PAYLOAD, RESULTS_DIR, TYPE

GROUP = "bench"
TOPIC = "bench-topic"
RAW_COUNT = 500
#: Commands a consumer sends per message in a healthy steady state are what is measured;
#: these are the benchmark's own probes, left out of the idle figure.
PROBE_COMMANDS = {
    "info",
    "monitor",
    "cluster|info",
    "cluster|slots",
    "cluster|shards",
    "cluster|nodes",
}

_ctx = mp.get_context("spawn")


# --------------------------------------------------------------------------- helpers


def uptime() -> str:
    try:
        load = os.getloadavg()
    except OSError:
        return "?"
    return f"load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])
    return (total - idle) / tick, total / tick


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _pack(*args: str | bytes) -> bytes:
    """One RESP command."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


class Run:
    """Spawned worker processes: each calls ``ready``, waits for ``go``, works, and puts
    ``{"t1": monotonic at finish, "cpu_s": own CPU over the work, ...}`` on ``out``."""

    def __init__(self, target: Callable[..., None], specs: Sequence[dict[str, Any]]) -> None:
        self.ready = _ctx.Barrier(len(specs) + 1)
        self.go = _ctx.Event()
        self.stop = _ctx.Event()
        self.out: Any = _ctx.Queue()
        # Progress the workers publish while they run: messages handled, monotonic time
        # of the last one, own CPU seconds since ``go``.
        self.count: Any = _ctx.Array("q", len(specs), lock=False)
        self.last: Any = _ctx.Array("d", len(specs), lock=False)
        self.cpu: Any = _ctx.Array("d", len(specs), lock=False)
        # Commands the worker's client packed (sent), counted in the client: unlike INFO
        # commandstats this leaves out the commands Lua scripts run inside the server.
        self.sent: Any = _ctx.Array("q", len(specs), lock=False)
        self.procs = [
            _ctx.Process(
                target=target,
                args=(
                    {**spec, "slot": i, "progress": (self.count, self.last, self.cpu, self.sent)},
                    self.ready,
                    self.go,
                    self.stop,
                    self.out,
                ),
            )
            for i, spec in enumerate(specs)
        ]

    def start(self, timeout: float = 120.0) -> None:
        for proc in self.procs:
            proc.start()
        self.ready.wait(timeout)

    def release(self) -> float:
        t0 = time.monotonic()
        self.go.set()
        return t0

    def results(self, timeout: float) -> list[dict[str, Any]]:
        got = [self.out.get(timeout=timeout) for _ in self.procs]
        for item in got:
            if "error" in item:
                raise RuntimeError(f"a worker failed: {item['error']}")
        return got

    def close(self) -> None:
        self.stop.set()
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _report(out: Any, fn: Callable[[], dict[str, Any]]) -> None:
    try:
        out.put(fn())
    except BaseException as exc:  # handed to the parent, then re-raised
        out.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


# --------------------------------------------------------------------------- raw workers


def raw_producer(spec: dict[str, Any], ready: Any, go: Any, stop: Any, out: Any) -> None:
    """Pipelined XADDs: every node has its own pipeline of ``depth`` pre-encoded batches
    in flight, refilled as soon as one batch's replies are in (a throttled node never
    holds up the others)."""
    import selectors

    import hiredis

    def work() -> dict[str, Any]:
        data = msgspec.json.encode(PAYLOAD)
        sel = selectors.DefaultSelector()
        state: dict[socket.socket, dict[str, Any]] = {}
        for port, streams in spec["nodes"]:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            one = [
                _pack("XADD", s, "*", "type", TYPE, "data", data, "metadata", b"{}")
                for s in streams
            ]
            state[sock] = {
                "batch": b"".join(one * spec["per_stream"]),
                "n": len(one) * spec["per_stream"],
                "to_send": spec["rounds"],
                "replies_due": 0,
                "reader": hiredis.Reader(),
            }
            sel.register(sock, selectors.EVENT_READ)
        ready.wait()
        go.wait()
        c0 = cpu_seconds()
        done = 0
        for sock, st in state.items():
            for _ in range(min(spec["depth"], st["to_send"])):
                sock.sendall(st["batch"])
                st["to_send"] -= 1
                st["replies_due"] += st["n"]
        while any(st["replies_due"] for st in state.values()):
            for key, _mask in sel.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                st = state[sock]
                chunk = sock.recv(1 << 17)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                reader = st["reader"]
                reader.feed(chunk)
                got = 0
                while (reply := reader.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise RuntimeError(f"XADD failed: {reply}")
                    got += 1
                st["replies_due"] -= got
                done += got
                # Keep the pipeline full: one new batch per batch answered.
                while st["to_send"] and st["replies_due"] <= (spec["depth"] - 1) * st["n"]:
                    sock.sendall(st["batch"])
                    st["to_send"] -= 1
                    st["replies_due"] += st["n"]
        t1 = time.monotonic()
        for sock in state:
            sock.close()
        return {"t1": t1, "cpu_s": cpu_seconds() - c0, "messages": done}

    _report(out, work)


def raw_consumer(spec: dict[str, Any], ready: Any, go: Any, stop: Any, out: Any) -> None:
    """One XREADGROUP + XACK loop per owned partition stream, direct to its node."""
    import redis.asyncio

    decode = msgspec.json.decode
    count_sent_commands(spec["progress"][3], spec["slot"])

    async def handler(payload: Any) -> None:
        return None

    async def loop(r: Any, stream: str, expected: int, name: str) -> int:
        # The XACK of one batch goes out in the same round trip as the next read.
        done = 0
        ids: list[bytes] = []
        block = spec.get("block_ms", 1000)
        while done < expected or expected < 0:
            if stop.is_set():
                break
            if ids:
                pipe = r.pipeline(transaction=False)
                pipe.xack(stream, GROUP, *ids)
                pipe.xreadgroup(GROUP, name, {stream: ">"}, count=RAW_COUNT, block=block)
                reply = (await pipe.execute())[1]
                ids = []
            else:
                reply = await r.xreadgroup(GROUP, name, {stream: ">"}, count=RAW_COUNT, block=block)
            if not reply:
                continue
            entries = reply[0][1]
            for _id, fields in entries:
                await handler(decode(fields[b"data"]))
            ids = [e[0] for e in entries]
            done += len(entries)
            if done >= expected >= 0:
                await r.xack(stream, GROUP, *ids)
        return done

    async def main() -> dict[str, Any]:
        clients = {
            port: redis.asyncio.Redis(port=port, socket_timeout=30) for port in spec["ports"]
        }
        try:
            for r in clients.values():
                await r.ping()
            ready.wait()
            go.wait()
            c0 = cpu_seconds()
            tasks = [
                loop(clients[port], stream, expected, spec["name"])
                for port, stream, expected in spec["streams"]
            ]
            if spec.get("idle"):
                # Idle: block until told to stop (the parent counts the commands).
                running = [asyncio.ensure_future(t) for t in tasks]
                await asyncio.to_thread(stop.wait)
                for t in running:
                    t.cancel()
                await asyncio.gather(*running, return_exceptions=True)
                counts = [0]
            else:
                counts = await asyncio.gather(*tasks)
            t1 = time.monotonic()
            return {"t1": t1, "cpu_s": cpu_seconds() - c0, "messages": sum(counts)}
        finally:
            for r in clients.values():
                await r.aclose()

    _report(out, lambda: asyncio.run(main()))


# --------------------------------------------------------------------------- redcurrent workers


def local_stream_keys() -> None:
    """Diagnostic (``--local-keys``): let redis-py's cluster client find the keys of
    XREADGROUP/XREAD itself. By default it asks a server with ``COMMAND GETKEYS`` for
    every such read (their keys are "movable"), always the same node: an extra round
    trip per read, and extra load on that shard."""
    from redis._parsers.commands import AsyncCommandsParser

    original = AsyncCommandsParser.get_keys

    async def get_keys(self: Any, *args: Any) -> Any:
        name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        if name.upper() in {"XREADGROUP", "XREAD"}:
            words = [a.decode() if isinstance(a, bytes) else str(a) for a in args]
            at = next(i for i, w in enumerate(words) if w.upper() == "STREAMS")
            rest = args[at + 1 :]
            return list(rest[: len(rest) // 2])
        return await original(self, *args)

    AsyncCommandsParser.get_keys = get_keys  # type: ignore[method-assign]


def count_sent_commands(sent: Any, slot: int) -> None:
    """Count every command this process's redis-py connections pack (pipelines pack
    each of theirs through ``pack_command`` too) into ``sent[slot]``."""
    from redis.asyncio.connection import AbstractConnection

    original = AbstractConnection.pack_command

    def pack_command(self: Any, *args: Any) -> Any:
        sent[slot] += 1
        return original(self, *args)

    AbstractConnection.pack_command = pack_command  # type: ignore[method-assign]


def _cluster_client(ports: Sequence[int]) -> Any:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    return RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", port) for port in ports],
        socket_timeout=30,
    )


def rc_producer(spec: dict[str, Any], ready: Any, go: Any, stop: Any, out: Any) -> None:
    """``Topic(cluster, name, partitions=N).publish_many`` with a key per message,
    ``inflight`` calls of ``chunk`` items at a time."""
    from redcurrent import Topic

    async def main() -> dict[str, Any]:
        client = _cluster_client(spec["ports"])
        try:
            topic = Topic(client, spec["topic"], partitions=spec["partitions"])
            await topic.partition_streams()  # layout read (or made) before the clock
            chunk, total = spec["chunk"], spec["messages"]
            items = [(TYPE, PAYLOAD)] * chunk
            base = spec["index"] * total
            ready.wait()
            go.wait()
            c0 = cpu_seconds()
            sent = 0

            async def lane(lane_no: int) -> None:
                nonlocal sent
                for start in range(lane_no * chunk, total, chunk * spec["inflight"]):
                    n = min(chunk, total - start)
                    keys = [f"user-{base + start + i}" for i in range(n)]
                    ids = await topic.publish_many(items[:n], keys=keys)
                    sent += len(ids)

            await asyncio.gather(*(lane(i) for i in range(spec["inflight"])))
            t1 = time.monotonic()
            return {"t1": t1, "cpu_s": cpu_seconds() - c0, "messages": sent}
        finally:
            await client.aclose()

    _report(out, lambda: asyncio.run(main()))


def rc_consumer(spec: dict[str, Any], ready: Any, go: Any, stop: Any, out: Any) -> None:
    """One :class:`redcurrent.StreamConsumer` of the partitioned topic, with its own
    ``RedisCluster`` client, until ``stop``; progress into the shared arrays."""
    from redcurrent import StartFrom, StreamConsumer

    count_arr, last_arr, cpu_arr, sent_arr = spec["progress"]
    slot = spec["slot"]
    count_sent_commands(sent_arr, slot)
    if spec["local_keys"]:
        local_stream_keys()

    async def main() -> dict[str, Any]:
        client = _cluster_client(spec["ports"])
        handled = 0
        last = 0.0

        async def one(_message: Any) -> None:
            nonlocal handled, last
            handled += 1
            last = time.monotonic()

        async def many(messages: Sequence[Any]) -> None:
            nonlocal handled, last
            handled += len(messages)
            last = time.monotonic()

        try:
            consumer = StreamConsumer(
                client,
                spec["topic"],
                GROUP,
                name=f"c{slot}",
                start=StartFrom.EARLIEST,
                concurrency=spec["concurrency"],
                member_ttl=spec["member_ttl"],
            )
            if spec["batch"]:
                consumer.batch_handler(TYPE, size=spec["batch"])(many)
            else:
                consumer.handler(TYPE)(one)
            ready.wait()
            go.wait()
            c0 = cpu_seconds()
            async with consumer:
                waiting = asyncio.ensure_future(asyncio.to_thread(stop.wait))
                while not waiting.done():
                    count_arr[slot], last_arr[slot] = handled, last
                    cpu_arr[slot] = cpu_seconds() - c0
                    await asyncio.wait({waiting}, timeout=0.02)
                partitions = consumer.partitions
            count_arr[slot], last_arr[slot] = handled, last
            return {
                "t1": last,
                "cpu_s": cpu_seconds() - c0,
                "messages": handled,
                "partitions": partitions,
            }
        finally:
            await client.aclose()

    _report(out, lambda: asyncio.run(main()))


# --------------------------------------------------------------------------- measuring


def summarise(
    label: str,
    shards: int,
    messages: int,
    seconds: float,
    delta: list[dict[str, Any]],
    client_cpu: float,
    commands: Sequence[str] | None,
) -> dict[str, Any]:
    """One row. ``commands``: the commands whose calls per shard measure its load
    (None: every command but the benchmark's own probes)."""

    def picked(d: dict[str, Any]) -> list[dict[str, int]]:
        if commands is None:
            return [v for k, v in d["commands"].items() if k not in PROBE_COMMANDS]
        return [d["commands"][c] for c in commands if c in d["commands"]]

    per_shard = [sum(v["calls"] for v in picked(d)) for d in delta]
    all_calls = [
        sum(v["calls"] for k, v in d["commands"].items() if k not in PROBE_COMMANDS) for d in delta
    ]
    usec = [sum(v["usec"] for v in picked(d)) for d in delta]
    by_command: dict[str, int] = {}
    for d in delta:
        for k, v in d["commands"].items():
            if k not in PROBE_COMMANDS:
                by_command[k] = by_command.get(k, 0) + v["calls"]
    mean = sum(per_shard) / len(per_shard) if per_shard else 0
    server_cpu = sum(d["cpu_s"] for d in delta)
    busy = delta[0].get("machine_busy_s", float("nan")) if delta else float("nan")
    return {
        "row": label,
        "shards": shards,
        "messages": messages,
        "seconds": seconds,
        "rate": messages / seconds if seconds else 0.0,
        "commands": list(commands) if commands is not None else "all",
        "by_command": by_command,
        "per_shard_calls": per_shard,
        "per_shard_usec": usec,
        "balance": max(per_shard) / mean if mean else float("nan"),
        "per_shard_commands": [
            {k: v["calls"] for k, v in d["commands"].items() if k not in PROBE_COMMANDS}
            for d in delta
        ],
        "cpu_balance": (
            max(d["cpu_s"] for d in delta) / (server_cpu / len(delta))
            if server_cpu > 0
            else float("nan")
        ),
        "all_calls_balance": (
            max(all_calls) / (sum(all_calls) / len(all_calls)) if sum(all_calls) else float("nan")
        ),
        "usec_balance": max(usec) / (sum(usec) / len(usec)) if usec and sum(usec) else float("nan"),
        "spread": [c / mean - 1 for c in per_shard] if mean else [],
        "server_cpu_s": server_cpu,
        "server_cpu_per_shard_s": [d["cpu_s"] for d in delta],
        "server_us_per_msg": server_cpu / messages * 1e6 if messages else float("nan"),
        "client_cpu_s": client_cpu,
        "client_cores": client_cpu / seconds if seconds else 0.0,
        "client_us_per_msg": client_cpu / messages * 1e6 if messages else float("nan"),
        "throttled": [d["throttling"] for d in delta],
        # Share of the CFS periods in which a shard ran out of quota: near 1 means the
        # servers were the bottleneck, near 0 that the clients (or the machine) were.
        "throttled_share": [
            d["throttling"].get("nr_throttled", 0) / d["throttling"]["nr_periods"]
            if d["throttling"].get("nr_periods")
            else float("nan")
            for d in delta
        ],
        # CPU the rest of the machine (other workers, this script's parent) used meanwhile.
        "others_cores": (busy - server_cpu - client_cpu) / seconds if seconds else 0.0,
        "uptime": uptime(),
    }


def timed(
    cluster: BenchCluster, run: Run, timeout: float
) -> tuple[float, list[dict[str, Any]], list[dict[str, Any]]]:
    """Release the workers, wait for them; (seconds, results, per-shard delta)."""
    before = cluster.snapshot()
    busy0, _ = machine_cpu()
    t0 = run.release()
    results = run.results(timeout)
    seconds = max(r["t1"] for r in results) - t0
    busy1, _ = machine_cpu()
    delta = snapshot_delta(before, cluster.snapshot())
    for d in delta:
        d["machine_busy_s"] = busy1 - busy0
    return seconds, results, delta


def raw_rows(
    cluster: BenchCluster, streams: list[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    shards = len(cluster.shards)
    by_node: dict[int, list[str]] = {}
    for s in streams:
        by_node.setdefault(cluster.shard_of(s).port, []).append(s)
    for s in streams:
        with cluster.client(cluster.shard_of(s).port) as c:
            c.delete(s)
            c.xgroup_create(s, GROUP, id="0", mkstream=True)
    # Per round a producer writes per_stream entries to every stream.
    per_stream = max(1, args.batch * shards // len(streams))
    rounds = max(1, args.messages // (per_stream * len(streams) * args.producers))
    specs = [
        {
            "nodes": sorted(by_node.items()),
            "per_stream": per_stream,
            "rounds": rounds,
            "depth": args.depth,
        }
        for _ in range(args.producers)
    ]
    rows = []
    run = Run(raw_producer, specs)
    try:
        run.start()
        seconds, results, delta = timed(cluster, run, timeout=600)
    finally:
        run.close()
    total = sum(r["messages"] for r in results)
    row = summarise(
        "raw publish (XADD)",
        shards,
        total,
        seconds,
        delta,
        sum(r["cpu_s"] for r in results),
        ["xadd"],
    )
    row["processes"] = args.producers
    rows.append(row)

    lengths = {}
    for s in streams:
        with cluster.client(cluster.shard_of(s).port) as c:
            lengths[s] = int(c.xlen(s))
    assert sum(lengths.values()) == total, (lengths, total)
    k = min(args.consumers, len(streams))
    specs = [
        {
            "name": f"c{i}",
            "ports": sorted({cluster.shard_of(s).port for s in streams[i::k]}),
            "streams": [(cluster.shard_of(s).port, s, lengths[s]) for s in streams[i::k]],
        }
        for i in range(k)
    ]
    run = Run(raw_consumer, specs)
    try:
        run.start()
        seconds, results, delta = timed(cluster, run, timeout=600)
    finally:
        run.close()
    consumed = sum(r["messages"] for r in results)
    row = summarise(
        "raw consume (XREADGROUP+XACK)",
        shards,
        consumed,
        seconds,
        delta,
        sum(r["cpu_s"] for r in results),
        ["xreadgroup", "xack"],
    )
    row["processes"] = k
    for s in streams:
        with cluster.client(cluster.shard_of(s).port) as c:
            pending = int(c.xpending(s, GROUP)["pending"])
        assert pending == 0, f"{s}: {pending} left pending"
    rows.append(row)

    if "idle" in args.only:
        rows.append(raw_idle(cluster, streams, k, args))
    return rows


def rc_rows(cluster: BenchCluster, args: argparse.Namespace) -> list[dict[str, Any]]:
    """redcurrent: a partitioned Topic's publish_many, then StreamConsumers draining it."""
    shards = len(cluster.shards)
    ports = [s.port for s in cluster.shards]
    per_producer = args.messages // args.producers
    specs = [
        {
            "ports": ports,
            "topic": TOPIC,
            "partitions": args.partitions,
            "chunk": args.chunk,
            "inflight": args.inflight,
            "messages": per_producer,
            "index": i,
        }
        for i in range(args.producers)
    ]
    rows = []
    run = Run(rc_producer, specs)
    try:
        run.start()
        seconds, results, delta = timed(cluster, run, timeout=600)
    finally:
        run.close()
    total = sum(r["messages"] for r in results)
    row = summarise(
        "redcurrent publish_many (keyed)",
        shards,
        total,
        seconds,
        delta,
        sum(r["cpu_s"] for r in results),
        ["xadd"],
    )
    row["processes"] = args.producers
    rows.append(row)
    if has_partitioned_consumer():
        rows.extend(rc_consume_rows(cluster, total, args))
    else:
        print("redcurrent consume: skipped (no partitioned StreamConsumer yet)", flush=True)
    return rows


def has_partitioned_consumer() -> bool:
    import inspect

    from redcurrent import StreamConsumer

    return "member_ttl" in inspect.signature(StreamConsumer).parameters


def rc_consume_rows(
    cluster: BenchCluster, total: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """K StreamConsumers drain the backlog (timed until the last message is handled),
    then stay on, idle, for the idle-cost window."""
    shards = len(cluster.shards)
    ports = [s.port for s in cluster.shards]
    k = args.consumers
    specs = [
        {
            "ports": ports,
            "topic": TOPIC,
            "concurrency": args.concurrency,
            "batch": args.rc_batch,
            "member_ttl": args.member_ttl,
            "local_keys": args.local_keys,
        }
        for _ in range(k)
    ]
    rows: list[dict[str, Any]] = []
    run = Run(rc_consumer, specs)
    try:
        run.start()
        before = cluster.snapshot()
        busy0, _ = machine_cpu()
        t0 = run.release()
        deadline = t0 + args.timeout
        # When 10% and 90% of the backlog were handled: the rate between them leaves
        # out the start (members joining, partitions handed over) and the tail.
        marks: dict[float, float] = {}
        while (done := sum(run.count)) < total:
            now = time.monotonic()
            for frac in (0.1, 0.9):
                if frac not in marks and done >= frac * total:
                    marks[frac] = now
            if now > deadline:
                raise TimeoutError(f"consumed {done} of {total}")
            if not all(p.is_alive() for p in run.procs):
                raise RuntimeError("a consumer process died")
            time.sleep(0.005)
        seconds = max(run.last) - t0
        client_cpu = sum(run.cpu)
        busy1, _ = machine_cpu()
        delta = snapshot_delta(before, cluster.snapshot())
        for d in delta:
            d["machine_busy_s"] = busy1 - busy0
        label = "redcurrent consume ({}{})".format(
            f"batch {args.rc_batch}" if args.rc_batch else "handler",
            ", keys found locally" if args.local_keys else "",
        )
        # Load per shard: the calls that carry messages (XREADGROUP and XACK, wherever
        # sent from); every call, membership and leases included, is in the JSON.
        row = summarise(label, shards, total, seconds, delta, client_cpu, ["xreadgroup", "xack"])
        row["processes"] = k
        row["handled"] = sum(run.count)
        if 0.1 in marks and 0.9 in marks and marks[0.9] > marks[0.1]:
            row["steady_rate"] = 0.8 * total / (marks[0.9] - marks[0.1])
        rows.append(row)
        if "idle" in args.only:
            idle = idle_window(cluster, run, k, args, "redcurrent idle (StreamConsumer)")
            row["partitions"] = idle["partitions_owned"]
            rows.append(idle)
        else:
            run.stop.set()
            results = run.results(timeout=60)
            row["partitions"] = [r["partitions"] for r in results]
    finally:
        run.close()
    with contextlib.suppress(Exception):
        row["duplicates"] = sum(run.count) - total
    pending = 0
    for stream in _partition_streams(cluster):
        with cluster.client(cluster.shard_of(stream).port) as c, contextlib.suppress(Exception):
            pending += int(c.xpending(stream, GROUP)["pending"])
    row["pending_after_stop"] = pending
    return rows


def _partition_streams(cluster: BenchCluster) -> list[str]:
    from redcurrent import Topic

    async def get() -> list[str]:
        client = _cluster_client([s.port for s in cluster.shards])
        try:
            return await Topic(client, TOPIC).partition_streams()
        finally:
            await client.aclose()

    return asyncio.run(get())


def raw_idle(
    cluster: BenchCluster, streams: list[str], k: int, args: argparse.Namespace
) -> dict[str, Any]:
    specs = [
        {
            "name": f"idle{i}",
            "idle": True,
            "block_ms": 4000,
            "ports": sorted({cluster.shard_of(s).port for s in streams[i::k]}),
            "streams": [(cluster.shard_of(s).port, s, -1) for s in streams[i::k]],
        }
        for i in range(k)
    ]
    run = Run(raw_consumer, specs)
    try:
        run.start()
        run.release()
        return idle_window(cluster, run, k, args, "raw idle (XREADGROUP BLOCK 4000)")
    finally:
        run.close()


def script_names() -> dict[str, str]:
    """SHA1 -> ``module.NAME`` of every Lua script constant in redcurrent's modules."""
    import hashlib
    import importlib
    import pkgutil

    import redcurrent

    names: dict[str, str] = {}
    for info in pkgutil.iter_modules(redcurrent.__path__):
        try:
            module = importlib.import_module(f"redcurrent.{info.name}")
        except Exception:  # an optional extra's module
            continue
        for attr, value in vars(module).items():
            if isinstance(value, str) and "redis.call" in value:
                names[hashlib.sha1(value.encode()).hexdigest()] = f"{info.name}.{attr}"
    return names


class Monitor:
    """``MONITOR`` on every shard for a window: which commands the clients sent (and
    which scripts, by name), and which ran inside scripts."""

    def __init__(self, cluster: BenchCluster) -> None:
        import threading

        self.stop = threading.Event()
        self.sent: dict[str, int] = {}
        self.in_scripts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._scripts = script_names()
        self._threads = [
            threading.Thread(target=self._watch, args=(s.port,), daemon=True)
            for s in cluster.shards
        ]
        self._ready = threading.Barrier(len(self._threads) + 1)

    def __enter__(self) -> Monitor:
        for t in self._threads:
            t.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(5)

    def _watch(self, port: int) -> None:
        import shlex

        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(_pack("MONITOR"))
            sock.settimeout(0.2)
            buf = b""
            while not buf.endswith(b"+OK\r\n"):
                buf += sock.recv(1024)
            self._ready.wait(10)
            buf = b""
            while not self.stop.is_set():
                try:
                    chunk = sock.recv(1 << 16)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\r\n")
                for line in lines:
                    self._count(line.decode(errors="replace"), shlex)

    def _count(self, line: str, shlex: Any) -> None:
        head, _, rest = line.partition("] ")
        try:
            words = shlex.split(rest)
        except ValueError:
            return
        if not words:
            return
        name = words[0].lower()
        if name in PROBE_COMMANDS:
            return
        if name in {"evalsha", "eval"} and len(words) > 1:
            sha = words[1] if name == "evalsha" else ""
            name = f"{name} {self._scripts.get(sha, sha[:8])}"
        target = self.in_scripts if head.endswith("lua") else self.sent
        with self._lock:
            target[name] = target.get(name, 0) + 1


def idle_window(
    cluster: BenchCluster, run: Run, k: int, args: argparse.Namespace, label: str
) -> dict[str, Any]:
    time.sleep(args.settle)
    before = cluster.snapshot()
    sent0, cpu0 = sum(run.sent), sum(run.cpu)
    t0 = time.monotonic()
    with Monitor(cluster) as monitor:
        time.sleep(args.idle_window)
    after = cluster.snapshot()
    seconds = time.monotonic() - t0
    sent, cpu = sum(run.sent) - sent0, sum(run.cpu) - cpu0
    run.stop.set()
    results = run.results(timeout=60)
    delta = snapshot_delta(before, after)
    owned = [r.get("partitions") for r in results]
    per_shard = [
        sum(v["calls"] for name, v in d["commands"].items() if name not in PROBE_COMMANDS)
        for d in delta
    ]
    by_command: dict[str, int] = {}
    for d in delta:
        for name, v in d["commands"].items():
            if name not in PROBE_COMMANDS:
                by_command[name] = by_command.get(name, 0) + v["calls"]
    total = sum(per_shard)
    return {
        "row": label,
        "shards": len(cluster.shards),
        "consumers": k,
        "seconds": seconds,
        "commands": total,
        "by_command": by_command,
        "per_shard_calls": per_shard,
        "commands_per_s_per_consumer": total / seconds / k,
        # What the clients sent (0 where the worker does not count: the raw one).
        "sent_per_s_per_consumer": sent / seconds / k,
        "partitions_owned": owned,
        # From MONITOR: per consumer per second, by command (EVALSHA by script name).
        "monitor_sent_per_s_per_consumer": {
            name: round(n / seconds / k, 3) for name, n in sorted(monitor.sent.items())
        },
        "monitor_in_scripts_per_s_per_consumer": {
            name: round(n / seconds / k, 3) for name, n in sorted(monitor.in_scripts.items())
        },
        "server_cpu_s": sum(d["cpu_s"] for d in delta),
        # Over the window where the workers publish their CPU time (the StreamConsumer
        # ones), else from ``go`` to their stop (the raw ones: all of it idle).
        "client_cpu_s": cpu if any(run.cpu) else sum(r["cpu_s"] for r in results),
        "uptime": uptime(),
    }


# --------------------------------------------------------------------------- report


def medians(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Per (row, shards): the median of rate, server and client us/msg, balance."""
    out: dict[tuple[str, int], dict[str, float]] = {}
    for key in {(r["row"], r["shards"]) for r in rows if "rate" in r}:
        same = [r for r in rows if (r["row"], r["shards"]) == key]
        out[key] = {
            f: statistics.median(r[f] for r in same)
            for f in ("rate", "server_us_per_msg", "client_us_per_msg", "balance")
        }
        out[key]["runs"] = len(same)
        steady = [r["steady_rate"] for r in same if "steady_rate" in r]
        if steady:
            out[key]["steady_rate"] = statistics.median(steady)
    return out


def scale_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    med = medians(rows)
    for name in sorted({name for name, _ in med}):
        by = {n: m for (row, n), m in med.items() if row == name}
        if 1 in by and len(by) > 1:
            top = max(by)
            t1, tn = by[1]["rate"], by[top]["rate"]
            lines.append(
                f"- {name} (median of {int(by[top]['runs'])}): T1 {t1:,.0f}/s, T{top} "
                f"{tn:,.0f}/s, T{top}/T1 = {tn / t1:.2f}x, efficiency T{top}/({top}*T1) = "
                f"{tn / (top * t1):.2f}; balance {by[top]['balance']:.3f}; server CPU/msg "
                f"{by[1]['server_us_per_msg']:.2f} -> {by[top]['server_us_per_msg']:.2f} us; "
                f"client CPU/msg {by[1]['client_us_per_msg']:.2f} -> "
                f"{by[top]['client_us_per_msg']:.2f} us"
            )
            if "steady_rate" in by[1] and "steady_rate" in by[top]:
                s1, sn = by[1]["steady_rate"], by[top]["steady_rate"]
                lines.append(
                    f"  - steady part (10%..90% of the backlog): T1 {s1:,.0f}/s, "
                    f"T{top} {sn:,.0f}/s, T{top}/T1 = {sn / s1:.2f}x"
                )
    return lines


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets for the redcurrent consumer, PASS/MISS on the medians."""
    med = medians(rows)
    consume = sorted({name for name, _ in med if name.startswith("redcurrent consume")})
    lines: list[str] = []

    def mark(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    for name in consume:
        by = {n: m for (row, n), m in med.items() if row == name}
        if 1 not in by or len(by) < 2:
            continue
        top = max(by)
        ratio = by[top]["rate"] / by[1]["rate"]
        lines.append(f"- {mark(ratio >= 2.5)} {name}: T{top}/T1 = {ratio:.2f}x (>= 2.5x)")
        if "steady_rate" in by[1] and "steady_rate" in by[top]:
            steady = by[top]["steady_rate"] / by[1]["steady_rate"]
            lines.append(f"  - steady part: {steady:.2f}x")
        spreads = [
            r["spread"] for r in rows if r["row"] == name and r["shards"] == top and r["spread"]
        ]
        if spreads:
            worst = statistics.median(max(abs(x) for x in sp) for sp in spreads)
            lines.append(
                f"- {mark(worst <= 0.10)} {name}: per-shard XREADGROUP+XACK calls within "
                f"±{100 * worst:.1f}% of the mean (median over runs; target ±10%)"
            )
        publish = [
            r["spread"]
            for r in rows
            if r["row"].startswith("redcurrent publish") and r["shards"] == top and r["spread"]
        ]
        if publish:
            worst = statistics.median(max(abs(x) for x in sp) for sp in publish)
            lines.append(
                f"- {mark(worst <= 0.10)} messages per shard (XADD calls) within "
                f"±{100 * worst:.1f}% of the mean"
            )
        s1, sn = by[1]["server_us_per_msg"], by[top]["server_us_per_msg"]
        lines.append(
            f"- {mark(abs(sn / s1 - 1) <= 0.10)} {name}: server CPU per message flat, "
            f"{s1:.2f} -> {sn:.2f} us ({100 * (sn / s1 - 1):+.0f}%; within ±10%)"
        )
    idle = [r for r in rows if r["row"].startswith("redcurrent idle")]
    if idle:
        server = statistics.median(r["commands_per_s_per_consumer"] for r in idle)
        sent = statistics.median(r["sent_per_s_per_consumer"] for r in idle)
        parts = statistics.median(
            len(p) / max(1, len(r["partitions_owned"]))
            for r in idle
            for p in [[x for owned in r["partitions_owned"] if owned for x in owned]]
        )
        lines.append(
            f"- {mark(server < 2)} idle: {server:.2f} commands/s per consumer on the servers "
            f"(INFO commandstats, inside scripts included), {mark(sent < 2)} {sent:.2f}/s "
            f"sent by the client; {parts:.0f} partitions per consumer (target < 2)"
        )
    return lines


def render(report: dict[str, Any]) -> str:
    out = [
        "# Cluster scaling",
        "",
        f"- command: `{report['command']}`",
        f"- caps: {report['caps']}",
        f"- server: {report['server']}; machine: {report['machine']}",
        "",
        "| row | shards | procs | msgs | msg/s | per-shard calls | balance max/mean "
        "(calls, usec, CPU) | "
        "server us/msg | throttled share/shard | client CPU s (cores) | client us/msg | "
        "others' cores | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "rate" not in r:
            continue
        throttled = ", ".join(f"{t:.2f}" for t in r["throttled_share"]) or "-"
        out.append(
            f"| {r['row']} | {r['shards']} | {r.get('processes', '')} | {r['messages']} | "
            f"{r['rate']:,.0f} | {', '.join(str(c) for c in r['per_shard_calls'])} | "
            f"{r['balance']:.2f}, {r['usec_balance']:.2f}, {r['cpu_balance']:.2f} | "
            f"{r['server_us_per_msg']:.2f} | {throttled} | "
            f"{r['client_cpu_s']:.1f} ({r['client_cores']:.2f}) | "
            f"{r['client_us_per_msg']:.2f} | {r['others_cores']:.2f} | {r['uptime']} |"
        )
    idle = [r for r in report["rows"] if "commands_per_s_per_consumer" in r]
    if idle:
        out += [
            "",
            "| idle row | shards | consumers | window s | server-side commands | "
            "per consumer /s | sent by client per consumer /s | client CPU % per consumer | "
            "by command (server side, incl. inside scripts) | load |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in idle:
            out.append(
                f"| {r['row']} | {r['shards']} | {r['consumers']} | {r['seconds']:.1f} | "
                f"{r['commands']} | {r['commands_per_s_per_consumer']:.2f} | "
                f"{r['sent_per_s_per_consumer']:.2f} | "
                f"{100 * r['client_cpu_s'] / r['seconds'] / r['consumers']:.2f} | "
                f"{json.dumps(r['by_command'], sort_keys=True)} | {r['uptime']} |"
            )
    for r in idle:
        if r.get("monitor_sent_per_s_per_consumer"):
            out.append(
                f"\n{r['row']}, {r['shards']} shard(s): sent per consumer per second "
                f"(MONITOR): {json.dumps(r['monitor_sent_per_s_per_consumer'])}; inside "
                f"scripts: {json.dumps(r['monitor_in_scripts_per_s_per_consumer'])}"
            )
    out += ["", "Scaling:", *scale_lines(report["rows"])]
    targets = target_lines(report["rows"])
    if targets:
        out += ["", "Targets (issue 19):", *targets]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run (CI smoke)")
    p.add_argument(
        "--cap",
        type=float,
        default=0.025,
        help="cores per redis-server (0: uncapped); low enough that the clients can keep "
        "3 capped shards busy on a small machine (see benchmarks/README.md)",
    )
    p.add_argument(
        "--period-us",
        type=int,
        default=20_000,
        help="CFS period (short: many periods per run, so the quota's burst matters less)",
    )
    p.add_argument("--partitions", type=int, default=12)
    p.add_argument("--messages", type=int, default=None)
    p.add_argument("--producers", type=int, default=3)
    p.add_argument("--consumers", type=int, default=4)
    p.add_argument("--batch", type=int, default=500, help="XADDs per node per round")
    p.add_argument("--depth", type=int, default=2, help="XADD batches in flight per node")
    p.add_argument("--chunk", type=int, default=1000, help="items per publish_many call")
    p.add_argument("--inflight", type=int, default=2, help="publish_many calls at a time")
    p.add_argument("--repeat", type=int, default=None, help="repetitions (median reported)")
    p.add_argument("--concurrency", type=int, default=16, help="StreamConsumer concurrency")
    p.add_argument("--rc-batch", type=int, default=0, help="batch_handler size (0: handler)")
    p.add_argument("--member-ttl", type=float, default=10.0)
    p.add_argument(
        "--local-keys",
        action="store_true",
        help="diagnostic: the consumers' cluster client finds XREADGROUP keys itself "
        "instead of asking COMMAND GETKEYS",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="per timed row")
    p.add_argument("--shards", default="1,3")
    p.add_argument("--only", default="raw,redcurrent,idle")
    p.add_argument("--settle", type=float, default=None, help="idle: seconds before counting")
    p.add_argument("--idle-window", type=float, default=None, help="idle: seconds counted")
    p.add_argument("--server", default=None, help="redis-server binary")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--render", type=Path, default=None, help="only re-render a saved JSON")
    p.add_argument("--tag", default=None, help="results/cluster-<tag>.{md,json} (default latest)")
    args = p.parse_args(argv)
    if args.messages is None:
        args.messages = 100_000 if args.quick else 300_000
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.settle is None:
        args.settle = 1.0 if args.quick else 2.0
    if args.idle_window is None:
        args.idle_window = 5.0 if args.quick else 10.0
    args.only = set(args.only.split(","))
    args.shard_counts = [int(x) for x in args.shards.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        # Re-render a saved JSON (e.g. after changing this report's layout).
        report = json.loads(args.render.read_text())
        text = render(report)
        args.render.with_suffix(".md").write_text(text)
        print(text)
        return 0
    cgroups = None
    if args.cap > 0:
        cgroups, why = CpuCgroups.detect()
        if cgroups is None:
            print(f"SKIP cluster benchmark: cannot cap redis-server CPU here ({why})")
            return 0
        args.period_us = effective_period(args.cap, args.period_us)
        caps = (
            f"{args.cap} core per redis-server (quota {round(args.cap * args.period_us)} us / "
            f"period {args.period_us} us, {cgroups.describe()})"
        )
    else:
        caps = "none (uncapped)"
    from redcurrent.testing import find_redis_server

    binary = args.server or find_redis_server()
    print(f"caps: {caps}; {uptime()}", flush=True)
    streams = spread_keys("bench", args.partitions)
    rows: list[dict[str, Any]] = []
    clusters: dict[int, BenchCluster] = {}
    try:
        # Every cluster size up at once (idle servers cost nothing), then the sizes take
        # turns in each repetition, so that a change in the machine's load hits all alike.
        for shards in args.shard_counts:
            clusters[shards] = BenchCluster(
                binary, shards, cgroups=cgroups, cap=args.cap, period_us=args.period_us
            ).start()
        for rep in range(args.repeat):
            for shards, cluster in clusters.items():
                print(f"-- repetition {rep + 1}/{args.repeat}, {shards} shard(s)", flush=True)
                got: list[dict[str, Any]] = []
                if "raw" in args.only:
                    cluster.flushall()
                    got += raw_rows(cluster, streams, args)
                if "redcurrent" in args.only:
                    cluster.flushall()
                    got += rc_rows(cluster, args)
                for row in got:
                    row["repetition"] = rep
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        for cluster in clusters.values():
            cluster.stop()
        if cgroups is not None:
            cgroups.remove_all()
    version = "?"
    with contextlib.suppress(Exception):
        import subprocess

        version = subprocess.run(
            [binary or "redis-server", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    report = {
        "command": " ".join(["python", "benchmarks/cluster.py", *(argv or sys.argv[1:])]),
        "caps": caps,
        "cap": args.cap,
        "period_us": args.period_us,
        "partitions": args.partitions,
        "server": version,
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"
        ),
        "rows": rows,
    }
    text = render(report)
    print(text)
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = (
        f"cluster-{args.tag}" if args.tag else "quick-cluster" if args.quick else "cluster-latest"
    )
    (args.json or RESULTS_DIR / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS_DIR / f"{stem}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
