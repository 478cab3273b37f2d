"""Unit tests of the benchmark machinery itself (no timing is asserted anywhere)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from benchmarks import harness, report, results_file, timing
from benchmarks.bench_inference import ffn_keep, intermediate_sizes, uniform_pruned
from benchmarks.bench_prune_e2e import stage_times
from benchmarks.peers import Peer, Skipped, measure_peers


def test_peaks_table() -> None:
    assert harness.device_peak_tflops("NVIDIA H100 80GB HBM3", "ieee") == pytest.approx(66.9)
    assert harness.device_peak_tflops("NVIDIA H100 PCIe", "tf32") == pytest.approx(378.0)
    assert harness.device_peak_tflops("NVIDIA H200", "fp16") == pytest.approx(989.4)
    assert harness.device_peak_tflops("NVIDIA A100-SXM4-80GB", "tf32x3") == pytest.approx(52.0)
    assert harness.device_peak_tflops("Tesla V100-SXM2-16GB", "tf32") is None
    assert harness.device_peak_tflops("AMD EPYC", "ieee") is None
    assert harness.device_peak_tflops(None, "ieee") is None


def test_flop_counts() -> None:
    assert harness.rbf_flops(3, 4, 5) == 120
    assert harness.update_flops(10) == 2 * 1000 + 6 * 100
    assert harness.update_flops(10, layers=3) == 3 * harness.update_flops(10)
    assert harness.solver_flops(10, [2, 3]) == 5 * harness.update_flops(10)
    # BERT-base, one sequence of 128: the MACs model of ALGORITHM.md, times 2.
    per_layer = 4 * 128 * 768**2 + 2 * 128**2 * 768 + 2 * 128 * 768 * 3072
    assert harness.encoder_flops(1, 128, 768, [3072] * 12) == 2 * 12 * per_layer


def test_slug_and_git_info() -> None:
    assert results_file.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert results_file.slugify("  ") == "unknown"
    info = results_file.git_info(Path("/"))  # not a repository: no sha, no crash
    assert info["sha"] is None


class FakeTimer(timing.Timer):
    """Records the call order instead of timing (each call 'takes' 1 ms)."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"), flush=False)

    def time_call(self, fn, flush: bool = True) -> float:
        fn()
        return 1.0


def test_peers_alternate_and_failures_are_recorded() -> None:
    calls: list[str] = []

    def peer(name: str) -> Peer:
        return Peer(name, lambda: calls.append(name))

    def broken() -> None:
        raise RuntimeError("boom")

    peers = [peer("a"), peer("b"), peer("c"), Peer("bad", broken)]
    samples, errors, rounds = measure_peers(
        peers, FakeTimer(), warmup=1, rounds=3, min_rounds=1, max_rounds=9, budget_s=1.0
    )
    assert rounds == 3 and set(errors) == {"bad"} and "boom" in errors["bad"]
    assert samples == {"a": [1.0] * 3, "b": [1.0] * 3, "c": [1.0] * 3}
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # rotated rounds


def test_recorder_writes_a_readable_result(tmp_path: Path) -> None:
    prof = harness.make_profile(smoke=True)
    rec = harness.Recorder(prof, argv=["x"])
    x = torch.randn(32, 8)
    rec.run_case(
        op="rbf", case="n=32", params={"n": 32},
        peers=[Peer("mm", lambda: x @ x.t(), flops=harness.rbf_flops(32, 32, 8)),
               Skipped("gone", "not installed")],
        baseline="mm",
    )
    path = rec.write(tmp_path)
    data = report.load(path)
    assert data["meta"]["device"]["slug"].startswith("cpu-")
    assert data["meta"]["versions"]["torch"] == torch.__version__
    ok, skipped = data["records"]
    assert ok["status"] == "ok" and ok["rounds"] == 2 and ok["tflops"] > 0
    assert ok["pct_peak"] is None and ok["speedup_vs_baseline"] == 1.0
    assert len(ok["cpu_samples_ms"]) == 2 and ok["cpu_median_ms"] >= 0.0
    assert ok["peak_mem_bytes"] is None or ok["peak_mem_bytes"] >= 0
    assert skipped["status"] == "skipped" and skipped["reason"] == "not installed"
    table = report.format_table(data["records"])
    assert "mm" in table and "not installed" in table


def _result(slug: str, medians: dict[str, float], iqr: float = 0.0) -> dict:
    return {
        "meta": {"schema": results_file.SCHEMA, "profile": "full", "device": {"slug": slug}},
        "records": [
            results_file.blank_record(op="rbf", case="n=8", peer=p, median_ms=m, iqr_ms=iqr)
            for p, m in medians.items()
        ],
    }


