"""The benchmark session: FLOP counts, device peaks, profiles, the recorder that measures a case
and writes the result file, goal records and dispatch rows.

Used by the pytest files (bench_*.py) through the fixtures of benchmarks/conftest.py. The
pieces it builds on: timing.py (timing a call, precision, memory), peers.py (Peer, the
alternation of peers, our backends), results_file.py (the JSON: schema, machine, records);
report.py reads results back (tables.py formats them). Nothing here asserts a timing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.peers import Peer, Skipped, measure_peers
from benchmarks.results_file import (
    RESULTS_DIR,
    SCHEMA,
    blank_record,
    device_info,
    git_info,
    json_safe,
    versions,
)
from benchmarks.tables import format_table
from benchmarks.timing import Timer, measure_peak_memory, pinned_precision, summarize

# Element-wise FLOPs counted per entry of the convex update besides the K @ C product:
# K / KC, sqrt, C * (.), C_new - C, |.| accumulated into delta, |C| accumulated into mass.
UPDATE_ELEMENTWISE_FLOPS = 6

# ---------------------------------------------------------------------------------------------
# Peak throughput (dense, no structured sparsity), TFLOP/s, from the vendors' data sheets.
# Matched on the lower-cased device name: every pattern of an entry must occur in it; the first
# matching entry wins (so the PCIe / NVL variants come before the SXM default).
# ---------------------------------------------------------------------------------------------
_H100_SXM = {"fp32": 66.9, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4}
_NVL = {"fp32": 60.0, "tf32": 417.5, "fp16": 835.0, "bf16": 835.0}
DEVICE_PEAKS: list[tuple[tuple[str, ...], str, dict[str, float | None]]] = [
    (("h100", "pcie"), "H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0}),
    (("h100", "nvl"), "H100 NVL", _NVL),
    (("h100",), "H100 SXM", _H100_SXM),
    (("h200", "nvl"), "H200 NVL", _NVL),
    (("h200",), "H200 SXM", _H100_SXM),
    (("a100",), "A100", {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0}),
    (("v100", "pcie"), "V100 PCIe", {"fp32": 14.0, "tf32": None, "fp16": 112.0, "bf16": None}),
    (("v100",), "V100 SXM2", {"fp32": 15.7, "tf32": None, "fp16": 125.0, "bf16": None}),
]

# Which peak a precision mode is measured against. "ieee" runs on the fp32 (CUDA-core) units;
# "tf32x3" does three TF32 tensor-core products per useful product, so its ceiling is a third
# of the TF32 peak (useful FLOPs are counted once).
PRECISION_PEAK = {
    "ieee": ("fp32", 1.0),
    "fp32": ("fp32", 1.0),
    "tf32": ("tf32", 1.0),
    "tf32x3": ("tf32", 1.0 / 3.0),
    "fp16": ("fp16", 1.0),
    "bf16": ("bf16", 1.0),
}


def device_peak_tflops(device_name: str | None, precision: str) -> float | None:
    """The dense peak TFLOP/s of ``device_name`` for ``precision``; None when unknown (CPUs)."""
    if not device_name or precision not in PRECISION_PEAK:
        return None
    lowered = device_name.lower()
    unit, factor = PRECISION_PEAK[precision]
    for patterns, _label, peaks in DEVICE_PEAKS:
        if all(p in lowered for p in patterns):
            peak = peaks.get(unit)
            return None if peak is None else peak * factor
    return None


# ---------------------------------------------------------------------------------------------
# FLOP counts
# ---------------------------------------------------------------------------------------------
def rbf_flops(n: int, m: int, d: int) -> float:
    """The x @ y^T product of the RBF kernel: 2 n m d (norms and exp not counted)."""
    return 2.0 * n * m * d


def update_flops(n: int, layers: int = 1) -> float:
    """One convex update: the K @ C product (2 n^3) plus the fused element-wise work."""
    return float(layers) * (2.0 * n**3 + UPDATE_ELEMENTWISE_FLOPS * n**2)


def solver_flops(n: int, n_iter: list[int]) -> float:
    """A solve of a stack whose layer l took n_iter[l] updates (converged layers are frozen)."""
    return sum(update_flops(n) * int(k) for k in n_iter)


def encoder_flops(batch: int, seq: int, hidden: int, intermediate: list[int]) -> float:
    """BERT encoder forward, 2 x MACs of ALGORITHM.md's model: per layer attention
    4 s d^2 + 2 s^2 d, FFN 2 s d n_l (embeddings, pooler and heads excluded)."""
    attention = 4 * seq * hidden**2 + 2 * seq**2 * hidden
    macs = sum(attention + 2 * seq * hidden * k for k in intermediate)
    return 2.0 * batch * macs


# ---------------------------------------------------------------------------------------------
# Profiles (how big, how long) and the session's recorder
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """smoke: tiny sizes, CPU backends only, few rounds (CI). full: the issue's sizes; on a CPU
    ``reduced`` drops what does not fit a small shared machine (see each bench file)."""

    name: str  # "smoke" | "full"
    device: str  # "cpu" | "cuda"
    reduced: bool
    warmup: int
    min_rounds: int
    max_rounds: int
    budget_s: float  # time for all peers of one case together
    rounds: int | None = None  # fixed rounds (overrides the budget)
    compile: bool = True  # try torch.compile peers
    pruned_by: str = "auto"  # inference: "kcm" (prune()), "uniform", or "auto"

    @property
    def smoke(self) -> bool:
        return self.name == "smoke"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def make_profile(
    smoke: bool,
    device: str | None = None,
    cpu_all: bool = False,
    rounds: int | None = None,
    compile: bool = True,
    pruned_by: str = "auto",
) -> Profile:
    if smoke:
        return Profile(
            "smoke", "cpu", True, warmup=1, min_rounds=2, max_rounds=2, budget_s=0.0,
            rounds=rounds or 2, compile=False,
            pruned_by="uniform" if pruned_by == "auto" else pruned_by,
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return Profile(
            "full", "cuda", False, warmup=3, min_rounds=10, max_rounds=100, budget_s=2.0,
            rounds=rounds, compile=compile, pruned_by=pruned_by,
        )
    return Profile(
        "full", "cpu", not cpu_all, warmup=1, min_rounds=3, max_rounds=15, budget_s=6.0,
        rounds=rounds, compile=compile, pruned_by=pruned_by,
    )


_ENV_KEYS = ("TRITON_INTERPRET", "KCM_BENCH_SMOKE", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


class Recorder:
    """Collects the records of a session and writes the result file."""

    def __init__(self, profile: Profile, argv: list[str] | None = None) -> None:
        self.profile = profile
        self.device = profile.torch_device
        self.records: list[dict[str, Any]] = []
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.argv = list(sys.argv if argv is None else argv)
        self._device_info: dict[str, Any] | None = None
        self.load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    @property
    def device_info(self) -> dict[str, Any]:
        if self._device_info is None:
            self._device_info = device_info(self.device)
        return self._device_info

    def meta(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "date": self.started.isoformat(timespec="seconds"),
            "profile": self.profile.name,
            "reduced": self.profile.reduced,
            "device": self.device_info,
            "versions": versions(),
            "git": git_info(),
            "argv": self.argv,
            "host": platform.node(),
            # 1/5/15-minute load averages at the start and the end: a busy machine's timings.
            "load_avg_start": self.load_at_start,
            "load_avg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "env": {k: os.environ.get(k) for k in _ENV_KEYS},
        }

    def default_path(self) -> Path:
        meta_git = git_info()
        sha = (meta_git["sha"] or "nogit")[:10]
        stamp = self.started.strftime("%Y%m%dT%H%M%SZ")
        name = f"{stamp}-{sha}-{self.profile.name}.json"
        return RESULTS_DIR / self.device_info["slug"] / name

    def write(self, path: Path | None = None) -> Path:
        target = path or self.default_path()
        if target.suffix != ".json":
            target = target / self.default_path().name
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": self.meta(), "records": self.records}
        target.write_text(json.dumps(json_safe(payload), indent=1, allow_nan=False) + "\n")
        return target

    # -----------------------------------------------------------------------------------------
    def run_case(
        self,
        *,
        op: str,
        case: str,
        params: dict[str, Any],
        peers: list[Peer | Skipped],
        precision: str = "ieee",
        dtype: str = "float32",
        primary: str | None = None,
        baseline: str | None = None,
        benchmark: Any = None,
        warmup: int | None = None,
        rounds: int | None = None,
        memory: bool = True,
        flush: bool = True,
    ) -> list[dict[str, Any]]:
        """Measure one case (all peers alternated) and append one record per peer."""
        prof = self.profile
        runnable = [p for p in peers if isinstance(p, Peer)]
        skipped = [p for p in peers if isinstance(p, Skipped)]
        timer = Timer(self.device, flush=flush)
        pin = "tf32" if precision == "tf32" else "ieee"
        cpu_samples: dict[str, list[float]] = {}
        samples, errors, n_rounds = measure_peers(
            runnable,
            timer,
            warmup=prof.warmup if warmup is None else warmup,
            rounds=rounds if rounds is not None else prof.rounds,
            min_rounds=prof.min_rounds,
            max_rounds=prof.max_rounds,
            budget_s=prof.budget_s,
            benchmark=benchmark,
            primary=primary,
            pin=pin,
            cpu_samples=cpu_samples,
        )
        del timer
        name = self.device_info.get("name") if self.device.type == "cuda" else None
        new: list[dict[str, Any]] = []
        for peer in runnable:
            stats = summarize(samples.get(peer.name, []))
            peer_prec = peer.precision or (precision if peer.ours else pin)
            flops = peer.flops() if callable(peer.flops) else peer.flops
            median = stats["median_ms"]
            tflops = None if not flops or not median else flops / (median * 1e-3) / 1e12
            peak = device_peak_tflops(name, peer_prec)
            mem, mem_kind = (None, None)
            if memory and peer.name not in errors:
                try:
                    with pinned_precision(pin):
                        mem, mem_kind = measure_peak_memory(peer.fn, self.device)
                except Exception as exc:  # noqa: BLE001
                    errors[peer.name] = f"{type(exc).__name__}: {exc}"[:500]
            status = "error" if peer.name in errors else "ok"
            record: dict[str, Any] = {
                "op": op,
                "case": case,
                "peer": peer.name,
                "ours": peer.ours,
                "same_op": peer.same_op,
                "status": status,
                "reason": errors.get(peer.name),
                "params": params,
                "dtype": dtype,
                "precision": precision,
                "peer_precision": peer_prec,
                "rounds": n_rounds if status == "ok" else 0,
                "samples_ms": samples.get(peer.name, []),
                **stats,
                "cpu_samples_ms": cpu_samples.get(peer.name, []) if status == "ok" else [],
                "cpu_median_ms": (
                    statistics.median(cpu_samples[peer.name])
                    if status == "ok" and cpu_samples.get(peer.name) else None
                ),
                "flops": flops,
                "tflops": tflops,
                "peak_tflops": peak,
                "pct_peak": None if tflops is None or peak is None else 100.0 * tflops / peak,
                "peak_mem_bytes": mem,
                "mem_kind": mem_kind,
                "primary": peer.name == primary,
                "baseline": baseline,
                "note": peer.note,
                "info": json_safe(peer.info),
            }
            new.append(record)
        for sk in skipped:
            new.append(
                blank_record(
                    op=op, case=case, peer=sk.name, ours=sk.ours, status="skipped",
                    reason=sk.reason, params=params, dtype=dtype, precision=precision,
                    baseline=baseline,
                )
            )
        by_peer = {r["peer"]: r for r in new}
        base = by_peer.get(baseline) if baseline else None
        for r in new:
            ok = base is not None and base["median_ms"] and r["median_ms"]
            r["speedup_vs_baseline"] = base["median_ms"] / r["median_ms"] if ok else None
        self.records.extend(new)
        if benchmark is not None:
            with contextlib.suppress(Exception):
                benchmark.group = f"{op}:{case}"
                benchmark.extra_info.update(
                    {r["peer"]: r["median_ms"] for r in new if r["median_ms"] is not None}
                )
        return new


def records_table(records: list[dict[str, Any]]) -> str:
    """A plain text table of records (the terminal summary)."""
    return format_table(records)


# ---------------------------------------------------------------------------------------------
# Goals (bench_goals.py): reported as pass/fail, never asserted
# ---------------------------------------------------------------------------------------------
_GOAL_OPS = {
    "<": lambda v, t: v < t,
    "<=": lambda v, t: v <= t,
    ">": lambda v, t: v > t,
    ">=": lambda v, t: v >= t,
}


def goal_record(name: str, value: float, op: str, target: float, unit: str) -> dict[str, Any]:
    """A result-file record (op "goal") for one goal: ``value op target`` and whether it holds."""
    if op not in _GOAL_OPS:
        raise ValueError(f"goal comparison must be one of {sorted(_GOAL_OPS)}, got {op!r}")
    record = blank_record(op="goal", case=name, peer=name, ours=True, baseline=None)
    record["info"] = {
        "value": float(value),
        "comparison": op,
        "target": float(target),
        "unit": unit,
        "passed": bool(_GOAL_OPS[op](float(value), float(target))),
    }
    return record


def goals_lines(records: list[dict[str, Any]]) -> list[str]:
    """One 'PASS/FAIL name: value (goal op target)' line per goal record."""
    lines = []
    for r in records:
        if r.get("op") != "goal":
            continue
        g = r["info"]
        verdict = "PASS" if g["passed"] else "FAIL"
        lines.append(
            f"{verdict}  {r['case']}: {g['value']:.3g} {g['unit']} "
            f"(goal {g['comparison']} {g['target']:g} {g['unit']})"
        )
    return lines


def dispatch_rows(
    measured: dict[tuple[str, str], dict[str, float | None]], min_capability: int
) -> list[dict[str, Any]]:
    """Dispatch-table rows (kcm_cuda.dispatch JSON format, plus the times) from measured
    median ms per (op, precision) and backend: fastest first, unmeasured or failed backends
    dropped, ``torch`` always kept last as the fallback."""
    rows = []
    for (op, precision), times in sorted(measured.items()):
        ok = {b: t for b, t in times.items() if t is not None and b != "torch"}
        order = sorted(ok, key=lambda b: ok[b]) + ["torch"]
        rows.append(
            {
                "min_capability": min_capability,
                "op": op,
                "precision": precision,
                "order": order,
                "median_ms": {b: times[b] for b in order if times.get(b) is not None},
            }
        )
    return rows
