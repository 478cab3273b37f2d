"""Peak memory of ``kcm_cuda.load_pruned`` against the size of the weights it loads.

A LLaMA model (``--hidden``, ``--mlp``, ``--layers``, vocabulary 32000; random weights) is pruned
to c = 0.6 per layer with heads (no refit: the shapes are what matter), saved in ``--dtype``
compact and padded, and each save is loaded in a fresh process whose imports and model code are
warmed first: the peak resident memory of the load (VmHWM after the load, every weight read
once, minus VmRSS before it) is reported beside the size of the weights, and beside plain
``from_pretrained`` of the dense checkpoint of the same dtype for reference.

    python -m benchmarks.load_memory --out benchmarks/results/<device>/load_memory
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.results_file import study_meta, write_study

CHILD = """
import gc, sys, torch, transformers
from kcm_cuda.pruning.saving import load_pruned
path, how = sys.argv[1], sys.argv[2]
cfg = transformers.AutoConfig.from_pretrained(path)
small = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=16, head_dim=8)
w = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small)); del w; gc.collect()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak
base = status("VmRSS:")
if how == "load_pruned":
    model = load_pruned(path)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto")
total = 0.0
with torch.no_grad():
    for p in model.parameters():  # every weight read once: mapped pages count too
        total += float(p.float().sum()) if p.numel() < 2**20 else float(p[0].float().sum())
        p.data.abs_()  # written: a private copy of each page
peak = status("VmHWM:") - base
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(peak, size, next(model.parameters()).dtype)
"""


def main(argv: list[str] | None = None) -> int:
    import transformers

    import kcm_cuda

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--mlp", type=int, default=5632)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=a.hidden,
        intermediate_size=a.mlp,
        num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 128,
        num_key_value_heads=max(1, a.hidden // 512),
        vocab_size=32000,
        max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 32000, (int(a.mlp / 100) + 8, 128))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    r = kcm_cuda.prune(
        model,
        data,
        0.6,
        heads=True,
        structure="fixed",
        scale=False,
        allocation="global",
        samples=len(ids),
        progress=False,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = Path(tmp) / "dense"
        model.to(getattr(torch, a.dtype)).save_pretrained(dense_dir)
        r.model.to(getattr(torch, a.dtype))
        for padded in (False, True):
            d = Path(tmp) / ("padded" if padded else "compact")
            r.save(d, padded=padded)
            rows.append(("load_pruned", "padded" if padded else "compact", d))
        rows.append(("from_pretrained", "dense", dense_dir))
        results = []
        for how, kind, d in rows:
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, str(d), how],
                capture_output=True,
                text=True,
                check=True,
            )
            peak, size, dtype = proc.stdout.split()
            row = {
                "loader": how,
                "checkpoint": kind,
                "peak_bytes": int(peak),
                "weights_bytes": int(size),
                "dtype": dtype,
                "peak_over_weights": int(peak) / int(size),
            }
            results.append(row)
            print(
                f"{how} {kind}: peak {int(peak) / 2**20:.0f} MiB for {int(size) / 2**20:.0f} "
                f"MiB of {dtype} weights ({row['peak_over_weights']:.2f}x)",
                flush=True,
            )
    meta = study_meta(model=cfg.to_dict() | {"layers": a.layers})
    lines = [
        f"# Peak memory of a load ({meta['device']}, {meta['date']})",
        "",
        "| loader | checkpoint | dtype | weights MiB | peak MiB | peak / weights |",
        "|---|---|---|---|---|---|",
    ]
    for row in results:
        lines.append(
            f"| {row['loader']} | {row['checkpoint']} | {row['dtype']} | "
            f"{row['weights_bytes'] / 2**20:.0f} | {row['peak_bytes'] / 2**20:.0f} | "
            f"{row['peak_over_weights']:.2f} |"
        )
    write_study(out, meta, results, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
