"""The ``redcurrent`` command group: every command is registered here."""

from __future__ import annotations

import click

from .._version import __version__
from ._admin import cleanup, terminate
from ._common import URL_ENVVARS
from ._dead import dead_letters
from ._info import info, pending
from ._messages import publish, resume_message, stop_message, tail
from ._worker import worker

__all__ = ["cli"]


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=f"Every command takes --url (else ${' then $'.join(URL_ENVVARS)}, else "
    "redis://localhost:6379/0) and --json for scripts.",
)
@click.version_option(__version__, prog_name="redcurrent")
def cli() -> None:
    """redcurrent: run workers and operate topics on Redis Streams."""


for command in (
    worker,
    info,
    pending,
    tail,
    publish,
    stop_message,
    resume_message,
    terminate,
    cleanup,
    dead_letters,
):
    cli.add_command(command)
