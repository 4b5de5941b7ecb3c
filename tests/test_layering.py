"""The package's layering, read from the source with `ast` (nothing is imported).

docs/architecture.md "Layers" holds the layer order as a fenced ``layers`` block, highest layer first; each line
names the top-level parts of ``moe_compress`` (a subpackage or a module; ``moe_compress`` itself is the package's
``__init__``) on one layer. Checked over every module of src/moe_compress, imports inside functions and under
``TYPE_CHECKING`` included:

- an import between two parts goes strictly down the order (parts of one layer do not import each other);
- every module belongs to a listed part;
- no import cycle between modules;
- no ``from module import _private`` across modules;
- nothing in the package imports the repository's ``tools`` (the research tooling sits above the package);
- registration is complete: every module that registers a method is found by ``moe_compress/methods``'s
  discovery of ``pruning/``, ``merging/``, ``hybrid/`` (one file per method, nothing else to edit), every
  observer plug-in is imported by ``calibration/observers.py``.

The checker also runs on small synthetic packages with a bad import of each kind, so that it is seen to fail.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "moe_compress"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


@dataclass(frozen=True)
class Edge:
    source: str   # importing module, e.g. moe_compress.models.lazy
    target: str   # imported module (or package), e.g. moe_compress.calibration.runner
    names: tuple[str, ...]
    line: int


def documented_layers(text: str) -> list[list[str]]:
    """The ``layers`` block of docs/architecture.md: [[part, ...] per layer], highest layer first."""
    block = re.search(r"^```layers\n(.*?)^```", text, re.S | re.M)
    assert block, "docs/architecture.md has no ```layers block"
    return [line.split() for line in block.group(1).splitlines() if line.strip()]


def module_files(src: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} of every module under ``src/package`` (a package is its ``__init__``)."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_edges(modules: dict[str, Path], roots: tuple[str, ...]) -> tuple[list[Edge], list[Edge]]:
    """(edges between the modules, imports of other top-level names in ``roots``), from every import statement.

    ``from pkg import name`` is an edge to the submodule ``pkg.name`` when there is one, else to ``pkg``.
    """
    edges, outside = [], []
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [(a.name, ()) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here[: len(here) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append((sub, ()) if sub in modules else (base, (alias.name,)))
            else:
                continue
            for target, names in targets:
                top = target.split(".")[0]
                if top == roots[0]:
                    while target not in modules and "." in target:  # `import a.b.c` of a name inside a.b
                        target = target.rsplit(".", 1)[0]
                    edges.append(Edge(mod, target, names, node.lineno))
                elif top in roots[1:]:
                    outside.append(Edge(mod, target, names, node.lineno))
    return edges, outside


def part_of(module: str, package: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else package


def upward_edges(edges: list[Edge], layers: list[list[str]], package: str) -> list[str]:
    """Imports that do not go strictly down the layer order, and modules of parts the order does not list."""
    rank = {part: len(layers) - i for i, line in enumerate(layers) for part in line}
    problems = []
    for e in edges:
        a, b = part_of(e.source, package), part_of(e.target, package)
        for part, mod in ((a, e.source), (b, e.target)):
            if part not in rank:
                problems.append(f"{mod}: part {part!r} is not in the documented layer order")
        if a != b and a in rank and b in rank and rank[b] >= rank[a]:
            where = "on the same layer as" if rank[b] == rank[a] else "on a higher layer than"
            problems.append(f"{e.source}:{e.line} imports {e.target} ({b} is {where} {a})")
    return sorted(set(problems))


def unlisted_parts(modules: dict[str, Path], layers: list[list[str]], package: str) -> list[str]:
    listed = {part for line in layers for part in line}
    return sorted({part_of(m, package) for m in modules} - listed)


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself), Tarjan's way."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
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


def private_imports(edges: list[Edge]) -> list[str]:
    """``from other_module import _name`` (dunder names such as ``__version__`` are public)."""
    return sorted(f"{e.source}:{e.line} imports {', '.join(n for n in e.names if _private(n))} from {e.target}"
                  for e in edges if e.target != e.source and any(_private(n) for n in e.names))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def check(src: Path, package: str, layers: list[list[str]], foreign: tuple[str, ...] = ("tools",)) -> list[str]:
    """Every layering problem of ``src/package``, one line each."""
    modules = module_files(src, package)
    edges, outside = import_edges(modules, (package, *foreign))
    problems = [f"part {p!r} is not in the documented layer order" for p in unlisted_parts(modules, layers, package)]
    problems += upward_edges(edges, layers, package)
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    problems += private_imports(edges)
    problems += [f"{e.source}:{e.line} imports {e.target} (the package must not import the repository's tools)"
                 for e in outside]
    return problems


# -- the package -------------------------------------------------------------------------------------------------

def test_package_layering_holds():
    problems = check(SRC, PACKAGE, documented_layers(ARCHITECTURE.read_text(encoding="utf-8")))
    assert not problems, "layering violations (docs/architecture.md, Layers):\n" + "\n".join(problems)


def test_every_documented_part_exists():
    """A part named in the layer order that is not in the package is a stale document."""
    modules = module_files(SRC, PACKAGE)
    present = {part_of(m, PACKAGE) for m in modules}
    stale = [p for line in documented_layers(ARCHITECTURE.read_text(encoding="utf-8")) for p in line
             if p not in present]
    assert not stale, f"docs/architecture.md lists parts that do not exist: {stale}"


def _registering_modules(folder: Path, decorator: str) -> set[str]:
    pattern = re.compile(rf"^@{decorator}\b", re.M)
    return {".".join(p.relative_to(SRC).with_suffix("").parts) for p in folder.rglob("*.py")
            if pattern.search(p.read_text(encoding="utf-8"))}


def _imported_by(module: str) -> set[str]:
    modules = module_files(SRC, PACKAGE)
    edges, _ = import_edges({module: modules[module]} | {m: p for m, p in modules.items() if m != module},
                            (PACKAGE,))
    return {e.target for e in edges if e.source == module}


def test_every_method_module_is_registered_by_the_package():
    """Every module under methods/ that registers a method lies in one of the discovered subpackages, and at
    runtime the registry holds a method from each of them."""
    import importlib
    import sys

    from moe_compress.methods.base import all_methods

    defining = _registering_modules(SRC / PACKAGE / "methods", "register")
    assert defining, "no method module found"
    outside = {m for m in defining if m.split(".")[2] not in ("pruning", "merging", "hybrid")}
    assert not outside, f"method modules outside pruning/, merging/, hybrid/ are not discovered: {sorted(outside)}"
    methods = all_methods()
    for module in defining:
        importlib.import_module(module)
        assert module in sys.modules
    found = {cls.__module__ for cls in methods.values()}
    assert defining <= found, f"registered methods not discovered: {sorted(defining - found)}"


def test_every_observer_plugin_is_imported_by_observers():
    defining = _registering_modules(SRC / PACKAGE / "calibration", "register_observer")
    assert defining, "no observer plug-in found"
    missing = defining - _imported_by("moe_compress.calibration.observers")
    assert not missing, f"add to src/moe_compress/calibration/observers.py: {sorted(missing)}"


def test_registries_are_full_at_runtime():
    """The discovery and the explicit observer list fill the registries: a lookup sees every method and observer."""
    from moe_compress.calibration.observer_base import EXTRA_OBSERVERS
    from moe_compress.calibration.observers import make_observers  # noqa: F401  (registers the plug-ins)
    from moe_compress.methods.base import all_methods

    assert {"frequency", "reap", "refit", "hcsmoe", "premoe"} <= set(all_methods())
    assert {"output_similarity", "input_moment", "tokens_by_domain", "routed_output_sum"} <= set(EXTRA_OBSERVERS)


# -- the checker fails on bad imports ----------------------------------------------------------------------------

def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


GOOD = {
    "__init__.py": "",
    "errors.py": "class UserError(Exception): ...\n",
    "low/__init__.py": "",
    "low/a.py": "from pkg.errors import UserError\n",
    "low/b.py": "from pkg.low.a import UserError\n",
    "high.py": "from pkg.low import b\n\ndef f():\n    from pkg.low.a import UserError\n",
}
TOY_LAYERS = [["high"], ["low"], ["pkg", "errors"]]


def test_checker_accepts_a_clean_tree(tmp_path):
    assert check(_write_tree(tmp_path, GOOD), "pkg", TOY_LAYERS) == []


@pytest.mark.parametrize("name, text, expected", [
    ("low/c.py", "def f():\n    from pkg.high import f\n",
     "pkg.low.c:2 imports pkg.high (high is on a higher layer than low)"),
    ("errors.py", "from pkg.low.a import UserError\n", "import cycle: pkg.errors -> pkg.low.a"),
    ("low/c.py", "from pkg.low.a import _helper\n", "pkg.low.c:1 imports _helper from pkg.low.a"),
    ("low/c.py", "from .a import _helper\n", "pkg.low.c:1 imports _helper from pkg.low.a"),
    ("low/c.py", "import tools.testbed\n", "pkg.low.c:1 imports tools.testbed (the package must not import"),
    ("middle.py", "", "part 'middle' is not in the documented layer order"),
])
def test_checker_reports_a_bad_import(tmp_path, name, text, expected):
    problems = check(_write_tree(tmp_path, {**GOOD, name: text}), "pkg", TOY_LAYERS)
    assert any(p.startswith(expected) or expected in p for p in problems), problems


def test_checker_refuses_imports_within_one_layer(tmp_path):
    layers = [["high", "side"], ["low"], ["pkg", "errors"]]
    tree = _write_tree(tmp_path, {**GOOD, "side.py": "from pkg.high import f\n"})
    assert check(tree, "pkg", layers) == ["pkg.side:1 imports pkg.high (high is on the same layer as side)"]
