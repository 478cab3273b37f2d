"""One command that validates kcm_cuda on a GPU machine (`make gpu-check`).

Stages (each a separate process with its own time limit, all well inside 10 minutes):

    env        the GPU, driver, torch/CUDA/Triton versions, nvcc and compute-sanitizer; fails
               without a CUDA GPU
    build      the CUDA extension kcm_cuda._C for the present GPU only (TORCH_CUDA_ARCH_LIST =
               its compute capability, KCM_CUDA_BUILD=1: a build that cannot happen fails
               loudly), in place, then imports it and checks that it loaded
    tests      the GPU tests without the Triton interpreter (TRITON_INTERPRET unset) and with
               KCM_REQUIRE_GPU=1: a GPU test that would skip fails instead; the stage also
               fails when no CUDA-op test ran
    memcheck   compute-sanitizer --tool memcheck over small shapes of every kernel (cuda and
               triton backends; PyTorch's caching allocator off, so that out-of-bounds
               accesses inside a cached block are seen)
    racecheck  compute-sanitizer --tool racecheck (shared-memory hazards) over the same shapes
               (a hazard reported inside a cuBLAS kernel is the library's, not this project's)
    cuda-paths the cuda backend's own paths timed against bare torch: the convex update by
               cuBLAS + fused pass and by the single fused FMA kernel (KCM_CUDA_CONVEX=fused)
               against torch.bmm, the RBF kernel against torch.cdist + exp (CUDA events,
               median of 20); decides whether the fused kernel should be the default anywhere
    bench-rbf, bench-update, bench-solver, bench-e2e, bench-goals, bench-dispatch
               the benchmark suite (benchmarks/), one file per stage, JSON results;
               bench-goals measures the issue's goals, bench-dispatch the auto-dispatch table
    search-7b  the structure search on a Llama-2-7B-shaped block (2 layers at full width,
               random weights, 128 x 128 tokens) beside the fixed rules: time and peak GPU
               memory of each, the time extrapolated to 32 layers (the search holds one
               layer's statistics at a time, so its peak does not grow with depth:
               benchmarks/memory_depth.py); benchmarks/search_at_scale.py
    goals      the issue's timing goals, PASS / FAIL / UNMEASURED (reported, never failing the
               check): bench_goals.py's own goal records, plus ratios derived from the other
               benchmarks' records (per precision)

Results: <out>/<stamp>-gpu-check.json (device, versions, date, git, each stage's status and
time, the test counts, the goals), <out>/<stamp>-gpu-check.log (every stage's output) and the
benchmark JSONs <out>/<stamp>-bench-*.json; <out> defaults to benchmarks/results/<device
slug>/. The device tool brings back at most 8 files from $OUT: --part 1 returns 4, --part 2
returns 8. The goals stage reads the newest bench JSON of each benchmark in <out>, whichever
call wrote it. The stages' bodies: gpu_workloads.py; running a stage: gpu_process.py; counts,
goals and the summary: gpu_summary.py.

    python tools/gpu_check.py --part 1 --out "$OUT"    # one lent-GPU command: build, GPU
                                                       # parity tests, timing goals (<= 8 min)
    python tools/gpu_check.py --part 2 --out "$OUT"    # the second: sanitizers, dispatch
                                                       # table, the benchmarks (<= 8 min)
    python tools/gpu_check.py                          # every stage
    python tools/gpu_check.py --stages env,build,tests --out "$OUT"
    python tools/gpu_check.py --dry-run [--part 1]     # the plan with estimated times; checks
                                                       # the commands exist
    python tools/gpu_check.py --stages build,bench-rbf --budget 540   # inside one 10-min call

The dry run needs neither a GPU nor torch: it prints each stage's command, checks that the
files and modules it names exist here, reports whether its executables are on PATH, and exits
0 (1 if a file a stage needs is missing). Exit status of a real run: 0 when every stage that
ran passed, 1 otherwise (a failed build stops the stages that need the extension).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gpu_process  # noqa: E402 (tools/ is this script's folder: its modules are on sys.path)
import gpu_summary
import gpu_workloads

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# GPU test files (their CUDA/Triton tests skip without a GPU, and must run here).
GPU_TEST_FILES = [
    "tests/test_cuda_ops.py",
    "tests/test_parity.py",
    "tests/test_triton_kernels.py",
    "tests/test_solver.py",
    "tests/test_validation.py",
]
# Tests whose run proves that the CUDA extension was exercised (at least one must pass).
CUDA_OPS_TEST_FILE = "tests/test_cuda_ops.py"
BENCH_FILES = {
    "bench-rbf": "benchmarks/bench_rbf.py",
    "bench-update": "benchmarks/bench_convex_update.py",
    "bench-solver": "benchmarks/bench_solver.py",
    "bench-e2e": "benchmarks/bench_prune_e2e.py",
    "bench-goals": "benchmarks/bench_goals.py",
    "bench-dispatch": "benchmarks/bench_dispatch.py",
}
STAGES = [
    "env", "build", "tests", "search-7b", "memcheck", "racecheck", "cuda-paths", *BENCH_FILES,
    "goals",
]  # fmt: skip
NEEDS_EXTENSION = {"tests", "memcheck", "racecheck", "cuda-paths", *BENCH_FILES}
STAGE_TIMEOUT_S = 540  # each stage ends well inside the device tool's 10 minutes

# Seconds each stage should take on one H100, from the work it does. ESTIMATES: no gpu-check has
# run on a lent GPU yet; each run's summary JSON records every stage's measured seconds: put
# those here. "build" is a cold build (a warm machine keeps build/ and takes seconds).
EST_S = {
    "env": 15, "build": 120, "tests": 150, "search-7b": 30, "memcheck": 90, "racecheck": 120,
    "cuda-paths": 30,
    "bench-rbf": 120, "bench-update": 90, "bench-solver": 120, "bench-e2e": 60,
    "bench-goals": 120, "bench-dispatch": 60, "goals": 1,
}  # fmt: skip
# The lent GPU (benchmarks/README.md): 10 min per command, 15 min of device time per session,
# the machine's start included. So two commands of at most 8 min (PART_BUDGET_S plus the
# summary), the first with the most valuable results: the build, the GPU parity tests, the
# timing goals. Within a part the stages run in this order, the most valuable first; when the
# budget is spent the rest are SKIPPED ("budget spent") and can be run later with --stages.
PART_BUDGET_S = 470
PARTS = {
    "1": ["env", "build", "tests", "search-7b", "cuda-paths", "bench-goals", "goals"],
    "2": ["build", "memcheck", "racecheck", "bench-dispatch", "bench-rbf", "bench-update",
          "bench-solver", "bench-e2e", "goals"],
}  # fmt: skip


@dataclass
class Stage:
    name: str
    what: str
    commands: list[list[str]]
    env: dict[str, str | None] = field(default_factory=dict)  # None: unset the variable
    files: list[str] = field(default_factory=list)  # must exist in the source tree
    executables: list[str] = field(default_factory=list)  # must be on PATH on the GPU machine
    modules: list[str] = field(default_factory=list)  # importable Python modules needed there


def sanitizer_command(tool: str) -> list[str]:
    return [
        "compute-sanitizer", "--tool", tool, "--error-exitcode", "1",
        "--target-processes", "all", "--print-limit", "20",
        PY, "tools/gpu_check.py", "--workload",
    ]  # fmt: skip


def plan(out: Path, stamp: str, arch: str | None) -> list[Stage]:
    """The stages with their commands (arch: the GPU's compute capability, e.g. "9.0")."""
    tests_xml = out / f".{stamp}-tests.xml"
    stages = [
        Stage(
            "env",
            "the GPU, its driver and the toolchain (fails without a CUDA GPU)",
            [[PY, "tools/gpu_check.py", "--probe"], ["nvidia-smi"], ["nvcc", "--version"]],
            files=["tools/gpu_check.py", "tools/gpu_workloads.py"],
            executables=["nvidia-smi", "nvcc"],
            modules=["torch"],
        ),
        Stage(
            "build",
            "build kcm_cuda._C for this GPU only, in place; fail loudly if it does not build",
            [
                [PY, "setup.py", "-q", "build_ext", "--inplace"],
                [PY, "-c", "import kcm_cuda.kernels.cuda as c; assert c.is_available(), "
                 "c.EXTENSION_ERROR; print('kcm_cuda._C loaded:', c._C.__file__)"],
            ],  # fmt: skip
            env={"KCM_CUDA_BUILD": "1", "TORCH_CUDA_ARCH_LIST": arch or "<this GPU's cc>",
                 "MAX_JOBS": str(os.cpu_count() or 4)},  # fmt: skip
            files=["setup.py", "kcm_cuda_build.py", "csrc/bindings.cpp"],
            executables=["nvcc"],
            modules=["torch", "setuptools"],
        ),
        Stage(
            "tests",
            "GPU tests, no Triton interpreter; a GPU test that would skip fails",
            [[PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
              f"--junitxml={tests_xml}", *GPU_TEST_FILES]],  # fmt: skip
            env={"TRITON_INTERPRET": None, "KCM_REQUIRE_GPU": "1", "HF_HUB_OFFLINE": "1"},
            files=GPU_TEST_FILES,
            modules=["torch", "pytest", "triton"],
        ),
        Stage(
            "memcheck",
            "compute-sanitizer memcheck over small shapes of every kernel",
            [sanitizer_command("memcheck")],
            env={"TRITON_INTERPRET": None, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
            files=["tools/gpu_check.py"],
            executables=["compute-sanitizer"],
            modules=["torch"],
        ),
        Stage(
            "racecheck",
            "compute-sanitizer racecheck (shared-memory hazards) over the same shapes",
            [sanitizer_command("racecheck")],
            env={"TRITON_INTERPRET": None},
            files=["tools/gpu_check.py"],
            executables=["compute-sanitizer"],
            modules=["torch"],
        ),
    ]
    scale_cmd = [PY, "-m", "benchmarks.search_at_scale", "--shape", "llama-2-7b", "--device",
                 "cuda", "--samples", "128", "--seq", "128", "--out", str(out)]  # fmt: skip
    stages.append(
        Stage(
            "search-7b",
            "the structure search and the fixed rules on a Llama-2-7B block (2 layers)",
            [[*scale_cmd, "--layers", "2"]],
            env={"TRITON_INTERPRET": None, "HF_HUB_OFFLINE": "1"},
            files=["benchmarks/search_at_scale.py"],
            modules=["torch", "transformers"],
        )
    )
    stages.append(
        Stage(
            "cuda-paths",
            "time the cuda backend's paths against bare torch (convex update, RBF)",
            [[PY, "tools/gpu_check.py", "--cuda-paths", str(out / f"{stamp}-cuda-paths.json")]],
            env={"TRITON_INTERPRET": None},
            files=["tools/gpu_check.py"],
            modules=["torch"],
        )
    )
    for name, path in BENCH_FILES.items():
        result = out / f"{stamp}-{name}.json"
        stages.append(
            Stage(
                name,
                f"benchmarks: {path}",
                [[PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", path,
                  "--benchmark-disable", "--kcm-device", "cuda", "--kcm-out", str(result)]],
                env={"TRITON_INTERPRET": None, "KCM_BENCH_SMOKE": None, "HF_HUB_OFFLINE": "1"},
                files=[path, "benchmarks/conftest.py", "benchmarks/harness.py"],
                modules=["torch", "pytest", "pytest_benchmark"],
            )  # fmt: skip
        )
    stages.append(
        Stage(
            "goals",
            "the timing goals from the benchmark results, PASS / FAIL / UNMEASURED",
            [],
            files=["tools/gpu_check.py"],
        )
    )
    return stages


# ---------------------------------------------------------------------------- dry run


def _module_found(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def part_command(part: str) -> str:
    """The device-tool command of one part (its files come back from $OUT)."""
    return f"python3 tools/gpu_check.py --part {part} --out $OUT"


def print_parts(parts: list[str]) -> None:
    """Each of ``parts``: its stages, estimated time and command."""
    print("\ndevice-tool commands (estimates for one H100, not yet measured; budget "
          f"{PART_BUDGET_S} s each, timeout_s=540):")  # fmt: skip
    for part in parts:
        stages = PARTS[part]
        total = sum(EST_S[s] for s in stages)
        fits = "fits" if total <= PART_BUDGET_S else "over the budget: the last stages are SKIPPED"
        print(f"  part {part}: ~{total} s ({total / 60:.1f} min; {fits})")
        print("    " + " + ".join(f"{s} {EST_S[s]}" for s in stages))
        print(f"    run(command=\"{part_command(part)}\", timeout_s=540)")
        left, cut = PART_BUDGET_S, []
        for name in stages:
            left -= EST_S[name]
            if left < 0 and name != "goals":
                cut.append(name)
        if cut:
            later = ",".join(["build", *cut, "goals"])
            print(f"    by these estimates SKIPPED: {', '.join(cut)} (a later command: "
                  f"--stages {later} --budget {PART_BUDGET_S})")  # fmt: skip


def dry_run(stages: list[Stage], out: Path, parts: list[str] | None = None) -> int:
    print(f"gpu-check plan (dry run; results would go to {out})")
    parts = list(PARTS) if parts is None else parts
    missing_files = []
    for stage in stages:
        print(f"\n[{stage.name}] {stage.what} (est. ~{EST_S[stage.name]} s)")
        for key, value in stage.env.items():
            print(f"    env {key}={'<unset>' if value is None else value}")
        for cmd in stage.commands:
            print("    $ " + shlex.join(cmd))
        if stage.name == "goals":
            print("    (in process: reads the bench-*.json of this run)")
        for f in stage.files:
            ok = (ROOT / f).is_file()
            print(f"    file   {f}: {'ok' if ok else 'MISSING'}")
            if not ok:
                missing_files.append(f)
        for exe in stage.executables:
            where = shutil.which(exe)
            print(f"    exe    {exe}: {where or 'not on PATH here (needed on the GPU machine)'}")
        for mod in stage.modules:
            state = "importable" if _module_found(mod) else "not importable here"
            print(f"    module {mod}: {state}")
    if missing_files:
        print(f"\nMISSING files: {missing_files}")
        return 1
    print_parts(parts)
    print("\ndry run OK: every stage's files exist")
    return 0


# ------------------------------------------------------------------ in-process helpers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--part", choices=sorted(PARTS), default=None, help="one device-tool "
                        f"command's stages ({PART_BUDGET_S} s budget unless --budget)")  # fmt: skip
    parser.add_argument("--out", default=None, help="result folder (default: benchmarks/"
                        "results/<device slug>/)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the plan, check files")
    parser.add_argument("--timeout", type=float, default=STAGE_TIMEOUT_S, help="s per stage")
    parser.add_argument("--budget", type=float, default=None, help="s for all the stages of "
                        "this call (later stages are skipped when it is spent)")  # fmt: skip
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cuda-paths", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        return gpu_workloads.probe()
    if args.workload:
        sys.path.insert(0, str(ROOT))
        return gpu_workloads.workload()
    if args.cuda_paths:
        sys.path.insert(0, str(ROOT))
        return gpu_workloads.cuda_paths(Path(args.cuda_paths))

    if args.part and args.stages:
        parser.error("--part and --stages: give one of them")
    if args.part:
        names = PARTS[args.part]
        args.budget = PART_BUDGET_S if args.budget is None else args.budget
    else:
        names = [s.strip() for s in (args.stages or ",".join(STAGES)).split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; the stages are {STAGES}")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if args.dry_run:
        out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "<device-slug>"
        by_name = {s.name: s for s in plan(out, stamp, None)}
        parts = [args.part] if args.part else list(PARTS)
        return dry_run([by_name[n] for n in names], out, parts)

    # goals alone over a folder: re-evaluating saved results, e.g. fetched from a GPU machine.
    saved = names == ["goals"] and args.out is not None
    meta = gpu_summary.meta_from_results(Path(args.out)) if saved else gpu_summary.device_meta()
    arch = meta["device"].get("capability")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / meta["device"]["slug"]
    out.mkdir(parents=True, exist_ok=True)
    stages = {s.name: s for s in plan(out, stamp, arch)}
    summary: dict[str, Any] = {
        "schema": 1,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "stages": {},
    }
    failed = False
    built = True
    t0 = time.monotonic()
    log_path = out / f"{stamp}-gpu-check.log"
    with log_path.open("w") as log:
        for name in names:
            stage = stages[name]
            if name == "goals":
                goals = gpu_summary.evaluate_goals(gpu_summary.newest_records(out, BENCH_FILES))
                summary["goals"] = goals
                print("\n=== [goals] (reported, not asserted)")
                gpu_summary.print_goals(goals)
                summary["stages"][name] = {"status": "PASS", "seconds": 0.0, "detail": ""}
                continue
            if name in NEEDS_EXTENSION and not built:
                summary["stages"][name] = {"status": "SKIPPED", "detail": "the build failed"}
                continue
            timeout = args.timeout
            if args.budget is not None:
                timeout = min(timeout, args.budget - (time.monotonic() - t0))
                if timeout < 30:
                    summary["stages"][name] = {"status": "SKIPPED", "detail": "budget spent"}
                    continue
            if name == "build" and arch is None:
                status, secs, detail = "FAIL", 0.0, "no CUDA GPU visible to torch"
            else:
                status, secs, detail = gpu_process.run_stage(stage, log, timeout)
            record: dict[str, Any] = {"status": status, "seconds": round(secs, 1), "detail": detail}
            if name == "tests":
                xml = out / f".{stamp}-tests.xml"
                counts = gpu_summary.junit_counts(xml)
                xml.unlink(missing_ok=True)
                record["counts"] = counts
                if counts["cuda_ops_passed"] == 0:
                    record.update(status="FAIL", detail="no CUDA-op test ran (all skipped?)")
            table = ROOT / "benchmarks" / "results" / str(meta["device"].get("slug")) / (
                "dispatch_table.json"
            )
            if name == "bench-dispatch" and table.is_file() and table.parent != out:
                shutil.copy(table, out / f"{stamp}-dispatch_table.json")
            if name == "build" and status != "PASS":
                built = False
                print("\n!!! gpu-check: THE CUDA EXTENSION DID NOT BUILD (see above) !!!\n")
            summary["stages"][name] = record
            failed |= record["status"] == "FAIL"
            log.flush()
    summary["ok"] = not failed
    summary["complete"] = all(r["status"] == "PASS" for r in summary["stages"].values())
    gpu_summary.write_summary(summary, out / f"{stamp}-gpu-check.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
