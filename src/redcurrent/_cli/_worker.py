"""``redcurrent worker pkg.module:obj``: run consumers until SIGTERM, then drain.

The target is a :class:`StreamConsumer`, a list of them, a :class:`Router`
(built into a consumer of ``--stream`` and ``--group`` on ``--url``), or a
function returning one of these (awaited if it is async), as ``uvicorn
--factory`` takes an app factory.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import anyio
import click
import msgspec
import redis.asyncio as aredis

from .._config import ConsumerConfig
from .._consumer import StreamConsumer, default_consumer_name
from .._router import Router
from .._serve import serve
from ..errors import ConfigurationError
from ._common import client_from_url, url_option

__all__ = ["worker"]

#: consumer options a Router target takes from flags or ``REDCURRENT_<NAME>``.
_OPTIONS: dict[str, tuple[type, str]] = {
    "concurrency": (int, "Handlers running at once."),
    "prefetch": (int, "Entries held in memory at most."),
    "claim_idle": (float, "Seconds before idle entries of dead consumers are taken over."),
    "max_deliveries": (int, "Deliveries before a failing message becomes a dead letter."),
    "shutdown_timeout": (float, "Seconds a graceful stop waits for running handlers."),
    "block": (float, "Seconds one read waits for new entries."),
    "start": (str, "Where a new group starts: latest, earliest or an entry id."),
    "start_timeout": (float, "Seconds start-up keeps trying to reach Redis."),
}


def _consumer_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for name, (kind, help_text) in reversed(_OPTIONS.items()):
        flag = "--" + name.replace("_", "-")
        fn = click.option(
            flag, name, type=kind, default=None, envvar=f"REDCURRENT_{name.upper()}", help=help_text
        )(fn)
    return fn


@click.command()
@click.argument("target")
@url_option
@click.option("--stream", envvar="REDCURRENT_STREAM", help="The stream (for a Router target).")
@click.option(
    "--group", envvar="REDCURRENT_GROUP", help="The consumer group (for a Router target)."
)
@click.option(
    "--name",
    envvar="REDCURRENT_NAME",
    help="The consumer name (for a Router target); default: <host>-<n>, see the docs.",
)
@click.option(
    "--stable-names/--no-stable-names",
    default=True,
    help="Give consumers left to the default name a stable worker name <host>-<n>.",
)
@click.option(
    "--log-level",
    default="INFO",
    envvar="REDCURRENT_LOG_LEVEL",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@_consumer_options
def worker(
    target: str,
    url: str,
    stream: str | None,
    group: str | None,
    name: str | None,
    stable_names: bool,
    log_level: str,
    **options: Any,
) -> None:
    """Run the consumers TARGET names (pkg.module:obj) until SIGTERM or SIGINT,
    then stop gracefully: running handlers finish (up to shutdown_timeout), the
    rest is handed back to the group at once. A second signal stops at once.

    Exit code: 0 stopped (or topic terminated), 1 failed, 3 stream or group
    deleted.
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    given = {k: v for k, v in options.items() if v is not None}
    obj = _load(target)
    code = anyio.run(_serve_target, obj, target, url, stream, group, name, stable_names, given)
    sys.exit(code)


async def _serve_target(
    obj: Any,
    target: str,
    url: str,
    stream: str | None,
    group: str | None,
    name: str | None,
    stable_names: bool,
    options: dict[str, Any],
) -> int:
    if callable(obj) and not isinstance(obj, (Router, StreamConsumer)):
        obj = obj()
        if inspect.isawaitable(obj):
            obj = await obj
    if isinstance(obj, Router):
        if not stream or not group:
            raise click.UsageError(f"{target} is a Router: --stream and --group are required")
        async with client_from_url(url) as client:
            consumer = _build(client, obj, stream, group, name, options)
            return await serve(consumer, stable_names=stable_names)
    if isinstance(obj, StreamConsumer):
        consumers = [obj]
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(c, StreamConsumer) for c in obj):
        consumers = list(obj)
    else:
        raise click.UsageError(
            f"{target} is a {type(obj).__name__}: expected a StreamConsumer, a list of "
            "them, a Router, or a function returning one of these"
        )
    router_only = {"stream": stream, "group": group, "name": name, **options}
    ignored = ["--" + k.replace("_", "-") for k, v in router_only.items() if v is not None]
    if ignored:
        raise click.UsageError(
            f"{', '.join(ignored)} only apply to a Router target; {target} builds its "
            "consumers itself"
        )
    return await serve(*consumers, stable_names=stable_names)


def _build(
    client: aredis.Redis,
    router: Router,
    stream: str,
    group: str,
    name: str | None,
    options: dict[str, Any],
) -> StreamConsumer:
    fields = {"stream": stream, "group": group, "name": name or default_consumer_name()}
    try:
        config = msgspec.convert({**fields, **options}, ConsumerConfig)
    except (msgspec.ValidationError, ConfigurationError) as exc:
        raise click.BadParameter(str(exc)) from None
    consumer = StreamConsumer.from_config(client, config)
    consumer._named = name is not None  # the default name gives way to a worker name
    consumer.include_router(router)
    return consumer


def _load(target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(f"{target!r}: expected pkg.module:obj", param_hint="TARGET")
    # Like python -m: modules of the working directory can be named.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise click.BadParameter(
                f"no module {exc.name!r} (from {target!r})", param_hint="TARGET"
            ) from None
        raise
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise click.BadParameter(
                f"module {module_name!r} has no {attribute!r}", param_hint="TARGET"
            ) from None
    return obj
