"""The documentation site's sources (docs/, mkdocs.yml), checked without mkdocs.

``nox -s docs`` builds the site strictly (broken links, anchors and cross-references
fail it); these checks catch in the ordinary suite what a reader would trip over
first: an example that does not parse or imports a name redcurrent does not have, a
page missing from the navigation, a public name missing from the API reference, and
the ACL rule drifting from the README's, which the ACL tests run as written.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import redcurrent
import redcurrent.errors
import redcurrent.otel
import redcurrent.prometheus
import redcurrent.testing

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', re.M)
PUBLIC = {
    "redcurrent": set(redcurrent.__all__),
    "redcurrent.errors": set(redcurrent.errors.__all__),
    "redcurrent.testing": set(redcurrent.testing.__all__),
    "redcurrent.otel": set(redcurrent.otel.__all__),
    "redcurrent.prometheus": set(redcurrent.prometheus.__all__),
}


def _blocks(page: Path, language: str) -> list[str]:
    """The page's fenced blocks in ``language``, with snippets (``--8<--``) inlined."""
    found = [body for lang, body in FENCE.findall(page.read_text()) if lang == language]
    return [SNIPPET.sub(lambda m: (ROOT / m.group(1)).read_text(), body) for body in found]


def _python_examples() -> list[tuple[str, int, str]]:
    return [
        (str(page.relative_to(DOCS)), n, code)
        for page in PAGES
        for n, code in enumerate(_blocks(page, "python"))
    ]


EXAMPLES = _python_examples()


def _parse(code: str) -> ast.Module:
    # Examples may await at the top level, as a reader would in an async REPL.
    flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    tree: ast.Module = compile(code, "<docs>", "exec", flags=flags)
    return tree


def test_the_guide_has_python_examples() -> None:
    assert len([e for e in EXAMPLES if e[0].startswith("guide/")]) >= 20


@pytest.mark.parametrize(("page", "index", "code"), EXAMPLES, ids=lambda v: str(v)[:30])
def test_every_python_example_parses_and_imports_public_names(
    page: str, index: int, code: str
) -> None:
    tree = _parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in PUBLIC:
            missing = {a.name for a in node.names} - PUBLIC[node.module]
            assert not missing, f"{page} example {index}: {node.module} has no {missing}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("redcurrent."):
            assert node.module in PUBLIC, f"{page} example {index} imports {node.module}"


def _nav_pages() -> list[str]:
    config = (ROOT / "mkdocs.yml").read_text()
    nav = config.split("\nnav:\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r":\s*(\S+\.md)\s*$", nav, re.M)


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    nav = _nav_pages()
    assert len(nav) == len(set(nav))
    assert sorted(nav) == sorted(str(p.relative_to(DOCS)) for p in PAGES)


def test_relative_links_between_pages_point_at_pages() -> None:
    for page in PAGES:
        text = FENCE.sub("", page.read_text())
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", text):
            assert (page.parent / target).resolve().is_file(), f"{page.name} -> {target}"


def test_the_api_reference_covers_every_public_name() -> None:
    reference = (DOCS / "reference" / "redcurrent.md").read_text()
    rendered = set(re.findall(r"^::: redcurrent\.(\w+)$", reference, re.M))
    # The errors are documented with their module, redcurrent.errors; the version is text.
    expected = PUBLIC["redcurrent"] - PUBLIC["redcurrent.errors"] - {"__version__"}
    assert rendered == expected
    for module in ("errors", "testing"):
        page = (DOCS / "reference" / f"{module}.md").read_text()
        assert f"::: redcurrent.{module}\n" in page


def _acl_rule(text: str) -> str:
    block = re.search(r"```\w*\n(ACL SETUSER .*?)```", text, re.S)
    assert block is not None
    return " ".join(block.group(1).split())


def test_the_acl_rule_is_the_readmes() -> None:
    readme = (ROOT / "README.md").read_text()
    guide = (DOCS / "guide" / "security.md").read_text()
    assert _acl_rule(guide) == _acl_rule(readme)


def test_guarantees_page_keeps_the_chaos_table_markers() -> None:
    # tools/chaos_table.py rewrites the table between these markers in place.
    page = (DOCS / "guarantees.md").read_text()
    assert page.count("<!-- chaos-table -->") == 1
    assert page.count("<!-- /chaos-table -->") == 1
