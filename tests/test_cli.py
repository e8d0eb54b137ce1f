"""The operator command line, run through click's CliRunner against a real Redis.

Each command runs in a worker thread (it starts its own event loop with
``anyio.run``) while the test sets the scene and checks the result with its own
client. Output for people is checked for what an operator reads; ``--json``
output is parsed and compared.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
import redis.asyncio as aredis
from click.testing import CliRunner, Result

from helpers import closed_port, wait_until, xadd_raw
from redcurrent import CleanupPolicy, ConfigurationError, Topic, __version__
from redcurrent._cli._app import cli
from redcurrent._dead import DeadLetterWriter
from redcurrent.testing import RedisServer

Run = Callable[..., Awaitable[Result]]


@pytest.fixture
def run(redis_url: str) -> Run:
    """``await run("info", "orders", input=...)``: the command with ``--url`` of the test server."""

    async def invoke(*args: str, input: str | None = None, url: str = redis_url) -> Result:
        call = functools.partial(CliRunner().invoke, cli, [*args, "--url", url], input=input)
        return await anyio.to_thread.run_sync(call)

    return invoke


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


def as_json(result: Result) -> Any:
    return json.loads(ok(result))


def failed(result: Result, code: int = 1) -> str:
    """The one ``Error: ...`` line of a failed command (no traceback, nothing else)."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


async def acked(client: aredis.Redis, topic: Topic, count: int, group: str = "g") -> list[str]:
    """``count`` messages a group ``group`` read and acknowledged."""
    ids = await topic.publish_many([("job", {"n": n}) for n in range(count)])
    await client.xgroup_create(topic.name, group, "$")
    return ids


async def dead_letter(
    client: aredis.Redis, topic: Topic, message_type: str, data: Any, reason: str
) -> str:
    """A message moved to the dead letters as a consumer does it (by group
    ``dlq``, removed afterwards); returns the dead letter's id."""
    await client.xgroup_create(topic.name, "dlq", "$", mkstream=True)
    entry_id = await topic.publish(message_type, data)
    reply = await client.xreadgroup("dlq", "c1", {topic.name: ">"}, count=1)
    _, fields = reply[0][1][0]
    writer = DeadLetterWriter(client, topic.keys, "dlq", "c1")
    assert await writer.move(
        entry_id, fields, reason=reason, error_type="RuntimeError", delivery_count=5
    )
    await client.xgroup_destroy(topic.name, "dlq")
    newest = await client.xrevrange(topic.keys.dead_letters, count=1)
    return str(newest[0][0].decode())


# -- the group ---------------------------------------------------------------------------


def test_help_lists_every_command_and_version_is_the_packages() -> None:
    runner = CliRunner()
    help_text = runner.invoke(cli, ["--help"]).output
    for command in (
        "info",
        "pending",
        "tail",
        "publish",
        "stop-message",
        "resume-message",
        "terminate",
        "cleanup",
        "dead-letters",
        "worker",
    ):
        assert f"  {command} " in help_text, command
    assert "REDCURRENT_URL" in help_text
    version = runner.invoke(cli, ["--version"])
    assert version.exit_code == 0
    assert __version__ in version.output
    sub = runner.invoke(cli, ["dead-letters", "--help"]).output
    assert all(name in sub for name in ("list", "show", "replay", "purge"))


async def test_url_comes_from_the_environment(redis_url: str, redis_client: aredis.Redis) -> None:
    """--url, else REDCURRENT_URL, else REDIS_URL: the first one that is set wins."""
    closed = f"redis://127.0.0.1:{closed_port()}/0"

    async def publish(env: dict[str, str | None], *url: str) -> Result:
        args = ["publish", "env", "t", "{}", *url]
        call = functools.partial(CliRunner().invoke, cli, args, env=env)
        return await anyio.to_thread.run_sync(call)

    ok(await publish({"REDCURRENT_URL": redis_url, "REDIS_URL": closed}))
    ok(await publish({"REDCURRENT_URL": None, "REDIS_URL": redis_url}))
    ok(await publish({"REDCURRENT_URL": closed, "REDIS_URL": closed}, "--url", redis_url))
    assert await redis_client.xlen("env") == 3
    line = failed(await publish({"REDCURRENT_URL": None, "REDIS_URL": closed}))
    assert line.startswith(f"Error: cannot reach Redis at {closed}")