def test_compare_flags_regressions_on_the_same_device() -> None:
    old = _result("gpu-x", {"a": 10.0, "b": 10.0, "c": 10.0})
    new = _result("gpu-x", {"a": 11.5, "b": 10.5, "c": 8.0})
    status, text = report.compare(old, new)
    assert status == report.EXIT_REGRESSION
    lines = {line.split()[2]: line for line in text.splitlines() if line.startswith("rbf")}
    assert "REGRESSION" in lines["a"] and "1.150" in lines["a"]
    assert "REGRESSION" not in lines["b"] and "faster" in lines["c"]
    status, _ = report.compare(old, copy.deepcopy(old))
    assert status == report.EXIT_OK


def test_compare_by_cpu_time() -> None:
    old = _result("cpu-x", {"a": 10.0})
    new = _result("cpu-x", {"a": 30.0})  # wall time tripled by a busy neighbour ...
    old["records"][0]["cpu_samples_ms"] = [10.0, 10.2, 9.8]
    new["records"][0]["cpu_samples_ms"] = [10.1, 10.0, 10.3]  # ... the work did not
    assert report.compare(old, new)[0] == report.EXIT_REGRESSION
    status, text = report.compare(old, new, metric="cpu")
    assert status == report.EXIT_OK and "cpu ms" in text


def test_compare_refuses_different_devices() -> None:
    old, new = _result("gpu-x", {"a": 1.0}), _result("gpu-y", {"a": 5.0})
    status, text = report.compare(old, new)
    assert status == report.EXIT_REFUSED and "REFUSED" in text
    status, text = report.compare(old, new, force=True)
    assert status == report.EXIT_OK and "WARNING" in text and "REGRESSION" not in text


def test_report_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "1-old.json").write_text(json.dumps(_result("d", {"a": 1.0})))
    (tmp_path / "2-new.json").write_text(json.dumps(_result("d", {"a": 2.0})))
    assert report.main([str(tmp_path)]) == report.EXIT_OK
    assert "rbf  n=8" in capsys.readouterr().out
    assert report.main([str(tmp_path), "--previous"]) == report.EXIT_REGRESSION
    assert report.main([str(tmp_path / "missing.json")]) == report.EXIT_REFUSED


def test_stage_times_from_reports() -> None:
    assert stage_times({"timings_s": {"r2": 1.5, "d2": 2}}) == {"r2": 1.5, "d2": 2.0}
    assert stage_times({"timings_ms": {"r2": 1500}}) == {"r2": 1.5}
    nested = {"r2": {"time_s": 3.0, "n_iter": 5}, "scale_ms": 250, "flops": 0.6}
    assert stage_times(nested) == {"r2.time_s": 3.0, "scale_ms": 0.25}
    assert stage_times(None) == {}


def test_uniform_pruning_keeps_the_flops_budget() -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128, max_position_embeddings=32)
    model = BertModel(config).eval()
    keep = ffn_keep(config, 0.7, 16)
    pruned = uniform_pruned(model, 0.7, 16)
    assert intermediate_sizes(pruned) == [keep, keep] and 0 < keep < 128
    full = harness.encoder_flops(1, 16, 32, [128, 128])
    assert harness.encoder_flops(1, 16, 32, intermediate_sizes(pruned)) <= 0.7 * full
    assert intermediate_sizes(model) == [128, 128]  # the input model is untouched
    ids = torch.randint(5, 100, (2, 16))
    with torch.no_grad():
        assert pruned(input_ids=ids).last_hidden_state.shape == (2, 16, 32)
    with pytest.raises(ValueError, match="attention floor"):
        ffn_keep(config, 0.1, 16)


def test_goal_records_and_lines():
    ok = harness.goal_record("rbf vs cdist+exp", 2.5, ">=", 2.0, "x")
    bad = harness.goal_record("R2 12x3072 seconds", 0.61, "<", 0.5, "s")
    assert ok["info"]["passed"] is True and bad["info"]["passed"] is False
    lines = harness.goals_lines([ok, bad, results_file.blank_record(op="rbf")])
    assert lines == [
        "PASS  rbf vs cdist+exp: 2.5 x (goal >= 2 x)",
        "FAIL  R2 12x3072 seconds: 0.61 s (goal < 0.5 s)",
    ]
    assert "rbf vs cdist+exp" in harness.records_table([ok, bad])
    with pytest.raises(ValueError, match="goal comparison"):
        harness.goal_record("x", 1.0, "~", 1.0, "s")


