"""Render build/chaos-report.json (written by ``nox -s chaos``) as the table of
docs/guarantees.md, between its ``<!-- chaos-table -->`` markers.

    python tools/chaos_table.py                 # rewrite the table in docs/guarantees.md
    python tools/chaos_table.py --print         # print it instead
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- chaos-table -->", "<!-- /chaos-table -->"
COLUMNS = ("published", "handled", "duplicates", "dead_letters", "lost", "pending")


def render(report: dict[str, dict[str, object]]) -> str:
    lines = [
        "| server / scenario | faults | published | handled | duplicates | dead letters"
        " | lost | pending after | last fault → empty PEL |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name in sorted(report):
        row = report[name]
        recovery = row.get("recovery_s")
        faults = "; ".join(str(f) for f in row.get("faults", []) or []) or "-"  # type: ignore[union-attr]
        cells = [f"{row.get(c, '-'):,}" if isinstance(row.get(c), int) else "-" for c in COLUMNS]
        recovery_text = f"{recovery:.1f} s" if isinstance(recovery, (int, float)) else "-"
        lines.append(f"| {name} | {faults} | " + " | ".join(cells) + f" | {recovery_text} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=ROOT / "build" / "chaos-report.json")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "guarantees.md")
    parser.add_argument("--print", action="store_true", help="print the table only")
    args = parser.parse_args()
    table = render(json.loads(args.report.read_text()))
    if args.print:
        print(table)
        return
    page = args.page.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(page):
        raise SystemExit(f"{args.page} has no {BEGIN} ... {END} markers")
    args.page.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", page))
    print(f"table of {len(json.loads(args.report.read_text()))} scenarios written to {args.page}")


if __name__ == "__main__":
    main()