# -- publish, info, pending ----------------------------------------------------------------


async def test_publish_prints_the_id_and_info_shows_the_topic(
    run: Run, redis_client: aredis.Redis
) -> None:
    entry_id = ok(
        await run("publish", "orders", "email", '{"to": "ada"}', "--metadata", '{"p": "1"}')
    )
    entry_id = entry_id.strip()
    entries = await redis_client.xrange("orders")
    assert [e[0].decode() for e in entries] == [entry_id]
    assert entries[0][1] == {b"type": b"email", b"data": b'{"to":"ada"}', b"metadata": b'{"p":"1"}'}

    scheduled = as_json(
        await run("publish", "orders", "email", "[1, 2]", "--delay", "3600", "--json")
    )
    assert scheduled["scheduled"] is True
    assert scheduled["stream"] == "orders"
    assert await Topic(redis_client, "orders").cancel_scheduled(scheduled["id"]) is True
    ok(await run("publish", "orders", "email", "null", "--delay", "60"))  # the one left waiting

    second = await Topic(redis_client, "orders").publish("sms", {"n": 2})
    await redis_client.xgroup_create("orders", "mailer", "0")
    await redis_client.xreadgroup("mailer", "m1", {"orders": ">"}, count=1)
    await Topic(redis_client, "orders").stop_message(second)

    info = as_json(await run("info", "orders", "--json"))
    assert info["stream"] == "orders"
    assert info["length"] == 2
    assert (info["first_id"], info["last_id"]) == (entry_id, second)
    assert info["groups"] == [
        {"name": "mailer", "consumers": 1, "pending": 1, "lag": 1, "last_delivered_id": entry_id}
    ]
    assert [(c["group"], c["name"], c["pending"]) for c in info["consumers"]] == [
        ("mailer", "m1", 1)
    ]
    assert info["stopped"] == [second]
    assert (info["scheduled"], info["dead_letters"]) == (1, 0)

    table = ok(await run("info", "orders"))
    assert "mailer" in table
    assert "m1" in table
    assert second in table
    assert "scheduled" in table
    assert "dead letters" in table


async def test_info_of_a_topic_with_only_scheduled_messages(run: Run) -> None:
    """publish --delay creates the topic before its stream exists."""
    ok(await run("publish", "later", "t", "{}", "--delay", "600"))
    info = as_json(await run("info", "later", "--json"))
    assert (info["length"], info["scheduled"], info["groups"]) == (0, 1, [])
    assert "no consumer groups" in ok(await run("info", "later"))


async def test_publish_reads_the_payload_from_stdin(run: Run, redis_client: aredis.Redis) -> None:
    entry_id = ok(await run("publish", "orders", "t", "-", input='{"from": "stdin"}')).strip()
    assert (await redis_client.xrange("orders"))[0] == (
        entry_id.encode(),
        {b"type": b"t", b"data": b'{"from":"stdin"}', b"metadata": b"{}"},
    )


