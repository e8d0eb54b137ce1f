"""``info`` and ``pending``: what a topic holds and what its groups still owe."""

from __future__ import annotations

from typing import Any

import click
import msgspec
import redis.asyncio as aredis
from rich.table import Table

from .._message import TopicInfo
from .._topic import Topic
from ._common import CliError, age, console, echo_json, json_option, require_topic, run, url_option

__all__ = ["info", "pending"]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _field(mapping: Any, name: str) -> Any:
    """A field of a parsed XINFO/XPENDING reply (str keys; bytes under RESP3)."""
    return mapping[name] if name in mapping else mapping.get(name.encode())


async def _consumers(client: aredis.Redis, stream: str, group: str) -> list[dict[str, Any]]:
    rows = await client.xinfo_consumers(stream, group)
    return [
        {
            "group": group,
            "name": _text(_field(row, "name")),
            "pending": int(_field(row, "pending")),
            "idle_ms": int(_field(row, "idle")),
        }
        for row in rows
    ]


@click.command()
@click.argument("stream")
@url_option
@json_option
def info(stream: str, url: str, as_json: bool) -> None:
    """Show the state of STREAM.

    Length and ends, groups (consumers, pending, lag), consumers, stopped ids,
    scheduled messages and dead letters."""

    async def body(client: aredis.Redis) -> tuple[TopicInfo, list[dict[str, Any]]]:
        topic = Topic(client, stream)
        await require_topic(client, topic, partitioned=True)
        state = await topic.info()
        consumers: list[dict[str, Any]] = []
        for group in state.groups:
            consumers += await _consumers(client, stream, group.name)
        return state, consumers

    state, consumers = run(url, body)
    if as_json:
        echo_json({"stream": stream, **msgspec.to_builtins(state), "consumers": consumers})
        return
    out = console()
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("stream", stream)
    summary.add_row("length", str(state.length))
    summary.add_row("first id", state.first_id or "-")
    summary.add_row("last id", state.last_id or "-")
    summary.add_row("scheduled", str(state.scheduled))
    summary.add_row("dead letters", str(state.dead_letters))
    summary.add_row("stopped", ", ".join(state.stopped) if state.stopped else "none")
    out.print(summary)
    if not state.groups:
        out.print("no consumer groups")
        return
    groups = Table(title="groups", title_justify="left")
    for column in ("group", "consumers", "pending", "lag", "last delivered"):
        groups.add_column(
            column, justify="left" if column in ("group", "last delivered") else "right"
        )
    for group in state.groups:
        lag = "?" if group.lag is None else str(group.lag)
        groups.add_row(
            group.name, str(group.consumers), str(group.pending), lag, group.last_delivered_id
        )
    out.print(groups)
    if consumers:
        table = Table(title="consumers", title_justify="left")
        for column in ("group", "consumer", "pending", "idle"):
            table.add_column(column, justify="right" if column in ("pending", "idle") else "left")
        for row in consumers:
            table.add_row(row["group"], row["name"], str(row["pending"]), age(row["idle_ms"]))
        out.print(table)


@click.command()
@click.argument("stream")
@click.argument("group")
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Show at most this many entries, oldest first.",
)
@url_option
@json_option
def pending(stream: str, group: str, count: int, url: str, as_json: bool) -> None:
    """List what GROUP of STREAM has not acknowledged.

    Oldest first, with the consumer holding each entry, its idle time and how
    many times it was delivered."""

    async def body(client: aredis.Redis) -> tuple[int, list[dict[str, Any]]]:
        topic = Topic(client, stream)
        await require_topic(client, topic, stream=True)
        names = [_text(_field(g, "name")) for g in await client.xinfo_groups(stream)]
        if group not in names:
            known = ", ".join(repr(n) for n in sorted(names)) or "none"
            raise CliError(f"stream {stream!r} has no group {group!r} (groups: {known})")
        summary = await client.xpending(stream, group)
        # XPENDING lists entries by id: the oldest first.
        rows = await client.xpending_range(stream, group, min="-", max="+", count=count)
        entries = [
            {
                "id": _text(row["message_id"]),
                "consumer": _text(row["consumer"]),
                "idle_ms": int(row["time_since_delivered"]),
                "delivery_count": int(row["times_delivered"]),
            }
            for row in rows
        ]
        return int(summary["pending"]), entries

    total, entries = run(url, body)
    if as_json:
        echo_json({"stream": stream, "group": group, "pending": total, "entries": entries})
        return
    out = console()
    if not entries:
        out.print(f"group {group!r} of {stream!r} has nothing pending")
        return
    shown = f"oldest {len(entries)} of {total}" if len(entries) < total else f"{total}"
    table = Table(title=f"pending in {group!r} of {stream!r} ({shown})", title_justify="left")
    table.add_column("id")
    table.add_column("consumer")
    table.add_column("idle", justify="right")
    table.add_column("deliveries", justify="right")
    for entry in entries:
        table.add_row(
            entry["id"], entry["consumer"], age(entry["idle_ms"]), str(entry["delivery_count"])
        )
    out.print(table)
