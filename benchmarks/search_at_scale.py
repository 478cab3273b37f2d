"""The structure search on real LLM shapes (random weights): does it run, in what time and
peak memory, with how many candidates — beside the fixed rules on the same model and data.

    python -m benchmarks.search_at_scale --shape qwen2.5-0.5b [--samples 64 --seq 96]
        [--structures search,fixed] [--device cpu|cuda] [--layers N] [--out DIR]

Each (shape, structure) runs in a fresh process: a random-weight model of that shape (float32,
on the CPU; ``--layers`` keeps the first N layers of the shape at full width, e.g. a Llama-2-7B
block on one GPU), random pre-tokenized calibration rows, ``prune(flops=0.6)`` with the
default options. Reported: prune seconds, the process's peak RSS (sampled every 5 ms) above
its start, the GPU's peak allocation (cuda), whether the search ran and its candidates, its
stages' timings; with ``--layers``, the time and GPU peak per layer extrapolated to the shape's
full depth. Writes ``search_at_scale.json`` (appending to an existing one) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # Qwen2.5-0.5B: 24 layers, hidden 896, 14 query / 2 KV heads, FFN 4864, tied embeddings
    "qwen2.5-0.5b": dict(
        family="qwen2",
        num_hidden_layers=24,
        hidden_size=896,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    # TinyLlama-1.1B: 22 layers, hidden 2048, 32 / 4 heads, FFN 5632
    "tinyllama-1.1b": dict(
        family="llama",
        num_hidden_layers=22,
        hidden_size=2048,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    # Llama-2-7B: 32 layers, hidden 4096, 32 heads (MHA), FFN 11008
    "llama-2-7b": dict(
        family="llama",
        num_hidden_layers=32,
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(
    shape: str, structure: str, samples: int, seq: int, device: str, layers: int | None
) -> dict:
    """One prune, in this process (call it in a fresh one: :func:`main`)."""
    import threading

    import torch
    import transformers

    import kcm_cuda

    cfg = dict(SHAPES[shape])
    family = cfg.pop("family")
    full_depth = cfg["num_hidden_layers"]
    if layers:
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(0)
    cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[family]
    config = cls(**cfg, max_position_embeddings=max(256, seq))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, config.vocab_size, (samples, seq))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    peak = {"rss": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], _rss())
            time.sleep(0.005)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    base = _rss()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    res = kcm_cuda.prune(
        model, data, 0.6, device=device, progress=False, samples=samples, structure=structure
    )
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    stop.set()
    thread.join()
    s = res.report["structure"]
    out = {
        "shape": shape,
        "layers": config.num_hidden_layers,
        "full_depth": full_depth,
        "structure": structure,
        "device": device,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "samples": samples,
        "seq": seq,
        "prune_s": wall,
        "rss_peak_above_start_mb": (peak["rss"] - base) / 2**20,
        "searched": s.get("chosen") is not None,
        "not_searched": s.get("not_searched"),
        "candidates": len(s.get("candidates", [])),
        "chosen": s.get("chosen"),
        "judged_rows": s.get("judged_rows"),
        "fitted_sequences": res.report["data"]["sequences"],
        "timings_s": res.report.get("timings_s"),
        "flops_ratio": res.report["flops"]["ratio"],
    }
    if device == "cuda":
        out["gpu_peak_mb"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    if layers:
        scale = full_depth / config.num_hidden_layers
        out["extrapolated_prune_s_full_depth"] = wall * scale
    return out


def _child(args: tuple) -> dict:
    code = (
        "import json; from benchmarks.search_at_scale import measure; "
        f"print('RESULT ' + json.dumps(measure(*{args!r})))"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{args}: {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.search_at_scale", description=__doc__)
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--structures", default="search,fixed")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq", type=int, default=96)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "search_at_scale.json"
    result = json.loads(path.read_text()) if path.exists() else {"rows": []}
    for structure in [x for x in args.structures.split(",") if x]:
        row = _child((args.shape, structure, args.samples, args.seq, args.device, args.layers))
        row["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        row["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
        row["cores"] = os.cpu_count()
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=2)
    os.replace(f.name, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
