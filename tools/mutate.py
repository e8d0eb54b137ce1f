"""A small mutation check of redcurrent's critical modules.

    python tools/mutate.py --list                       # the mutants, no tests run
    python tools/mutate.py --module _lease --limit 5    # run the first five of _lease.py
    python tools/mutate.py --sample 20 --seed 1         # twenty at random, all modules
    python tools/mutate.py --module _scripts --line 57  # every mutant of one line
    nox -s mutation -- ...                              # the same in a nox virtualenv

Each mutant changes ONE line of one of src/redcurrent/{_scripts,_lease,_claim,_dispatch,
_ack}.py, in Python or in a Lua script string:

* a comparison flipped (``<`` and ``<=``, ``>`` and ``>=``, ``==`` and ``!=``, Lua ``~=``);
* ``and`` and ``or`` swapped; a ``not`` dropped; ``True`` and ``False`` swapped;
* an off-by-one: ``+ 1`` or ``- 1`` dropped, an integer in a slice, ``range()``, Lua ``for``
  or ``math.min/max`` moved by one;
* a statement deleted (``pass`` in Python, an empty line in Lua).

The mutant is written into a copy of the repository (src, tests, pyproject.toml) in a
temporary directory, never into the work tree, and the test files that cover that module
run against the copy (``PYTHONPATH`` puts the copy's ``src`` first, for subprocesses too),
stopping at the first failure. A mutant is *killed* when a test fails (or the run times
out), and *survives* when every test passes: a survivor is a change of behaviour no test
notices. The report lists the survivors; the exit code is 0 unless the unmutated tests
fail. mutmut was not used: it mutates a string only by wrapping it in ``XX``, which breaks
a Lua script as a whole instead of changing one of its lines, and its first pass runs the
whole suite to map tests to functions.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path("src/redcurrent")

# The critical modules and the test files that cover each (``--tests`` overrides).
MODULES: dict[str, list[str]] = {
    "_scripts": ["tests/test_scripts.py", "tests/test_dead_letters.py"],
    "_lease": [
        "tests/test_many_entries.py",
        "tests/test_scripts.py",
        "tests/test_consumer_control.py",
    ],
    "_claim": [
        "tests/test_many_entries.py",
        "tests/test_consumer_faults.py",
        "tests/test_faults.py",
    ],
    "_dispatch": [
        "tests/test_consumer.py",
        "tests/test_many_entries.py",
        "tests/test_batch.py",
        "tests/test_bookkeeping.py",
    ],
    "_ack": ["tests/test_many_entries.py", "tests/test_consumer.py", "tests/test_bookkeeping.py"],
}

# (pattern, replacement) applied at one match at a time.
OPERATORS: list[tuple[str, str, str]] = [
    ("<= to <", r"<=", "<"),
    (">= to >", r">=", ">"),
    ("< to <=", r"(?<![<-])<(?![<=])", "<="),
    ("> to >=", r"(?<![->=])>(?![>=])", ">="),
    ("== to !=", r"==", "!="),
    ("!= to ==", r"!=", "=="),
    ("~= to ==", r"~=", "=="),
    ("and to or", r"\band\b", "or"),
    ("or to and", r"\bor\b", "and"),
    ("drop not", r"\bnot\s+", ""),
    ("True to False", r"\bTrue\b", "False"),
    ("False to True", r"\bFalse\b", "True"),
    ("drop + 1", r"\s*\+\s*1\b(?!\.)", ""),
    ("drop - 1", r"\s*-\s*1\b(?!\.)", ""),
]
# Lines where a bare integer is a bound: slices, range(), Lua loops and min/max.
BOUND_LINE = re.compile(r"\[[^\]]*:[^\]]*\]|\brange\(|^\s*for\s+\w+\s*=|math\.(min|max)\(")
INTEGER = re.compile(r"(?<![\w.])(\d+)(?![\w.])")
LUA_STATEMENT = re.compile(r"^\s*(redis\.call|redis\.pcall|table\.insert|\w+\[#\w+ \+ 1\] =)")


@dataclasses.dataclass(frozen=True)
class Mutant:
    module: str
    line: int  # 1-based
    operator: str
    before: str
    after: str

    @property
    def path(self) -> Path:
        return PACKAGE / f"{self.module}.py"

    def describe(self) -> str:
        return (
            f"{self.path}:{self.line} [{self.operator}]\n"
            f"    - {self.before.strip()}\n    + {self.after.strip() or '(deleted)'}"
        )


def _skipped_lines(tree: ast.Module) -> set[int]:
    """Docstrings, ``__all__`` and type-only lines: mutating them changes nothing."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body:
            first = body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                skipped.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            skipped.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skipped.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return skipped


def _string_lines(tree: ast.Module) -> set[int]:
    """Lines inside multi-line string constants (the Lua scripts)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            end = node.end_lineno or node.lineno
            if end > node.lineno:
                lines.update(range(node.lineno + 1, end))
    return lines


def _deletable_lines(tree: ast.Module) -> set[int]:
    """One-line statements inside functions (not ``__init__``) whose removal changes
    behaviour rather than just crashing: calls and awaits, ``+=``, ``del``, ``raise``, and
    assignments to attributes or items (``self._space = anyio.Event()``)."""
    lines: set[int] = set()
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if func.name == "__init__":
            continue
        for stmt in ast.walk(func):
            if not isinstance(stmt, ast.stmt) or stmt.lineno != stmt.end_lineno:
                continue
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                continue  # a docstring
            if isinstance(stmt, (ast.Expr, ast.AugAssign, ast.Delete, ast.Raise)) or (
                isinstance(stmt, ast.Assign)
                and all(isinstance(t, (ast.Attribute, ast.Subscript)) for t in stmt.targets)
            ):
                lines.add(stmt.lineno)
    return lines


def _code_part(line: str, in_string: bool) -> str:
    """The part of a line that is code: Lua comments after ``--``, Python ones after ``#``."""
    marker = "--" if in_string else "#"
    head, _, _ = line.partition(marker)
    return head


