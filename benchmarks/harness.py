"""Timing engine, FLOP counts, device peaks and the result file of the benchmark suite.

Used by the pytest files (bench_*.py) through the fixtures of benchmarks/conftest.py, and by
benchmarks/report.py to read results back. Nothing here asserts a timing.

Timing semantics (the same as ``triton.testing.do_bench``):
- warm-up calls (compilation, autotuning, allocator growth) run before and outside the timing;
- before every timed call the last-level cache is flushed by overwriting a large buffer;
- on CUDA a call is timed with a pair of CUDA events around it (GPU time, no host sync inside);
  on the CPU with ``time.perf_counter``;
- the peers of one case are **alternated**: round r runs every peer once, in an order rotated
  by r, so drift (clocks, other processes on a shared machine) hits every peer alike;
- every peer of a case runs at the same pinned matmul precision
  (``torch.backends.cuda.matmul.allow_tf32`` on for "tf32" only).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SCHEMA = "kcm-bench/1"
REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

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
# Environment description
# ---------------------------------------------------------------------------------------------
def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "unknown"


def cpu_model_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if lines else None


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, slug (the results sub-folder), and what else identifies the machine."""
    info: dict[str, Any] = {
        "type": device.type,
        "cpu_model": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            name=props.name,
            slug=slugify(props.name),
            capability=f"{props.major}.{props.minor}",
            total_memory_bytes=int(props.total_memory),
            multiprocessors=int(props.multi_processor_count),
            driver=_nvidia_driver(),
        )
    else:
        name = info["cpu_model"]
        info.update(name=name, slug="cpu-" + slugify(name), driver=None)
    return info


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of what was measured (triton read from its metadata: no import needed)."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None if cudnn is None else str(cudnn),
        "triton": _package_version("triton"),
        "numpy": _package_version("numpy"),
        "scikit-learn": _package_version("scikit-learn"),
        "transformers": _package_version("transformers"),
        "pykeops": _package_version("pykeops"),
        "pytest-benchmark": _package_version("pytest-benchmark"),
        "kcm_cuda": _package_version("kcm_cuda") or _kcm_version(),
    }


def _kcm_version() -> str | None:
    """kcm_cuda's version when it runs from the source tree (not pip-installed)."""
    try:
        import kcm_cuda
    except ImportError:
        return None
    return getattr(kcm_cuda, "__version__", None)


def git_info(root: Path = REPO_ROOT) -> dict[str, Any]:
    """sha (None before the first commit or outside git), branch, and dirty: whether tracked
    files differ from that commit (untracked files are not counted)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    sha = git("rev-parse", "--verify", "--quiet", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "sha": sha or None,
        "branch": git("rev-parse", "--abbrev-ref", "HEAD") if sha else None,
        "dirty": None if status is None else bool(status),
    }


# ---------------------------------------------------------------------------------------------
# Precision pinning and memory
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def pinned_precision(precision: str) -> Iterator[None]:
    """Pin torch's fp32 matmul mode for a peer: TF32 allowed for "tf32" only (a "tf32x3" case
    runs its peers in exact fp32, the accuracy class that mode stands in for)."""
    allow = precision == "tf32"
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _proc_status_kb(key: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so that RSS growth during the next call
    counts the memory that call touches, not only what the heap had never held before."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def measure_peak_memory(
    fn: Callable[[], object], device: torch.device
) -> tuple[int | None, str | None]:
    """Extra memory one call needs beyond what was allocated before it (inputs excluded,
    output included). CUDA: torch's allocator high-water mark; CPU: growth of the process's
    peak resident set (Linux only; None elsewhere)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak), "cuda_max_allocated"
    _malloc_trim()
    if not _reset_cpu_peak():
        return None, None
    base = _proc_status_kb("VmRSS")
    out = fn()
    peak = _proc_status_kb("VmHWM")
    del out
    if base is None or peak is None:
        return None, None
    return max(0, peak - base) * 1024, "cpu_rss_hwm_growth"


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
class Timer:
    """Times single calls on one device with a cache flush before each."""

    CUDA_FLUSH_BYTES = 256 * 1024 * 1024  # as triton.testing.do_bench
    CPU_FLUSH_BYTES = 64 * 1024 * 1024

    def __init__(self, device: torch.device, flush: bool = True) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        nbytes = self.CUDA_FLUSH_BYTES if self.is_cuda else self.CPU_FLUSH_BYTES
        self._cache = torch.empty(nbytes, dtype=torch.int8, device=device) if flush else None
        self.last_cpu_ms: float | None = None

    def flush(self) -> None:
        if self._cache is not None:
            self._cache.zero_()

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def time_call(self, fn: Callable[[], object], flush: bool = True) -> float:
        """Milliseconds of one call of ``fn``; its result is dropped."""
        if flush:
            self.flush()
        self.last_cpu_ms = None
        if self.is_cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            del out
            return float(start.elapsed_time(end))
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        t1, c1 = time.perf_counter(), time.process_time()
        del out
        # CPU time of the whole process (all its threads): unlike the wall time, it does not
        # grow when neighbours on a shared machine take our cores away.
        self.last_cpu_ms = (c1 - c0) * 1e3
        return (t1 - t0) * 1e3


