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
from bench_consumer import BASELINE
from bench_consumer import READ_AHEAD_PREFETCH as READ_AHEAD

import redcurrent

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


def _tp_ratio(tp: dict[str, Any], key: str, field: str = "msgs_per_s") -> float:
    if key not in tp or BASELINE not in tp:
        return math.nan
    return ratio(tp[key][field], tp[BASELINE][field])


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, goal: str, ok: bool) -> None:
        out.append({"target": name, "value": value, "goal": goal, "pass": bool(ok)})

    tp = res.get("throughput")
    if tp:
        for key, goal, name in (
            ("single_c1", 1.0, "single handler, concurrency 1"),
            ("single_c64", 0.9, "single handler, concurrency 64"),
            ("batch_100", 1.2, "batch handler, size 100"),
            ("batch_500", 1.2, "batch handler, size 500"),
        ):
            r = _tp_ratio(tp, key)
            add(f"{name} vs strongest raw loop", r, f">= {goal}x", r >= goal)
        r = _tp_ratio(tp, "single_c1", "server_cpu_us_per_msg")
        add("server CPU/msg, single c1 vs strongest raw loop", r, "<= 1.1x", r <= 1.1)
    pub = res.get("publish")
    if pub:
        pr = pub["results"]
        bound = pr.get("server bound -c 50")
        if bound:
            r = ratio(pr["publish_many"]["msgs_per_s"], bound["msgs_per_s"])
            add("publish_many vs server bound (redis-benchmark -P 64)", r, ">= 0.5x", r >= 0.5)
        r = ratio(pr["publish"]["msgs_per_s"], pr["raw awaited XADD"]["msgs_per_s"])
        add("publish one by one vs raw awaited XADD", r, ">= 1.0x", r >= 1.0)
    lat = res.get("latency")
    if lat:
        r = ratio(lat["redcurrent"]["p99_ms"], lat["raw"]["p99_ms"])
        rate = lat["redcurrent"]["rate_per_s"]
        add(f"p99 publish -> handler at {rate:,.0f} msg/s vs raw loop", r, "<= 1.0x", r <= 1.0)
    idle = res.get("idle")
    if idle:
        cps = idle["redcurrent"]["commands_per_s"]
        cpu = idle["redcurrent"]["cpu_pct"]
        add("idle consumer commands/s", cps, "< 1/s", cps < 1)
        add("idle consumer CPU %", cpu, "< 1%", cpu < 1)
    costs = res.get("costs")
    if costs:
        for key in ("retry", "scheduled"):
            v = costs[key]["extra_commands_per_msg"]
            add(f"{key} message: extra server commands", v, "<= 3", v <= 3)
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
        f"{meta['cpus']} CPUs · load average at start {meta.get('load', '?')} · "
        f"median of {meta['repeat']} · `{meta['command']}`",
        "",
        "Ratios only: absolute figures on a shared 2-core machine vary by ±30% between runs. "
        "All variants take turns in each repetition, each in a fresh event loop.",
    ]
    tp = res.get("throughput")
    if tp:
        base = tp[BASELINE]
        n = base["messages"]
        lines += [
            "",
            f"## Consumer throughput ({n:,} msgs, start of the consumer to the last ack "
            "visible in XPENDING)",
            "",
            "Baseline: the strongest simple raw loop (redis-py + hiredis, XREADGROUP COUNT 500, "
            "`msgspec.json.decode` of `data`, the same trivial async handler per message, the "
            "batch's XACK in one pipeline with the next XREADGROUP). Server CPU is `INFO cpu` "
            "user + sys over the run; commands are `INFO commandstats` calls (INFO and the "
            "XPENDING polls of the measurement left out); client CPU is this process's CPU "
            "time over the run (steadier than wall time when the machine is busy); *ack lag*: "
            "from the last handler call until XPENDING shows no pending entry (part of the time).",
            "",
            "| variant | msgs/s | vs strongest loop | client CPU µs/msg | vs loop "
            "| server CPU µs/msg | vs loop | commands/msg | ack lag ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, r in tp.items():
            lines.append(
                f"| {r['label']} | {_fmt(r['msgs_per_s'])} | {_x(_tp_ratio(tp, key))} "
                f"| {r['client_cpu_us_per_msg']:.2f} "
                f"| {_x(_tp_ratio(tp, key, 'client_cpu_us_per_msg'))} "
                f"| {r['server_cpu_us_per_msg']:.2f} "
                f"| {_x(_tp_ratio(tp, key, 'server_cpu_us_per_msg'))} "
                f"| {r['commands_per_msg']:.4f} | {r.get('ack_lag_ms', math.nan):.1f} |"
            )
    pub = res.get("publish")
    if pub:
        pr = pub["results"]
        bound = pr.get("server bound -c 50", {}).get("msgs_per_s", math.nan)
        lines += [
            "",
            f"## Publishing ({pub['count']:,} msgs; one by one: {pr['publish']['messages']:,})",
            "",
            f"Server: {pub.get('persistence', '?')}. Server bound: "
            f"`{pub.get('server_bound_command') or 'redis-benchmark not installed'}`.",
            "",
            "| variant | msgs/s | vs raw pipeline | vs server bound (-c 50) "
            "| server CPU µs/msg | commands/msg |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        raw_rate = pr["raw pipeline"]["msgs_per_s"]
        for name, r in pr.items():
            lines.append(
                f"| {name} | {_fmt(r['msgs_per_s'])} | {_x(ratio(r['msgs_per_s'], raw_rate))} "
                f"| {_x(ratio(r['msgs_per_s'], bound))} | {r['server_cpu_us_per_msg']:.2f} "
                f"| {r['commands_per_msg']:.3f} |"
            )
    lat, mem, idle = res.get("latency"), res.get("memory"), res.get("idle")
    if lat or mem or idle:
        lines += [
            "",
            "## Latency, memory, idle cost",
            "",
            "| figure | redcurrent | raw loop | ratio |",
            "|---|---:|---:|---:|",
        ]
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
        by = rc.get("by_command_per_s", {})
        if by:
            shown = ", ".join(f"{k} {v:.2f}" for k, v in by.items())
            lines.append(
                f"| redcurrent's commands/s by command (inside scripts too) | {shown} | | |"
            )
    fair = res.get("fairness")
    if fair:
        lines += [
            "",
            "## Fairness: 3 competing consumers of one group on a backlog",
            "",
            "| prefetch | messages | largest share | smallest share |",
            "|---:|---:|---:|---:|",
        ]
        for f in fair.values():
            lines.append(
                f"| {f['prefetch']} | {f['messages']:,} | {f['max_share']:.1%} "
                f"| {f['min_share']:.1%} |"
            )
    costs = res.get("costs")
    if costs:
        lines += [
            "",
            "## Server commands beyond a plain message (all commands, inside scripts too)",
            "",
            "| message | extra commands/msg | by command |",
            "|---|---:|---|",
        ]
        for key in ("retry", "scheduled"):
            c = costs[key]
            by = ", ".join(f"{k} {v:+g}" for k, v in c["by_command"].items())
            lines.append(
                f"| {key} ({c['messages']} msgs) | {c['extra_commands_per_msg']:.2f} | {by} |"
            )
    if res["targets"]:
        lines += ["", "## Targets", "", "| target | value | goal | |", "|---|---:|---|---|"]
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
    raw = tp[BASELINE]["msgs_per_s"] / 1000
    tp = {k: r for k, r in tp.items() if r.get("loop", "asyncio") == "asyncio"}
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
        ax.axhline(raw, color="grey", linestyle="--", label="strongest raw redis-py loop")
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    left.set_ylabel("thousand messages / s")
    left.set_ylim(bottom=0)
    left.legend(loc="lower left")
    n = tp[BASELINE]["messages"]
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
    parser.add_argument("--fair-count", type=int, help="backlog of the fairness run (30k)")
    parser.add_argument(
        "--only",
        default="throughput,publish,latency,memory,idle,fairness,costs",
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
    fair_n = args.fair_count or (5_000 if quick else 30_000)
    sections = {s.strip() for s in args.only.split(",") if s.strip()}

    import hiredis
    import redis

    started = time.perf_counter()
    res: dict[str, Any] = {}
    with private_redis_url() as url:
        res["meta"] = {
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "quick": quick,
            "command": " ".join(
                [f"BENCH_LOOP={loop}" for loop in [os.environ.get("BENCH_LOOP")] if loop]
                + ["python", "benchmarks/run.py", *(argv or sys.argv[1:])]
            ),
            "repeat": repeat,
            "count": count,
            "python": platform.python_version(),
            "redis_py": redis.__version__,
            "hiredis": hiredis.__version__,
            "redcurrent": redcurrent.__version__,
            "redis_version": _server_version(url),
            "cpus": os.cpu_count(),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "loops": bench_consumer.bench_loops(),
            "platform": platform.platform(),
        }

        def step(name: str) -> bool:
            if name in sections:
                print(f"[{time.perf_counter() - started:6.1f}s] {name} ...", flush=True)
                return True
            return False

        if step("throughput"):
            res["throughput"] = bench_consumer.throughput(url, count, repeat, quick)
        if step("publish"):
            res["publish"] = publish(url, publish_count, repeat)
        if step("latency"):
            res["latency"] = asyncio.run(bench_consumer.latency(url, lat_s, args.rate, repeat))
        if step("memory"):
            res["memory"] = asyncio.run(bench_consumer.memory(url, mem_n))
        if step("idle"):
            res["idle"] = asyncio.run(bench_consumer.idle(url, idle_s))
        if step("fairness"):
            res["fairness"] = bench_consumer.fairness(url, fair_n, max(1, min(repeat, 3)))
        if step("costs"):
            import bench_costs

            res["costs"] = asyncio.run(
                bench_costs.costs(url, 200 if quick else 1000, 5 if quick else 20)
            )
    res["meta"]["seconds"] = time.perf_counter() - started
    res["meta"]["load_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
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