def test_dispatch_rows_are_a_valid_dispatch_table():
    from kcm_cuda import dispatch

    measured = {
        ("rbf", "tf32"): {"cuda": 1.9, "triton": 0.8, "torch": 1.2},
        ("convex_update", "ieee"): {"cuda": 3.0, "triton": None, "torch": 5.0},
    }
    rows = harness.dispatch_rows(measured, 90)
    by_key = {(r["op"], r["precision"]): r for r in rows}
    assert by_key[("rbf", "tf32")]["order"] == ["triton", "cuda", "torch"]  # torch: fallback
    assert by_key[("convex_update", "ieee")]["order"] == ["cuda", "torch"]  # failed: dropped
    table = dispatch.table_from_json(json.loads(json.dumps(rows)))
    assert table[(90, "rbf", "tf32")] == ("triton", "cuda", "torch")


def test_smoke_results_stay_inside_the_repo():
    """A smoke run writes under the repo's git-ignored out/, not the system temp."""
    from benchmarks import conftest

    out = conftest.smoke_output_dir("cpu-test")
    assert out.is_relative_to(results_file.REPO_ROOT / "out")
    ignore = (results_file.REPO_ROOT / ".gitignore").read_text().splitlines()
    assert "/out/" in ignore


def test_bench_goals_dry_run_on_cpu(monkeypatch):
    """bench_goals.py is GPU-only; at tiny sizes on the CPU its four goals run end to end
    through the real harness and each yields a goal record (values meaningless here)."""
    from benchmarks import bench_goals
    from benchmarks.bench_prune_e2e import TINY_CONFIG

    monkeypatch.setitem(bench_goals.SIZES, "rbf", (40, 8))
    monkeypatch.setitem(bench_goals.SIZES, "update", 24)
    monkeypatch.setitem(bench_goals.SIZES, "r2", (2, 24, 8))
    monkeypatch.setitem(
        bench_goals.SIZES,
        "prune",
        {"name": "bert-tiny", "samples": 16, "seq": 16, "config": TINY_CONFIG},
    )
    monkeypatch.setitem(bench_goals.SIZES, "allow_cpu", True)
    prof = harness.make_profile(smoke=True)
    rec = harness.Recorder(prof)

    def bench(**kwargs):
        return rec.run_case(benchmark=None, **kwargs)

    for case in bench_goals.make_cases(prof, "test_goal"):
        bench_goals.test_goal(case, prof, torch.device("cpu"), bench, rec)
    goals = [r for r in rec.records if r["op"] == "goal"]
    names = [g["case"] for g in goals]
    assert names == [
        "rbf vs cdist+exp",
        "update / torch.mm",
        "R2 2x24 seconds",
        "bert-tiny prune seconds",
    ]  # no "% of TF32 peak" on a CPU: no peak known
    assert all(g["info"]["value"] > 0 for g in goals)
    assert len(harness.goals_lines(rec.records)) == 4


def test_bench_dispatch_dry_run_on_cpu(monkeypatch, tmp_path):
    """bench_dispatch.py (GPU-only) at a tiny size on the CPU: every op x precision measured
    for the backends available here, and a table file kcm_cuda.dispatch can load."""
    from benchmarks import bench_dispatch
    from kcm_cuda import dispatch

    monkeypatch.setattr(bench_dispatch, "SIZES", {"n": 24, "d": 8, "allow_cpu": True,
                                                  "out_dir": tmp_path})  # fmt: skip
    monkeypatch.setattr(bench_dispatch, "_MEASURED", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    prof = harness.make_profile(smoke=True)
    rec = harness.Recorder(prof)

    def bench(**kwargs):
        return rec.run_case(benchmark=None, **kwargs)

    cpu = torch.device("cpu")
    for case in bench_dispatch.make_cases(prof, "test_measure"):
        bench_dispatch.test_measure(case, prof, cpu, bench)
    (write_case,) = bench_dispatch.make_cases(prof, "test_write_table")
    bench_dispatch.test_write_table(write_case, prof, cpu, rec)
    rows = json.loads((tmp_path / "dispatch_table.json").read_text())
    table = dispatch.table_from_json(rows)
    assert set(table) == {(90, op, p) for op in dispatch.OPS for p in dispatch.PRECISION_KEYS}
    assert all(order[-1] == "torch" for order in table.values())
