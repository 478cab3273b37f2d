"""``auto`` dispatch per op, precision and compute capability (kcm_cuda.dispatch), on a
simulated GPU: availability and capability are mocked, the table logic is real."""

from __future__ import annotations

import json
import types

import pytest
import torch

import kcm_cuda
from kcm_cuda import dispatch

CUDA1 = torch.device("cuda", 1)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of settable capability on which cuda, triton and torch all run."""
    state = {"capability": (9, 0), "available": {"cuda", "triton", "torch"}}
    monkeypatch.setattr(dispatch, "_capability", lambda device: state["capability"])
    monkeypatch.setattr(
        dispatch, "_is_available", lambda name, device: name in state["available"]
    )
    return state


@pytest.mark.parametrize(
    "capability, op, precision, expected",
    [
        ((9, 0), "rbf", "tf32", "triton"),
        ((9, 0), "rbf", "tf32x3", "triton"),
        ((9, 0), "convex_update", "tf32", "triton"),
        ((9, 0), "rbf", "ieee", "cuda"),
        ((9, 0), "convex_update", "ieee", "cuda"),
        ((8, 0), "convex_update", "tf32", "triton"),
        ((8, 6), "rbf", "tf32", "triton"),
        ((7, 5), "rbf", "tf32", "cuda"),
        ((7, 0), "convex_update", "tf32", "cuda"),
        ((6, 1), "rbf", "ieee", "torch"),
    ],
)
def test_auto_follows_the_table(fake_gpu, capability, op, precision, expected):
    fake_gpu["capability"] = capability
    assert dispatch.resolve_backend("auto", CUDA1, op, precision) == expected


def test_auto_skips_unavailable_and_unsupported_backends(fake_gpu, monkeypatch):
    fake_gpu["available"] = {"cuda", "torch"}  # no triton installed
    assert dispatch.resolve_backend("auto", CUDA1, "rbf", "tf32") == "cuda"
    fake_gpu["available"] = {"cuda", "triton", "torch"}
    # A backend module may decline a combination (e.g. cuda without a tf32 update).
    fake_cuda = types.SimpleNamespace(
        supports=lambda op, precision, cc: not (op == "convex_update" and precision == "ieee")
    )
    real = dispatch.backend_module
    monkeypatch.setattr(
        dispatch, "backend_module", lambda name: fake_cuda if name == "cuda" else real(name)
    )
    assert dispatch.resolve_backend("auto", CUDA1, "convex_update", "ieee") == "triton"
    assert dispatch.resolve_backend("auto", CUDA1, "rbf", "ieee") == "cuda"


def test_auto_on_cpu_and_float64(fake_gpu):
    assert dispatch.resolve_backend("auto", torch.device("cpu"), "rbf", "tf32") == "torch"
    assert dispatch.resolve_backend("auto", CUDA1, "rbf", "ieee", torch.float64) == "torch"
    # Without op/precision (callers that only need "the" backend): the old fixed order.
    assert dispatch.resolve_backend("auto", CUDA1) == "cuda"


def test_table_round_trips_through_json_and_rejects_bad_rows():
    rows = dispatch.table_to_json(dispatch.DISPATCH_TABLE)
    assert dispatch.table_from_json(json.loads(json.dumps(rows))) == dispatch.DISPATCH_TABLE
    ops = {(r["op"], r["precision"]) for r in rows if r["min_capability"] == 80}
    assert ops == {(o, p) for o in dispatch.OPS for p in dispatch.PRECISION_KEYS}
    with pytest.raises(ValueError, match="bad row"):
        dispatch.table_from_json(
            [{"min_capability": 80, "op": "rbf", "precision": "tf32", "order": ["opencl"]}]
        )


def test_table_override_from_file(tmp_path, monkeypatch, fake_gpu):
    path = tmp_path / "table.json"
    row = {"min_capability": 90, "op": "rbf", "precision": "ieee", "order": ["triton", "cuda"]}
    path.write_text(json.dumps([row]))
    monkeypatch.setenv("KCM_DISPATCH_TABLE", str(path))
    monkeypatch.setattr(dispatch, "DISPATCH_TABLE", dict(dispatch.DISPATCH_TABLE))
    dispatch._load_table_override()
    assert dispatch.resolve_backend("auto", CUDA1, "rbf", "ieee") == "triton"
    fake_gpu["capability"] = (8, 0)  # the 90 row does not apply to sm_80
    assert dispatch.resolve_backend("auto", CUDA1, "rbf", "ieee") == "cuda"


def test_default_precision_per_device(monkeypatch):
    caps = {"cap": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: caps["cap"])
    assert kcm_cuda.kernels.default_precision(CUDA1) == "tf32"
    caps["cap"] = (8, 0)
    assert kcm_cuda.kernels.default_precision("cuda:0") == "tf32"
    caps["cap"] = (7, 0)
    assert kcm_cuda.kernels.default_precision(CUDA1) == "ieee"
    assert kcm_cuda.kernels.default_precision("cpu") == "ieee"


def test_public_op_passes_op_and_precision_to_dispatch(monkeypatch):
    seen = []
    real = dispatch.resolve_backend

    def spy(name, device, op=None, precision=None, dtype=None):
        seen.append((op, precision, dtype))
        return real(name, device, op, precision, dtype)

    import kcm_cuda.kernels as kernels

    monkeypatch.setattr(kernels, "resolve_backend", spy)
    x = torch.randn(6, 3)
    K = kcm_cuda.rbf_kernel(x, precision="tf32")
    kcm_cuda.convex_update(K, torch.full_like(K, 1 / 6), precision="tf32x3")
    kcm_cuda.kcm_coefficients(K, max_iter=2)
    kcm_cuda.rbf_kernel(x.double())
    assert seen == [
        ("rbf", "tf32", torch.float32),
        ("convex_update", "tf32x3", None),
        ("convex_update", "ieee", None),
        ("rbf", "ieee", torch.float64),
    ]
