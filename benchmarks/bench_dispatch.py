"""Fill the ``auto`` dispatch table by measurement (GPU only; skipped on a CPU).

For each op (rbf at (3072, 768), the solver's update step at n = 3072) and precision (ieee,
tf32x3, tf32) every available backend is timed on this GPU; the backends ordered fastest
first give the table row for this GPU's compute capability (torch always last as the
fallback). The measured table is printed and written to
``benchmarks/results/<device-slug>/dispatch_table.json`` in kcm_cuda.dispatch's JSON format:
review it and use it with ``KCM_DISPATCH_TABLE=that/file`` (or copy its rows into
``kcm_cuda.dispatch.DISPATCH_TABLE``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks import harness, results_file
from benchmarks.peers import Peer

PRECISIONS = ("ieee", "tf32x3", "tf32")
# n, d of the measured shapes; where the table goes (None: results/<device-slug>/). Changed by
# benchmarks/test_harness.py to dry-run this GPU-only file on the CPU.
SIZES = {"n": 3072, "d": 768, "allow_cpu": False, "out_dir": None}
_MEASURED: dict[tuple[str, str], dict[str, float]] = {}


@dataclass(frozen=True)
class DispatchCase:
    op: str
    precision: str

    @property
    def id(self) -> str:
        return f"{self.op},{self.precision}"


def make_cases(profile: harness.Profile, test_name: str) -> list[DispatchCase]:
    if test_name == "test_write_table":
        return [DispatchCase("all", "all")]
    return [DispatchCase(op, p) for op in ("rbf", "convex_update") for p in PRECISIONS]


def _runner(module, op: str, precision: str, device: torch.device):
    n, d = SIZES["n"], SIZES["d"]
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, d, generator=gen) * math.sqrt(-math.log(0.48) / d)).to(device)
    if op == "rbf":
        return lambda: module.rbf_kernel(x, None, 1.0, precision)
    from kcm_cuda.kernels import torch_backend

    K = torch_backend.rbf_kernel(x, None, 1.0, "ieee")[None]
    C = torch.full_like(K, 1.0 / n)
    step = getattr(module, "convex_update_transposed", module.convex_update)
    return lambda: step(K, C, precision)


def test_measure(case: DispatchCase, profile: harness.Profile, device: torch.device, bench):
    if not SIZES["allow_cpu"] and (device.type != "cuda" or profile.smoke):
        pytest.skip("the dispatch table is measured on a GPU")
    from kcm_cuda import dispatch

    names = [b for b in dispatch.available_backends(device) if b in dispatch.AUTO_ORDER]
    peers = [
        Peer(f"kcm[{b}]", _runner(dispatch.backend_module(b), case.op, case.precision, device),
             ours=True)
        for b in names
    ]  # fmt: skip
    records = bench(
        op=f"dispatch_{case.op}", case=case.id, params={"n": SIZES["n"]}, peers=peers,
        precision=case.precision, primary=None, baseline=None,
    )  # fmt: skip
    _MEASURED[(case.op, case.precision)] = {
        r["peer"][4:-1]: r["median_ms"] for r in records if r["status"] == "ok"
    }


def test_write_table(case: DispatchCase, profile: harness.Profile, device: torch.device,
                     recorder: harness.Recorder) -> None:  # fmt: skip
    if not SIZES["allow_cpu"] and (device.type != "cuda" or profile.smoke):
        pytest.skip("the dispatch table is measured on a GPU")
    if not _MEASURED:
        pytest.skip("no measurement in this session (run the whole file)")
    from kcm_cuda import dispatch

    capability = torch.cuda.get_device_capability(device)
    rows = harness.dispatch_rows(_MEASURED, dispatch.capability_key(capability))
    folder = SIZES["out_dir"] or results_file.RESULTS_DIR / recorder.device_info["slug"]
    out = Path(folder) / "dispatch_table.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nmeasured dispatch table ({out}):")
    for row in rows:
        print(f"  sm_{row['min_capability']} {row['op']:<14} {row['precision']:<7} "
              f"{' > '.join(row['order'])}  {row['median_ms']}")  # fmt: skip
