"""The package's layers, read off its import statements (no module is imported).

``src/asyncmp`` is folders of layers: ``_core`` (what every adapter stands on) and the
adapters (``_connection``, ``_queue``, ``_process``, ``_pool``, ``_shared``, ``_remote``).
What is checked, for every import statement anywhere in a module (in functions and under
``if TYPE_CHECKING`` too: a cycle there is a concept without a home of its own):

* every module lives in a layer folder; a folder's ``__init__.py`` imports nothing, so that
  importing one of its modules (a pool worker importing ``_pool.worker``) loads no other;
* no import cycle between modules, of any length;
* ``_core`` imports no adapter, and nothing in ``src`` imports the package's own
  ``asyncmp/__init__.py``;
* an adapter takes from another adapter only what ``asyncmp/__init__.py`` exports, and from
  the module that ``__init__.py`` takes it from (``from .._connection.connection import
  AsyncConnection``); never a private name, never a whole module;
* no class of ``MAX_CLASS_LINES`` lines or more;
* the pool worker's module, which spawn and forkserver workers import by name, loads no
  event loop library and nothing of asyncmp but the worker side (in a fresh interpreter).

A parent package's ``__init__.py``, which Python runs before a module of the package, is no
edge of the graph: it is the facade, and it imports everything.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.pool_workers import EVENT_LOOP_LIBRARIES, WORKER_SIDE

PACKAGE = "asyncmp"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE
CORE = "_core"
MAX_CLASS_LINES = 400
#: The module a pool's spawn or forkserver worker imports by name to run.
WORKER_ENTRY = "asyncmp._pool.worker"

# Known violations, to be removed by the renovation's next steps. Each entry must still be
# a violation: one that is fixed fails the test until it is taken off its list.
#: (importer, imported module, name): another adapter's private names.
ALLOWED_PRIVATE_IMPORTS = {
    # the pool starts its workers, and ties them to itself, through the process adapter's
    # private helpers
    ("asyncmp._pool.pool", "asyncmp._process.process", "start_with_pipe"),
    ("asyncmp._pool.pool", "asyncmp._process.process", "Lifeline"),
    # shared()'s wrapper and its refusal context, used where pickles cross a boundary
    ("asyncmp._pool.pickling", "asyncmp._shared.shared", "Shared"),
    ("asyncmp._pool.pickling", "asyncmp._shared.shared", "refusing"),
    ("asyncmp._remote.connections", "asyncmp._shared.shared", "refusing"),
    # the record of the segments a pickle makes, which the pool gives back when unsent
    ("asyncmp._pool.job", "asyncmp._shared.shared", "SegmentsMade"),
    ("asyncmp._pool.map", "asyncmp._shared.shared", "SegmentsMade"),
    ("asyncmp._pool.pool", "asyncmp._shared.shared", "SegmentsMade"),
}


@dataclass(frozen=True)
class Import:
    importer: str  # the module whose statement this is
    module: str  # the module it loads
    names: tuple[str, ...]  # what it takes from it (empty: the module itself)
    line: int

    def __str__(self) -> str:
        what = f" ({', '.join(self.names)})" if self.names else ""
        return f"{self.importer}:{self.line} imports {self.module}{what}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _imports(module: str) -> Iterator[Import]:
    """Every import of asyncmp's modules in *module*, resolved to the module it loads."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    here = module if _is_package(module) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield Import(module, alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            assert target in MODULES, f"{module}:{node.lineno}: no module {target}"
            names: list[str] = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # `from .._core import platform`: the module itself
                    yield Import(module, sub, (), node.lineno)
                else:
                    names.append(alias.name)
            if names:
                yield Import(module, target, tuple(names), node.lineno)


IMPORTS: list[Import] = [imp for module in MODULES for imp in _imports(module)]


