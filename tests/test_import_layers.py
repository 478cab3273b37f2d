"""One-way imports: no module of kcm_cuda.pruning (methods and adapters included) or of
benchmarks imports, directly or through others, a module that imports it back. Every import
counts, also those inside functions (a lazy import is still a circle to a reader); only
``if TYPE_CHECKING:`` imports, which never run, are left out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The known modules ``path`` imports (``from pkg import mod`` counts as pkg.mod)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import mod`` is pkg.mod; ``from pkg import name`` is pkg (its __init__)
            subs = [f"{base}.{a.name}" for a in node.names]
            targets = [t if t in known else base for t in subs]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _cycles(files: list[Path]) -> list[list[str]]:
    names = {_module_name(f): f for f in files}
    known = set(names)
    graph = {n: _imports(f, n, known) for n, f in names.items()}
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


@pytest.mark.parametrize("where", ["kcm_cuda/pruning", "benchmarks"])
def test_no_import_circle(where):
    files = sorted((ROOT / where).rglob("*.py"))
    assert files
    assert _cycles(files) == []


def test_the_checker_sees_a_circle(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from pkg.c import x\n")
    (pkg / "c.py").write_text("import pkg.a\nx = 1\n")
    # a type-only import is no edge: d and e are no circle
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.e\n"
    )
    (pkg / "e.py").write_text("import pkg.d\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert _cycles(sorted(pkg.glob("*.py"))) == [["pkg.a", "pkg.b", "pkg.c"]]
