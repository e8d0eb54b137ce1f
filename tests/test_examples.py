"""Every example runs in the test suite, so none of them rots."""

from __future__ import annotations

import ast
import re
from typing import Any

import pytest

from helpers import load_example

ID = r"\d+-\d+"


def section(out: str, title: str) -> str:
    """The lines the demo printed under ``== <title>``, up to the next section."""
    match = re.search(rf"^== {re.escape(title)}\n(.*?)(?=^== |\Z)", out, re.M | re.S)
    assert match is not None, f"no section {title!r} in:\n{out}"
    return match.group(1)


def listed(text: str, pattern: str) -> Any:
    """The Python literal that group 1 of the first match of ``pattern`` shows."""
    match = re.search(pattern, text)
    assert match is not None, f"{pattern!r} not in:\n{text}"
    return ast.literal_eval(match.group(1))


async def test_demo_walks_through_every_feature(
    redis_url: str, redis_client: object, capsys: pytest.CaptureFixture[str]
) -> None:
    await load_example("demo").main(redis_url)
    out = capsys.readouterr().out

    basics = section(out, "publish and consume, with a typed payload")
    sent = re.findall(rf"handled {ID}: email to (\S+) \(metadata (.*)\)", basics)
    assert sorted(sent) == [
        ("ada@example.com", "{'priority': 'high'}"),
        *((f"user{i}@example.com", "{}") for i in range(3)),
    ]
    # An f-string shows a str-enum as "StopReason.STOPPED" before Python 3.12, "stopped" after.
    assert re.search(
        r"stopped: (StopReason\.STOPPED|stopped), stats ConsumerStats\(received=4, handled=4,"
        r" failed=0, claimed=0, retried=0, dead_lettered=0, running=0, held=0\)",
        basics,
    ), basics

    positions = section(out, "start positions: LATEST (default), EARLIEST, or after a given id")
    assert sorted(listed(positions, r"group 'latest' +got (\[.*\])")) == [100]
    assert sorted(listed(positions, r"group 'earliest' +got (\[.*\])")) == [0, 1, 2, 100, 101]
    assert sorted(listed(positions, r"group 'after' +got (\[.*\])")) == [1, 2, 100, 101, 102]

    retries = section(
        out, "a failing handler: retried with rising delivery_count, then a dead letter"
    )
    declined = re.findall(rf"^  ({ID}) delivery (\d): card declined$", retries, re.M)
    assert [n for _, n in declined] == ["1", "2", "3"]
    assert len({entry_id for entry_id, _ in declined}) == 1
    assert re.search(rf"^  {ID} delivery 1: charged ok$", retries, re.M)
    letters = dict(re.findall(rf"^  dead letter {ID} \((\w+)\): (.*)$", retries, re.M))
    assert letters.keys() == {"charge", "refund"}
    assert letters["charge"] == "RuntimeError: card declined"
    assert "no handler for type 'refund'" in letters["refund"]
    assert len(listed(retries, r"replayed as (\[.*\])")) == 2
    assert re.search(rf"^  {ID} delivery 1: charged declined$", retries, re.M)

    crash = section(out, "competing consumers, and a crashed consumer's messages taken over")
    match = re.search(r"handled per consumer: (\{.*\}); claimed from the dead: (\d+)", crash)
    assert match is not None, crash
    assert sum(ast.literal_eval(match.group(1)).values()) == 30
    assert match.group(2) == "5"

    control = section(out, "stop one message for every consumer of every group, then resume it")
    stopped = re.search(rf"stopped ({ID}); stopped ids now \['({ID})'\]", control)
    assert stopped is not None, control
    assert stopped.group(1) == stopped.group(2)
    assert "after 1 s, handled by groups: [] (none: it is stopped)" in control
    assert "resumed; handled by groups: ['a', 'b']" in control

    batches = section(out, "batch handlers: by size or timeout, per type, beside single handlers")
    sizes = [int(n) for n in re.findall(r"sms batch of (\d+):", batches)]
    assert sum(sizes) == 6
    assert max(sizes) <= 4
    recipients = re.findall(r"'(\+1555\d)'", batches)
    assert sorted(recipients) == [f"+1555{i}" for i in range(6)]
    assert "single email to x@y.z" in batches

    cleanup = section(out, "info, and cleanup of entries every group has acknowledged")
    assert "length 4, groups [('mailer', 0, 0)]" in cleanup
    assert "cleanup removed 4; length now 0" in cleanup

    terminate = section(
        out, "terminate a topic: running consumers stop at once; the name can be reused"
    )
    assert "consumer stopped: terminated, auto_stopped=True" in terminate
    assert "keys left: 0" in terminate
    assert "published again: length 1" in terminate
    deleted = section(out, "auto-stop when someone deletes the stream")
    assert "consumer stopped: deleted, auto_stopped=True" in deleted
    assert out.rstrip().endswith("Done.")