@dataclass
class Peer:
    """One implementation of a case. ``fn`` runs it once on prepared inputs; ``flops`` is the
    useful work of one call (a callable is evaluated after the run, e.g. from iterations);
    ``info`` is a dict the callable may fill (iterations, report) that lands in the record."""

    name: str
    fn: Callable[[], object]
    ours: bool = False
    flops: float | Callable[[], float | None] | None = None
    precision: str | None = None  # the precision the peer effectively runs at
    same_op: bool = True  # False: a related, not identical, computation (e.g. a ceiling)
    note: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Skipped:
    """A peer that could not run here (not installed, unsupported), recorded with the reason."""

    name: str
    reason: str
    ours: bool = False


def _rotation(names: list[str], r: int) -> list[str]:
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def measure_peers(
    peers: list[Peer],
    timer: Timer,
    *,
    warmup: int,
    rounds: int | None,
    min_rounds: int,
    max_rounds: int,
    budget_s: float,
    benchmark: Any = None,
    primary: str | None = None,
    pin: str = "ieee",
    cpu_samples: dict[str, list[float]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, str], int]:
    """Alternate the peers round by round. Returns (samples in ms per peer, errors per peer,
    rounds). ``rounds=None`` picks rounds from ``budget_s`` and a warm-up estimate, clamped to
    [min_rounds, max_rounds]. With an enabled pytest-benchmark fixture and a ``primary`` peer,
    that peer's calls are driven by ``benchmark.pedantic`` (its table then shows the primary)
    while the other peers run in its untimed setup/teardown, still alternated. On a CPU,
    ``cpu_samples`` (when given) receives each timed call's process CPU time."""
    errors: dict[str, str] = {}
    estimate: dict[str, float] = {}

    def call(peer: Peer, flush: bool = True) -> float:
        with pinned_precision(pin):
            return timer.time_call(peer.fn, flush=flush)

    for peer in peers:
        try:
            t = math.nan  # no warm-up: no estimate (rounds then fixed or min_rounds)
            for _ in range(warmup):
                t = call(peer)
            estimate[peer.name] = t
        except Exception as exc:  # noqa: BLE001 (a failing peer is recorded, not fatal)
            errors[peer.name] = f"{type(exc).__name__}: {exc}"[:500]
    live = [p for p in peers if p.name not in errors]
    by_name = {p.name: p for p in live}
    names = [p.name for p in live]
    samples: dict[str, list[float]] = {name: [] for name in names}
    if not live:
        return samples, errors, 0
    if rounds is None:
        per_round_s = sum(estimate[n] for n in names) / 1e3
        if math.isnan(per_round_s):
            rounds = min_rounds
        else:
            rounds = int(budget_s / per_round_s) if per_round_s > 0 else max_rounds
            rounds = max(min_rounds, min(max_rounds, rounds))

    def keep(name: str, ms: float) -> None:
        samples[name].append(ms)
        if cpu_samples is not None and timer.last_cpu_ms is not None:
            cpu_samples.setdefault(name, []).append(timer.last_cpu_ms)

    def run_named(name: str) -> None:
        if name in errors:
            return
        try:
            keep(name, call(by_name[name]))
        except Exception as exc:  # noqa: BLE001
            errors[name] = f"{type(exc).__name__}: {exc}"[:500]

    use_fixture = (
        benchmark is not None
        and primary in by_name
        and not getattr(benchmark, "disabled", True)
    )
    gc.collect()
    if not use_fixture:
        for r in range(rounds):
            for name in _rotation(names, r):
                run_named(name)
    else:
        order = {"r": -1, "after": []}

        def setup() -> None:
            order["r"] += 1
            rotated = _rotation(names, order["r"])
            i = rotated.index(primary)
            for name in rotated[:i]:
                run_named(name)
            order["after"] = rotated[i + 1 :]
            # Flush here, untimed by pytest-benchmark on a CPU. On a GPU the flush kernel is
            # only queued (no sync), as in time_call: it hides the launch latency of the
            # primary from its CUDA events (pytest-benchmark's own wall time then includes it).
            timer.flush()

        def target() -> None:
            keep(primary, call(by_name[primary], flush=False))

        def teardown() -> None:
            for name in order["after"]:
                run_named(name)

        benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds, warmup_rounds=0)
    for name in list(samples):
        if name in errors:
            samples[name] = []
    return samples, errors, rounds


