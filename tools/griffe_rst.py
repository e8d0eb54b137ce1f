"""A griffe extension for the docs site (mkdocs.yml): reST markup of redcurrent's
docstrings as Markdown, so mkdocstrings renders them as the source reads.

The docstrings are written for ``help()`` and IDEs in Sphinx's habits; rather than
rewrite them, this turns, before mkdocstrings parses them:

- roles (``:class:`~redcurrent.Message```, ``:meth:`Topic.publish```) into code, linked
  (an autorefs cross-reference) when the target is a public object the API reference
  renders, so ``mkdocs build --strict`` checks every such link; a role naming something
  private stays plain code;
- literal blocks (a paragraph ending in ``::`` and the indented block after it) into
  fenced code (Python when it parses as Python, as Sphinx would highlight it).

Loaded by path from mkdocs.yml (``tools/griffe_rst.py``), never imported by the library.
"""

from __future__ import annotations

import ast
import re
import textwrap
from typing import Any

import griffe

PUBLIC_MODULES = ("redcurrent.errors", "redcurrent.testing", "redcurrent")
ROLE = re.compile(r":(?P<role>class|meth|func|attr|data|mod|exc|obj):`(?P<target>[^`]+)`")
CALLABLE_ROLES = {"meth", "func"}


def _target(obj: griffe.Object | griffe.Alias) -> griffe.Object | None:
    try:
        return obj.final_target if isinstance(obj, griffe.Alias) else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _walk(start: griffe.Object | griffe.Alias, parts: list[str]) -> griffe.Object | None:
    obj = _target(start)
    for part in parts:
        if obj is None:
            return None
        member = obj.all_members.get(part) if obj.is_class else obj.members.get(part)
        obj = _target(member) if member is not None else None
    return obj


class RstMarkup(griffe.Extension):
    """Rewrite the docstrings of the ``redcurrent`` package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "redcurrent":
            return
        self.package = pkg
        self.public = self._public_paths(pkg)
        for obj in self._objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = self.convert(obj.docstring.value, obj)

    def _public_paths(self, pkg: griffe.Module) -> dict[str, str]:
        """Canonical path -> the path the API reference renders it under."""
        public: dict[str, str] = {}
        for module_path in PUBLIC_MODULES:
            module = _walk(pkg, module_path.split(".")[1:])
            if module is None:
                continue
            public.setdefault(module.path, module_path)
            for name in map(str, module.exports or ()):
                obj = _walk(module, [name])
                if obj is None or obj.path in public:
                    continue
                public[obj.path] = f"{module_path}.{name}"
                if obj.is_class:
                    for member_name, member in obj.all_members.items():
                        target = _target(member)
                        if target is not None and not member_name.startswith("_"):
                            public.setdefault(target.path, f"{module_path}.{name}.{member_name}")
        return public

    def _objects(self, root: griffe.Object) -> list[griffe.Object]:
        found: list[griffe.Object] = []
        stack = [root]
        while stack:
            obj = stack.pop()
            found.append(obj)
            stack.extend(m for m in obj.members.values() if isinstance(m, griffe.Object))
        return found

    def _lookup(self, owner: griffe.Object, name: str) -> griffe.Object | None:
        parts = name.split(".")
        if parts[0] == "redcurrent":
            return _walk(self.package, parts[1:])
        scope: griffe.Object | None = owner
        while scope is not None:
            members = scope.all_members if scope.is_class else scope.members
            if parts[0] in members:
                return _walk(members[parts[0]], parts[1:])
            scope = scope.parent
        # Docstrings name the public API as users import it: `RetryPolicy` in errors.py.
        return _walk(self.package, parts)

    def _role(self, match: re.Match[str], owner: griffe.Object) -> str:
        role, target = match["role"], match["target"].strip()
        explicit = re.fullmatch(r"(?P<text>.+?)\s*<(?P<path>[^>]+)>", target)
        if explicit:
            text, path = explicit["text"], explicit["path"]
        else:
            path = target.lstrip("~")
            text = path.rsplit(".", 1)[-1] if target.startswith("~") else path
            if role in CALLABLE_ROLES and not text.endswith(")"):
                text += "()"
        obj = self._lookup(owner, path.removesuffix("()"))
        rendered = self.public.get(obj.path) if obj is not None else None
        return f"[`{text}`][{rendered}]" if rendered else f"`{text}`"

    def convert(self, text: str, owner: griffe.Object) -> str:
        text = ROLE.sub(lambda m: self._role(m, owner), text)
        return _literal_blocks(text)


def _literal_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        stripped = line.rstrip()
        head = stripped[:-2]
        # reST: "text::" reads "text:", "text ::" reads "text", a lone "::" disappears.
        if head.strip():
            out.append(head.rstrip() if head.endswith(" ") else head + ":")
        indent = len(line) - len(line.lstrip())
        i += 1
        block: list[str] = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            block.append(lines[i])
            i += 1
        while block and not block[-1].strip():
            block.pop()
        code = textwrap.dedent("\n".join(block)).strip("\n")
        out.extend(["", "```" + _language(code), *code.split("\n"), "```", ""])
    return "\n".join(out)


def _language(code: str) -> str:
    """Python when the block parses as Python (what Sphinx would highlight), else text."""
    try:
        ast.parse(code)
    except SyntaxError:
        return "text"
    return "python"
