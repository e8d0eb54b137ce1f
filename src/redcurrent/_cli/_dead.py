"""``dead-letters list|show|replay|purge``: reading and handling a topic's dead letters.

Every subcommand but ``show`` works on a selection: the ids given, or else
every dead letter, oldest first, narrowed by ``--type``, ``--error`` (a
substring of the reason) and ``--older-than`` (seconds since it died, by the
time in its id, on the server's clock, as ``dead_letter_retention`` counts).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import click
import redis.asyncio as aredis
from rich.table import Table

from .._ids import normalize_id
from .._info import id_key
from .._message import DeadLetter
from .._topic import Topic
from ..errors import ConfigurationError
from ._common import (
    BadInput,
    CliError,
    age,
    console,
    echo_json,
    entry_id_argument,
    json_option,
    plural,
    require_topic,
    run,
    url_option,
)

__all__ = ["dead_letters"]

F = TypeVar("F", bound=Callable[..., Any])

#: Dead letters read per XRANGE while selecting.
PAGE: Final = 500


@dataclass(frozen=True)
class Filters:
    type: str | None = None
    error: str | None = None
    older_than: float | None = None
    count: int | None = None

    def match(self, letter: DeadLetter, now_ms: int) -> bool:
        if self.type is not None and letter.type != self.type:
            return False
        if self.error is not None and self.error.casefold() not in letter.reason.casefold():
            return False
        if self.older_than is not None:
            died_ms = id_key(letter.id)[0]
            if now_ms - died_ms < self.older_than * 1000:
                return False
        return True

    @property
    def narrowing(self) -> bool:
        return self.type is not None or self.error is not None or self.older_than is not None


def _filter_options(default_count: int | None) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        for option in reversed(
            (
                click.option("--type", "type_", metavar="TYPE", help="Only this message type."),
                click.option(
                    "--error", metavar="TEXT", help="Only those whose reason contains TEXT."
                ),
                click.option(
                    "--older-than",
                    type=click.FloatRange(min=0),
                    metavar="SECONDS",
                    help="Only those that died at least SECONDS ago.",
                ),
                click.option(
                    "--count",
                    type=click.IntRange(min=1),
                    default=default_count,
                    show_default=default_count is not None,
                    help="At most this many, oldest first"
                    + ("." if default_count is not None else " (default: all)."),
                ),
            )
        ):
            func = option(func)
        return func

    return decorate


def _ids(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    try:
        return [normalize_id(value) for value in values]
    except ConfigurationError as exc:
        raise BadInput(str(exc)) from None


async def _select(
    client: aredis.Redis, topic: Topic, ids: list[str], filters: Filters
) -> list[DeadLetter]:
    """The dead letters ``ids`` names (each must exist), or every one, narrowed by
    ``filters``, oldest first."""
    await require_topic(client, topic, partitioned=True)
    seconds, micros = await client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    limit = filters.count
    chosen: list[DeadLetter] = []
    if ids:
        for entry_id in dict.fromkeys(ids):
            found = await topic.dead_letters(1, start=entry_id)
            if not found or found[0].id != entry_id:
                raise CliError(f"stream {topic.name!r} has no dead letter {entry_id}")
            if filters.match(found[0], now_ms):
                chosen.append(found[0])
        chosen.sort(key=lambda letter: id_key(letter.id))
        return chosen[:limit]
    start = "-"
    while limit is None or len(chosen) < limit:
        page = await topic.dead_letters(PAGE, start=start)
        chosen += [letter for letter in page if filters.match(letter, now_ms)]
        if len(page) < PAGE:
            break
        start = "(" + page[-1].id
    return chosen[:limit]


def _data(value: Any) -> Any:
    """A dead letter's payload for JSON: undecodable bytes as text."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _as_dict(letter: DeadLetter, *, fields: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": letter.id,
        "original_id": letter.original_id,
        "type": letter.type,
        "data": _data(letter.data),
        "metadata": letter.metadata,
        "group": letter.group,
        "consumer": letter.consumer,
        "reason": letter.reason,
        "error_type": letter.error_type,
        "delivery_count": letter.delivery_count,
        "failed_at": letter.failed_at,
    }
    if fields:
        out["fields"] = {
            k.decode(errors="replace"): v.decode(errors="replace") for k, v in letter.fields.items()
        }
    return out


@click.group("dead-letters")
def dead_letters() -> None:
    """List, show, replay or purge the dead letters of a stream."""


