"""The in-process bodies of gpu-check's stages (``tools/gpu_check.py --probe / --workload /
--cuda-paths`` run them in their own process): the machine probe, the small-shape workload
compute-sanitizer runs, and the cuda backend's paths timed against bare torch."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


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
