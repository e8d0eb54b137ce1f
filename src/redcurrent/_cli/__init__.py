"""The ``redcurrent`` command (the ``cli`` extra): a worker and operator commands.

The entry point imports nothing heavy until it knows click is there, so a
missing extra is a one-line hint instead of a traceback.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    try:
        from ._app import cli
    except ImportError as exc:  # pragma: no cover - depends on the environment
        if exc.name not in ("click", "rich"):
            raise
        sys.stderr.write(
            f"redcurrent: the command line needs {exc.name}: pip install 'redcurrent[cli]'\n"
        )
        sys.exit(2)
    cli()
