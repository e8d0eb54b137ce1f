"""``publish``, ``tail``, ``stop-message`` and ``resume-message``: single messages."""

from __future__ import annotations

import json
import sys
from typing import Any, Final

import click
import msgspec
import redis.asyncio as aredis
from rich.text import Text

from .._codec import FIELD_DATA, FIELD_METADATA, decode_message, is_init_entry, payload_decoder
from .._ids import normalize_id
from .._info import id_key
from .._redis import Entry, as_str, block_within_socket_timeout, entries_of
from .._topic import Topic
from ..errors import ConfigurationError, DecodeError
from ._common import (
    BadInput,
    CliError,
    console,
    echo_json,
    entry_id_argument,
    json_option,
    require_topic,
    run,
    url_option,
)

__all__ = ["publish", "resume_message", "stop_message", "tail"]

#: Seconds one XREAD of ``tail`` blocks (shortened to fit the socket timeout).
TAIL_BLOCK: Final = 2.0
#: The most entries one XREAD of ``tail`` asks for.
TAIL_BATCH: Final = 100


def _json_value(text: str, what: str) -> Any:
    if text == "-":
        text = sys.stdin.read()
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise BadInput(f"{what} is not valid JSON ({exc}): {text[:80]!r}") from None


@click.command()
@click.argument("stream")
@click.argument("message_type", metavar="TYPE")
@click.argument("payload", metavar="JSON")
@click.option("--metadata", help="A JSON object of strings, sent as the message's metadata.")
@click.option(
    "--delay",
    type=click.FloatRange(min=0),
    help="Seconds (on the Redis server's clock) before the message enters the stream.",
)
@click.option(
    "--key",
    help="The message key: per-key order, and the partition of a partitioned topic.",
)
@url_option
@json_option
def publish(
    stream: str,
    message_type: str,
    payload: str,
    metadata: str | None,
    delay: float | None,
    key: str | None,
    url: str,
    as_json: bool,
) -> None:
    """Publish a message and print its id.

    The message has type TYPE and the JSON payload given ('-': read from
    stdin). With --delay it is scheduled, and its schedule id is printed."""
    data = _json_value(payload, "the payload")
    meta = None
    if metadata is not None:
        meta = _json_value(metadata, "--metadata")
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise BadInput(f"--metadata must be a JSON object of strings, got {metadata}")

    async def body(client: aredis.Redis) -> str:
        return await Topic(client, stream).publish(message_type, data, meta, delay=delay, key=key)

    entry_id = run(url, body)
    if as_json:
        echo_json({"stream": stream, "id": entry_id, "scheduled": delay is not None})
    else:
        click.echo(entry_id)


