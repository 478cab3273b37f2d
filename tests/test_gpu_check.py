"""tools/gpu_check.py (`make gpu-check`; its pieces gpu_summary.py, gpu_workloads.py,
gpu_process.py) on a machine without a GPU: the dry run (plan, files,
exit 0), the refusal to pass without a GPU, the junit and goal evaluation it reports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402
import gpu_summary  # noqa: E402
import gpu_workloads  # noqa: E402


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_dry_run_prints_every_stage_and_exits_0():
    proc = _run([sys.executable, "tools/gpu_check.py", "--dry-run"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for stage in gpu_check.STAGES:
        assert f"[{stage}]" in proc.stdout
    assert "MISSING" not in proc.stdout and "dry run OK" in proc.stdout
    assert "compute-sanitizer --tool memcheck" in proc.stdout
    assert "compute-sanitizer --tool racecheck" in proc.stdout
    assert "KCM_REQUIRE_GPU=1" in proc.stdout and "TRITON_INTERPRET=<unset>" in proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_gpu_check_dry_run():
    proc = _run(["make", "--no-print-directory", "gpu-check", "DRY_RUN=1",
                 f"GPU_PYTHON={sys.executable}"])  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--dry-run" in proc.stdout and "dry run OK" in proc.stdout
    proc = _run(["make", "--no-print-directory", "gpu-check", "DRY_RUN=1", "PART=2",
                 f"GPU_PYTHON={sys.executable}"])  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--part 2" in proc.stdout and "part 2: ~" in proc.stdout


def test_dry_run_fails_when_a_stage_file_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "GPU_TEST_FILES", ["tests/test_does_not_exist.py"])
    assert gpu_check.main(["--dry-run", "--stages", "tests"]) == 1
    assert "MISSING" in capsys.readouterr().out


def test_unknown_stage_is_refused():
    proc = _run([sys.executable, "tools/gpu_check.py", "--dry-run", "--stages", "tests,bogus"])
    assert proc.returncode == 2 and "unknown stage" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_real_run_without_gpu_fails_loudly(tmp_path):
    proc = _run([sys.executable, "tools/gpu_check.py", "--stages", "build,tests,goals",
                 "--out", str(tmp_path)])  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DID NOT BUILD" in proc.stdout and "gpu-check FAILED" in proc.stdout
    (summary_file,) = tmp_path.glob("*-gpu-check.json")
    summary = json.loads(summary_file.read_text())
    assert summary["ok"] is False
    assert summary["stages"]["build"]["status"] == "FAIL"
    assert summary["stages"]["tests"]["status"] == "SKIPPED"
    assert summary["device"]["name"] and summary["versions"]["torch"] == torch.__version__
    assert "date" in summary and len(list(tmp_path.iterdir())) <= 8
    assert {g["status"] for g in summary["goals"]} == {"UNMEASURED"}


def test_junit_counts(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_cuda_ops" name="a"/>'
        '<testcase classname="tests.test_cuda_ops" name="b"><skipped message="x"/></testcase>'
        '<testcase classname="tests.test_parity" name="c"><failure message="y"/></testcase>'
        '<testcase classname="tests.test_parity" name="d"/>'
        '</testsuite></testsuites>'
    )
    counts = gpu_summary.junit_counts(xml)
    assert counts == {"tests": 4, "failures": 1, "errors": 0, "skipped": 1, "cuda_ops_passed": 1}
    assert gpu_summary.junit_counts(tmp_path / "absent.xml")["cuda_ops_passed"] == 0


def _rec(op, case, peer, ms, ours=True, pct=None):
    return {"op": op, "case": case, "peer": peer, "median_ms": ms, "ours": ours,
            "status": "ok", "pct_peak": pct}  # fmt: skip


def test_goals_from_records():
    records = [
        _rec("rbf", "n=3072,d=768,tf32", "kcm[triton]", 1.0, pct=65.0),
        _rec("rbf", "n=3072,d=768,tf32", "kcm[cuda]", 3.0, pct=20.0),
        _rec("rbf", "n=3072,d=768,tf32", "torch-cdist", 2.5, ours=False),
        _rec("convex_update", "n=3072,ieee", "kcm[cuda]", 11.0),
        _rec("convex_update", "n=3072,ieee", "torch-mm", 10.0, ours=False),
        _rec("convex_update", "n=3072,tf32", "kcm[triton]", 5.0),
        _rec("convex_update", "n=3072,tf32", "torch-mm", 2.0, ours=False),
        _rec("solver", "bert-base-like,L=12,n=3072,tf32", "kcm[triton]", 450.0),
        _rec("prune_e2e", "bert-base,N=2048,T=128,c=0.6", "kcm-prune[cuda]", 31000.0),
        {"op": "goal", "case": "r2 L=12 n=3072 auto", "peer": "x", "status": "ok",
         "median_ms": None, "info": {"value": 0.41, "comparison": "<", "target": 0.5,
                                     "unit": "s", "passed": True}},
    ]
    goals = {g["goal"]: g for g in gpu_summary.evaluate_goals(records)}
    rbf = goals["RBF (3072, 768) vs torch.cdist+exp"]
    assert rbf["status"] == "PASS" and rbf["value"] == pytest.approx(2.5)
    assert goals["RBF (3072, 768) % of TF32 peak"]["status"] == "PASS"
    assert goals["update n=3072 ieee vs bare torch.mm"]["status"] == "PASS"
    assert goals["update n=3072 tf32 vs bare torch.mm"]["status"] == "FAIL"
    assert goals["update n=3072 tf32x3 vs bare torch.mm"]["status"] == "UNMEASURED"
    assert goals["R2 solve 12 x 3072 (tf32)"]["status"] == "PASS"
    assert goals["R2 solve 12 x 3072 (ieee)"]["status"] == "UNMEASURED"
    assert goals["BERT-base prune end to end"]["status"] == "FAIL"
    measured = goals["r2 L=12 n=3072 auto"]
    assert measured["status"] == "PASS" and measured["from"] == "bench_goals"
    assert measured["target"] == "< 0.5 s"


def test_goal_records_survive_the_reader(tmp_path):
    from benchmarks import harness

    rec = harness.goal_record("prune c=0.6", 12.0, "<", 30.0, "s")
    (tmp_path / "20260101T000000Z-bench-goals.json").write_text(json.dumps({"records": [rec]}))
    goals = gpu_summary.evaluate_goals(gpu_summary.newest_records(tmp_path, gpu_check.BENCH_FILES))
    assert goals[0]["goal"] == "prune c=0.6" and goals[0]["status"] == "PASS"


def test_budget_skips_the_stages_it_cannot_fit(tmp_path):
    proc = _run([sys.executable, "tools/gpu_check.py", "--stages", "goals,build",
                 "--budget", "10", "--out", str(tmp_path)])  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (summary_file,) = tmp_path.glob("*-gpu-check.json")
    summary = json.loads(summary_file.read_text())
    assert summary["stages"]["build"] == {"status": "SKIPPED", "detail": "budget spent"}
    assert summary["ok"] is True and summary["complete"] is False
    assert "PASSED (incomplete)" in proc.stdout


def test_goals_only_run_over_saved_results(tmp_path):
    """The goals of results fetched from a GPU machine, evaluated here: the summary names the
    GPU of the results, not this machine."""
    from benchmarks import harness

    rec = harness.goal_record("rbf vs cdist", 2.4, ">=", 2.0, "x")
    meta = {"device": {"name": "NVIDIA H100 80GB HBM3", "slug": "nvidia-h100-80gb-hbm3"},
            "versions": {"torch": "2.11.0"}, "git": {"sha": None}}  # fmt: skip
    (tmp_path / "20260101T000000Z-bench-goals.json").write_text(
        json.dumps({"meta": meta, "records": [rec]})
    )
    proc = _run([sys.executable, "tools/gpu_check.py", "--stages", "goals", "--out",
                 str(tmp_path)])  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (summary_file,) = tmp_path.glob("*-gpu-check.json")
    summary = json.loads(summary_file.read_text())
    assert summary["device"]["name"] == "NVIDIA H100 80GB HBM3"
    assert summary["goals"][0]["status"] == "PASS" and "rbf vs cdist" in proc.stdout


def test_sanitizer_workload_calls_are_valid(capsys):
    """The workload's calls, on the ops' CPU kernels (and the Triton interpreter when on):
    wrong arguments would fail here, not on a lent GPU under compute-sanitizer."""
    assert gpu_workloads.workload("cpu") == 0
    assert "workload OK" in capsys.readouterr().out


def test_cuda_paths_timing_code_runs(tmp_path):
    """The cuda-paths stage's code on the CPU kernels (tiny sizes): the rows it writes."""
    out = tmp_path / "paths.json"
    assert gpu_workloads.cuda_paths(out, "cpu") == 0
    rows = json.loads(out.read_text())["rows"]
    update = [r for r in rows if r["op"] == "convex_update"]
    assert {r["precision"] for r in update} == {"ieee", "tf32"}
    ieee = next(r for r in update if r["precision"] == "ieee")
    assert ieee["cublas_ms"] > 0 and ieee["fused_ms"] > 0 and ieee["torch_bmm_ms"] > 0
    assert "fused_ms" not in next(r for r in update if r["precision"] == "tf32")
    rbf = next(r for r in rows if r["op"] == "rbf")
    assert rbf["speedup_vs_cdist"] > 0


