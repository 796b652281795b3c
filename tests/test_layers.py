"""Imports only point down (docs/architecture.md): an AST test over ``src/brainfm``.

Every ``import`` / ``from ... import`` in a module counts, at module top and inside functions
alike (an import inside a function is still a dependency). Three rules:

1. a module imports only its own layer or a lower one (:data:`LAYERS`, bottom to top);
2. a few pairs inside one layer are forbidden (:data:`FORBIDDEN`: a model never reads files, so
   ``models`` imports nothing from ``data``; a store, dataset or datamodule never knows about models);
3. no import cycle between modules.

:data:`KNOWN` lists the violations still allowed while they are being fixed. The list only
shrinks: the test fails on a violation not in it, and on an entry that no longer occurs.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "brainfm"

# bottom to top; the first part of a module's name below ``brainfm`` picks its layer
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"__init__", "errors", "config", "io", "instantiate", "logs", "deprecations", "checkpoints"}),
    ("data and models", {"data", "models"}),
    ("parallelism", {"strategies"}),
    ("tasks", {"tasks"}),
    ("trained runs", {"runs"}),
    ("using a run, training", {"eval", "training"}),
    ("drivers", {"search", "scaling", "bench"}),
    ("entry points", {"cli"}),
]

# (importer prefix, imported prefix) inside one layer that must not meet
FORBIDDEN: dict[tuple[str, str], str] = {
    ("brainfm.models", "brainfm.data"): "a model never reads files: the network assignment, ROI order etc. are passed in",
    **{(f"brainfm.data.{part}", "brainfm.models"): "a store never knows about models"
       for part in ("stores", "datasets", "datamodules", "preprocess", "windows", "normalization", "splits")},
}


def _forbidden(a: str, b: str) -> str | None:
    for (pa, pb), why in FORBIDDEN.items():
        if (a == pa or a.startswith(pa + ".")) and (b == pb or b.startswith(pb + ".")):
            return why
    return None


# (importer, imported) module pairs allowed for now. This list only shrinks: fix one, delete it.
KNOWN: set[tuple[str, str]] = set()


def _layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[-1] == "__main__":  # ``python -m brainfm.x``: an entry point, which no module can import
        return len(LAYERS) - 1
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, (_, members) in enumerate(LAYERS):
        if top in members:
            return i
    raise AssertionError(f"{module}: brainfm.{top} is in no layer; add it to LAYERS here and to docs/architecture.md")


def _modules() -> dict[str, Path]:
    """Module name -> file (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _without_main_block(tree: ast.Module) -> ast.Module:
    """``tree`` without its top-level ``if __name__ == "__main__":`` blocks: code that runs only as a script (``python
    -m brainfm.x``) is an entry point, in the entry points' layer, whatever module holds it."""
    def is_main(node: ast.stmt) -> bool:
        return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")
    return ast.Module(body=[n for n in tree.body if not is_main(n)], type_ignores=[])


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """brainfm modules that ``name`` imports anywhere in its file."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        while target and target not in modules:  # brainfm.x.func -> brainfm.x
            target = target.rpartition(".")[0]
        return target or None

    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(_without_main_block(tree)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] if mod else []
        else:
            continue
        for t in targets:
            if t == PACKAGE or t.startswith(PACKAGE + "."):
                r = resolve(t)
                if r is not None and r != name:
                    found.add(r)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer_violations(graph: dict[str, set[str]]) -> dict[tuple[str, str], str]:
    bad = {}
    for a, targets in graph.items():
        for b in targets:
            la, lb = _layer_of(a), _layer_of(b)
            if lb > la:
                bad[(a, b)] = f"{LAYERS[la][0]} imports {LAYERS[lb][0]}"
            elif _forbidden(a, b):
                bad[(a, b)] = _forbidden(a, b)
    return bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _without(graph: dict[str, set[str]], edges: set[tuple[str, str]]) -> dict[str, set[str]]:
    return {a: {b for b in bs if (a, b) not in edges} for a, bs in graph.items()}


def test_every_module_has_a_layer():
    for name in _modules():
        _layer_of(name)


def test_imports_only_point_down():
    bad = {e: why for e, why in _layer_violations(_graph()).items() if e not in KNOWN}
    assert not bad, "imports that point up or across (docs/architecture.md; move the code, or pass the value in):\n" + "\n".join(
        f"  {a} imports {b} ({why})" for (a, b), why in sorted(bad.items()))


def test_no_import_cycle():
    cycles = _cycles(_without(_graph(), KNOWN))
    assert not cycles, "import cycles (each line: modules that import each other, directly or around):\n" + "\n".join(
        "  " + " <-> ".join(c) for c in cycles)


def test_known_violations_still_occur():
    """KNOWN only holds what is still true: a fixed violation is deleted from it."""
    graph = _graph()
    bad = set(_layer_violations(graph))
    in_cycle = {(a, b) for comp in _cycles(graph) for a in comp for b in graph[a] if b in comp}
    stale = sorted(e for e in KNOWN if e not in bad and e not in in_cycle)
    assert not stale, "KNOWN entries that no longer occur; delete them from tests/test_layers.py:\n" + "\n".join(
        f"  {a} -> {b}" for a, b in stale)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    modules = {"brainfm.a": tmp_path / "a.py", "brainfm.b": tmp_path / "b.py", "brainfm.cli.c": tmp_path / "c.py",
               "brainfm.cli": tmp_path / "__init__.py"}
    (tmp_path / "a.py").write_text("def f():\n    from brainfm.cli import c\n    import brainfm.b as bb\n")
    (tmp_path / "c.py").write_text("from . import c\nfrom ..b import thing\n\nif __name__ == '__main__':\n    import brainfm.a\n")
    assert _imports("brainfm.a", modules["brainfm.a"], modules) == {"brainfm.cli.c", "brainfm.b"}
    assert _imports("brainfm.cli.c", modules["brainfm.cli.c"], modules) == {"brainfm.b"}
    assert _cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]


def _function_level_imports(path: Path) -> list[int]:
    """Line numbers of the brainfm imports inside functions of one file."""
    tree = _without_main_block(ast.parse(path.read_text()))
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PACKAGE)):
                    out.append(node.lineno)
                elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
                    out.append(node.lineno)
    return sorted(set(out))


def test_brainfm_imports_sit_at_module_top_outside_the_entry_points():
    """A dependency is seen at the top of the file (docs/architecture.md); only the entry points (cli/, __main__)
    import the library inside their commands, for start-up time."""
    inside = {name: lines for name, path in _modules().items()
              if _layer_of(name) != len(LAYERS) - 1 and (lines := _function_level_imports(path))}
    assert not inside, "brainfm imports inside functions (move them to the module's top):\n" + "\n".join(
        f"  {name}: lines {lines}" for name, lines in sorted(inside.items()))


def test_the_function_level_check_sees_nested_and_relative_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import brainfm.x\n\ndef f():\n    if True:\n        from brainfm.y import z\n\n"
                    "class C:\n    def g(self):\n        from . import w\n        import numpy\n")
    assert _function_level_imports(path) == [5, 9]
