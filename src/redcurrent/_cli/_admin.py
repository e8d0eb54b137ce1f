"""``terminate`` and ``cleanup``: the commands that remove things from a topic."""

from __future__ import annotations

import sys
from typing import Any, Final

import click
import redis.asyncio as aredis
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from .._config import CleanupPolicy
from .._message import TopicInfo
from .._topic import Topic
from ..errors import ConfigurationError
from ._common import (
    BadInput,
    console,
    echo_json,
    json_option,
    plural,
    require_topic,
    run,
    url_option,
)

__all__ = ["cleanup", "terminate"]

#: A stream longer than this many cleanup steps gets a progress bar (on a terminal).
PROGRESS_STEPS: Final = 10

_DEFAULTS: Final = CleanupPolicy()


def _contents(state: TopicInfo) -> str:
    groups = ", ".join(repr(group.name) for group in state.groups)
    parts = [
        plural(state.length, "entry", "entries")
        + (f" and {plural(len(state.groups), 'group')} ({groups})" if groups else ""),
        plural(state.dead_letters, "dead letter"),
        plural(len(state.stopped), "stopped id"),
        plural(state.scheduled, "scheduled message"),
    ]
    return ", ".join(parts)


@click.command()
@click.argument("stream")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@url_option
@json_option
def terminate(stream: str, yes: bool, url: str, as_json: bool) -> None:
    """Delete a topic and stop its consumers.

    Deletes STREAM, its groups and every key of the topic (dead letters,
    stopped ids, scheduled messages); every consumer of it stops. Asks first
    unless --yes."""

    async def look(client: aredis.Redis) -> TopicInfo:
        topic = Topic(client, stream)
        await require_topic(client, topic, partitioned=True)
        return await topic.info()

    state = run(url, look)
    if not yes:
        click.confirm(
            f"Terminate {stream!r}? This deletes {_contents(state)}, and stops every consumer",
            abort=True,
            err=True,
        )

    async def act(client: aredis.Redis) -> None:
        await Topic(client, stream).terminate()

    run(url, act)
    if as_json:
        echo_json(
            {
                "stream": stream,
                "terminated": True,
                "removed": {
                    "entries": state.length,
                    "groups": [group.name for group in state.groups],
                    "dead_letters": state.dead_letters,
                    "stopped": len(state.stopped),
                    "scheduled": state.scheduled,
                },
            }
        )
    else:
        click.echo(f"terminated {stream!r}: removed {_contents(state)}")


@click.command()
@click.argument("stream")
@click.option(
    "--min-retention",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.min_retention,
    show_default=True,
    help="Keep entries younger than this many seconds (by the time in their id).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=_DEFAULTS.batch_size,
    show_default=True,
    help="The most entries one step (one short Lua script) removes.",
)
@click.option(
    "--dead-letter-retention",
    type=click.FloatRange(min=0),
    help="Also remove dead letters older than this many seconds (default: keep them).",
)
@url_option
@json_option
def cleanup(
    stream: str,
    min_retention: float,
    batch_size: int,
    dead_letter_retention: float | None,
    url: str,
    as_json: bool,
) -> None:
    """Remove processed entries now.

    Removes the entries of STREAM every group has acknowledged, with the
    library's rules (never one a group still needs), and stopped ids of gone
    entries. Shows a progress bar on a terminal when the stream is long."""
    try:
        policy = CleanupPolicy(
            min_retention=min_retention,
            batch_size=batch_size,
            dead_letter_retention=dead_letter_retention,
        )
    except ConfigurationError as exc:  # inf or nan, which click's ranges let through
        raise BadInput(str(exc)) from None
    bar = sys.stdout.isatty() and not as_json

    async def body(client: aredis.Redis) -> tuple[int, TopicInfo, TopicInfo]:
        topic = Topic(client, stream)
        await require_topic(client, topic, partitioned=True)
        before = await topic.info()
        if bar and before.length > PROGRESS_STEPS * batch_size:
            with _progress() as progress:
                task = progress.add_task(f"cleaning {stream}", total=before.length)

                def advance(removed: int) -> None:
                    progress.advance(task, removed)

                removed = await topic.cleanup(policy, on_progress=advance)
        else:
            removed = await topic.cleanup(policy)
        return removed, before, await topic.info()

    removed, before, after = run(url, body)
    stopped = len(set(before.stopped) - set(after.stopped))
    dead = max(before.dead_letters - after.dead_letters, 0)
    if as_json:
        report: dict[str, Any] = {
            "stream": stream,
            "removed": removed,
            "length_before": before.length,
            "length": after.length,
            "stopped_dropped": stopped,
            "dead_letters_removed": dead,
        }
        echo_json(report)
        return
    line = f"removed {removed} of {before.length} entries from {stream!r} ({after.length} left)"
    if stopped:
        line += f"; dropped {plural(stopped, 'stopped id')} of gone entries"
    if dead_letter_retention is not None:
        line += f"; removed {plural(dead, 'dead letter')}"
    click.echo(line)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console(),
    )
