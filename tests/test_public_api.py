"""The package's namespace: what ``import asyncmp`` offers is the public API and nothing else."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import asyncmp


def test_dir_shows_exactly_the_public_names() -> None:
    # Private modules and dunders start with an underscore; anything else is a promise.
    public = {name for name in dir(asyncmp) if not name.startswith("_")}
    assert public == set(asyncmp.__all__)


def test_every_name_in_all_exists_once() -> None:
    assert len(asyncmp.__all__) == len(set(asyncmp.__all__))
    missing = [name for name in asyncmp.__all__ if not hasattr(asyncmp, name)]
    assert missing == []


def test_shared_is_public() -> None:
    assert "shared" in asyncmp.__all__ and "SharedMemoryError" in asyncmp.__all__
    assert issubclass(asyncmp.SharedMemoryError, asyncmp.AsyncmpError)
    # shared()'s docstring names the threshold: it is public too.
    assert "SHARED_THRESHOLD" in asyncmp.__all__
    assert asyncmp.SHARED_THRESHOLD == 1024 * 1024


def test_each_name_is_imported_on_first_use_from_where_type_checkers_see_it() -> None:
    """``asyncmp/__init__.py`` imports its names on first use (so that a pool worker loads
    only its own side); where it takes each from is where its ``TYPE_CHECKING`` imports,
    which type checkers, IDEs and the docs read, say it is."""
    tree = ast.parse(Path(asyncmp.__file__).read_text())
    shown = {
        alias.asname or alias.name: f".{node.module}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names
    }
    assert set(shown) == set(asyncmp.__all__)
    assert asyncmp._HOMES == shown
    for name, home in shown.items():
        defined = getattr(importlib.import_module(home, "asyncmp"), name)
        assert getattr(asyncmp, name) is defined, name
    star: dict[str, object] = {}
    exec("from asyncmp import *", star)
    assert set(star) - {"__builtins__"} == set(asyncmp.__all__)
