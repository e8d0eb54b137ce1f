"""A local Redis Cluster of M masters whose servers each run in a CPU-capped cgroup.

Used by ``benchmarks/cluster.py``. On a small shared machine an uncapped 3-shard cluster
is no faster than one shard (servers and clients share the same cores), so scaling is
measured with each ``redis-server`` in a cgroup of its own, capped to a fraction of a
core: the servers then behave like separate machines of that size.

* :class:`CpuCgroups` finds a writable cpu controller: cgroup v1 (``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us``) or, failing that, cgroup v2 (``cpu.max``). ``None`` from
  :meth:`CpuCgroups.detect` means capping is not possible here (the caller skips).
* :class:`BenchCluster` starts ``masters`` private servers (no replicas, no persistence:
  the benchmark measures CPU, not fsync), gives each its share of the 16384 slots by hand
  (``redis-cli --cluster create`` wants at least three masters, and one is needed here),
  joins them with ``CLUSTER MEET`` and waits until every node says ``ok``.
* :func:`spread_keys` picks stream keys whose slots are spread evenly over 16384 (the
  layout PARTITIONS.md describes), so N streams fall evenly on the shards.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from redcurrent.testing import RedisServer

SLOTS = 16384

__all__ = [
    "SLOTS",
    "BenchCluster",
    "CpuCgroup",
    "CpuCgroups",
    "effective_period",
    "spread_keys",
]


# --------------------------------------------------------------------------- cgroups


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, fs type, options) of every cgroup mount."""
    found: list[tuple[str, str, list[str]]] = []
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[2] in {"cgroup", "cgroup2"}:
                found.append((parts[1], parts[2], parts[3].split(",")))
    return found


def _own_path(version: int) -> str:
    """This process's cgroup path in the v1 cpu hierarchy or the v2 one."""
    with contextlib.suppress(OSError), open("/proc/self/cgroup") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            if version == 2 and hid == "0":
                return path
            if version == 1 and "cpu" in controllers.split(","):
                return path
    return "/"


@dataclass
class CpuCgroup:
    """One cgroup with a CPU cap; :meth:`add` moves a process into it."""

    path: Path
    version: int
    cap: float
    period_us: int
    pids: list[int] = field(default_factory=list)

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(f"{pid}\n")
        self.pids.append(pid)

    def throttling(self) -> dict[str, float]:
        """``nr_periods``, ``nr_throttled`` and throttled seconds so far."""
        stat: dict[str, float] = {}
        with contextlib.suppress(OSError):
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                stat[key] = float(value)
        if self.version == 1:
            throttled_s = stat.get("throttled_time", 0.0) / 1e9
        else:
            throttled_s = stat.get("throttled_usec", 0.0) / 1e6
        return {
            "nr_periods": stat.get("nr_periods", 0.0),
            "nr_throttled": stat.get("nr_throttled", 0.0),
            "throttled_s": throttled_s,
        }

    def remove(self) -> None:
        """Move any process still here back to the parent, then delete the cgroup."""
        parent = self.path.parent / "cgroup.procs"
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    parent.write_text(f"{pid}\n")
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)  # an exiting process may linger a moment


