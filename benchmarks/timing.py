"""Timing of single calls, precision pinning, peak memory and sample statistics.

Timing semantics (the same as ``triton.testing.do_bench``):
- warm-up calls (compilation, autotuning, allocator growth) run before and outside the timing
  (peers.measure_peers);
- before every timed call the last-level cache is flushed by overwriting a large buffer;
- on CUDA a call is timed with a pair of CUDA events around it (GPU time, no host sync inside);
  on the CPU with ``time.perf_counter``;
- every peer of a case runs at the same pinned matmul precision
  (``torch.backends.cuda.matmul.allow_tf32`` on for "tf32" only).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


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
