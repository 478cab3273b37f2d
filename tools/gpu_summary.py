"""What gpu-check reports: the test counts of the junit XML, the timing goals (PASS / FAIL /
UNMEASURED) from the benchmark results, and the machine the results came from."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def junit_counts(path: Path) -> dict[str, Any]:
    """Totals of a pytest junit XML, and how many CUDA-op tests passed."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "cuda_ops_passed": 0}
    if not path.is_file():
        return counts
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        counts["tests"] += 1
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
        if outcome == "failure":
            counts["failures"] += 1
        elif outcome == "error":
            counts["errors"] += 1
        elif outcome == "skipped":
            counts["skipped"] += 1
        elif "test_cuda_ops" in (case.get("classname") or ""):
            counts["cuda_ops_passed"] += 1
    return counts


def newest_records(out: Path, bench_names) -> list[dict[str, Any]]:
    """The records of the newest <stamp>-<name>.json of each benchmark stage name in ``out`` (so
    that a later call's goals stage sees the benchmarks of an earlier call in the same folder)."""
    records: list[dict[str, Any]] = []
    for name in bench_names:
        found = sorted(out.glob(f"*-{name}.json"))
        if found:
            records += json.loads(found[-1].read_text()).get("records", [])
    return [
        r for r in records
        if r.get("op") == "goal" or (r.get("status") == "ok" and r.get("median_ms") is not None)
    ]  # fmt: skip


def _best_ours(records, op: str, case_prefix: str) -> dict[str, Any] | None:
    mine = [
        r for r in records
        if r["op"] == op and str(r["case"]).startswith(case_prefix) and r.get("ours")
        and str(r["peer"]).startswith(("kcm[", "kcm-prune["))
    ]  # fmt: skip
    return min(mine, key=lambda r: r["median_ms"]) if mine else None


def _peer(records, op: str, case: str, peer: str) -> dict[str, Any] | None:
    for r in records:
        if r["op"] == op and r["case"] == case and r["peer"] == peer:
            return r
    return None


def evaluate_goals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's H100 goals (ratios within one run). Status PASS / FAIL / UNMEASURED."""
    goals: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: str, ok: bool | None, how: str) -> None:
        status = "UNMEASURED" if ok is None else ("PASS" if ok else "FAIL")
        goals.append(
            {"goal": name, "value": value, "target": target, "status": status, "from": how}
        )

    for r in records:  # measured by benchmarks/bench_goals.py
        g = r.get("info") or {}
        if r.get("op") == "goal" and "passed" in g:
            add(r["case"], g["value"], f"{g['comparison']} {g['target']:g} {g['unit']}",
                bool(g["passed"]), "bench_goals")  # fmt: skip
    # Derived from the per-op benchmarks (best of our backends against the peer).
    best = _best_ours(records, "rbf", "n=3072,d=768,tf32")
    cdist = best and _peer(records, "rbf", best["case"], "torch-cdist")
    ratio = cdist["median_ms"] / best["median_ms"] if best and cdist else None
    add("RBF (3072, 768) vs torch.cdist+exp", ratio, ">= 2x", None if ratio is None
        else ratio >= 2.0, best["peer"] if best else "no tf32 rbf record")  # fmt: skip
    pct = best.get("pct_peak") if best else None
    add("RBF (3072, 768) % of TF32 peak", pct, ">= 60%", None if pct is None else pct >= 60.0,
        best["peer"] if best else "no tf32 rbf record")  # fmt: skip
    for precision in ("ieee", "tf32x3", "tf32"):
        case = f"n=3072,{precision}"
        best = _best_ours(records, "convex_update", case)
        mm = best and _peer(records, "convex_update", best["case"], "torch-mm")
        ratio = best["median_ms"] / mm["median_ms"] if best and mm else None
        how = best["peer"] if best else "no record"
        add(f"update n=3072 {precision} vs bare torch.mm", ratio, "<= 1.2x",
            None if ratio is None else ratio <= 1.2, how)  # fmt: skip
    for precision in ("tf32", "ieee"):
        best = _best_ours(records, "solver", "bert-base-like,L=12,n=3072," + precision)
        sec = best["median_ms"] / 1000 if best else None
        add(f"R2 solve 12 x 3072 ({precision})", sec, "< 0.5 s",
            None if sec is None else sec < 0.5, best["peer"] if best else "no record")  # fmt: skip
    best = _best_ours(records, "prune_e2e", "bert-base")
    sec = best["median_ms"] / 1000 if best else None
    add("BERT-base prune end to end", sec, "< 30 s", None if sec is None else sec < 30.0,
        best["peer"] if best else "no record")  # fmt: skip
    return goals


def print_goals(goals: list[dict[str, Any]]) -> None:
    print(f"{'goal':<42} {'value':>10} {'target':>12}  status")
    for g in goals:
        value = "-" if g["value"] is None else f"{g['value']:.3g}"
        print(f"{g['goal']:<42} {value:>10} {g['target']:>12}  {g['status']}  ({g['from']})")


def device_meta() -> dict[str, Any]:
    """Device, versions and git state (benchmarks/results_file.py's description of a machine)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks import results_file

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = results_file.device_info(dev)
    if dev.type != "cuda":
        device["capability"] = None
    return {"device": device, "versions": results_file.versions(), "git": results_file.git_info()}


def meta_from_results(out: Path) -> dict[str, Any]:
    """Device, versions and git of the newest benchmark result in ``out`` (for a goals-only
    run over results fetched from a GPU machine)."""
    found = sorted(out.glob("*-bench-*.json"))
    if not found:
        raise SystemExit(f"gpu-check: no *-bench-*.json in {out} to evaluate")
    meta = json.loads(found[-1].read_text()).get("meta", {})
    return {
        "device": meta.get("device", {}),
        "versions": meta.get("versions", {}),
        "git": meta.get("git", {}),
        "evaluated_from": [p.name for p in found],
    }


def write_summary(summary: dict[str, Any], path: Path) -> None:
    """Write the run's summary JSON and print its table and verdict."""
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print("\n=== gpu-check summary")
    for name, rec in summary["stages"].items():
        print(f"  {name:<13} {rec['status']:<8} {rec.get('seconds', 0):>7} s  {rec['detail']}")
    print(f"  results: {path}")
    failed = not summary["ok"]
    verdict = "FAILED" if failed else ("PASSED" if summary["complete"] else "PASSED (incomplete)")
    print("gpu-check " + verdict)
