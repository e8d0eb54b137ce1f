"""The redcurrent benchmark suite: one run, every figure beside the raw redis-py baseline.

Usage::

    python benchmarks/run.py            # full: 100k messages, median of 5, 1M for memory
    python benchmarks/run.py --quick    # CI smoke run, well under a minute
    nox -s bench -- --quick

Runs against a private ``redis-server`` (started through
``redcurrent.testing.redis_url_for_demo()``; ``REDCURRENT_TEST_REDIS_URL`` and Docker are
ignored) and writes ``benchmarks/results/latest.md``, ``latest.json`` and ``throughput.png``
(``--quick``: ``quick.md``, ``quick.json``, ``quick-throughput.png``, git-ignored).
Targets are printed as PASS/MISS; a MISS does not fail the run (benchmarks are not
tests), only an error does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_consumer
from _common import RESULTS_DIR, private_redis_url, ratio
from bench_consumer import READ_AHEAD_PREFETCH as READ_AHEAD

import redcurrent

#: The batch size whose figure is held against the batch target.
HEADLINE_BATCH = 100


# --------------------------------------------------------------------------- publish


def publish(url: str, count: int, repeat: int) -> dict[str, Any]:
    """bench_publish.py's figures: imported when it exposes ``run``, else a subprocess."""
    try:
        import bench_publish

        run = bench_publish.run
    except (ImportError, AttributeError):
        run = None
    if run is not None:
        report: dict[str, Any] = asyncio.run(run(url, count, repeat))
    else:
        script = Path(__file__).resolve().parent / "bench_publish.py"
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "publish.json"
            subprocess.run(
                [
                    sys.executable,
                    str(script),
                    "--count",
                    str(count),
                    "--repeat",
                    str(repeat),
                    "--url",
                    url,
                    "--json",
                    str(out),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            report = json.loads(out.read_text())
    return report


# --------------------------------------------------------------------------- report


def _fmt(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _x(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, goal: str, ok: bool) -> None:
        out.append({"target": name, "value": value, "goal": goal, "pass": bool(ok)})

    tp = res.get("throughput")
    if tp:
        raw = tp["raw"]["msgs_per_s"]
        for key, goal, name in (
            ("single_c1", 0.8, "single handler, concurrency 1"),
            ("single_c64", 0.5, "single handler, concurrency 64"),
            (f"batch_{HEADLINE_BATCH}", 0.9, f"batch handler, size {HEADLINE_BATCH}"),
        ):
            r = ratio(tp[key]["msgs_per_s"], raw)
            add(f"{name} vs raw loop", r, f">= {goal}x", r >= goal)
    pub = res.get("publish")
    if pub:
        r = pub["results"]["publish_many"]["ratio_to_raw"]
        add("publish_many vs raw pipelined XADD", r, ">= 1.0x", r >= 1.0)
    lat = res.get("latency")
    if lat:
        p99 = lat["redcurrent"]["p99_ms"]
        rate = lat["redcurrent"]["rate_per_s"]
        add(f"p99 latency at {rate:,.0f} msg/s (ms)", p99, "< 5 ms", p99 < 5)
    idle = res.get("idle")
    if idle:
        cps = idle["redcurrent"]["commands_per_s"]
        cpu = idle["redcurrent"]["cpu_pct"]
        add("idle consumer commands/s", cps, "< 2/s", cps < 2)
        add("idle consumer CPU %", cpu, "< 1%", cpu < 1)
    mem = res.get("memory")
    if mem:
        m = mem["redcurrent"]
        growth = m["rss_100pct_mb"] - m["rss_10pct_mb"]
        add(
            "memory flat: RSS growth 10% -> 100% (MB)",
            growth,
            "< 10% of RSS at 10%",
            growth < 0.1 * m["rss_10pct_mb"],
        )
    return out


def markdown(res: dict[str, Any]) -> str:
    meta = res["meta"]
    lines = [
        f"# redcurrent benchmarks ({'quick' if meta['quick'] else 'full'} run)",
        "",
        f"{meta['when']} · Python {meta['python']} · redis-py {meta['redis_py']} "
        f"(hiredis {meta['hiredis']}) · Redis {meta['redis_version']} (private server) · "
        f"{meta['cpus']} CPUs · median of {meta['repeat']} · `{meta['command']}`",
        "",
        "Ratios are redcurrent / raw baseline from the same run (for throughput higher is "
        "better; for latency, memory and idle cost lower is better). The raw baseline is "
        "redis-py + hiredis: XREADGROUP COUNT 500, `msgspec.json.decode` of `data`, the "
        "same trivial async handler per message, one XACK per batch (publish: pipelined "
        "XADD, `json.dumps`).",
        "",
        "| figure | redcurrent | raw baseline | ratio |",
        "|---|---:|---:|---:|",
    ]
    tp = res.get("throughput")
    if tp:
        raw = tp["raw"]
        n = raw["messages"]
        lines.append(f"| **consumer throughput, msgs/s ({n:,} msgs)** | | | |")
        for key, r in tp.items():
            if key == "raw":
                continue
            lines.append(
                f"| {r['label']} | {_fmt(r['msgs_per_s'])} | {_fmt(raw['msgs_per_s'])} "
                f"| {_x(ratio(r['msgs_per_s'], raw['msgs_per_s']))} |"
            )
    pub = res.get("publish")
    if pub:
        pr = pub["results"]
        raw_rate = pr["raw pipeline"]["msgs_per_s"]
        lines.append(f"| **publish throughput, msgs/s ({pub['count']:,} msgs)** | | | |")
        for name, label in (
            ("publish_many", "publish_many"),
            ("publish", f"publish one by one ({pr['publish']['messages']:,} msgs)"),
        ):
            r = pr[name]
            lines.append(
                f"| {label} | {_fmt(r['msgs_per_s'])} | {_fmt(raw_rate)} "
                f"| {_x(ratio(r['msgs_per_s'], raw_rate))} |"
            )
    lat = res.get("latency")
    if lat:
        rc, raw = lat["redcurrent"], lat["raw"]
        lines.append(
            f"| **latency publish → handler, ms ({rc['rate_per_s']:,.0f} msg/s for "
            f"{rc['seconds']:g} s)** | | | |"
        )
        for key in ("p50_ms", "p99_ms", "max_ms"):
            lines.append(
                f"| {key[:-3]} | {rc[key]:.3f} | {raw[key]:.3f} | {_x(ratio(rc[key], raw[key]))} |"
            )
    mem = res.get("memory")
    if mem:
        rc, raw = mem["redcurrent"], mem["raw"]
        lines.append(f"| **consumer RSS, MB ({rc['messages']:,} msgs)** | | | |")
        for key, label in (
            ("rss_start_mb", "at start"),
            ("rss_10pct_mb", "at 10%"),
            ("rss_50pct_mb", "at 50%"),
            ("rss_100pct_mb", "at 100%"),
            ("peak_rss_mb", "peak"),
        ):
            lines.append(
                f"| {label} | {rc[key]:.1f} | {raw[key]:.1f} | {_x(ratio(rc[key], raw[key]))} |"
            )
    idle = res.get("idle")
    if idle:
        rc, raw = idle["redcurrent"], idle["raw"]
        lines.append(f"| **idle consumer ({rc['seconds']:.0f} s)** | | | |")
        lines.append(
            f"| commands/s | {rc['commands_per_s']:.2f} | {raw['commands_per_s']:.2f} "
            f"| {_x(ratio(rc['commands_per_s'], raw['commands_per_s']))} |"
        )
        lines.append(
            f"| CPU % | {rc['cpu_pct']:.2f} | {raw['cpu_pct']:.2f} "
            f"| {_x(ratio(rc['cpu_pct'], raw['cpu_pct']))} |"
        )
    if res["targets"]:
        lines += ["", "| target | value | goal | |", "|---|---:|---|---|"]
        for t in res["targets"]:
            value = t["value"]
            shown = _x(value) if t["goal"].endswith("x") else f"{value:.2f}"
            lines.append(
                f"| {t['target']} | {shown} | {t['goal']} | {'PASS' if t['pass'] else 'MISS'} |"
            )
    return "\n".join(lines) + "\n"


def chart(res: dict[str, Any], path: Path) -> bool:
    tp = res.get("throughput")
    if not tp:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no chart", file=sys.stderr)
        return False
    raw = tp["raw"]["msgs_per_s"] / 1000
    single = sorted(
        (r["concurrency"], r["msgs_per_s"] / 1000)
        for r in tp.values()
        if r["impl"] == "redcurrent" and not r["batch"] and not r["prefetch"]
    )
    batch = sorted(
        (r["batch"], r["msgs_per_s"] / 1000)
        for r in tp.values()
        if r["batch"] and not r["prefetch"]
    )
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, points, xlabel, title in (
        (left, single, "concurrency", "handler(type)"),
        (right, batch, "batch size", "batch_handler(type, size=...), concurrency 1"),
    ):
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, "o-", label="redcurrent")
            ax.set_xscale("log", base=2 if ax is left else 10)
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
        ahead = [
            (r["batch"] if ax is right else r["concurrency"], r["msgs_per_s"] / 1000)
            for r in tp.values()
            if r["prefetch"] and bool(r["batch"]) == (ax is right)
        ]
        if ahead:
            xs, ys = zip(*ahead, strict=True)
            ax.plot(xs, ys, "s", color="tab:green", label=f"prefetch={READ_AHEAD} (read-ahead)")
        ax.axhline(raw, color="grey", linestyle="--", label="raw redis-py loop")
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    left.set_ylabel("thousand messages / s")
    left.set_ylim(bottom=0)
    left.legend(loc="lower left")
    n = tp["raw"]["messages"]
    fig.suptitle(f"consumer throughput, {n:,} messages, median of {res['meta']['repeat']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


def _server_version(url: str) -> str:
    import redis

    with redis.Redis.from_url(url) as client:
        return str(client.info("server")["redis_version"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, 1 repetition")
    parser.add_argument("--count", type=int, help="messages per throughput run (100k)")
    parser.add_argument("--repeat", type=int, help="repetitions, median reported (5)")
    parser.add_argument("--publish-count", type=int, help="messages per publish run (100k)")
    parser.add_argument("--latency-seconds", type=float, help="per latency run (10)")
    parser.add_argument("--rate", type=float, default=1000.0, help="latency msg/s (1000)")
    parser.add_argument("--memory-count", type=int, help="messages for the memory run (1M)")
    parser.add_argument("--idle-seconds", type=float, help="idle window (10)")
    parser.add_argument(
        "--only",
        default="throughput,publish,latency,memory,idle",
        help="comma-separated sections to run",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = parser.parse_args(argv)
    quick = args.quick
    count = args.count or (10_000 if quick else 100_000)
    repeat = args.repeat or (1 if quick else 5)
    publish_count = args.publish_count or count
    lat_s = args.latency_seconds or (2.0 if quick else 10.0)
    mem_n = args.memory_count or (50_000 if quick else 1_000_000)
    idle_s = args.idle_seconds or (3.0 if quick else 10.0)
    sections = {s.strip() for s in args.only.split(",") if s.strip()}

    import hiredis
    import redis

    started = time.perf_counter()
    res: dict[str, Any] = {}
    with private_redis_url() as url:
        res["meta"] = {
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "quick": quick,
            "command": " ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
            "repeat": repeat,
            "count": count,
            "python": platform.python_version(),
            "redis_py": redis.__version__,
            "hiredis": hiredis.__version__,
            "redcurrent": redcurrent.__version__,
            "redis_version": _server_version(url),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        }

        def step(name: str) -> bool:
            if name in sections:
                print(f"[{time.perf_counter() - started:6.1f}s] {name} ...", flush=True)
                return True
            return False

        if step("throughput"):
            res["throughput"] = asyncio.run(bench_consumer.throughput(url, count, repeat, quick))
        if step("publish"):
            res["publish"] = publish(url, publish_count, repeat)
        if step("latency"):
            res["latency"] = asyncio.run(bench_consumer.latency(url, lat_s, args.rate, repeat))
        if step("memory"):
            res["memory"] = asyncio.run(bench_consumer.memory(url, mem_n))
        if step("idle"):
            res["idle"] = asyncio.run(bench_consumer.idle(url, idle_s))
    res["meta"]["seconds"] = time.perf_counter() - started
    res["targets"] = targets(res)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(res)
    # A quick run never overwrites the published figures of a full one.
    stem = "quick" if quick else "latest"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    chart_name = "quick-throughput.png" if quick else "throughput.png"
    drew = chart(res, out / chart_name)
    print()
    print(text)
    for t in res["targets"]:
        print(f"{'PASS' if t['pass'] else 'MISS'}  {t['target']}: {t['value']:.2f} ({t['goal']})")
    written = [f"{stem}.md", f"{stem}.json"] + ([chart_name] if drew else [])
    print(f"\nwrote {', '.join(str(out / w) for w in written)} in {res['meta']['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
