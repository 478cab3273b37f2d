"""Every third-party module the package imports is declared in pyproject.toml (a dependency, or
an extra for an optional feature): `pip install kcm_cuda[...]` never leaves a user with a
ModuleNotFoundError in the middle of a run (method="kwon" once imported an undeclared scipy)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
# import name -> distribution name, where they differ
DISTRIBUTION = {"sklearn": "scikit-learn", "yaml": "pyyaml"}


def _imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for f in (ROOT / "kcm_cuda").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                found.setdefault(n.split(".")[0], set()).add(str(f.relative_to(ROOT)))
    return found


def _declared() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(meta["dependencies"])
    for extra in meta.get("optional-dependencies", {}).values():
        specs.extend(extra)
    return {
        re.split(r"[<>=!~;\[ ]", s, maxsplit=1)[0].strip().lower().replace("_", "-") for s in specs
    }


def test_every_third_party_import_is_declared():
    declared = _declared()
    missing = {}
    for mod, files in _imports().items():
        if mod in sys.stdlib_module_names or mod in ("kcm_cuda", "__future__"):
            continue
        dist = DISTRIBUTION.get(mod, mod).lower().replace("_", "-")
        if dist not in declared:
            missing[mod] = sorted(files)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_scanner_sees_an_undeclared_import(tmp_path, monkeypatch):
    assert "scipy" in _imports()  # kwon's lsmr: found where it is imported, inside a function
    assert "scipy" in _declared()
    assert "surely-not-a-dependency" not in _declared()
