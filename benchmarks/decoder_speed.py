"""Decoder speed with transformers: dense vs the standard layout vs per-layer widths.

Prefill tokens/s (one forward over a batch of prompts, KV cache on) and decode tokens/s
(greedy ``generate`` of ``--new`` tokens after the prompt, KV cache on; decode time = generate
time − prefill time) for the dense model and the models ``kcm_cuda.prune`` makes at every
budget with ``layout="standard"`` (every layer alike: the stock class at a smaller
``intermediate_size`` / head count) and ``layout="per_layer"`` (each layer its own width and
heads; heads on, the global allocation). Models: ``small`` (the small LLaMA LM the perplexity
grid trains on the shipped text, cached after its first run) and ``llama7b-2l`` (LLaMA-7B's
shapes: hidden 4096, MLP 11008, 32 query / 8 KV heads, vocabulary 32000, 2 layers, random
weights: speed depends on the shapes only). The prunes use the fixed rules and no refit
(shapes are what is timed; their accuracy is the perplexity grid's). Every model is timed
once per round, rounds alternated; medians are reported with the speed-up over the dense
model of the same run.

    python -m benchmarks.decoder_speed --out benchmarks/results/<device>/decoder_speed
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.results_file import study_meta, write_study

BUDGETS = (0.8, 0.7, 0.6)


def small(samples: int):
    from kcm_cuda.evaluation.lm_data import load_lm_text
    from kcm_cuda.evaluation.lm_train import load_small_lm

    model, _tok, _meta = load_small_lm(load_lm_text("vader"))
    return model.eval()


def llama7b_2l(samples: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # spread the weights a little: random init makes all neurons alike
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.empty(p.shape[0], 1).uniform_(0.5, 1.5))
    return model


def tiny(samples: int):
    """A 2-layer LLaMA of random weights: the CI smoke test of this script."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=160,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


MODELS = {"small": small, "llama7b-2l": llama7b_2l, "tiny": tiny}


def _calibration(model, samples: int, length: int):
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(3, vocab, (samples, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _time(model, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    mask = torch.ones_like(prompt)
    t0 = time.perf_counter()
    model(input_ids=prompt, attention_mask=mask, use_cache=True)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=prompt,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
    )
    total = time.perf_counter() - t0
    assert out.shape[1] == prompt.shape[1] + new
    return prefill, max(total - prefill, 1e-9)


def main(argv: list[str] | None = None) -> int:
    import kcm_cuda

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="small,llama7b-2l")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (within the context)")
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=96, help="calibration sequences")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    budgets = [float(x) for x in a.budgets.split(",")]
    rows = []
    for name in a.models.split(","):
        dense = MODELS[name](a.samples)
        data = _calibration(dense, a.samples, 128)
        cache: dict = {}  # the activation statistics, shared by every prune of this model
        models = {"dense": (dense, 1.0)}
        for c in budgets:
            for layout, opts in (
                ("standard", {}),
                ("per_layer", {"allocation": "global"}),
            ):
                t0 = time.perf_counter()
                r = kcm_cuda.prune(
                    dense,
                    data,
                    c,
                    layout=layout,
                    heads=True,
                    structure="fixed",
                    scale=False,
                    samples=a.samples,
                    max_length=128,
                    progress=False,
                    cache=cache,
                    **opts,
                )
                print(
                    f"{name} c={c} {layout}: pruned in {time.perf_counter() - t0:.0f}s", flush=True
                )
                models[f"c={c} {layout}"] = (r.model.eval(), r.report["flops"]["ratio"])
        gen = torch.Generator().manual_seed(1)
        # within the model's context: the small LM's is 128 tokens
        length = min(a.prompt, int(dense.config.max_position_embeddings) - a.new)
        prompt = torch.randint(3, int(dense.config.vocab_size), (a.batch, length), generator=gen)
        times = {k: ([], []) for k in models}
        for m, _ in models.values():  # warm-up
            _time(m, prompt[:, :16], 2)
        for _ in range(a.rounds):
            for k, (m, _) in models.items():
                pre, dec = _time(m, prompt, a.new)
                times[k][0].append(pre)
                times[k][1].append(dec)
        d_pre = statistics.median(times["dense"][0])
        d_dec = statistics.median(times["dense"][1])
        for k, (m, ratio) in models.items():
            pre, dec = statistics.median(times[k][0]), statistics.median(times[k][1])
            row = {
                "model": name,
                "variant": k,
                "flops_ratio": ratio,
                "parameters": sum(p.numel() for p in m.parameters()),
                "prompt_tokens": length,
                "prefill_tokens_per_s": a.batch * length / pre,
                "decode_tokens_per_s": a.batch * a.new / dec,
                "prefill_speedup": d_pre / pre,
                "decode_speedup": d_dec / dec,
                "prefill_s": times[k][0],
                "decode_s": times[k][1],
                "ffn": m.config.intermediate_size
                if not hasattr(m.config, "kcm_intermediate_sizes")
                else m.config.kcm_intermediate_sizes,
                "heads": getattr(m.config, "kcm_attention_heads", m.config.num_attention_heads),
            }
            rows.append(row)
            print(
                f"{name} {k}: prefill {row['prefill_tokens_per_s']:.0f} tok/s "
                f"(x{row['prefill_speedup']:.2f}), decode {row['decode_tokens_per_s']:.1f} "
                f"tok/s (x{row['decode_speedup']:.2f})",
                flush=True,
            )
    meta = study_meta(
        batch=a.batch, prompt=a.prompt, new_tokens=a.new, rounds=a.rounds, dtype="float32"
    )
    lines = [
        f"# Decoder speed with transformers: dense vs standard vs per-layer "
        f"({meta['device']}, fp32, batch {a.batch}, prompt {a.prompt}, {a.new} new tokens, "
        f"{meta['date']})",
        "",
        "| model | variant | FLOPs | params | prompt | prefill tok/s | x dense | decode tok/s "
        "| x dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['flops_ratio']:.3f} | "
            f"{r['parameters'] / 1e6:.1f}M | {r['prompt_tokens']} | "
            f"{r['prefill_tokens_per_s']:.0f} | "
            f"{r['prefill_speedup']:.2f} | {r['decode_tokens_per_s']:.1f} | "
            f"{r['decode_speedup']:.2f} |"
        )
    write_study(out, meta, rows, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
