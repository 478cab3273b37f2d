"""Time one full prune of the fine-tuned MiniLM (vader-movie, the kcm-eval cache) and print
the stage timings. Usage: python benchmarks/prune_time.py [flops] [method] [k=v ...]"""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import AutoModel, AutoTokenizer

from kcm_cuda.evaluation.datasets import default_cache_dir, get_task
from kcm_cuda.evaluation.modeling import resolve_model_path
from kcm_cuda.pruning import prune


def _value(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def main() -> None:
    c = float(sys.argv[1]) if len(sys.argv) > 1 else 0.6
    method = sys.argv[2] if len(sys.argv) > 2 else "kcm"
    opts = dict(kv.split("=", 1) for kv in sys.argv[3:])
    opts = {k: _value(v) for k, v in opts.items()}
    cache = default_cache_dir(None)
    task = get_task("vader-movie", cache)
    enc_dirs = [
        d
        for d in sorted((cache / "finetuned").glob("*/encoder"))
        if json.loads((d.parent / "meta.json").read_text()).get("task") == "vader-movie"
    ]
    model = AutoModel.from_pretrained(str(enc_dirs[0])).eval()
    tok = AutoTokenizer.from_pretrained(str(resolve_model_path(None)))
    print(f"torch threads {torch.get_num_threads()}; model {enc_dirs[0].parent.name}")
    t0 = time.perf_counter()
    r = prune(
        model, list(task.pool), c, method=method, tokenizer=tok, samples=512, progress=False, **opts
    )
    wall = time.perf_counter() - t0
    print(r.summary())
    print(
        json.dumps(
            {
                "wall_s": round(wall, 2),
                "timings_s": r.report["timings_s"],
                "reconstruct": r.report["reconstruct"],
                "method": method,
                "flops": c,
                "options": opts,
            }
        )
    )


if __name__ == "__main__":
    main()
