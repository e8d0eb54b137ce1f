"""Every Lua script of ``redcurrent._scripts``, called directly on a real server
with several ids (>= 3) and with a large batch (> 500 ids).

Lua truncates a multi-value expression that is not the last argument of a call
to ONE value (``redis.call('X', unpack(t), 'OPT')`` passes one element of ``t``),
and scripts that work through ids in chunks can be off by one at a chunk's
edge. Tests that pass one id at a time see neither, so every script here gets
several ids, and those taking a list also get more than 500 (one internal chunk)
and more than 1,000 (one chunk of the lease keeper).
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio

from helpers import pel_of, wait_until
from redcurrent import Topic, _scripts
from redcurrent._keys import TopicKeys

STREAM = "scripted"
GROUP = "g"
KEYS = TopicKeys(STREAM)

#: Entries are left alone until every one of them is at least this idle (ms) ...
AGED_MS = 400
#: ... and a script that resets idle times must bring them all below this.
FRESH_MS = 300


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def pel(client: redis.asyncio.Redis) -> dict[str, tuple[str, int, int]]:
    """The group's pending list: id -> (consumer, idle ms, delivery count)."""
    return await pel_of(client, STREAM, GROUP)


async def deliver(client: redis.asyncio.Redis, n: int, consumer: str) -> list[str]:
    """Publish ``n`` messages and read exactly those as ``consumer`` (left pending)."""
    if not await client.exists(STREAM):
        await client.xgroup_create(STREAM, GROUP, id="$", mkstream=True)
    ids = await Topic(client, STREAM).publish_many([("job", {"n": i}) for i in range(n)])
    reply = await client.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=n)
    got = [_s(entry_id) for entry_id, _ in reply[0][1]]
    assert got == ids
    return ids


async def wait_aged(client: redis.asyncio.Redis, ids: list[str]) -> None:
    """Wait (polling the PEL) until every one of ``ids`` is idle >= AGED_MS."""

    async def aged() -> bool:
        rows = await pel(client)
        return all(rows[i][1] >= AGED_MS for i in ids)

    await wait_until(aged, timeout=10)


def script(client: redis.asyncio.Redis, name: str) -> Any:
    # Looked up at call time: the module may be edited while the suite runs.
    return client.register_script(getattr(_scripts, name))


def interleave(*lists: list[str]) -> list[str]:
    out: list[str] = []
    longest = max(len(x) for x in lists)
    for i in range(longest):
        out += [x[i] for x in lists if i < len(x)]
    return out


# -- REFRESH_LEASE -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 7, 499, 500, 501, 1200])
async def test_refresh_lease_renews_every_owned_id(
    redis_client: redis.asyncio.Redis, n: int
) -> None:
    mine = await deliver(redis_client, n, "c1")
    await wait_aged(redis_client, mine)
    lost = await script(redis_client, "REFRESH_LEASE")(keys=[STREAM], args=[GROUP, "c1", 0, *mine])
    rows = await pel(redis_client)
    stale = [i for i in mine if rows[i][1] >= FRESH_MS]
    assert not stale, f"{len(stale)} of {n} held ids were not renewed (first: {stale[:5]})"
    assert all(rows[i][0] == "c1" for i in mine)
    assert all(rows[i][2] == 1 for i in mine)  # a renewal is not a delivery
    assert list(lost) == []


