"""Helpers of the fault-injection suite (imported by its conftest and tests)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_pruning_conftest", Path(__file__).parents[1] / "pruning" / "conftest.py"
)
pc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pc)

REPO = Path(__file__).resolve().parents[2]
PRUNE_ARGS = ["--flops", "0.8", "--samples", "64", "--max-length", "32", "--quiet"]


def tree_hash(path: Path) -> str:
    """sha256 over every file below ``path`` (relative name, mode bits, bytes), or of the file."""
    h = hashlib.sha256()
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if not p.is_dir())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        h.update(oct(f.lstat().st_mode).encode())
        h.update(os.readlink(f).encode() if f.is_symlink() else f.read_bytes())
    return h.hexdigest()


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TRITON_INTERPRET", "1")
    return env


def run_python(code: str, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def one_line_error(err: str, prog: str = "kcm-prune") -> str:
    """The error line of a CLI's stderr, after checking it is the only line and no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, err
    return errors[0]
