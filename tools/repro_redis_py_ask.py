"""Minimal reproduction: redis.asyncio.RedisCluster fails every write to a key in a
slot being migrated (the ASK window) once the target node has >= 2 idle pooled
connections.

    python tools/repro_redis_py_ask.py            # uses redis-server from PATH
    REDIS_SERVER=/path/to/redis-server python tools/repro_redis_py_ask.py

Needs only redis-py and a redis-server binary (>= 6.2). Starts two private
cluster-enabled servers on free ports in a temporary directory, splits the slots
between nodes A and B, puts one slot in the ASK window by hand (IMPORTING on B, MIGRATING on
A, one key migrated to B), opens 2 idle connections to B through the client,
then writes a new key of that slot 20 times.

Mechanism (redis/asyncio/cluster.py, redis-py 8.1.0): on an AskError,
``RedisCluster._execute_command`` sends ``ASKING`` as a separate command,
``await target_node.execute_command("ASKING")``, which takes a connection from
the node's free deque (``ClusterNode.acquire_connection``: ``popleft``) and
puts it back at the other end (``ClusterNode.release``: ``append``). The real
command then takes the next free connection, which is a different one whenever
the node has >= 2 idle connections, so it is sent without ASKING; B answers
``MOVED`` to A, A answers ``ASK`` to B, and so on. With an even number of idle
connections the ASKINGs and the commands keep landing on disjoint connections
until the request TTL (16) runs out: ``ClusterError('TTL exhausted.')``. With an
odd number (>= 3) a later retry happens to land on a connection that still
carries an unused ASKING flag from an earlier round and succeeds (that stale
flag is a bug too: it applies to whatever that connection sends next). Every 5th MOVED the client
also closes all its connections (``reinitialize_steps``). With 0 or 1 idle
connections the ASKING and the command share one connection and it works, so
the bug shows under load only. Redis's ASKING flag is per connection and
applies to the next command only: ASKING and the command must be sent on the
same connection, back to back (as redis-py's sync cluster client does).

Exit status: 0 if all writes succeed (bug absent), 1 if any failed (bug present).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterError, RedisError

WRITES = 20
IDLE_CONNECTIONS = 2  # any even number; see below for odd ones


def free_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def start_node(binary: str, port: int, workdir: str) -> subprocess.Popen[bytes]:
    nodedir = os.path.join(workdir, str(port))
    os.makedirs(nodedir)
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", nodedir, "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port).ping()
            return proc
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait_for(predicate, what: str, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def writes_in_the_ask_window(port_a: int, port_b: int) -> int:
    """The failing writes, through redis.asyncio.RedisCluster; returns how many failed."""
    client = RedisCluster(host="127.0.0.1", port=port_a)
    await client.initialize()
    try:
        node_b = client.get_node(host="127.0.0.1", port=port_b)
        assert node_b is not None
        # Concurrent commands open connections to B, which then sit idle in the
        # node's pool (any busy client has some).
        pings = [
            client.execute_command("PING", target_nodes=node_b) for _ in range(IDLE_CONNECTIONS)
        ]
        await asyncio.gather(*pings)
        print(f"idle connections to B: {len(node_b._free)}")

        failed = 0
        first_error: RedisError | None = None
        for i in range(WRITES):
            try:
                await client.set("{repro}new", str(i))
            except ClusterError as exc:  # ClusterError('TTL exhausted.')
                failed += 1
                first_error = first_error or exc
        what = f" ({type(first_error).__name__}: {first_error})" if first_error else ""
        print(f"writes to a new key of the migrating slot: {WRITES - failed}/{WRITES} ok, "
              f"{failed}/{WRITES} failed{what}")  # fmt: skip

        # Control: ASKING and SET sent together on one connection of B succeed.
        conn = node_b.acquire_connection()
        try:
            await conn.send_packed_command(
                conn.pack_commands([("ASKING",), ("SET", "{repro}new", "ok")])
            )
            replies = [await conn.read_response(), await conn.read_response()]
        finally:
            node_b.release(conn)
        print(f"control, ASKING + SET on one connection of B: {replies}")
        return failed
    finally:
        await client.aclose()


def main() -> int:
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if binary is None:
        print("needs a redis-server binary (PATH or REDIS_SERVER)")
        return 2
    print(f"redis-py {redis.__version__}")
    print(subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip())
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as workdir:
        try:
            port_a, port_b = free_port(), free_port()
            procs = [start_node(binary, p, workdir) for p in (port_a, port_b)]
            a, b = redis.Redis(port=port_a), redis.Redis(port=port_b)
            a.execute_command("CLUSTER", "ADDSLOTS", *range(8192))
            b.execute_command("CLUSTER", "ADDSLOTS", *range(8192, 16384))
            a.execute_command("CLUSTER", "MEET", "127.0.0.1", str(port_b))
            id_a = a.execute_command("CLUSTER", "MYID").decode()
            id_b = b.execute_command("CLUSTER", "MYID").decode()

            def ready() -> bool:
                info = [n.execute_command("CLUSTER", "INFO").decode() for n in (a, b)]
                shards = [len(n.execute_command("CLUSTER", "SLOTS")) for n in (a, b)]
                return all("cluster_state:ok" in i for i in info) and shards == [2, 2]

            wait_for(ready, "the two-node cluster")

            # The ASK window, by hand: the slot of "{repro}" migrating from A to
            # B, one key of it already moved to B.
            slot = int(a.execute_command("CLUSTER", "KEYSLOT", "{repro}"))  # 6120: on A
            a.set("{repro}moved", "1")
            b.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", id_a)
            a.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", id_b)
            a.migrate("127.0.0.1", port_b, "{repro}moved", 0, 5000)
            print(f"slot {slot}: MIGRATING on A :{port_a}, IMPORTING on B :{port_b}")
            a.close()
            b.close()

            failed = asyncio.run(writes_in_the_ask_window(port_a, port_b))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)
    print("BUG PRESENT" if failed else "bug absent")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