@pytest.mark.parametrize("n", [3, 1200])
async def test_refresh_lease_reports_what_others_own_and_leaves_it_alone(
    redis_client: redis.asyncio.Redis, n: int
) -> None:
    mine = await deliver(redis_client, n, "c1")
    theirs = await deliver(redis_client, max(3, n // 2), "c2")
    acked = await deliver(redis_client, 3, "c1")
    await redis_client.xack(STREAM, GROUP, *acked)
    never = ["1-1", "2-0", "3-7"]  # not pending at all
    await wait_aged(redis_client, mine + theirs)
    args = interleave(mine, theirs, acked, never)
    lost = await script(redis_client, "REFRESH_LEASE")(keys=[STREAM], args=[GROUP, "c1", 0, *args])
    rows = await pel(redis_client)
    assert sorted(_s(i) for i in lost) == sorted(theirs + acked + never)
    assert [i for i in mine if rows[i][1] >= FRESH_MS] == []
    # Another consumer's entries keep their owner, idle time and count.
    assert all(rows[i][0] == "c2" and rows[i][1] >= AGED_MS and rows[i][2] == 1 for i in theirs)
    assert not set(acked + never) & rows.keys()  # nothing acked came back to the PEL


@pytest.mark.parametrize("n", [3, 1200])
async def test_refresh_lease_hands_every_id_back(redis_client: redis.asyncio.Redis, n: int) -> None:
    """With idle = claim_idle (a stop), every held entry is claimable by a peer at once."""
    mine = await deliver(redis_client, n, "c1")
    lost = await script(redis_client, "REFRESH_LEASE")(
        keys=[STREAM], args=[GROUP, "c1", 30_000, *mine]
    )
    assert list(lost) == []
    rows = await pel(redis_client)
    not_back = [i for i in mine if rows[i][1] < 30_000]
    assert not not_back, f"{len(not_back)} of {n} ids were not handed back"
    # A peer with claim_idle=30 s takes them all in one step.
    reply = await redis_client.execute_command(
        "XAUTOCLAIM", STREAM, GROUP, "peer", 29_000, "0-0", "COUNT", n + 10
    )
    assert sorted(_s(i) for i, _ in reply[1]) == sorted(mine)


# -- SET_DELIVERY_COUNTS -------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 1200])
async def test_set_delivery_counts_sets_every_count(
    redis_client: redis.asyncio.Redis, n: int
) -> None:
    mine = await deliver(redis_client, n, "c1")
    theirs = await deliver(redis_client, 3, "c2")
    wanted = {entry_id: (k * 7) % 11 for k, entry_id in enumerate(mine)}  # includes 0
    args: list[Any] = [GROUP, "c1"]
    for entry_id in interleave(mine, theirs):
        args += (entry_id, wanted.get(entry_id, 9))
    done = await script(redis_client, "SET_DELIVERY_COUNTS")(keys=[STREAM], args=args)
    assert done == n
    rows = await pel(redis_client)
    wrong = {i: rows[i][2] for i in mine if rows[i][2] != wanted[i]}
    assert not wrong, f"{len(wrong)} of {n} counts not set: {list(wrong.items())[:5]}"
    assert all(rows[i][0] == "c1" for i in mine)
    assert all(rows[i][0] == "c2" and rows[i][2] == 1 for i in theirs)  # not ours: untouched


# -- DEAD_LETTER ------------------------------------------------------------------------------


def dead_letter_args(entry_id: str, fields: list[tuple[bytes, bytes]]) -> list[Any]:
    args: list[Any] = [GROUP, entry_id]
    for key, value in fields:
        args += (key, value)
    args += ("dlq:original_id", entry_id, "dlq:reason", "boom", "dlq:group", GROUP)
    return args


async def test_dead_letter_moves_each_of_several_entries_once(
    redis_client: redis.asyncio.Redis,
) -> None:
    ids = await deliver(redis_client, 4, "c1")
    entries = {_s(i): f for i, f in await redis_client.xrange(STREAM)}
    move = script(redis_client, "DEAD_LETTER")
    dead_ids = []
    for entry_id in ids[:3]:
        fields = list(entries[entry_id].items())
        dead_ids.append(
            await move(keys=[STREAM, KEYS.dead_letters], args=dead_letter_args(entry_id, fields))
        )
    assert all(d is not None for d in dead_ids)
    # A second move of an entry that is no longer pending copies nothing.
    again = await move(
        keys=[STREAM, KEYS.dead_letters],
        args=dead_letter_args(ids[0], list(entries[ids[0]].items())),
    )
    assert again is None
    assert list((await pel(redis_client)).keys()) == [ids[3]]
    letters = await redis_client.xrange(KEYS.dead_letters)
    assert [i for i, _ in letters] == dead_ids
    for (_, fields), entry_id in zip(letters, ids[:3], strict=True):
        original = [(k, v) for k, v in fields.items() if not k.startswith(b"dlq:")]
        assert original == list(entries[entry_id].items())  # byte for byte, in order
        assert fields[b"dlq:original_id"] == entry_id.encode()


async def test_dead_letter_keeps_every_field_of_a_wide_entry(
    redis_client: redis.asyncio.Redis,
) -> None:
    await redis_client.xgroup_create(STREAM, GROUP, id="$", mkstream=True)
    fields = [(f"f{k}".encode(), f"v{k}".encode()) for k in range(600)]
    entry_id = _s(await redis_client.xadd(STREAM, dict(fields)))  # type: ignore[arg-type]
    await redis_client.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=10)
    dead_id = await script(redis_client, "DEAD_LETTER")(
        keys=[STREAM, KEYS.dead_letters], args=dead_letter_args(entry_id, fields)
    )
    [(got_id, got)] = await redis_client.xrange(KEYS.dead_letters)
    assert got_id == dead_id
    assert [(k, v) for k, v in got.items() if not k.startswith(b"dlq:")] == fields
    assert await pel(redis_client) == {}


# -- REPLAY --------------------------------------------------------------------------------------


async def test_replay_puts_back_several_dead_letters(redis_client: redis.asyncio.Redis) -> None:
    ids = await deliver(redis_client, 4, "c1")
    entries = {_s(i): list(f.items()) for i, f in await redis_client.xrange(STREAM)}
    move = script(redis_client, "DEAD_LETTER")
    dead = [
        _s(await move(keys=[STREAM, KEYS.dead_letters], args=dead_letter_args(i, entries[i])))
        for i in ids
    ]
    # A dead letter of an entry that was gone before it died: nothing to put back.
    empty = _s(await redis_client.xadd(KEYS.dead_letters, {"dlq:reason": "gone"}))
    asked = [dead[0], "1-1", dead[1], empty, dead[2], dead[3]]
    out = await script(redis_client, "REPLAY")(keys=[STREAM, KEYS.dead_letters], args=asked)
    assert len(out) == len(asked)
    assert [o is None for o in out] == [False, True, False, True, False, False]
    new_ids = [_s(o) for o in out if o is not None]
    replayed = {
        _s(i): list(f.items()) for i, f in await redis_client.xrange(STREAM, min=new_ids[0])
    }
    assert list(replayed) == new_ids
    assert [replayed[n] for n in new_ids] == [entries[i] for i in ids]
    assert [_s(i) for i, _ in await redis_client.xrange(KEYS.dead_letters)] == [empty]


async def test_replay_puts_back_a_large_batch(redis_client: redis.asyncio.Redis) -> None:
    n = 1200
    pipe = redis_client.pipeline(transaction=False)
    for k in range(n):
        pipe.xadd(
            KEYS.dead_letters,
            {"type": "job", "data": f'{{"n":{k}}}', "metadata": "{}", "dlq:reason": "r"},
        )
    dead = [_s(i) for i in await pipe.execute()]
    out = await script(redis_client, "REPLAY")(keys=[STREAM, KEYS.dead_letters], args=dead)
    assert len(out) == n
    assert all(o is not None for o in out)
    entries = await redis_client.xrange(STREAM)
    assert [_s(i) for i, _ in entries] == [_s(o) for o in out]
    assert [f[b"data"] for _, f in entries] == [f'{{"n":{k}}}'.encode() for k in range(n)]
    assert all(not any(k.startswith(b"dlq:") for k in f) for _, f in entries)
    assert await redis_client.xlen(KEYS.dead_letters) == 0


# -- TERMINATE ---------------------------------------------------------------------------------


async def test_terminate_deletes_every_key_and_announces(
    redis_client: redis.asyncio.Redis,
) -> None:
    await deliver(redis_client, 3, "c1")
    await redis_client.xadd(KEYS.dead_letters, {"dlq:reason": "x"})
    await redis_client.sadd(KEYS.stopped, "1-1", "2-2", "3-3")
    await redis_client.set(KEYS.cleanup_lock, "me")
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(KEYS.control_channel)
    try:
        deleted = await script(redis_client, "TERMINATE")(
            keys=list(KEYS.owned()), args=[KEYS.control_channel]
        )
        assert deleted == 4
        assert await redis_client.exists(*KEYS.owned()) == 0
        with anyio.fail_after(5):
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    break
        assert message["data"] == b"terminate"
    finally:
        await pubsub.aclose()


async def test_terminate_deletes_a_large_batch_of_keys(redis_client: redis.asyncio.Redis) -> None:
    names = [f"{KEYS.tag}:k{k}" for k in range(1200)]
    pipe = redis_client.pipeline(transaction=False)
    for name in names:
        pipe.set(name, "1")
    await pipe.execute()
    deleted = await script(redis_client, "TERMINATE")(keys=names, args=[KEYS.control_channel])
    assert deleted == 1200
    assert await redis_client.exists(*names) == 0


# -- PUBLISH_MANY -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 1200])
async def test_publish_many_appends_every_message_in_order(
    redis_client: redis.asyncio.Redis, n: int
) -> None:
    args: list[Any] = [""]
    for k in range(n):
        args += ("job", f'{{"n":{k}}}', f'{{"k":"{k}"}}')
    ids = [_s(i) for i in await script(redis_client, "PUBLISH_MANY")(keys=[STREAM], args=args)]
    entries = await redis_client.xrange(STREAM)
    assert [_s(i) for i, _ in entries] == ids
    assert len(set(ids)) == n
    assert [list(f.items()) for _, f in entries] == [
        [
            (b"type", b"job"),
            (b"data", f'{{"n":{k}}}'.encode()),
            (b"metadata", f'{{"k":"{k}"}}'.encode()),
        ]
        for k in range(n)
    ]


async def test_publish_many_with_maxlen_keeps_the_newest(redis_client: redis.asyncio.Redis) -> None:
    args: list[Any] = ["100"]
    for k in range(1200):
        args += ("job", f'{{"n":{k}}}', "{}")
    ids = [_s(i) for i in await script(redis_client, "PUBLISH_MANY")(keys=[STREAM], args=args)]
    assert len(ids) == 1200
    kept = [_s(i) for i, _ in await redis_client.xrange(STREAM)]
    assert 100 <= len(kept) < 1200  # approximate trim: whole nodes only
    assert kept == ids[-len(kept) :]


# -- DELETE_IDLE_CONSUMER ---------------------------------------------------------------------


async def consumers(client: redis.asyncio.Redis) -> dict[str, int]:
    return {_s(r["name"]): int(r["pending"]) for r in await client.xinfo_consumers(STREAM, GROUP)}


async def test_delete_idle_consumer_among_several(redis_client: redis.asyncio.Redis) -> None:
    await deliver(redis_client, 3, "busy")
    for name in ("old-1", "old-2", "old-3"):
        await redis_client.execute_command("XGROUP", "CREATECONSUMER", STREAM, GROUP, name)

    async def all_idle() -> bool:
        rows = await redis_client.xinfo_consumers(STREAM, GROUP)
        return all(int(r["idle"]) >= 500 for r in rows)

    await wait_until(all_idle)
    await redis_client.execute_command("XGROUP", "CREATECONSUMER", STREAM, GROUP, "fresh")
    delete = script(redis_client, "DELETE_IDLE_CONSUMER")
    results = {
        name: await delete(keys=[STREAM], args=[GROUP, name, 500])
        for name in ("fresh", "old-2", "busy", "old-1", "nobody", "old-3")
    }
    assert results == {"fresh": -1, "old-2": 0, "busy": -1, "old-1": 0, "nobody": -1, "old-3": 0}
    assert await consumers(redis_client) == {"busy": 3, "fresh": 0}


async def test_delete_idle_consumer_in_a_large_group(redis_client: redis.asyncio.Redis) -> None:
    await deliver(redis_client, 1, "busy")
    pipe = redis_client.pipeline(transaction=False)
    for k in range(600):
        pipe.execute_command("XGROUP", "CREATECONSUMER", STREAM, GROUP, f"c{k:03}")
    await pipe.execute()

    async def all_idle() -> bool:
        rows = await redis_client.xinfo_consumers(STREAM, GROUP)
        return all(int(r["idle"]) >= 200 for r in rows)

    await wait_until(all_idle)
    delete = script(redis_client, "DELETE_IDLE_CONSUMER")
    for name in ("c599", "c000", "c300"):
        assert await delete(keys=[STREAM], args=[GROUP, name, 200]) == 0
    assert await delete(keys=[STREAM], args=[GROUP, "busy", 200]) == -1
    left = await consumers(redis_client)
    assert len(left) == 598
    assert not {"c599", "c000", "c300"} & left.keys()


# -- SET_STOPPED and COUNT_AFTER ---------------------------------------------------------------


async def test_set_stopped_records_and_announces_each_change(
    redis_client: redis.asyncio.Redis,
) -> None:
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(KEYS.control_channel)
    try:
        change = script(redis_client, "SET_STOPPED")
        ids = ["1-1", "2-2", "3-3", "4-4"]
        for entry_id in ids:
            await change(keys=[KEYS.stopped], args=[KEYS.control_channel, "stop", entry_id])
        await change(keys=[KEYS.stopped], args=[KEYS.control_channel, "resume", "2-2"])
        assert sorted(_s(m) for m in await redis_client.smembers(KEYS.stopped)) == [
            "1-1",
            "3-3",
            "4-4",
        ]
        heard: list[bytes] = []
        with anyio.fail_after(5):
            while len(heard) < 5:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    heard.append(message["data"])
        assert heard == [b"stop 1-1", b"stop 2-2", b"stop 3-3", b"stop 4-4", b"resume 2-2"]
    finally:
        await pubsub.aclose()


async def test_count_after_counts_up_to_the_limit(redis_client: redis.asyncio.Redis) -> None:
    ids = await Topic(redis_client, STREAM).publish_many([("job", k) for k in range(1200)])
    count = script(redis_client, "COUNT_AFTER")
    assert await count(keys=[STREAM], args=[ids[99], 5000]) == 1100
    assert await count(keys=[STREAM], args=[ids[99], 1001]) == 1001
    assert await count(keys=[STREAM], args=[ids[-1], 5000]) == 0
    assert await count(keys=[STREAM], args=["0-0", 5000]) == 1200
