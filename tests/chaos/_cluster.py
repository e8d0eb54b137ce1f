"""A local Redis Cluster of three masters with one replica each, for chaos scenarios.

Six private ``redis-server`` processes (AOF, ``appendfsync always``, as
:class:`redcurrent.testing.RedisServer` starts them) joined by
``redis-cli --cluster create ... --cluster-replicas 1``. A scenario may kill,
fail over or reshard them; :meth:`LocalCluster.wait_healthy` tells when the
cluster agrees again on who serves which slot and every replica is in sync.

The helpers here are blocking (redis-py's sync client with short timeouts): a
scenario calls them between its own awaits, while the consumers and the
producer run in processes of their own.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from redcurrent.testing import RedisServer

__all__ = ["LocalCluster", "Node", "cluster_ports"]


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
class Node:
    """One line of ``CLUSTER NODES`` as one node sees it."""

    id: str
    port: int
    master: bool
    master_id: str | None
    failed: bool
    slots: tuple[tuple[int, int], ...]

    def serves(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)


def _parse_nodes(text: str) -> list[Node]:
    nodes: list[Node] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address, flags = parts[1], set(parts[2].split(","))
        port = int(address.split("@")[0].rsplit(":", 1)[1])
        slots: list[tuple[int, int]] = []
        for item in parts[8:]:
            if item.startswith("["):  # a migrating/importing marker, not an owned range
                continue
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        nodes.append(
            Node(
                id=parts[0],
                port=port,
                master="master" in flags,
                master_id=None if parts[3] == "-" else parts[3],
                failed="fail" in flags or "fail?" in flags,
                slots=tuple(slots),
            )
        )
    return nodes


class LocalCluster:
    """Three masters and three replicas on loopback ports; see the module docstring."""

    def __init__(self, binary: str, *, node_timeout_ms: int = 1500) -> None:
        self.binary = binary
        self.node_timeout_ms = node_timeout_ms
        self.servers: list[RedisServer] = []

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> LocalCluster:
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        args = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            # A replica may always take over, however long it was cut off: on a
            # loaded two-core machine its last contact can look old.
            "--cluster-replica-validity-factor",
            "0",
        )
        self.servers = [RedisServer(self.binary, port=p, extra_args=args) for p in cluster_ports(6)]
        for server in self.servers:
            server.start()
        nodes = [f"127.0.0.1:{s.port}" for s in self.servers]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_healthy()
        return self

    def stop(self) -> None:
        for server in self.servers:
            # SIGKILL first: on SIGTERM a 7.0+ master waits up to
            # shutdown-timeout (10 s) for replicas already gone.
            server.kill()
            server.stop()

    @property
    def url(self) -> str:
        return next(s.url for s in self.servers if s.is_running)

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    # -- looking -------------------------------------------------------------
    def client(self, port: int, **kwargs: Any) -> redis.Redis:
        """A plain (non-cluster) client of one node, without retries."""
        kwargs.setdefault("socket_timeout", 5.0)
        return redis.Redis(
            port=port,
            socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
            **kwargs,
        )

    def call(self, port: int, *args: Any, **kwargs: Any) -> Any:
        with self.client(port, **kwargs) as client:
            return client.execute_command(*args)

    def cluster_info(self, port: int) -> dict[str, str]:
        text = self.call(port, "CLUSTER", "INFO")
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {key: value.strip() for key, value in pairs}

    def nodes(self, port: int) -> list[Node]:
        """The cluster as the node on ``port`` sees it."""
        with self.client(port) as client:
            text = client.execute_command("CLUSTER", "NODES")
        return _parse_nodes(text if isinstance(text, str) else text.decode())

    def owner(self, slot: int) -> tuple[int, int]:
        """``(master port, replica port)`` of ``slot`` by a majority of the live
        nodes' views; 0 for a part no majority sees (mid-failover)."""
        views: list[tuple[int, int]] = []
        for server in self.servers:
            if server.is_running:
                try:
                    views.append(self._owner_in(self.nodes(server.port), slot))
                except (redis.RedisError, OSError):
                    continue
        return max(set(views), key=views.count) if views else (0, 0)

    @staticmethod
    def _owner_in(nodes: list[Node], slot: int) -> tuple[int, int]:
        master = next((n for n in nodes if n.master and n.serves(slot)), None)
        if master is None:
            return 0, 0
        replicas = (n.port for n in nodes if n.master_id == master.id and not n.failed)
        return master.port, next(replicas, 0)

    def errorstats(self, port: int) -> dict[str, int]:
        """Error replies the node sent, by code (``INFO errorstats``): ASK, MOVED ..."""
        info = self.call(port, "INFO", "errorstats")
        return {
            key.removeprefix("errorstat_"): int(value["count"])
            for key, value in info.items()
            if key.startswith("errorstat_")
        }

    # -- waiting -------------------------------------------------------------
    def healthy(self, replicas: int = 3) -> bool:
        """Every live node says ``ok`` and sees the same masters, slots and
        replicas; every live replica is linked to its master and in sync, and
        at least ``replicas`` masters have one."""
        live = [s for s in self.servers if s.is_running]
        ports = {s.port for s in live}
        nodes: list[Node] = []
        try:
            views = []
            for server in live:
                if self.cluster_info(server.port).get("cluster_state") != "ok":
                    return False
                nodes = self.nodes(server.port)
                if any(n.failed for n in nodes if n.port in ports):
                    return False
                views.append(
                    sorted(
                        (n.port, n.master, n.slots, n.master_id) for n in nodes if n.port in ports
                    )
                )
                if not next(n for n in nodes if n.port == server.port).master:
                    repl = self.call(server.port, "INFO", "replication")
                    if repl.get("master_link_status") != "up":
                        return False
                    if int(repl.get("master_sync_in_progress", 1)) != 0:
                        return False
            if any(view != views[0] for view in views):
                return False
            masters = {n for n in nodes if n.master and n.slots and n.port in ports}
            replicated = {n.master_id for n in nodes if not n.master and n.port in ports}
            return len(masters) == 3 and len({m.id for m in masters} & replicated) >= replicas
        except (redis.RedisError, OSError, StopIteration):
            return False

    def wait_healthy(self, replicas: int = 3, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy(replicas):
            if time.monotonic() > deadline:
                raise TimeoutError("the local cluster did not become healthy")
            time.sleep(0.05)
