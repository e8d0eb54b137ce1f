"""Fixtures of the chaos suite (``nox -s chaos``).

``--chaos-scale=full`` (the default of ``nox -s chaos``) runs the scenarios at
the sizes the guarantees page reports; ``--chaos-scale=short`` (CI) runs the
same scenarios smaller. Every scenario's audit lands in
``build/chaos-report.json`` and in the terminal summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _ledger import Audit, write_report

CHAOS_DIR = Path(__file__).resolve().parent
ROOT = CHAOS_DIR.parents[1]
REPORT = ROOT / "build" / "chaos-report.json"
_RESULTS: list[Audit] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-scale",
        choices=("short", "full"),
        default=os.environ.get("REDCURRENT_CHAOS_SCALE", "short"),
        help="size of the chaos scenarios (short: CI; full: the guarantees page)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: a fault-injection scenario (nox -s chaos)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if CHAOS_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.chaos)


@pytest.fixture(scope="session")
def full_scale(request: pytest.FixtureRequest) -> bool:
    """True when the scenarios run at the sizes of the guarantees page."""
    scale = request.config.getoption("--chaos-scale", default=None)
    return (scale or os.environ.get("REDCURRENT_CHAOS_SCALE")) == "full"


@pytest.fixture
def ledger_root(tmp_path: Path) -> Path:
    root = tmp_path / "ledger"
    root.mkdir()
    return root


@pytest.fixture
def record() -> Any:
    """``record(audit)``: keep a scenario's audit for the report."""

    def _record(result: Audit) -> Audit:
        flavour = os.environ.get("REDCURRENT_CHAOS_FLAVOUR")
        if flavour:
            result.scenario = f"{flavour}/{result.scenario}"
        _RESULTS.append(result)
        REPORT.parent.mkdir(exist_ok=True)
        write_report(REPORT, result)
        return result

    return _record


def spawn(script: str, options: dict[str, Any], log: Path) -> subprocess.Popen[bytes]:
    """Start ``_worker.py`` / ``_producer.py`` with its output in ``log``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), str(CHAOS_DIR), env.get("PYTHONPATH", "")) if p
    )
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(CHAOS_DIR / script), json.dumps(options)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _RESULTS:
        return
    terminalreporter.section("chaos audit")
    for result in _RESULTS:
        terminalreporter.write_line(str(result))
    terminalreporter.write_line(f"(report: {REPORT})")
