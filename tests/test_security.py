"""Nothing is ever unpickled or evaluated from message content.

Each hostile payload below would create a marker file if it were unpickled,
evaluated or loaded as YAML (the test first proves that on a control file).
Sent to a running consumer, it either reaches the handler as plain data or
becomes a dead letter with a reason; the marker never appears.
"""

from __future__ import annotations

import pathlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio

from helpers import Recorder, nothing_pending, wait_until
from redcurrent import DecodeError, StartFrom, StreamConsumer, Topic

STREAM = "hostile"
GROUP = "g"


class _Plant:
    """Unpickled, it touches ``path``: what a pickle-trusting consumer would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.path,))


def _pickle_for(path: Path) -> bytes:
    return pickle.dumps(_Plant(path))


def _expression_for(path: Path) -> str:
    return f"__import__('pathlib').Path({str(path)!r}).touch()"


def _yaml_for(path: Path) -> str:
    path_object = f"!!python/object/apply:pathlib.Path [{str(path)!r}]"
    return f"!!python/object/apply:pathlib.Path.touch [{path_object}]"


class Order(msgspec.Struct):
    item: str


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    """The file a payload would create if it were run; checked after each test."""
    control = tmp_path / "control"
    pickle.loads(_pickle_for(control))  # the payloads are live: they do run when trusted
    assert control.exists()
    control.unlink()
    eval(_expression_for(control))
    assert control.exists()
    path = tmp_path / "executed"
    yield path
    assert not path.exists(), "message content was executed"


def _order(entry_id: str) -> tuple[int, ...]:
    return tuple(map(int, entry_id.split("-")))


def _entry(type: bytes, data: bytes, metadata: bytes = b"{}") -> dict[bytes, bytes]:
    return {b"type": type, b"data": data, b"metadata": metadata}


async def test_hostile_payloads_are_data_or_dead_letters(
    redis_client: redis.asyncio.Redis, marker: Path
) -> None:
    blob = _pickle_for(marker)
    expression = _expression_for(marker)
    as_data = [
        # A Python expression, a pickle as text, a jsonpickle-style object: JSON
        # values, handed over exactly as they are.
        _entry(b"job", msgspec.json.encode(expression)),
        _entry(b"job", msgspec.json.encode(blob.decode("latin-1"))),
        _entry(b"job", msgspec.json.encode({"py/reduce": [{"py/function": "os.system"}]})),
        _entry(b"job", b"{}", msgspec.json.encode({"note": expression})),
        _entry(b"order", msgspec.json.encode({"item": expression, "__reduce__": expression})),
    ]
    dead = [
        _entry(b"job", blob),  # a raw pickle: not JSON
        _entry(b"job", _yaml_for(marker).encode()),  # YAML with a Python tag: not JSON
        _entry(b"order", msgspec.json.encode({"__class__": expression})),  # fails the model
        _entry(expression.encode(), b"{}"),  # a type nobody handles
    ]
    seen = Recorder()
    orders = Recorder()
    consumer = StreamConsumer(
        redis_client, STREAM, GROUP, "c1", start=StartFrom.EARLIEST, claim_idle=0.5
    )
    consumer.handler("job")(seen)
    consumer.handler("order", model=Order)(orders)
    async with consumer:
        for fields in as_data + dead:
            await redis_client.xadd(STREAM, fields)
        await seen.wait_for(4, timeout=10)
        await orders.wait_for(1, timeout=10)
        # Nothing pending is also true of an entry not read yet: wait for the
        # dead letters themselves too.
        await wait_until(lambda: consumer.stats.dead_lettered == len(dead), timeout=10)
        await wait_until(nothing_pending(redis_client, STREAM, GROUP), timeout=10)
    topic = Topic(redis_client, STREAM)
    handled = sorted(seen.messages, key=lambda m: _order(m.id))
    assert [m.data for m in handled] == [
        expression,
        blob.decode("latin-1"),
        {"py/reduce": [{"py/function": "os.system"}]},
        {},
    ]
    assert handled[3].metadata == {"note": expression}
    assert [m.data for m in orders.messages] == [Order(item=expression)]
    letters = sorted(await topic.dead_letters(), key=lambda d: _order(d.original_id))
    assert [letter.fields for letter in letters] == dead
    categories = [DecodeError.category_of(letter.reason) for letter in letters]
    # A pickle is not even UTF-8; the YAML is text but not JSON.
    assert categories[:3] == ["invalid_utf8", "invalid_json", "wrong_schema"]
    assert letters[3].error_type == "NoHandlerError"
    assert letters[0].data == blob  # not decodable: kept as the bytes it was


async def test_publishing_never_pickles(redis_client: redis.asyncio.Redis, marker: Path) -> None:
    """An object that only pickle could carry is refused before anything is sent."""
    topic = Topic(redis_client, STREAM)
    with pytest.raises(TypeError):
        await topic.publish("job", _Plant(marker))
    assert await redis_client.exists(STREAM) == 0
