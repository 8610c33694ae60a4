"""Griffe extension for the docs build: render the reST bits of asyncmp's docstrings.

The docstrings use reST roles such as ``:class:`ProtocolError``` and ``:meth:`recv_bytes```,
which Markdown would show literally. This turns each into inline code, linked to the public
object it names when that object is part of asyncmp's API (``asyncmp.X`` or a member of it),
so autorefs can resolve it; anything else (a private helper, the stdlib, anyio) stays plain
inline code, which never produces an unresolved-reference warning in a strict build. A
``::`` that introduces a literal block is dropped (or becomes ``:``): the indented block
after it is a Markdown code block as it stands.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|data|exc|obj|mod|const):`(~?)([^`]+)`")
#: A line that is only ``::``, or a paragraph that ends in ``::``.
_LITERAL_MARKER = re.compile(r"(?P<alone>^[ \t]*::$)|(?<=\S)::$", re.MULTILINE)


def _public_path(found: griffe.Object | griffe.Alias, package: griffe.Module) -> str | None:
    """``asyncmp.X[.member]`` for an object that asyncmp exports, else None."""
    parts = found.canonical_path.split(".")
    if len(parts) < 3 or parts[0] != package.name:
        return None
    # asyncmp._package.module.Name[.member]: public if the package exports Name from there.
    for i in range(2, len(parts)):
        exported = package.members.get(parts[i])
        if exported is None or not exported.is_public:
            continue
        try:
            if exported.canonical_path == ".".join(parts[: i + 1]):
                return ".".join([package.name, *parts[i:]])
        except griffe.AliasResolutionError:
            return None
    return None


def _lookup(scope: griffe.Object | griffe.Alias, name: str) -> griffe.Object | griffe.Alias | None:
    try:
        return scope[name]  # type: ignore[no-any-return]
    except (KeyError, griffe.AliasResolutionError, ValueError):
        return None


def _literal_marker(match: re.Match[str]) -> str:
    return "" if match.group("alone") is not None else ":"


class SphinxRoles(griffe.Extension):
    """Rewrite reST roles and literal-block markers in every docstring into Markdown."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg, pkg, set())

    def _walk(self, obj: griffe.Object, pkg: griffe.Module, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            text = _ROLE.sub(lambda m: self._render(m, obj, pkg), obj.docstring.value)
            obj.docstring.value = _LITERAL_MARKER.sub(_literal_marker, text)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, pkg, seen)  # type: ignore[arg-type]

    def _render(self, match: re.Match[str], obj: griffe.Object, pkg: griffe.Module) -> str:
        short, target = match.group(1), match.group(2).strip()
        shown = target.rsplit(".", 1)[-1] if short else target
        scopes: list[griffe.Object] = []
        scope: griffe.Object | None = obj
        while scope is not None:  # the object itself, its class, its module, the package
            scopes.append(scope)
            scope = scope.parent
        for candidate in scopes:
            found = _lookup(candidate, target)
            if found is not None:
                public = _public_path(found, pkg)
                if public is not None:
                    return f"[`{shown}`][{public}]"
                break
        return f"`{shown}`"
