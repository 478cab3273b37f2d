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
    goals      the issue's timing goals, PASS / FAIL / UNMEASURED (reported, never failing the
               check): bench_goals.py's own goal records, plus ratios derived from the other
               benchmarks' records (per precision)

Results: <out>/<stamp>-gpu-check.json (device, versions, date, git, each stage's status and
time, the test counts, the goals), <out>/<stamp>-gpu-check.log (every stage's output) and the
benchmark JSONs <out>/<stamp>-bench-*.json; <out> defaults to benchmarks/results/<device
slug>/. The device tool brings back at most 8 files from $OUT: the three calls that
benchmarks/README.md gives return 3, 5 and 6. The goals stage reads
the newest bench JSON of each benchmark in <out>, whichever call wrote it.

    python tools/gpu_check.py                          # every stage
    python tools/gpu_check.py --stages env,build,tests --out "$OUT"
    python tools/gpu_check.py --dry-run                # the plan; checks the commands exist
    python tools/gpu_check.py --stages build,bench-rbf --budget 540   # inside one 10-min call

The dry run needs neither a GPU nor torch: it prints each stage's command, checks that the
files and modules it names exist here, reports whether its executables are on PATH, and exits
0 (1 if a file a stage needs is missing). Exit status of a real run: 0 when every stage that
ran passed, 1 otherwise (a failed build stops the stages that need the extension).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
STAGES = ["env", "build", "tests", "memcheck", "racecheck", "cuda-paths", *BENCH_FILES, "goals"]
NEEDS_EXTENSION = {"tests", "memcheck", "racecheck", "cuda-paths", *BENCH_FILES}
STAGE_TIMEOUT_S = 540  # each stage ends well inside the device tool's 10 minutes


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
            files=["tools/gpu_check.py"],
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


def dry_run(stages: list[Stage], out: Path) -> int:
    print(f"gpu-check plan (dry run; results would go to {out})")
    missing_files = []
    for stage in stages:
        print(f"\n[{stage.name}] {stage.what}")
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
    print("\ndry run OK: every stage's files exist")
    return 0


# ------------------------------------------------------------------ in-process helpers


def probe() -> int:
    """Print the machine as JSON; exit 1 without a usable CUDA GPU."""
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            device_count=torch.cuda.device_count(),
        )
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    print(json.dumps(info))
    if not info["cuda_available"] or info["torch_cuda"] is None:
        print("gpu-check: no CUDA GPU visible to torch", file=sys.stderr)
        return 1
    return 0


def workload(dev: str = "cuda") -> int:
    """Small shapes of every kernel, for compute-sanitizer (odd sizes: the bounds checks).
    ``dev="cpu"`` (tests only) runs the same calls on the ops' CPU kernels."""
    import torch

    from kcm_cuda.kernels import cuda

    if dev == "cuda":
        assert cuda.is_available(), cuda.EXTENSION_ERROR
    g = torch.Generator(device=dev).manual_seed(0)
    for n, m, d in ((1, 1, 1), (5, 3, 7), (129, 131, 33), (257, 130, 20)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(n, d, generator=g, device=dev).to(dtype)
            y = torch.randn(m, d, generator=g, device=dev).to(dtype)
            for precision in ("ieee", "tf32"):
                torch.ops.kcm.rbf_kernel(x, None, 1.0, precision)
                torch.ops.kcm.rbf_kernel(x, y, 0.7, precision)
    # A row-strided x and an output of odd width (scalar stores).
    base = torch.randn(70, 40, generator=g, device=dev)
    torch.ops.kcm.rbf_kernel(base[:, :33], base[:9, :33], 1.0, "ieee")
    for mode in ("cublas", "fused"):
        os.environ["KCM_CUDA_CONVEX"] = mode
        for batch, n in ((1, 1), (2, 5), (1, 128), (2, 129), (1, 260)):
            K = torch.rand(batch, n, n, generator=g, device=dev)
            C = torch.rand(batch, n, n, generator=g, device=dev)
            for precision in ("ieee", "tf32x3", "tf32"):
                torch.ops.kcm.convex_update(K, C, precision)
    os.environ.pop("KCM_CUDA_CONVEX", None)
    try:
        from kcm_cuda.kernels import triton as triton_backend
    except ImportError as exc:
        print(f"workload: triton backend not importable ({exc}); cuda kernels only")
    else:
        x = torch.randn(129, 33, generator=g, device=dev)
        y = torch.randn(70, 33, generator=g, device=dev)
        K = torch.rand(2, 129, 129, generator=g, device=dev)
        K = (K + K.transpose(1, 2)).contiguous()  # symmetric, for the transposed form
        C = torch.rand(2, 129, 129, generator=g, device=dev)
        for precision in ("ieee", "tf32x3", "tf32"):
            triton_backend.rbf_kernel(x, None, 1.0, precision)
            triton_backend.rbf_kernel(x, y, 1.0, precision)
            triton_backend.convex_update(K, C, precision)
            transposed = getattr(triton_backend, "convex_update_transposed", None)
            if transposed is not None:
                transposed(K, C, precision)
    if dev == "cuda":
        torch.cuda.synchronize()
    print("workload OK")
    return 0


def cuda_paths(result: Path, dev: str = "cuda") -> int:
    """Median times (ms) of the cuda backend's paths and their bare-torch counterparts.
    ``dev="cpu"`` (tests only): tiny sizes, host timer, the ops' CPU kernels."""
    import statistics

    import torch

    from kcm_cuda.kernels import cuda

    on_gpu = dev == "cuda"
    if on_gpu:
        assert cuda.is_available(), cuda.EXTENSION_ERROR

    def timed(fn, reps: int = 20 if on_gpu else 2) -> float:
        for _ in range(3 if on_gpu else 1):
            fn()
        times = []
        for _ in range(reps):
            if not on_gpu:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1000)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def with_path(path: str, fn):
        def run():
            os.environ["KCM_CUDA_CONVEX"] = path
            try:
                return fn()
            finally:
                os.environ.pop("KCM_CUDA_CONVEX", None)

        return run

    g = torch.Generator(device=dev).manual_seed(0)
    rows: list[dict[str, Any]] = []
    for layers, n in ((12, 3072), (1, 3072)) if on_gpu else ((2, 40),):
        K = torch.rand(layers, n, n, generator=g, device=dev)
        C = torch.rand(layers, n, n, generator=g, device=dev) / n
        for precision in ("ieee", "tf32"):
            allow = precision == "tf32"
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = allow
            try:
                bare = timed(lambda K=K, C=C: torch.bmm(K, C))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
            row = {"op": "convex_update", "layers": layers, "n": n, "precision": precision,
                   "torch_bmm_ms": bare}  # fmt: skip
            for path in ("cublas", "fused"):
                if path == "fused" and precision != "ieee":
                    continue  # the fused kernel is fp32 for every precision
                op = with_path(path, lambda K=K, C=C, p=precision: cuda.convex_update(K, C, p))
                ms = timed(op)
                row[f"{path}_ms"] = ms
                row[f"{path}_over_bmm"] = ms / bare
            rows.append(row)
        del K, C
    for n, d in ((3072, 768), (1536, 384)) if on_gpu else ((50, 8),):
        x = torch.randn(n, d, generator=g, device=dev) / d**0.5
        ours = timed(lambda x=x: cuda.rbf_kernel(x, None, 1.0, "ieee"))
        peer = timed(lambda x=x: torch.exp(-torch.cdist(x, x).square() / 2.0))
        rows.append({"op": "rbf", "n": n, "d": d, "precision": "ieee", "cuda_ms": ours,
                     "cdist_exp_ms": peer, "speedup_vs_cdist": peer / ours})  # fmt: skip
    for row in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    result.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


