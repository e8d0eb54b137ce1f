"""Placeholder for the ``worker`` command, written on another branch."""

from __future__ import annotations

import click

__all__ = ["worker"]


@click.command()
def worker() -> None:
    """Run a worker (not yet available)."""
    click.echo("not yet")
    raise click.exceptions.Exit(2)
