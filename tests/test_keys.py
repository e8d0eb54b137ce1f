"""Every key of a topic hashes to the stream's cluster slot; streams never share keys."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from redcurrent import TopicKeys
from redcurrent._keys import hash_tag

NAMES = [
    "orders",
    "o",
    "orders:eu-west:2024",
    "a{b}c",
    "{orders}",
    "x{orders}",
    "{orders}x",
    "{}",
    "a{}b",
    "{}{b}",
    "}{",
    "a}b{c",
    "{",
    "}",
    "{{x}}",
    "{x}}",
    "{{}",
    "{a{b}c}",
    "a{b{c}d}e",
    "名前{ストリーム}",
    "{名前}",
    "ü{}",
    "😀{😀}",
    " ",
    "redcurrent:{orders}:orders:dead",
    "x" * 1000,
]


def slot(key: str) -> int:
    return key_slot(key.encode())


def all_keys(keys: TopicKeys) -> tuple[str, ...]:
    return (*keys.owned(), keys.control_channel)


@pytest.mark.parametrize("name", NAMES)
def test_every_key_shares_the_stream_slot(name: str) -> None:
    keys = TopicKeys(name)
    assert keys.owned()[0] == name == keys.stream
    want = slot(name)
    for key in all_keys(keys):
        assert slot(key) == want, (name, key)


@pytest.mark.parametrize("name", NAMES)
def test_keys_are_distinct_and_contain_the_name(name: str) -> None:
    keys = TopicKeys(name)
    every = all_keys(keys)
    assert len(set(every)) == len(every)
    for key in every[1:]:
        assert name in key
        assert key.startswith("redcurrent:")


def test_owned_lists_every_key() -> None:
    keys = TopicKeys("orders")
    assert set(keys.owned()) == {
        keys.stream,
        keys.dead_letters,
        keys.stopped,
        keys.cleanup_lock,
        keys.idempotency_epoch,
        keys.scheduled,
        keys.scheduled_data,
        keys.workers,
        keys.meta,
        keys.members,
        keys.owners,
    }
    assert keys.control_channel not in keys.owned()
    assert repr(keys) == "TopicKeys('orders')"


def test_plain_name_is_its_own_tag() -> None:
    assert hash_tag("orders") == "{orders}"
    assert hash_tag("a{b}c") == "{b}"
    assert hash_tag("{orders}x") == "{orders}"


@pytest.mark.parametrize("name", ["{}", "a{}b", "}{", "{{x}}", "{", "}", "a}b{c"])
def test_awkward_names_get_a_brace_free_tag(name: str) -> None:
    tag = hash_tag(name)
    assert tag[0] == "{"
    assert tag[-1] == "}"
    inner = tag[1:-1]
    assert inner
    assert "{" not in inner
    assert "}" not in inner
    assert slot(tag) == slot(name)


def test_equal_tags_never_share_keys() -> None:
    names = ["orders", "x{orders}", "{orders}", "{orders}y", "a{orders}b", "orders{}"]
    assert len({hash_tag(n) for n in names[:-1]}) == 1
    seen: dict[str, str] = {}
    for name in names:
        for key in all_keys(TopicKeys(name)):
            assert key not in seen, (key, name, seen.get(key))
            seen[key] = name


def test_distinct_names_never_share_keys_pairwise() -> None:
    for a, b in itertools.combinations(NAMES[:-1], 2):
        keys_a, keys_b = set(all_keys(TopicKeys(a))), set(all_keys(TopicKeys(b)))
        # A stream literally named like another topic's key is the one overlap
        # possible by construction; none of the names above is such a key except
        # the one tested separately.
        if "redcurrent:" in a or "redcurrent:" in b:
            continue
        assert not keys_a & keys_b, (a, b)


@settings(max_examples=300, deadline=None)
@given(name=st.text(min_size=1, max_size=30))
def test_property_any_name_keeps_one_slot(name: str) -> None:
    keys = TopicKeys(name)
    want = slot(name)
    for key in all_keys(keys):
        assert slot(key) == want


braced = st.text(alphabet="{}ab:é", min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(name=braced)
def test_property_brace_heavy_names_keep_one_slot(name: str) -> None:
    keys = TopicKeys(name)
    assert {slot(k) for k in all_keys(keys)} == {slot(name)}


@settings(max_examples=300, deadline=None)
@given(a=st.text(min_size=1, max_size=12) | braced, b=st.text(min_size=1, max_size=12) | braced)
def test_property_two_streams_never_share_a_key(a: str, b: str) -> None:
    if a == b:
        assert all_keys(TopicKeys(a)) == all_keys(TopicKeys(b))
        return
    assert not set(all_keys(TopicKeys(a))) & set(all_keys(TopicKeys(b)))