def _start(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if value == "$":
        return value
    try:
        return normalize_id(value)
    except ConfigurationError as exc:
        raise BadInput(f"--from: {exc} or '$'") from None


@click.command()
@click.argument("stream")
@click.option(
    "--from",
    "start",
    default="$",
    show_default=True,
    callback=_start,
    help="Print entries after this id ('$': only new ones, '0': everything in the stream).",
)
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many entries.")
@url_option
@json_option
def tail(stream: str, start: str, count: int | None, url: str, as_json: bool) -> None:
    """Follow STREAM, printing entries as they arrive.

    Each entry as id, type and payload (and metadata), until Ctrl-C or until
    --count entries were printed. --json prints one JSON object per line."""

    async def body(client: aredis.Redis) -> None:
        topic = Topic(client, stream)
        exists = await require_topic(client, topic)
        last = start
        if last == "$":
            last = "0-0"
            if exists:
                last = as_str((await client.xinfo_stream(stream))["last-generated-id"])
        block_ms = int(block_within_socket_timeout(client, TAIL_BLOCK) * 1000)
        left = count
        while left is None or left > 0:
            batch = TAIL_BATCH if left is None else min(left, TAIL_BATCH)
            reply = await client.xread({stream: last}, count=batch, block=block_ms)
            for entry in entries_of(reply):
                last = as_str(entry[0])
                if is_init_entry(entry[1]):
                    continue
                _print_entry(stream, entry, as_json)
                if left is not None:
                    left -= 1

    run(url, body)


def _print_entry(stream: str, entry: Entry, as_json: bool) -> None:
    raw_id, fields = entry
    entry_id = as_str(raw_id)
    try:
        message = decode_message(entry_id, fields, stream, payload_decoder(None))
    except DecodeError as exc:
        raw = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
        if as_json:
            click.echo(json.dumps({"id": entry_id, "error": str(exc), "fields": raw}))
        else:
            line = Text.assemble((entry_id, "dim"), "  ", ("undecodable", "bold red"), "  ")
            line.append(f"{exc.category}: {exc.reason}")
            console().print(line, soft_wrap=True)
        return
    if as_json:
        click.echo(
            json.dumps(
                {
                    "id": entry_id,
                    "type": message.type,
                    "data": message.data,
                    "metadata": message.metadata,
                },
                ensure_ascii=False,
            )
        )
        return
    line = Text.assemble((entry_id, "dim"), "  ", (message.type, "bold cyan"), "  ")
    line.append(fields.get(FIELD_DATA, b"{}").decode())
    if message.metadata:
        line.append("  ")
        line.append(fields.get(FIELD_METADATA, b"{}").decode(), "dim")
    console().print(line, soft_wrap=True)


@click.command("stop-message")
@click.argument("stream")
@entry_id_argument("entry_id")
@url_option
@json_option
def stop_message(stream: str, entry_id: str, url: str, as_json: bool) -> None:
    """Stop one message for every consumer.

    Every consumer of every group of STREAM leaves entry ENTRY_ID alone until
    resume-message. An id after the stream's last one is stopped in advance;
    an id the stream had and lost is an error."""

    async def body(client: aredis.Redis) -> tuple[bool, bool]:
        topic = Topic(client, stream)
        exists = await require_topic(client, topic)
        present = False
        if exists:
            present = bool(await client.xrange(stream, entry_id, entry_id))
            if not present:
                last = as_str((await client.xinfo_stream(stream))["last-generated-id"])
                if id_key(entry_id) <= id_key(last):
                    raise CliError(
                        f"stream {stream!r} has no entry {entry_id} (removed, or never written)"
                    )
        changed = not await client.sismember(topic.keys.stopped, entry_id)
        await topic.stop_message(entry_id)
        return changed, present

    changed, present = run(url, body)
    if as_json:
        echo_json(
            {
                "stream": stream,
                "id": entry_id,
                "stopped": True,
                "changed": changed,
                "in_stream": present,
            }
        )
    elif not changed:
        click.echo(f"{entry_id} was already stopped on {stream!r}")
    elif present:
        click.echo(f"stopped {entry_id} on {stream!r}")
    else:
        click.echo(f"stopped {entry_id} on {stream!r} in advance (not in the stream yet)")


@click.command("resume-message")
@click.argument("stream")
@entry_id_argument("entry_id")
@url_option
@json_option
def resume_message(stream: str, entry_id: str, url: str, as_json: bool) -> None:
    """Let a stopped message be handled again.

    Resuming an id that is not stopped changes nothing and says so."""

    async def body(client: aredis.Redis) -> bool:
        topic = Topic(client, stream)
        await require_topic(client, topic)
        changed = bool(await client.sismember(topic.keys.stopped, entry_id))
        await topic.resume_message(entry_id)
        return changed

    changed = run(url, body)
    if as_json:
        echo_json({"stream": stream, "id": entry_id, "stopped": False, "changed": changed})
    elif changed:
        click.echo(f"resumed {entry_id} on {stream!r}")
    else:
        click.echo(f"{entry_id} was not stopped on {stream!r}; nothing changed")