def summarize(samples_ms: list[float]) -> dict[str, float | None]:
    if not samples_ms:
        return {k: None for k in ("median_ms", "mean_ms", "min_ms", "max_ms", "stdev_ms", "iqr_ms")}
    ordered = sorted(samples_ms)
    if len(ordered) >= 2:
        q = statistics.quantiles(ordered, n=4, method="inclusive")
        iqr = q[2] - q[0]
        stdev = statistics.stdev(ordered)
    else:
        iqr, stdev = 0.0, 0.0
    return {
        "median_ms": statistics.median(ordered),
        "mean_ms": statistics.fmean(ordered),
        "min_ms": ordered[0],
        "max_ms": ordered[-1],
        "stdev_ms": stdev,
        "iqr_ms": iqr,
    }


def _json_safe(value: Any, depth: int = 0) -> Any:
    """A JSON-serialisable copy (tensors → lists/scalars when small, else a shape note)."""
    if depth > 6:
        return repr(value)[:200]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        if value.numel() <= 64:
            return _json_safe(value.detach().cpu().tolist(), depth + 1)
        return f"<tensor {tuple(value.shape)} {value.dtype}>"
    if isinstance(value, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) > 256:
            return f"<{type(value).__name__} of {len(value)}>"
        return [_json_safe(v, depth + 1) for v in value]
    if hasattr(value, "item") and callable(value.item):
        with contextlib.suppress(Exception):
            return _json_safe(value.item(), depth + 1)
    return repr(value)[:200]


json_safe = _json_safe


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
        target.write_text(json.dumps(_json_safe(payload), indent=1, allow_nan=False) + "\n")
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
                "info": _json_safe(peer.info),
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


def blank_record(**fields: Any) -> dict[str, Any]:
    """A record with every field present (None / empty), updated with ``fields``."""
    record: dict[str, Any] = {
        "op": None, "case": None, "peer": None, "ours": False, "same_op": True,
        "status": "ok", "reason": None, "params": {}, "dtype": "float32",
        "precision": "ieee", "peer_precision": None, "rounds": 0, "samples_ms": [],
        **summarize([]), "cpu_samples_ms": [], "cpu_median_ms": None,
        "flops": None, "tflops": None, "peak_tflops": None, "pct_peak": None,
        "peak_mem_bytes": None, "mem_kind": None, "primary": False, "baseline": None,
        "note": None, "info": {}, "speedup_vs_baseline": None,
    }
    record.update(fields)
    if record["samples_ms"]:
        record.update(summarize(record["samples_ms"]))
        record["rounds"] = len(record["samples_ms"])
    return record


def records_table(records: list[dict[str, Any]]) -> str:
    """A plain text table of records (used by the terminal summary and the report)."""
    from benchmarks.report import format_table

    return format_table(records)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the bench files
# ---------------------------------------------------------------------------------------------
TRITON_INTERPRETER_MAX_N = 256  # the Triton CPU interpreter is only usable at tiny sizes


def our_backends(device: torch.device, n: int) -> tuple[list[str], list[Skipped]]:
    """kcm_cuda's backends to measure on ``device`` at size ``n`` (the float64 "reference"
    is never measured), and the ones that are not, with the reason."""
    from kcm_cuda import dispatch

    usable = [b for b in dispatch.available_backends(device) if b != "reference"]
    chosen: list[str] = []
    skipped: list[Skipped] = []
    for name in ("cuda", "triton", "torch"):
        label = f"kcm[{name}]"
        if name not in usable:
            if name == "cuda" and device.type != "cuda":
                continue  # the compiled backend is for GPUs only: not worth a line on a CPU
            why = "not available here"
            if name == "triton" and device.type != "cuda":
                why += " (on CPU tensors it needs TRITON_INTERPRET=1)"
            skipped.append(Skipped(label, why, ours=True))
        elif name == "triton" and device.type != "cuda" and n > TRITON_INTERPRETER_MAX_N:
            why = f"Triton interpreter on CPU: measured at n <= {TRITON_INTERPRETER_MAX_N} only"
            skipped.append(Skipped(label, why, ours=True))
        else:
            chosen.append(name)
    return chosen, skipped


def auto_backend(device: torch.device) -> str:
    from kcm_cuda import dispatch

    return dispatch.resolve_backend("auto", device)


def try_compile(fn: Callable[..., Any]) -> tuple[Callable[..., Any] | None, str | None]:
    """torch.compile(fn) or (None, reason) when compile is unusable here. Compilation itself
    happens at the first call, i.e. in the warm-up, outside the timing."""
    compile_fn = getattr(torch, "compile", None)
    if compile_fn is None:
        return None, "torch.compile not available in this torch"
    try:
        return compile_fn(fn, dynamic=False), None
    except Exception as exc:  # noqa: BLE001
        return None, f"torch.compile failed: {type(exc).__name__}: {exc}"[:300]


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