async def test_pending_lists_the_oldest_first(run: Run, redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    ids = await topic.publish_many([("job", {"n": n}) for n in range(4)])
    await redis_client.xgroup_create("orders", "g", "0")
    await redis_client.xreadgroup("g", "c1", {"orders": ">"}, count=2)
    await redis_client.xreadgroup("g", "c2", {"orders": ">"}, count=1)
    await redis_client.xclaim("orders", "g", "c2", 0, [ids[1]])  # a second delivery
    await redis_client.xack("orders", "g", ids[0])

    report = as_json(await run("pending", "orders", "g", "--json"))
    assert report["pending"] == 2
    rows = [(e["id"], e["consumer"], e["delivery_count"]) for e in report["entries"]]
    assert rows == [(ids[1], "c2", 2), (ids[2], "c2", 1)]
    assert all(e["idle_ms"] >= 0 for e in report["entries"])

    first = as_json(await run("pending", "orders", "g", "--count", "1", "--json"))
    assert [e["id"] for e in first["entries"]] == [ids[1]]
    assert first["pending"] == 2

    table = ok(await run("pending", "orders", "g"))
    assert table.index(ids[1]) < table.index(ids[2])
    assert "c2" in table
    await redis_client.xack("orders", "g", ids[1], ids[2])
    assert "nothing pending" in ok(await run("pending", "orders", "g"))


# -- tail ----------------------------------------------------------------------------------


async def test_tail_prints_entries_from_an_id(run: Run, redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    ids = await topic.publish_many([("email", {"to": "ada"}, {"p": "high"}), ("sms", [1, 2])])
    bad = await xadd_raw(redis_client, "orders", {"type": "x", "data": "{not json"})

    lines = ok(await run("tail", "orders", "--from", "0", "--count", "3")).splitlines()
    assert len(lines) == 3
    assert lines[0].split() == [ids[0], "email", '{"to":"ada"}', '{"p":"high"}']
    assert lines[1].split() == [ids[1], "sms", "[1,2]"]
    assert lines[2].startswith(bad)
    assert "undecodable" in lines[2]

    records = [
        json.loads(line)
        for line in ok(
            await run("tail", "orders", "--from", ids[0], "--count", "2", "--json")
        ).splitlines()
    ]
    assert records[0] == {"id": ids[1], "type": "sms", "data": [1, 2], "metadata": {}}
    assert records[1]["id"] == bad
    assert "invalid_json" in records[1]["error"]
    assert records[1]["fields"] == {"type": "x", "data": "{not json"}


async def test_tail_follows_new_entries(run: Run, redis_client: aredis.Redis) -> None:
    """Without --from only entries published after it started are printed."""
    topic = Topic(redis_client, "orders")
    await topic.publish("old", {})
    results: list[Result] = []

    async def tail() -> None:
        results.append(await run("tail", "orders", "--count", "2", "--json"))

    async def blocked_in_xread() -> bool:
        clients = await redis_client.client_list()
        return any(c.get("cmd") == "xread" for c in clients)

    async with anyio.create_task_group() as tg:
        tg.start_soon(tail)
        await wait_until(blocked_in_xread)
        new = [await topic.publish("new", {"n": 1}), await topic.publish("new", {"n": 2})]
    records = [json.loads(line) for line in ok(results[0]).splitlines()]
    assert [(r["id"], r["type"], r["data"]) for r in records] == [
        (new[0], "new", {"n": 1}),
        (new[1], "new", {"n": 2}),
    ]


# -- stop, resume --------------------------------------------------------------------------


async def test_stop_and_resume_a_message(run: Run, redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    ids = await topic.publish_many([("job", {}), ("job", {})])
    stopped = as_json(await run("stop-message", "orders", ids[1], "--json"))
    assert stopped == {
        "stream": "orders",
        "id": ids[1],
        "stopped": True,
        "changed": True,
        "in_stream": True,
    }
    assert (await topic.info()).stopped == [ids[1]]
    assert "already stopped" in ok(await run("stop-message", "orders", ids[1]))

    future = f"{int(ids[1].split('-')[0]) + 10_000}-0"
    assert "in advance" in ok(await run("stop-message", "orders", future))
    assert (await topic.info()).stopped == [ids[1], future]

    assert (
        ok(await run("resume-message", "orders", ids[1])).strip() == f"resumed {ids[1]} on 'orders'"
    )
    resumed = as_json(await run("resume-message", "orders", ids[1], "--json"))
    assert resumed["changed"] is False
    assert "was not stopped" in ok(await run("resume-message", "orders", ids[1]))
    assert (await topic.info()).stopped == [future]
    # Leading zeros and a bare millisecond part are the same id.
    ok(await run("resume-message", "orders", "0" + future.split("-")[0]))
    assert (await topic.info()).stopped == []


async def test_stopping_an_id_the_stream_lost_is_an_error(
    run: Run, redis_client: aredis.Redis
) -> None:
    topic = Topic(redis_client, "orders")
    ids = await topic.publish_many([("job", {}), ("job", {})])
    await redis_client.xdel("orders", ids[0])
    line = failed(await run("stop-message", "orders", ids[0]))
    assert ids[0] in line
    assert "no entry" in line
    assert (await topic.info()).stopped == []


# -- terminate -----------------------------------------------------------------------------


async def test_terminate_asks_first_and_says_what_went(
    run: Run, redis_client: aredis.Redis
) -> None:
    topic = Topic(redis_client, "orders")
    await acked(redis_client, topic, 3)
    await topic.stop_message("1-0")
    await topic.publish("later", {}, delay=600)

    refused = await run("terminate", "orders", input="n\n")
    assert refused.exit_code == 1
    assert "Aborted" in refused.output
    assert "3 entries and 1 group ('g')" in refused.output
    assert await redis_client.exists("orders", topic.keys.stopped, topic.keys.scheduled) == 3

    done = await run("terminate", "orders", input="y\n")
    assert "terminated 'orders': removed 3 entries and 1 group" in ok(done)
    assert await redis_client.exists(*topic.keys.owned()) == 0

    await acked(redis_client, topic, 2, group="a")
    report = as_json(await run("terminate", "orders", "--yes", "--json"))
    assert report == {
        "stream": "orders",
        "terminated": True,
        "removed": {"entries": 2, "groups": ["a"], "dead_letters": 0, "stopped": 0, "scheduled": 0},
    }
    assert await redis_client.exists("orders") == 0


# -- cleanup -------------------------------------------------------------------------------


async def test_cleanup_removes_what_every_group_acknowledged(
    run: Run, redis_client: aredis.Redis
) -> None:
    topic = Topic(redis_client, "orders")
    ids = await topic.publish_many([("job", {"n": n}) for n in range(50)])
    await redis_client.xgroup_create("orders", "g", ids[29])  # 30 read and acknowledged

    kept = ok(await run("cleanup", "orders"))  # the default retention keeps young entries
    assert kept.strip() == "removed 0 of 50 entries from 'orders' (50 left)"

    report = as_json(
        await run("cleanup", "orders", "--min-retention", "0", "--batch-size", "7", "--json")
    )
    assert report == {
        "stream": "orders",
        "removed": 30,
        "length_before": 50,
        "length": 20,
        "stopped_dropped": 0,
        "dead_letters_removed": 0,
    }
    assert (await redis_client.xrange("orders", count=1))[0][0].decode() == ids[30]


async def test_cleanup_prints_a_plain_summary_off_a_terminal(
    run: Run, redis_client: aredis.Redis
) -> None:
    topic = Topic(redis_client, "orders")
    await dead_letter(redis_client, topic, "t", {}, "boom")
    await acked(redis_client, topic, 2_000)
    await topic.stop_message("1-0")  # below every id: its entry is gone for good
    out = ok(
        await run(
            "cleanup", "orders", "--min-retention", "0", "--batch-size", "10",
            "--dead-letter-retention", "0",
        )
    )  # fmt: skip
    assert out.splitlines() == [
        "removed 2001 of 2001 entries from 'orders' (0 left); dropped 1 stopped id of gone "
        "entries; removed 1 dead letter"
    ]
    assert await redis_client.xlen("orders") == 0
    assert await redis_client.xlen(topic.keys.dead_letters) == 0


# -- dead letters --------------------------------------------------------------------------


async def test_dead_letters_list_show_filter(run: Run, redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    d1 = await dead_letter(redis_client, topic, "email", {"to": "ada"}, "RuntimeError: SMTP down")
    d2 = await dead_letter(redis_client, topic, "sms", [1], "ValueError: bad number")
    d3 = await dead_letter(redis_client, topic, "email", {"to": "bob"}, "TimeoutError: smtp slow")

    listed = as_json(await run("dead-letters", "list", "orders", "--json"))
    assert [d["id"] for d in listed["dead_letters"]] == [d1, d2, d3]
    first = listed["dead_letters"][0]
    assert (first["type"], first["data"], first["reason"]) == (
        "email",
        {"to": "ada"},
        "RuntimeError: SMTP down",
    )
    assert (first["group"], first["consumer"], first["delivery_count"]) == ("dlq", "c1", 5)

    def ids(result: Result) -> list[str]:
        return [d["id"] for d in as_json(result)["dead_letters"]]

    assert ids(await run("dead-letters", "list", "orders", "--type", "email", "--json")) == [d1, d3]
    assert ids(await run("dead-letters", "list", "orders", "--error", "smtp", "--json")) == [d1, d3]
    assert (
        ids(
            await run(
                "dead-letters", "list", "orders", "--error", "smtp", "--type", "sms", "--json"
            )
        )
        == []
    )
    assert ids(await run("dead-letters", "list", "orders", "--count", "2", "--json")) == [d1, d2]
    assert ids(await run("dead-letters", "list", "orders", "--older-than", "3600", "--json")) == []
    assert ids(await run("dead-letters", "list", "orders", "--older-than", "0", "--json")) == [
        d1,
        d2,
        d3,
    ]

    table = ok(await run("dead-letters", "list", "orders"))
    assert all(d in table for d in (d1, d2, d3))
    assert "ValueError: bad number" in table
    assert "no dead letters match" in ok(
        await run("dead-letters", "list", "orders", "--type", "fax")
    )

    shown = as_json(await run("dead-letters", "show", "orders", d2, "--json"))
    assert (shown["id"], shown["type"], shown["data"], shown["error_type"]) == (
        d2,
        "sms",
        [1],
        "RuntimeError",
    )
    assert shown["fields"] == {"type": "sms", "data": "[1]", "metadata": "{}"}
    detail = ok(await run("dead-letters", "show", "orders", d2))
    assert "ValueError: bad number" in detail
    assert "original id" in detail


async def test_dead_letters_replay_and_purge(run: Run, redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    d1 = await dead_letter(redis_client, topic, "email", {"to": "ada"}, "RuntimeError: down")
    d2 = await dead_letter(redis_client, topic, "sms", [1], "ValueError: bad")
    d3 = await dead_letter(redis_client, topic, "email", {"to": "bob"}, "RuntimeError: down")
    length = await redis_client.xlen("orders")

    replayed = as_json(await run("dead-letters", "replay", "orders", "--type", "email", "--json"))
    assert replayed["replayed"] == [d1, d3]
    entries = await redis_client.xrange("orders", min=replayed["new_ids"][0])
    assert [(e[0].decode(), e[1][b"data"]) for e in entries] == [
        (replayed["new_ids"][0], b'{"to":"ada"}'),
        (replayed["new_ids"][1], b'{"to":"bob"}'),
    ]
    assert await redis_client.xlen("orders") == length + 2
    assert [d.id for d in await topic.dead_letters()] == [d2]

    d4 = await dead_letter(redis_client, topic, "fax", {}, "NoHandlerError")
    assert "replayed 1 dead letter to 'orders'" in ok(
        await run("dead-letters", "replay", "orders", d4)
    )
    assert "no dead letters match" in ok(
        await run("dead-letters", "replay", "orders", "--type", "fax")
    )

    refused = await run("dead-letters", "purge", "orders", input="n\n")
    assert refused.exit_code == 1
    assert "Delete 1 dead letter of 'orders'" in refused.output
    assert [d.id for d in await topic.dead_letters()] == [d2]
    purged = as_json(await run("dead-letters", "purge", "orders", "--yes", "--json"))
    assert purged == {"stream": "orders", "deleted": 1, "ids": [d2]}
    assert await topic.dead_letters() == []
    assert "deleted 0 dead letters" in ok(await run("dead-letters", "purge", "orders"))
    assert "Delete" not in (await run("dead-letters", "purge", "orders")).output  # nothing to ask


async def test_purge_deletes_only_the_selection(run: Run, redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    d1 = await dead_letter(redis_client, topic, "a", {}, "KeyError: x")
    await dead_letter(redis_client, topic, "b", {}, "KeyError: y")
    d3 = await dead_letter(redis_client, topic, "c", {}, "OSError: z")
    done = await run("dead-letters", "purge", "orders", "--error", "keyerror", input="y\n")
    assert "Delete 2 dead letters of 'orders' for good?" in done.output
    assert "deleted 2 dead letters" in ok(done)
    assert [d.id for d in await topic.dead_letters()] == [d3]
    gone = failed(await run("dead-letters", "purge", "orders", d1, d3, "--yes"))
    assert gone == f"Error: stream 'orders' has no dead letter {d1}"
    assert "deleted 1 dead letter of 'orders'" in ok(
        await run("dead-letters", "purge", "orders", d3, "--yes")
    )
    assert await topic.dead_letters() == []


# -- bad input -----------------------------------------------------------------------------

ON_A_STREAM = [
    ("info", "{s}"),
    ("pending", "{s}", "g"),
    ("tail", "{s}", "--count", "1"),
    ("stop-message", "{s}", "1-0"),
    ("resume-message", "{s}", "1-0"),
    ("terminate", "{s}", "--yes"),
    ("cleanup", "{s}"),
    ("dead-letters", "list", "{s}"),
    ("dead-letters", "show", "{s}", "1-0"),
    ("dead-letters", "replay", "{s}"),
    ("dead-letters", "purge", "{s}", "--yes"),
]


def _args(command: tuple[str, ...], stream: str) -> list[str]:
    return [arg.replace("{s}", stream) for arg in command]


async def test_an_unknown_stream_is_an_error(run: Run, redis_client: aredis.Redis) -> None:
    await Topic(redis_client, "other").publish("t", {})
    for command in ON_A_STREAM:
        line = failed(await run(*_args(command, "nope")))
        assert line == "Error: stream 'nope' does not exist", command
    await redis_client.set("plain", "x")
    for command in ON_A_STREAM:
        line = failed(await run(*_args(command, "plain")))
        assert line == "Error: key 'plain' holds a string, not a stream", command
    assert await redis_client.get("plain") == b"x"


async def test_an_unknown_group_is_an_error(run: Run, redis_client: aredis.Redis) -> None:
    await acked(redis_client, Topic(redis_client, "orders"), 1, group="workers")
    line = failed(await run("pending", "orders", "nope"))
    assert line == "Error: stream 'orders' has no group 'nope' (groups: 'workers')"


async def test_malformed_input_is_a_usage_error(run: Run, redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    await topic.publish("t", {})
    for args in (
        ("publish", "orders", "t", "{not json"),
        ("publish", "orders", "t", "{}", "--metadata", "[1"),
        ("publish", "orders", "t", "{}", "--metadata", '{"n": 1}'),
        ("stop-message", "orders", "abc"),
        ("resume-message", "orders", "1-2-3"),
        ("tail", "orders", "--from", "yesterday"),
        ("dead-letters", "show", "orders", "x"),
        ("dead-letters", "replay", "orders", "1-0", "nope"),
        ("dead-letters", "purge", "orders", "-", "--yes"),
        ("publish", "orders", "", "{}"),
        ("info", ""),
        ("cleanup", "orders", "--min-retention", "inf"),
    ):
        line = failed(await run(*args), code=2)
        assert any(
            word in line
            for word in ("not valid JSON", "id", "metadata", "type", "name", "retention")
        ), line
    assert await redis_client.xlen("orders") == 1
    assert (await topic.info()).stopped == []
    line = failed(await run("info", "orders", url="http://localhost"), code=2)
    assert line.startswith("Error: invalid --url 'http://localhost'")


async def test_a_wrong_dead_letter_id_is_an_error(run: Run, redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    known = await dead_letter(redis_client, topic, "t", {}, "boom")
    for args in (
        ("dead-letters", "show", "orders", "1-0"),
        ("dead-letters", "replay", "orders", known, "1-0"),
        ("dead-letters", "purge", "orders", "1-0", "--yes"),
    ):
        assert failed(await run(*args)) == "Error: stream 'orders' has no dead letter 1-0"
    assert [d.id for d in await topic.dead_letters()] == [known]  # nothing replayed


async def test_an_unreachable_server_is_one_line(run: Run) -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    for command in (*ON_A_STREAM, ("publish", "{s}", "t", "{}")):
        line = failed(await run(*_args(command, "orders"), url=url))
        assert line.startswith(f"Error: cannot reach Redis at {url}: "), (command, line)


@pytest.mark.private_server
async def test_wrong_password_and_acl_denials(run: Run, private_redis: RedisServer) -> None:
    admin = aredis.Redis.from_url(private_redis.url)
    try:
        await Topic(admin, "orders").publish("t", {})
        await admin.xgroup_create("orders", "g", "0")
        # May read key types and publish, but no XINFO/XPENDING (+@stream minus those).
        await admin.execute_command(
            "ACL", "SETUSER", "ops", "on", ">s3cret", "~*", "&*", "+@all", "-xinfo", "-xpending"
        )
        base = f"127.0.0.1:{private_redis.port}/0"

        line = failed(await run("info", "orders", url=f"redis://ops:hunter2@{base}"))
        assert line.startswith(f"Error: Redis at redis://ops:***@{base} refused the credentials")
        assert "hunter2" not in line

        denied = failed(await run("info", "orders", url=f"redis://ops:s3cret@{base}"))
        assert "denied" in denied
        assert "orders" in denied
        denied = failed(await run("pending", "orders", "g", url=f"redis://ops:s3cret@{base}"))
        assert "denied" in denied
        assert "ACL" in denied
        # What the user may do still works.
        ok(await run("publish", "orders", "t", "{}", url=f"redis://ops:s3cret@{base}"))

        await admin.config_set("requirepass", "adminpass")
        line = failed(await run("info", "orders", url=f"redis://{base}"))
        assert "refused the credentials" in line
    finally:
        await admin.aclose()


# -- the library hooks the command line needs ----------------------------------------------


async def test_cleanup_reports_each_step(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    await acked(redis_client, topic, 25)
    steps: list[int] = []
    removed = await topic.cleanup(
        CleanupPolicy(min_retention=0, batch_size=10), on_progress=steps.append
    )
    assert removed == 25
    assert sum(steps) == 25
    assert steps[:3] == [10, 10, 5]


async def test_delete_dead_letters(redis_client: aredis.Redis) -> None:
    topic = Topic(redis_client, "orders")
    d1 = await dead_letter(redis_client, topic, "a", {}, "x")
    d2 = await dead_letter(redis_client, topic, "b", {}, "y")
    with pytest.raises(ConfigurationError, match="not a stream entry id"):
        await topic.delete_dead_letters([d1, "nope"])
    with pytest.raises(ConfigurationError, match="iterable"):
        await topic.delete_dead_letters(d1)
    assert [d.id for d in await topic.dead_letters()] == [d1, d2]
    assert await topic.delete_dead_letters([d1, "1-0"]) == 1
    assert await topic.delete_dead_letters([d1]) == 0  # a retry changes nothing
    assert await topic.delete_dead_letters([]) == 0
    assert [d.id for d in await topic.dead_letters()] == [d2]
