"""ONNX Runtime speed of pruned encoders against their dense model, side by side.

For each model (MiniLM: the packaged all-MiniLM-L6-v2, pruned on the VADER amazon snippets;
a BERT-base-shaped encoder with random weights, pruned on random tokens: its speed depends on
the kept shapes only), the dense model and the model pruned by ``kcm_cuda.prune`` at every
budget are exported with ``kcm_cuda.export_onnx`` and timed in ONNX Runtime (CPU execution
provider, ``--threads`` intra-op threads), batch 1 / 8 / 32, sequence 128, every graph
once per round, rounds alternated (so a load change hits all alike); the median per-batch
latency and the throughput (sequences/s) are reported with the speed-up over the dense model of
the same run. The structure of a pruned model is what ``prune`` chose (``--layout``:
``per_layer``, the default's per-layer widths and heads, or ``standard``).

    python -m benchmarks.onnx_speed --out benchmarks/results/<device>/onnx_speed
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.results_file import study_meta, write_study

BATCHES = (1, 8, 32)
BUDGETS = (0.7, 0.6, 0.5)


def minilm(samples: int):
    from transformers import AutoModel, AutoTokenizer

    from kcm_cuda.evaluation.datasets import get_task
    from kcm_cuda.evaluation.modeling import default_model_dir

    d = default_model_dir()
    model = AutoModel.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)
    texts = list(get_task("vader-amazon").pool)[:samples]
    return model, texts, tok, {}


def bert_base(samples: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    )
    model = transformers.BertModel(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, cfg.vocab_size, (samples, 128), generator=gen)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # the fixed rules (uniform widths, heads at c <= 0.7): the search's measurement on random
    # weights would cost minutes on a CPU and choose among shapes of the same speed
    return model, data, None, {"structure": "fixed", "samples": 64}


def tiny(samples: int):
    """A 2-layer BERT of random weights: the CI smoke test of this script."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    ids = torch.randint(5, 1000, (samples, 16))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return transformers.BertModel(cfg).eval(), data, None, {"structure": "fixed"}


MODELS = {"minilm": minilm, "bert-base": bert_base, "tiny": tiny}


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feed(session, batch: int, seq: int, vocab: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(batch)
    names = [i.name for i in session.get_inputs()]
    feed = {
        "input_ids": rng.integers(min(1000, vocab // 2), vocab, (batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }
    return {n: feed[n] for n in names}


def main(argv: list[str] | None = None) -> int:
    import kcm_cuda

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,bert-base")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=256, help="calibration sequences")
    p.add_argument("--layout", default="per_layer", choices=("per_layer", "standard"))
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    budgets = [float(x) for x in a.budgets.split(",")]
    batches = [int(x) for x in a.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            model, data, tok, extra = MODELS[name](a.samples)
            opts = {"samples": a.samples, **extra}
            graphs = {
                "dense": (
                    kcm_cuda.export_onnx(model, Path(tmp) / f"{name}-dense.onnx"),
                    sum(p.numel() for p in model.parameters()),
                    None,
                )
            }
            for c in budgets:
                t0 = time.perf_counter()
                r = kcm_cuda.prune(
                    model,
                    data,
                    c,
                    tokenizer=tok,
                    max_length=a.seq,
                    layout=a.layout,
                    progress=False,
                    **opts,
                )
                print(
                    f"{name} c={c}: pruned in {time.perf_counter() - t0:.0f}s "
                    f"({r.report['flops']['ratio']:.3f} of the FLOPs)",
                    flush=True,
                )
                path = kcm_cuda.export_onnx(r, Path(tmp) / f"{name}-{c}.onnx")
                shape = {
                    "ffn": r.model.config.kcm_intermediate_sizes
                    if hasattr(r.model.config, "kcm_intermediate_sizes")
                    else [r.model.config.intermediate_size] * r.model.config.num_hidden_layers,
                    "heads": getattr(r.model.config, "kcm_attention_heads", None),
                    "structure": (r.report.get("structure") or {}).get("chosen"),
                    "flops_ratio": r.report["flops"]["ratio"],
                }
                graphs[f"c={c}"] = (path, sum(p.numel() for p in r.model.parameters()), shape)
            sessions = {k: _session(v[0], a.threads) for k, v in graphs.items()}
            vocab = int(model.config.vocab_size)
            for b in batches:
                times: dict[str, list[float]] = {k: [] for k in sessions}
                feeds = {k: _feed(s, b, a.seq, vocab) for k, s in sessions.items()}
                for k, s in sessions.items():  # warm-up
                    s.run(None, feeds[k])
                for _ in range(a.rounds):
                    for k, s in sessions.items():
                        t0 = time.perf_counter()
                        s.run(None, feeds[k])
                        times[k].append(time.perf_counter() - t0)
                dense = statistics.median(times["dense"])
                for k, ts in times.items():
                    med = statistics.median(ts)
                    row = {
                        "model": name,
                        "graph": k,
                        "batch": b,
                        "seq": a.seq,
                        "latency_ms": 1000 * med,
                        "sequences_per_s": b / med,
                        "speedup": dense / med,
                        "parameters": graphs[k][1],
                        "shape": graphs[k][2],
                        "runs_ms": [1000 * t for t in ts],
                    }
                    rows.append(row)
                    print(
                        f"{name} b={b} {k}: {1000 * med:.1f} ms, {b / med:.1f} seq/s, "
                        f"x{dense / med:.2f}",
                        flush=True,
                    )
    meta = study_meta(layout=a.layout, rounds=a.rounds)
    lines = [
        f"# ONNX Runtime: dense vs pruned ({meta['device']}, {meta['date']})",
        "",
        "| model | batch | graph | FLOPs | latency ms | seq/s | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fl = r["shape"]["flops_ratio"] if r["shape"] else 1.0
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['graph']} | {fl:.3f} | "
            f"{r['latency_ms']:.1f} | {r['sequences_per_s']:.1f} | {r['speedup']:.2f} |"
        )
    write_study(out, meta, rows, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