def mutants_of(module: str, root: Path = ROOT) -> Iterator[Mutant]:
    path = root / PACKAGE / f"{module}.py"
    source = path.read_text()
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    skipped = _skipped_lines(tree)
    in_strings = _string_lines(tree)
    deletable = _deletable_lines(tree)
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if number in skipped or not stripped or stripped.startswith(("#", "--", "@")):
            continue
        in_string = number in in_strings
        code = _code_part(line, in_string)
        found: list[tuple[str, str]] = []
        for name, pattern, replacement in OPERATORS:
            for match in re.finditer(pattern, code):
                found.append((name, line[: match.start()] + replacement + line[match.end() :]))
        if BOUND_LINE.search(code):
            for match in INTEGER.finditer(code):
                value = int(match.group(1))
                for delta in (1, -1):
                    if value + delta < 0:
                        continue
                    after = line[: match.start()] + str(value + delta) + line[match.end() :]
                    found.append((f"{value} to {value + delta}", after))
        if in_string and LUA_STATEMENT.match(line):
            found.append(("delete Lua statement", "\n"))
        elif number in deletable:
            indent = line[: len(line) - len(line.lstrip())]
            found.append(("delete statement", f"{indent}pass\n"))
        seen: set[str] = set()
        for name, after in found:
            if after == line or after in seen:
                continue
            seen.add(after)
            mutated = "".join(lines[: number - 1]) + after + "".join(lines[number:])
            try:
                ast.parse(mutated)
            except SyntaxError:
                continue
            yield Mutant(module, number, name, line, after)


# --------------------------------------------------------------------------- running


def make_copy() -> Path:
    """A copy of what the tests need, so that the work tree is never mutated."""
    target = Path(tempfile.mkdtemp(prefix="redcurrent-mutate-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    shutil.copytree(ROOT / "src", target / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", target / "tests", ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", target / "pyproject.toml")
    return target


def run_tests(
    copy: Path, tests: list[str], timeout: float, *, show_failure: bool = False
) -> tuple[str, float]:
    """``passed``, ``failed`` or ``timeout`` for the tests against the copy."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            command,
            cwd=copy,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - started
    if proc.returncode != 0 and show_failure:
        tail = proc.stdout.decode(errors="replace").splitlines()[-40:]
        print("\n".join(tail), file=sys.stderr)
    return ("passed" if proc.returncode == 0 else "failed"), time.monotonic() - started


def check_copy_is_imported(copy: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(copy / "src"))
    out = subprocess.run(
        [sys.executable, "-c", "import redcurrent; print(redcurrent.__file__)"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy is not what the tests import ({out}): aborting")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(MODULES), default=[])
    parser.add_argument("--line", type=int, action="append", default=[], help="only these lines")
    parser.add_argument("--limit", type=int, help="run at most this many mutants")
    parser.add_argument("--sample", type=int, help="run this many mutants picked at random")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample")
    parser.add_argument("--tests", nargs="+", help="test files to run instead of the mapping")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument(
        "--timeout-factor", type=float, default=3.0, help="a mutant's time limit / baseline"
    )
    args = parser.parse_args(argv)

    # Mutants of a snapshot: other work on the tree meanwhile changes neither side.
    copy = make_copy()
    try:
        modules = args.module or sorted(MODULES)
        mutants = [m for module in modules for m in mutants_of(module, root=copy)]
        if args.line:
            mutants = [m for m in mutants if m.line in args.line]
        if args.sample is not None:
            mutants = random.Random(args.seed).sample(mutants, min(args.sample, len(mutants)))
        if args.limit is not None:
            mutants = mutants[: args.limit]
        if args.list:
            for mutant in mutants:
                print(mutant.describe())
            print(f"{len(mutants)} mutant(s)")
            return 0
        if not mutants:
            print("no mutants selected")
            return 0
        check_copy_is_imported(copy)
        baselines: dict[tuple[str, ...], float] = {}
        survivors: list[Mutant] = []
        counts = {"killed": 0, "survived": 0}
        for index, mutant in enumerate(mutants, start=1):
            tests = args.tests or MODULES[mutant.module]
            tests = [t for t in tests if (copy / t).exists()]
            key = tuple(tests)
            if key not in baselines:
                outcome, took = run_tests(copy, tests, timeout=3600, show_failure=True)
                print(f"baseline {' '.join(tests)}: {outcome} in {took:.0f}s", flush=True)
                if outcome != "passed":
                    print("the unmutated tests do not pass: fix them first", file=sys.stderr)
                    return 2
                baselines[key] = took
            target = copy / mutant.path
            original = target.read_text()
            lines = original.splitlines(keepends=True)
            lines[mutant.line - 1] = mutant.after
            target.write_text("".join(lines))
            try:
                limit = max(30.0, baselines[key] * args.timeout_factor)
                outcome, took = run_tests(copy, tests, timeout=limit)
            finally:
                target.write_text(original)
            verdict = "survived" if outcome == "passed" else "killed"
            counts[verdict] += 1
            print(
                f"[{index}/{len(mutants)}] {verdict.upper()} ({outcome}, {took:.0f}s) "
                + mutant.describe(),
                flush=True,
            )
            if verdict == "survived":
                survivors.append(mutant)
        print(f"\n{counts['killed']} killed, {counts['survived']} survived")
        if survivors:
            print("\nSurvivors (no test noticed these changes):")
            for mutant in survivors:
                print(mutant.describe())
        return 0
    finally:
        shutil.rmtree(copy, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
