"""Shared pytest configuration: real Redis servers come from redcurrent's own plugin."""

from pathlib import Path

import pytest

# Installed, redcurrent registers its plugin through the pytest11 entry point named
# "redcurrent.testing"; naming it here too is then a no-op (same name), and it registers
# the plugin where the package is only on PYTHONPATH or its installed metadata predates
# the entry point.
pytest_plugins = ["redcurrent.testing", "pytester"]


_CHAOS = Path(__file__).resolve().parent / "chaos"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The chaos suite runs only when asked for by path (``nox -s chaos``)."""
    if collection_path != _CHAOS:
        return None
    asked = (Path(arg.split("::")[0]).resolve() for arg in config.args)
    return not any(path == _CHAOS or _CHAOS in path.parents for path in asked) or None
