"""Configuration lives in frozen, keyword-only Structs: one place, validated once."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import pytest
import redis.asyncio

from redcurrent import (
    BatchConfig,
    CleanupPolicy,
    ConfigurationError,
    ConsumerConfig,
    Message,
    StartFrom,
    StreamConsumer,
)


def test_consumer_exposes_its_config_read_only(redis_client: redis.asyncio.Redis) -> None:
    consumer = StreamConsumer(redis_client, "s", "g", "c", claim_idle=2.5, concurrency=3)
    config = consumer.config
    assert (config.stream, config.group, config.name) == ("s", "g", "c")
    assert (config.claim_idle, config.concurrency, config.prefetch) == (2.5, 3, None)
    assert config.batch == BatchConfig()
    assert config.start is StartFrom.LATEST
    with pytest.raises(AttributeError):
        config.claim_idle = 1.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        consumer.config = config  # type: ignore[misc]
    with pytest.raises(AttributeError):
        consumer.claim_idle = 1.0  # type: ignore[attr-defined]
    assert (consumer.stream, consumer.group, consumer.name) == ("s", "g", "c")


def test_default_name_is_unique_per_consumer(redis_client: redis.asyncio.Redis) -> None:
    a = StreamConsumer(redis_client, "s", "g")
    b = StreamConsumer(redis_client, "s", "g")
    assert a.name != b.name
    assert a.config.name == a.name


def test_configs_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        ConsumerConfig("s", "g", "c")  # type: ignore[misc]
    with pytest.raises(TypeError):
        BatchConfig(10, 0.5)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 2.5}, "concurrency"),
        ({"max_deliveries": 0}, "max_deliveries"),
        ({"claim_idle": 0}, "claim_idle"),
        ({"block": -1}, "block"),
        ({"start_timeout": 0}, "start_timeout"),
        ({"consumer_idle_timeout": 0}, "consumer_idle_timeout"),
        ({"shutdown_timeout": -0.1}, "shutdown_timeout"),
        ({"prefetch": 4, "concurrency": 8}, "prefetch"),
        ({"start": "yesterday"}, "start"),
        ({"stream": ""}, "stream"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_options_name_the_problem(options: dict[str, Any], names: str) -> None:
    fields: dict[str, Any] = {"stream": "s", "group": "g", "name": "c", **options}
    with pytest.raises(ConfigurationError, match=names):
        ConsumerConfig(**fields)


def test_a_config_decodes_from_a_file_and_refuses_unknown_fields() -> None:
    raw = b'{"stream": "s", "group": "g", "name": "c", "claim_idle": 5, "batch": {"size": 50}}'
    config = msgspec.json.decode(raw, type=ConsumerConfig)
    assert config.claim_idle == 5
    assert config.batch == BatchConfig(size=50)
    assert config.start_id == "$"
    earliest = msgspec.json.decode(raw[:-1] + b', "start": "earliest"}', type=ConsumerConfig)
    assert earliest.start_id == "0"
    with pytest.raises(msgspec.ValidationError, match="claim_idel"):
        msgspec.json.decode(
            b'{"stream": "s", "group": "g", "name": "c", "claim_idel": 5}', type=ConsumerConfig
        )
    with pytest.raises(msgspec.ValidationError, match="intervall"):
        msgspec.convert({"intervall": 3}, CleanupPolicy)


async def test_from_config_consumes(redis_client: redis.asyncio.Redis) -> None:
    from redcurrent import Topic

    config = ConsumerConfig(
        stream="cfg", group="g", name="c", start=StartFrom.EARLIEST, block=0.1, claim_idle=1
    )
    consumer = StreamConsumer.from_config(redis_client, config)
    assert consumer.config is config
    seen: list[Any] = []

    @consumer.handler("t")
    async def handle(msg: Message[Any]) -> None:
        seen.append(msg.data)
        consumer.request_stop()

    await Topic(redis_client, "cfg").publish("t", {"n": 1})
    await consumer.run()
    assert seen == [{"n": 1}]


def test_replace_builds_a_new_config() -> None:
    config = ConsumerConfig(stream="s", group="g", name="c")
    assert msgspec.structs.replace(config, concurrency=4).concurrency == 4
    assert not dataclasses.is_dataclass(config)