class CpuCgroups:
    """Makes CPU-capped cgroups under this process's own cgroup."""

    def __init__(self, root: Path, version: int) -> None:
        self.root = root
        self.version = version
        self.made: list[CpuCgroup] = []

    def describe(self) -> str:
        knob = "cpu.cfs_quota_us/cpu.cfs_period_us" if self.version == 1 else "cpu.max"
        return f"cgroup v{self.version} ({knob}) under {self.root}"

    @classmethod
    def detect(cls) -> tuple[CpuCgroups | None, str]:
        """A writable cpu controller, or ``(None, why not)``."""
        reasons: list[str] = []
        mounts = _mounts()
        for point, fstype, options in mounts:
            if fstype == "cgroup" and "cpu" in options:
                root = Path(point) / _own_path(1).lstrip("/")
                if (root / "cpu.cfs_quota_us").exists() and _writable_dir(root):
                    return cls(root, 1), ""
                reasons.append(f"cgroup v1 cpu at {root} is not writable")
        for point, fstype, _ in mounts:
            if fstype == "cgroup2":
                root = Path(point) / _own_path(2).lstrip("/")
                why = _prepare_v2(root)
                if not why:
                    return cls(root, 2), ""
                reasons.append(why)
        if not mounts:
            reasons.append("no cgroup file system mounted")
        return None, "; ".join(reasons) or "no cpu cgroup controller"

    def make(self, name: str, cap: float, period_us: int) -> CpuCgroup:
        path = self.root / name
        path.mkdir(exist_ok=True)
        period_us = effective_period(cap, period_us)
        quota = round(cap * period_us)
        if self.version == 1:
            (path / "cpu.cfs_period_us").write_text(f"{period_us}\n")
            (path / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        else:
            (path / "cpu.max").write_text(f"{quota} {period_us}\n")
        group = CpuCgroup(path, self.version, cap, period_us)
        self.made.append(group)
        return group

    def remove_all(self) -> None:
        while self.made:
            self.made.pop().remove()


#: The kernel refuses a CFS quota below 1 ms.
MIN_QUOTA_US = 1000


def effective_period(cap: float, period_us: int) -> int:
    """``period_us``, lengthened where ``cap`` of it would be under the kernel's
    minimum quota (1 ms): a cap of 0.025 needs a period of at least 40 ms."""
    return max(period_us, math.ceil(MIN_QUOTA_US / cap)) if cap > 0 else period_us


def _writable_dir(path: Path) -> bool:
    probe = path / f"redcurrent-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return False
    with contextlib.suppress(OSError):
        probe.rmdir()
    return True


def _prepare_v2(root: Path) -> str:
    """'' when children of ``root`` can have ``cpu.max``; else why not."""
    try:
        controllers = (root / "cgroup.controllers").read_text().split()
    except OSError:
        return f"cgroup v2 at {root}: unreadable"
    if "cpu" not in controllers:
        return f"cgroup v2 at {root}: no cpu controller (bound to v1?)"
    subtree = root / "cgroup.subtree_control"
    try:
        if "cpu" not in subtree.read_text().split():
            subtree.write_text("+cpu\n")
    except OSError as exc:
        return f"cgroup v2 at {root}: cannot enable +cpu ({exc.strerror})"
    if not _writable_dir(root):
        return f"cgroup v2 at {root}: not writable"
    return ""


# --------------------------------------------------------------------------- keys


def spread_keys(prefix: str, count: int) -> list[str]:
    """``count`` keys ``<prefix>#<p>.<k>`` whose slots fall in ``count`` equal slot ranges,
    partition ``p`` in the ``p``-th range (so each shard of an evenly split cluster gets
    the same number of them)."""
    keys: list[str] = []
    for p in range(count):
        lo, hi = p * SLOTS // count, (p + 1) * SLOTS // count
        k = 0
        while not lo <= key_slot(f"{prefix}#{p}.{k}".encode()) < hi:
            k += 1
        keys.append(f"{prefix}#{p}.{k}")
    return keys


# --------------------------------------------------------------------------- cluster


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus port (+10000) is free too."""
    found: list[int] = []
    for port in random.sample(range(20000, 45000), 2000):
        if _free(port) and _free(port + 10000):
            found.append(port)
            if len(found) == count:
                return found
    raise RuntimeError("no free ports for a local cluster")


@dataclass(frozen=True)
class Shard:
    port: int
    pid: int
    slots: tuple[int, int]  # inclusive range
    cgroup: CpuCgroup | None


class BenchCluster:
    """``masters`` private cluster-mode servers, each optionally in a capped cgroup."""

    def __init__(
        self,
        binary: str | None,
        masters: int,
        *,
        cgroups: CpuCgroups | None = None,
        cap: float = 0.0,
        period_us: int = 100_000,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.binary = binary
        self.masters = masters
        self.cgroups = cgroups
        self.cap = cap
        self.period_us = period_us
        self.extra_args = extra_args
        self.servers: list[RedisServer] = []
        self.shards: list[Shard] = []
        self._probes: dict[int, redis.Redis] = {}

    def __enter__(self) -> BenchCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> BenchCluster:
        args = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "5000",
            # Measure CPU, not the disk: no AOF (RedisServer turns it on), no snapshots.
            "--appendonly",
            "no",
            "--save",
            "",
            *self.extra_args,
        )
        for port in cluster_ports(self.masters):
            server = RedisServer(self.binary, port=port, extra_args=args)
            self.servers.append(server)
            server.start()
        ranges = [
            (i * SLOTS // self.masters, (i + 1) * SLOTS // self.masters - 1)
            for i in range(self.masters)
        ]
        for epoch, (server, (lo, hi)) in enumerate(zip(self.servers, ranges, strict=True), 1):
            with self.client(server.port) as c:
                c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
                try:
                    c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
                except redis.ResponseError:  # 6.2: no ADDSLOTSRANGE
                    c.execute_command("CLUSTER", "ADDSLOTS", *range(lo, hi + 1))
        first = self.servers[0]
        with self.client(first.port) as c:
            for server in self.servers[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", server.port)
        self._wait_ok()
        for i, (server, slots) in enumerate(zip(self.servers, ranges, strict=True)):
            pid = server.pid
            assert pid is not None
            group = None
            if self.cgroups is not None and self.cap > 0:
                group = self.cgroups.make(
                    f"redcurrent-bench-{os.getpid()}-{self.masters}-{i}", self.cap, self.period_us
                )
                group.add(pid)
            self.shards.append(Shard(server.port, pid, slots, group))
        return self

    def stop(self) -> None:
        for probe in self._probes.values():
            with contextlib.suppress(Exception):
                probe.close()
        self._probes = {}
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.kill()
                server.stop()
        self.servers = []
        for shard in self.shards:
            if shard.cgroup is not None:
                shard.cgroup.remove()
        self.shards = []

    def _wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for server in self.servers:
                with self.client(server.port) as c:
                    text = c.execute_command("CLUSTER", "INFO")
                info = dict(line.split(":", 1) for line in str(text).splitlines() if ":" in line)
                states.append(
                    info.get("cluster_state", "").strip() == "ok"
                    and int(info.get("cluster_known_nodes", 0)) == self.masters
                    and int(info.get("cluster_slots_ok", 0)) == SLOTS
                )
            if all(states):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {self.masters}-master cluster did not become ok")
            time.sleep(0.05)

    # -- looking ------------------------------------------------------------------

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", s.port) for s in self.shards]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.shards[0].port}"

    def shard_of(self, key: str) -> Shard:
        slot = key_slot(key.encode())
        return next(s for s in self.shards if s.slots[0] <= slot <= s.slots[1])

    @staticmethod
    def client(port: int) -> redis.Redis:
        return redis.Redis(
            port=port,
            socket_timeout=10.0,
            socket_connect_timeout=5.0,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )

    def flushall(self) -> None:
        """Empty every shard (these are private servers made for the benchmark)."""
        for shard in self.shards:
            with self.client(shard.port) as c:
                c.flushall()

    def snapshot(self) -> list[dict[str, Any]]:
        """Per shard: INFO commandstats (calls/usec by command), server CPU seconds, and
        the cgroup's throttling counters."""
        out: list[dict[str, Any]] = []
        for shard in self.shards:
            # One lasting connection per shard: a new one would add a HELLO to the counts.
            c = self._probes.get(shard.port)
            if c is None:
                c = self._probes[shard.port] = self.client(shard.port)
            stats = c.info("commandstats")
            cpu = c.info("cpu")
            commands = {
                key.removeprefix("cmdstat_"): {
                    "calls": int(value["calls"]),
                    "usec": int(value["usec"]),
                }
                for key, value in stats.items()
                if key.startswith("cmdstat_")
            }
            out.append(
                {
                    "port": shard.port,
                    "commands": commands,
                    "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
                    "throttling": shard.cgroup.throttling() if shard.cgroup else {},
                }
            )
        return out


def snapshot_delta(
    before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per shard differences of two :meth:`BenchCluster.snapshot` results."""
    out: list[dict[str, Any]] = []
    for b, a in zip(before, after, strict=True):
        commands: dict[str, dict[str, int]] = {}
        for name, now in a["commands"].items():
            was = b["commands"].get(name, {"calls": 0, "usec": 0})
            calls, usec = now["calls"] - was["calls"], now["usec"] - was["usec"]
            if calls:
                commands[name] = {"calls": calls, "usec": usec}
        out.append(
            {
                "port": a["port"],
                "commands": commands,
                "cpu_s": a["cpu_s"] - b["cpu_s"],
                "throttling": {
                    k: a["throttling"][k] - b["throttling"].get(k, 0.0) for k in a["throttling"]
                },
            }
        )
    return out


@contextlib.contextmanager
def capped_cluster(
    binary: str | None,
    masters: int,
    cgroups: CpuCgroups | None,
    cap: float,
    period_us: int,
) -> Iterator[BenchCluster]:
    cluster = BenchCluster(binary, masters, cgroups=cgroups, cap=cap, period_us=period_us)
    with cluster:
        yield cluster