def _junit_counts(path: Path) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------- goals


def _records(out: Path) -> list[dict[str, Any]]:
    """The records of the newest <stamp>-bench-*.json of each benchmark in ``out`` (so that a
    later call's goals stage sees the benchmarks of an earlier call in the same folder)."""
    records: list[dict[str, Any]] = []
    for name in BENCH_FILES:
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


# ---------------------------------------------------------------------------- runner


def _run_stage(stage: Stage, log, timeout: float) -> tuple[str, float, str]:
    env = dict(os.environ)
    for key, value in stage.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    start = time.monotonic()
    for cmd in stage.commands:
        exe = shutil.which(cmd[0]) if not os.path.isabs(cmd[0]) else cmd[0]
        if exe is None:
            return "FAIL", time.monotonic() - start, f"{cmd[0]} not found on PATH"
        left = timeout - (time.monotonic() - start)
        banner = f"\n=== [{stage.name}] $ {shlex.join(cmd)}\n"
        print(banner, end="", flush=True)
        log.write(banner)
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True,
        )  # fmt: skip

        def copy(stream=proc.stdout) -> None:
            for line in stream:
                sys.stdout.write(line)
                log.write(line)

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(left, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            reader.join(timeout=10)
            return "FAIL", time.monotonic() - start, f"timed out after {timeout:.0f} s"
        reader.join(timeout=30)
        if rc != 0:
            return "FAIL", time.monotonic() - start, f"exit status {rc}: {' '.join(cmd[:4])}"
    return "PASS", time.monotonic() - start, ""


def _device_meta() -> dict[str, Any]:
    """Device, versions and git state (benchmarks/results_file.py's description of a machine)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks import results_file

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = results_file.device_info(dev)
    if dev.type != "cuda":
        device["capability"] = None
    return {"device": device, "versions": results_file.versions(), "git": results_file.git_info()}


def _meta_from_results(out: Path) -> dict[str, Any]:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset")
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
        return probe()
    if args.workload:
        sys.path.insert(0, str(ROOT))
        return workload()
    if args.cuda_paths:
        sys.path.insert(0, str(ROOT))
        return cuda_paths(Path(args.cuda_paths))

    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; the stages are {STAGES}")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if args.dry_run:
        out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "<device-slug>"
        return dry_run([s for s in plan(out, stamp, None) if s.name in names], out)

    # goals alone over a folder: re-evaluating saved results, e.g. fetched from a GPU machine.
    saved = names == ["goals"] and args.out is not None
    meta = _meta_from_results(Path(args.out)) if saved else _device_meta()
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
                goals = evaluate_goals(_records(out))
                summary["goals"] = goals
                print("\n=== [goals] (reported, not asserted)")
                print_goals(goals)
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
                status, secs, detail = _run_stage(stage, log, timeout)
            record: dict[str, Any] = {"status": status, "seconds": round(secs, 1), "detail": detail}
            if name == "tests":
                xml = out / f".{stamp}-tests.xml"
                counts = _junit_counts(xml)
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
    summary_path = out / f"{stamp}-gpu-check.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print("\n=== gpu-check summary")
    for name, rec in summary["stages"].items():
        print(f"  {name:<13} {rec['status']:<8} {rec.get('seconds', 0):>7} s  {rec['detail']}")
    print(f"  results: {summary_path}")
    verdict = "FAILED" if failed else ("PASSED" if summary["complete"] else "PASSED (incomplete)")
    print("gpu-check " + verdict)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
