"""The new Triton kernels compile for real GPUs (ahead of time, no GPU needed: Triton's
bundled ptxas) and the D = C^T update reads both operands in 16-byte pieces on sm_90, where
the update on C reads C 4 bytes at a time. About 40 s on a 2-core CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
triton = pytest.importorskip("triton")
_PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
if not _PTXAS.exists():
    pytest.skip("Triton's bundled ptxas is not installed", allow_module_level=True)


def _aot(cc: int, kernel: str, precision: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton_aot.py"), str(cc), kernel, precision],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_persistent_symmetric_rbf_compiles_to_tensor_cores_on_sm80():
    info = _aot(80, "rbf_symmetric", "tf32")
    assert info["mma"] > 0  # TF32 mma.sync on Ampere


def test_transposed_update_reads_16_byte_pieces_on_sm90():
    info = _aot(90, "update_d", "tf32")
    assert info["wgmma"] > 0, info
    assert info["cp_async_4B"] == 0 and info["cp_async_16B"] > 0, info
