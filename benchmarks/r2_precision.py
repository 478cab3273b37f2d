"""R2 ranking under TF32 vs IEEE float32 on real MiniLM weights (TF32 emulated on the CPU).

    PYTHONPATH=. python -m benchmarks.r2_precision [--model DIR] [--out FILE.json]

Runs R2 (rbf_kernel + kcm_coefficients, torch backend) once per precision on every FFN layer
of the model and compares each precision's ranking with the ieee one at keep ratio c: the
overlap of the top ceil(c n) neurons per layer, and of the global top-k over all layers'
raw scores, plus the solver's iterations. The torch backend emulates TF32 on the CPU by
rounding both operands of every product to TF32 (10-bit mantissa, round to nearest), which is
what a TF32 tensor core multiplies; only the accumulation order differs from a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from kcm_cuda.evaluation.modeling import load_encoder, model_fingerprint, resolve_model_path
from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.r2 import r2_scores


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """|top_k(a) ∩ top_k(b)| / k (ties broken by index, the same way for both)."""
    ta = set(torch.topk(a, k, sorted=False).indices.tolist())
    tb = set(torch.topk(b, k, sorted=False).indices.tolist())
    return len(ta & tb) / k


def compare(base: list[torch.Tensor], other: list[torch.Tensor], c: float) -> dict:
    per_layer = [
        top_overlap(x, y, max(1, math.ceil(c * x.numel())))
        for x, y in zip(base, other, strict=True)
    ]
    cat_a, cat_b = torch.cat(base), torch.cat(other)
    k = max(1, math.ceil(c * cat_a.numel()))
    rel = [float((y - x).abs().max() / x.abs().max()) for x, y in zip(base, other, strict=True)]
    return {
        "c": c,
        "per_layer_overlap": per_layer,
        "min_layer_overlap": min(per_layer),
        "global_overlap": top_overlap(cat_a, cat_b, k),
        "max_rel_score_diff_per_layer": rel,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (default: packaged MiniLM)")
    parser.add_argument("--precisions", default="ieee,tf32,tf32x3")
    parser.add_argument("--c", type=float, nargs="+", default=[0.6, 0.5, 0.8])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    path = resolve_model_path(args.model)
    encoder, _ = load_encoder(path)
    adapter = get_adapter(encoder)
    runs = {}
    for precision in args.precisions.split(","):
        t0 = time.perf_counter()
        scores, iters = r2_scores(
            encoder, adapter, precision=precision, backend="torch", device=torch.device("cpu")
        )
        runs[precision] = {"scores": scores, "iters": iters, "seconds": time.perf_counter() - t0}
        print(f"{precision}: iterations {iters}, {runs[precision]['seconds']:.1f} s", flush=True)
    result = {
        "what": "R2 top-k overlap of each precision vs ieee (torch backend, TF32 emulated)",
        "model": str(path),
        "model_fingerprint": model_fingerprint(path),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads (CPU)",
        "torch": torch.__version__,
        "r2": {"points": "output", "sigma": 1.0, "alpha": 0.01, "max_iter": 100},
        "layers": [int(s.numel()) for s in runs["ieee"]["scores"]],
        "runs": {
            p: {"iters": r["iters"], "seconds": round(r["seconds"], 2)} for p, r in runs.items()
        },
        "comparisons": {
            p: [compare(runs["ieee"]["scores"], r["scores"], c) for c in args.c]
            for p, r in runs.items()
            if p != "ieee"
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