def _layer(module: str) -> str | None:
    """The layer folder of *module* (``_core``, ``_pool``, ...); None for the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        graph[imp.importer].add(imp.module)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or with a self-import
    (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _exported() -> set[tuple[str, str]]:
    """(module, name) for each name ``asyncmp/__init__.py`` takes from a module of its own."""
    return {(imp.module, name) for imp in IMPORTS if imp.importer == PACKAGE for name in imp.names}


def _private_imports() -> list[tuple[Import, str | None]]:
    """Imports from another adapter of what asyncmp doesn't export there (name None: a
    whole module)."""
    exported = _exported()
    found: list[tuple[Import, str | None]] = []
    for imp in IMPORTS:
        mine, theirs = _layer(imp.importer), _layer(imp.module)
        if mine in (None, CORE) or theirs in (None, CORE) or mine == theirs:
            continue
        if not imp.names:
            found.append((imp, None))
        found += [(imp, n) for n in imp.names if (imp.module, n) not in exported]
    return found


def _large_classes() -> dict[str, int]:
    sizes = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines >= MAX_CLASS_LINES:
                    sizes[f"{module}.{node.name}"] = lines
    return sizes


def test_the_source_is_found() -> None:
    assert (SRC / "__init__.py").is_file(), SRC
    assert f"{PACKAGE}.{CORE}.wire" in MODULES
    assert any(imp.importer == PACKAGE for imp in IMPORTS)


def test_every_module_lives_in_a_layer_folder() -> None:
    flat = [m for m in MODULES if m != PACKAGE and len(m.split(".")) == 2 and not _is_package(m)]
    assert flat == [], "move each into _core or an adapter's folder"
    deep = [m for m in MODULES if len(m.split(".")) > 3]
    assert deep == [], "one level of folders: _core/x.py, _pool/y.py"


def test_layer_folders_import_nothing() -> None:
    packages = [m for m in MODULES if m != PACKAGE and _is_package(m)]
    assert packages, "no layer folders found"
    for package in packages:
        tree = ast.parse(MODULES[package].read_text())
        statements = [n for n in tree.body if not isinstance(n, ast.Expr)]
        assert statements == [], f"{package}/__init__.py holds only its docstring"


def test_no_import_cycle() -> None:
    cycles = _cycles(_graph())
    assert cycles == [], "modules that import each other (TYPE_CHECKING imports count too)"


def test_core_imports_no_adapter() -> None:
    wrong = [str(i) for i in IMPORTS if _layer(i.importer) == CORE and _layer(i.module) != CORE]
    assert wrong == [], "_core stands below every adapter"


def test_nothing_imports_the_package_facade() -> None:
    wrong = [str(i) for i in IMPORTS if i.module == PACKAGE]
    assert wrong == [], "import from the module that defines the name, not from asyncmp"


def test_adapters_take_only_public_names_from_each_other() -> None:
    found = {(imp.importer, imp.module, name or "<the module>") for imp, name in _private_imports()}
    new = sorted(found - ALLOWED_PRIVATE_IMPORTS)
    assert new == [], (
        "an adapter may take from another only the names asyncmp/__init__.py exports, from "
        "the module __init__.py takes them from; move what they share into _core"
    )
    fixed = sorted(ALLOWED_PRIVATE_IMPORTS - found)
    assert fixed == [], "no longer imported: take these off ALLOWED_PRIVATE_IMPORTS"


def test_no_class_of_400_lines_or_more() -> None:
    sizes = _large_classes()
    assert sizes == {}, f"classes of {MAX_CLASS_LINES} lines or more: split each concept out"


def test_the_checks_see_violations() -> None:
    """The checks themselves, on made-up graphs and imports: a cycle of three is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _layer("asyncmp._pool.pool") == "_pool" and _layer(PACKAGE) is None


def test_a_pool_worker_imports_only_what_it_runs() -> None:
    """Importing the worker's module runs ``asyncmp/__init__.py`` first: that must not load
    the package (anyio and the parent's side) in every spawn or forkserver worker."""
    code = (
        "import sys; before = set(sys.modules); import importlib; "
        f"print(importlib.import_module({WORKER_ENTRY!r}).__file__); "
        "print(*sorted(set(sys.modules) - before))"
    )
    path = os.pathsep.join([str(SRC.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    where, _, names = result.stdout.partition("\n")
    assert Path(where).is_relative_to(SRC), where
    loaded = set(names.split())
    libraries = sorted(m for m in loaded if m.split(".")[0] in EVENT_LOOP_LIBRARIES)
    assert libraries == [], "a pool worker runs plain calls: import these where they are used"
    ours = sorted(m for m in loaded if m.split(".")[0] == PACKAGE and m not in WORKER_SIDE)
    assert ours == [], "the worker side imports only the modules of WORKER_SIDE"


def test_the_worker_names_the_shared_module_by_its_real_path() -> None:
    """The worker looks the shared-memory module up by name (so that importing it stays
    lazy): a move of that module must move the name too."""
    from asyncmp._pool import worker

    module = importlib.import_module(worker._SHARED_MODULE)
    assert hasattr(module, "Shared"), worker._SHARED_MODULE


DESIGN = SRC.parents[1] / "docs" / "design.md"
_ROW = re.compile(r"^\| `(_[a-z]+\.[a-z_]+)` \| .* \| ([^|]+) \|$")


def test_the_design_pages_table_of_layers_is_the_import_graph() -> None:
    # docs/design.md lists every module with what it imports of asyncmp: read off the
    # import statements here, so that the picture can't fall behind the code.
    listed: dict[str, set[str]] = {}
    for line in DESIGN.read_text().splitlines():
        if match := _ROW.match(line):
            cell = match[2].strip()
            names = set() if cell == "stdlib only" else set(re.findall(r"`([^`]+)`", cell))
            listed[f"{PACKAGE}.{match[1]}"] = {f"{PACKAGE}.{name}" for name in names}
    graph = _graph()
    real = {m: graph[m] - {m} for m in MODULES if m.count(".") == 2}
    assert listed == real, "docs/design.md's table of layers: update its rows"