@dead_letters.command("list")
@click.argument("stream")
@_filter_options(default_count=100)
@url_option
@json_option
def list_(
    stream: str,
    type_: str | None,
    error: str | None,
    older_than: float | None,
    count: int,
    url: str,
    as_json: bool,
) -> None:
    """List the dead letters of STREAM, oldest first."""
    filters = Filters(type_, error, older_than, count)

    async def body(client: aredis.Redis) -> tuple[list[DeadLetter], int]:
        topic = Topic(client, stream)
        letters = await _select(client, topic, [], filters)
        seconds, _ = await client.time()
        return letters, int(seconds)

    letters, now = run(url, body)
    if as_json:
        echo_json({"stream": stream, "dead_letters": [_as_dict(letter) for letter in letters]})
        return
    out = console()
    if not letters:
        out.print(f"no dead letters{' match' if filters.narrowing else ''} in {stream!r}")
        return
    table = Table(title=f"dead letters of {stream!r} ({len(letters)})", title_justify="left")
    table.add_column("id", no_wrap=True)
    table.add_column("original id", no_wrap=True)
    table.add_column("type")
    table.add_column("group")
    table.add_column("tries", justify="right")
    table.add_column("died", justify="right")
    table.add_column("reason", overflow="ellipsis", no_wrap=True, max_width=60)
    for letter in letters:
        died = max(now * 1000 - id_key(letter.id)[0], 0)
        table.add_row(
            letter.id,
            letter.original_id,
            letter.type or "-",
            letter.group,
            str(letter.delivery_count),
            f"{age(died)} ago",
            letter.reason,
        )
    out.print(table)


@dead_letters.command("show")
@click.argument("stream")
@entry_id_argument("dead_letter_id")
@url_option
@json_option
def show(stream: str, dead_letter_id: str, url: str, as_json: bool) -> None:
    """Show one dead letter in full.

    Where it came from, why it failed, its payload and metadata."""

    async def body(client: aredis.Redis) -> DeadLetter:
        letters = await _select(client, Topic(client, stream), [dead_letter_id], Filters())
        return letters[0]

    letter = run(url, body)
    if as_json:
        echo_json({"stream": stream, **_as_dict(letter, fields=True)})
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    data = letter.data
    shown = (
        repr(data) if isinstance(data, bytes) else json.dumps(data, indent=2, ensure_ascii=False)
    )
    for name, value in (
        ("id", letter.id),
        ("original id", letter.original_id),
        ("stream", stream),
        ("type", letter.type or "-"),
        ("group", letter.group),
        ("consumer", letter.consumer),
        ("deliveries", str(letter.delivery_count)),
        ("error type", letter.error_type),
        ("reason", letter.reason),
        ("data", shown),
        ("metadata", json.dumps(letter.metadata, ensure_ascii=False)),
    ):
        grid.add_row(name, value)
    console().print(grid)


@dead_letters.command("replay")
@click.argument("stream")
@click.argument("ids", nargs=-1, callback=_ids, metavar="[ID]...")
@_filter_options(default_count=None)
@url_option
@json_option
def replay(
    stream: str,
    ids: list[str],
    type_: str | None,
    error: str | None,
    older_than: float | None,
    count: int | None,
    url: str,
    as_json: bool,
) -> None:
    """Put dead letters back on the stream.

    The IDs given, else every dead letter that matches, become new entries of
    STREAM, seen by every group, and leave the dead letters."""
    filters = Filters(type_, error, older_than, count)

    async def body(client: aredis.Redis) -> tuple[list[str], list[str]]:
        topic = Topic(client, stream)
        chosen = [letter.id for letter in await _select(client, topic, ids, filters)]
        if not chosen:
            return [], []
        return chosen, await topic.replay_dead_letters(chosen)

    chosen, new_ids = run(url, body)
    if as_json:
        echo_json({"stream": stream, "replayed": chosen, "new_ids": new_ids})
    elif not chosen:
        click.echo(f"no dead letters{' match' if filters.narrowing else ''} in {stream!r}")
    else:
        replayed = plural(len(new_ids), "dead letter")
        click.echo(f"replayed {replayed} to {stream!r}: {', '.join(new_ids)}")


@dead_letters.command("purge")
@click.argument("stream")
@click.argument("ids", nargs=-1, callback=_ids, metavar="[ID]...")
@_filter_options(default_count=None)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@url_option
@json_option
def purge(
    stream: str,
    ids: list[str],
    type_: str | None,
    error: str | None,
    older_than: float | None,
    count: int | None,
    yes: bool,
    url: str,
    as_json: bool,
) -> None:
    """Delete dead letters for good.

    The IDs given, else every dead letter that matches. Asks first unless
    --yes."""
    filters = Filters(type_, error, older_than, count)

    async def look(client: aredis.Redis) -> list[str]:
        return [letter.id for letter in await _select(client, Topic(client, stream), ids, filters)]

    chosen = run(url, look)
    if chosen and not yes:
        click.confirm(
            f"Delete {plural(len(chosen), 'dead letter')} of {stream!r} for good?",
            abort=True,
            err=True,
        )

    async def act(client: aredis.Redis) -> int:
        return await Topic(client, stream).delete_dead_letters(chosen) if chosen else 0

    deleted = run(url, act)
    if as_json:
        echo_json({"stream": stream, "deleted": deleted, "ids": chosen})
    else:
        click.echo(f"deleted {plural(deleted, 'dead letter')} of {stream!r}")
