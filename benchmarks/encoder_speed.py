"""Encoder speed with transformers on the CPU: how each way of loading a pruned model runs.

MiniLM (the packaged all-MiniLM-L6-v2, pruned on the VADER amazon snippets) at each budget,
saved and loaded back the ways a user can: the per-layer default through ``load_pruned``
(its real widths and heads), the same save through plain ``from_pretrained`` (zero-padded to
the widest layer and the full head count: the padding costs its FLOPs), and
``layout="standard"`` through plain ``from_pretrained`` (an ordinary checkpoint). Batch 1 and
32, sequence 128, ``--threads`` torch threads, every model once per round, rounds alternated;
medians, with the speed-up over the dense model of the same run.

    python -m benchmarks.encoder_speed --out benchmarks/results/<device>/encoder_speed
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.onnx_speed import minilm
from benchmarks.results_file import study_meta, write_study


@torch.no_grad()
def _time(model, x) -> float:
    t0 = time.perf_counter()
    model(**x)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    import transformers

    import kcm_cuda

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="0.7,0.6,0.5")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    dense, texts, tok, _ = minilm(a.samples)
    auto = transformers.AutoModel
    models = {"dense": (dense, 1.0)}
    with tempfile.TemporaryDirectory() as tmp:
        for c in (float(x) for x in a.budgets.split(",")):
            for layout in ("per_layer", "standard"):
                r = kcm_cuda.prune(
                    dense,
                    texts,
                    c,
                    tokenizer=tok,
                    samples=a.samples,
                    max_length=a.seq,
                    layout=layout,
                    progress=False,
                )
                d = r.save(Path(tmp) / f"{layout}-{c}")
                ratio = r.report["flops"]["ratio"]
                if layout == "per_layer":
                    models[f"c={c} per_layer, load_pruned"] = (kcm_cuda.load_pruned(d), ratio)
                    models[f"c={c} per_layer padded, from_pretrained"] = (
                        auto.from_pretrained(d).eval(),
                        ratio,
                    )
                else:
                    models[f"c={c} standard, from_pretrained"] = (
                        auto.from_pretrained(d).eval(),
                        ratio,
                    )
                print(f"c={c} {layout}: pruned", flush=True)
    rows = []
    for b in (int(x) for x in a.batches.split(",")):
        gen = torch.Generator().manual_seed(b)
        ids = torch.randint(1000, int(dense.config.vocab_size), (b, a.seq), generator=gen)
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        times: dict[str, list[float]] = {k: [] for k in models}
        for m, _ in models.values():
            _time(m, x)  # warm-up
        for _ in range(a.rounds):
            for k, (m, _) in models.items():
                times[k].append(_time(m, x))
        base = statistics.median(times["dense"])
        for k, (m, ratio) in models.items():
            med = statistics.median(times[k])
            rows.append(
                {
                    "batch": b,
                    "model": k,
                    "flops_ratio": ratio,
                    "latency_ms": 1000 * med,
                    "sequences_per_s": b / med,
                    "speedup": base / med,
                    "parameters": sum(q.numel() for q in m.parameters()),
                    "runs_ms": [1000 * t for t in times[k]],
                }
            )
            print(f"b={b} {k}: {1000 * med:.1f} ms, x{base / med:.2f}", flush=True)
    meta = study_meta(seq=a.seq, rounds=a.rounds)
    lines = [
        f"# MiniLM in transformers: dense vs pruned, by how it is loaded ({meta['device']}, "
        f"fp32, sequence {a.seq}, {meta['date']})",
        "",
        "| batch | model | FLOPs | params | latency ms | seq/s | × dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['model']} | {r['flops_ratio']:.3f} | "
            f"{r['parameters'] / 1e6:.1f}M | {r['latency_ms']:.1f} | "
            f"{r['sequences_per_s']:.1f} | {r['speedup']:.2f} |"
        )
    write_study(out, meta, rows, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