def test_parts_cover_every_stage_and_part_1_fits_one_command():
    """Two device-tool commands: every stage in one of them, the first (build, GPU parity
    tests, timing goals) inside its budget by the estimates, each at most 8 files back and
    8 minutes (budget plus the summary), the most valuable part first."""
    assert set(gpu_check.STAGES) == {s for part in gpu_check.PARTS.values() for s in part}
    assert set(gpu_check.EST_S) == set(gpu_check.STAGES)
    assert gpu_check.PART_BUDGET_S <= 8 * 60 - 10
    part1 = gpu_check.PARTS["1"]
    assert {"build", "tests", "bench-goals", "goals"} <= set(part1)
    assert sum(gpu_check.EST_S[s] for s in part1) <= gpu_check.PART_BUDGET_S
    for stages in gpu_check.PARTS.values():
        # files back from $OUT: summary, log, one JSON per benchmark / cuda-paths stage, and
        # the dispatch table's copy
        files = 2 + sum(s.startswith("bench-") or s == "cuda-paths" for s in stages)
        files += "bench-dispatch" in stages
        assert files <= 8, stages
        assert stages[-1] == "goals" and ("build" in stages or stages[0] == "env")


def test_dry_run_of_a_part_prints_its_estimate_and_command():
    proc = _run([sys.executable, "tools/gpu_check.py", "--dry-run", "--part", "1"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "[tests]" in out and "[memcheck]" not in out
    total = sum(gpu_check.EST_S[s] for s in gpu_check.PARTS["1"])
    assert f"part 1: ~{total} s" in out and "part 2:" not in out
    assert 'run(command="python3 tools/gpu_check.py --part 1 --out $OUT", timeout_s=540)' in out
    proc = _run([sys.executable, "tools/gpu_check.py", "--dry-run"])
    assert "part 1:" in proc.stdout and "part 2:" in proc.stdout and "(est. ~" in proc.stdout


def test_part_and_stages_together_are_refused():
    proc = _run([sys.executable, "tools/gpu_check.py", "--dry-run", "--part", "1", "--stages",
                 "env"])  # fmt: skip
    assert proc.returncode == 2 and "--part and --stages" in proc.stderr


def test_a_part_runs_under_its_budget(tmp_path):
    """--part sets the stages and the budget: with --budget 10 every stage but goals is
    skipped (the default budget is PART_BUDGET_S)."""
    proc = _run([sys.executable, "tools/gpu_check.py", "--part", "2", "--budget", "10",
                 "--out", str(tmp_path)])  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (summary_file,) = tmp_path.glob("*-gpu-check.json")
    stages = json.loads(summary_file.read_text())["stages"]
    assert list(stages) == [s for s in gpu_check.PARTS["2"]]
    assert stages["memcheck"] == {"status": "SKIPPED", "detail": "budget spent"}
