"""Peak memory of pruning a decoder LM against its depth: block-by-block calibration keeps the
working memory flat as layers are added.

    python -m benchmarks.memory_depth [--depths 2,4,8,16] [--device cpu|cuda] [--out DIR]
        [--structures search,fixed] [--hidden 256 --ffn 4096 --samples 64 --seq 96]

For each depth, a fresh process builds a random LLaMA-architecture model (GQA, gated MLP) of
that many layers in float32 on the CPU and prunes it (default method and refit, c = 0.6,
pre-tokenized random calibration data of fixed size) with ``device=``, once per
``--structures`` entry (``search``: the default's structure search, ``fixed``: the fixed
rules; the table then gives the search's extra over the fixed rules at each depth):
* ``cuda``: the model stays on the CPU and every block is run on the GPU in turn; reported:
  ``torch.cuda.max_memory_allocated`` during ``prune()`` (the GPU's whole share of the work);
* ``cpu``: the process's resident memory is sampled every 2 ms during ``prune()``; reported:
  its peak above the resident memory before the call, minus the size of the pruned model that
  ``prune()`` returns (the output grows with depth by design; the rest is working memory).
Each child runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so that the CPU's resident memory follows
the live memory (glibc's adaptive threshold otherwise keeps freed temporaries resident).
A design that copied the whole model for its statistics would add at least the model's size
(``model_mb``) to the working memory at every depth. Writes ``memory_vs_depth.json`` and a
markdown table to ``--out`` (default ``benchmarks/results/<device>/memory_vs_depth/``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(
    vocab_size=1024,
    hidden_size=512,
    intermediate_size=1408,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
SAMPLES, SEQ = 64, 128


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(
    depth: int,
    device: str,
    samples: int = SAMPLES,
    seq: int = SEQ,
    structure: str = "search",
    **config,
) -> dict:
    """One measurement, in this process (call it in a fresh process: see :func:`main`)."""
    import threading

    import torch
    import transformers

    import kcm_cuda

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**CONFIG, **config}, num_hidden_layers=depth)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, cfg.vocab_size, (samples, seq))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = {"rss": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], _rss_bytes())
            time.sleep(0.002)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    base = _rss_bytes()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    res = kcm_cuda.prune(
        model, data, flops=0.6, device=device, progress=False, samples=samples, structure=structure
    )
    wall = time.perf_counter() - t0
    stop.set()
    thread.join()
    pruned_bytes = sum(p.numel() * p.element_size() for p in res.model.parameters())
    out = {
        "depth": depth,
        "device": device,
        "model_mb": model_bytes / 2**20,
        "pruned_mb": pruned_bytes / 2**20,
        "rss_peak_above_start_mb": (peak["rss"] - base) / 2**20,
        "working_mb": (peak["rss"] - base - pruned_bytes) / 2**20,
        "prune_s": wall,
        "flops_ratio": res.report["flops"]["ratio"],
        "structure": structure,
        "searched": res.report["structure"].get("chosen") is not None,
        "not_searched": res.report["structure"].get("not_searched"),
        "candidates": len(res.report["structure"].get("candidates", [])),
    }
    if device == "cuda":
        out["gpu_peak_mb"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    return out


def _child(depth: int, device: str, extra: dict, structure: str = "search") -> dict:
    code = (
        "import json, sys; from benchmarks.memory_depth import measure; "
        f"print(json.dumps(measure({depth}, {device!r}, structure={structure!r}, **{extra!r})))"
    )
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    # glibc raises its mmap threshold after large frees, so freed buffers stay in the heap and
    # the resident size keeps the high-water mark of every layer's temporaries: fix the
    # threshold so that RSS follows the live memory (measured: without it the working memory
    # seemed to grow ~45 MB per layer; with it, ~1 MB)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root
    )
    if proc.returncode != 0:
        raise RuntimeError(f"depth {depth}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    gpu = any("gpu_peak_mb" in r for r in rows)
    head = "| layers | structure | searched | model MB | pruned MB | peak RSS above start MB |"
    head += " working MB (peak − pruned) |"
    head += " GPU peak MB |" if gpu else ""
    head += " prune s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (
            f"| {r['depth']} | {r.get('structure', 'search')} | "
            f"{'yes' if r.get('searched') else 'no'} | {r['model_mb']:.0f} | "
            f"{r['pruned_mb']:.0f} | "
            f"{r['rss_peak_above_start_mb']:.0f} | {r['working_mb']:.0f} |"
        )
        if gpu:
            line += f" {r.get('gpu_peak_mb', float('nan')):.0f} |"
        lines.append(line + f" {r['prune_s']:.1f} |")
    return "\n".join(lines)


def extra_of_search(rows: list[dict]) -> dict | None:
    """Per depth, the search's peak memory above the fixed rules' (MB), and its growth from
    the first depth to the last (the number that must stay flat)."""
    by = {(r["depth"], r.get("structure", "search")): r for r in rows}
    depths = sorted({r["depth"] for r in rows})
    key = "gpu_peak_mb" if any("gpu_peak_mb" in r for r in rows) else "rss_peak_above_start_mb"
    extra = {
        d: by[(d, "search")][key] - by[(d, "fixed")][key]
        for d in depths
        if (d, "search") in by and (d, "fixed") in by
    }
    if len(extra) < 2:
        return None
    lo, hi = min(extra), max(extra)
    return {"measure": key, "per_depth_mb": extra, "growth_mb": extra[hi] - extra[lo]}


def _device_slug(device: str) -> str:
    if device == "cuda":
        import torch

        return "-".join(torch.cuda.get_device_name().lower().replace("nvidia", "").split())
    return "cpu-amd-epyc" if "AMD" in _cpu_name() else "cpu"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_depth", description=__doc__)
    p.add_argument("--depths", default="2,4,8,16", help="numbers of layers (2,4,8,16)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.add_argument("--out", default=None, help="directory for the JSON and the table")
    p.add_argument("--tiny", action="store_true", help="a tiny config (smoke test)")
    p.add_argument(
        "--structures", default="search", help="comma list of structure= values (search,fixed)"
    )
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default 512)")
    p.add_argument("--ffn", type=int, default=None, help="FFN width (default 1408)")
    p.add_argument("--samples", type=int, default=None, help=f"sequences (default {SAMPLES})")
    p.add_argument("--seq", type=int, default=None, help=f"tokens per sequence (default {SEQ})")
    args = p.parse_args(argv)
    import torch
    import transformers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    depths = [int(x) for x in args.depths.split(",") if x.strip()]
    extra = (
        dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, samples=16, seq=32)
        if args.tiny
        else {}
    )
    for key, value in (
        ("hidden_size", args.hidden),
        ("intermediate_size", args.ffn),
        ("samples", args.samples),
        ("seq", args.seq),
    ):
        if value is not None:
            extra[key] = value
    structures = [x.strip() for x in args.structures.split(",") if x.strip()]
    rows = []
    for depth in depths:
        for structure in structures:
            rows.append(_child(depth, device, extra, structure))
            print(table(rows).splitlines()[-1], flush=True)
    out = (
        Path(args.out)
        if args.out
        else (Path(__file__).parent / "results" / _device_slug(device) / "memory_vs_depth")
    )
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "study": "peak memory of prune() vs number of layers (random LLaMA, block by block)",
        "command": "python -m benchmarks.memory_depth " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "device": device},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "config": {"samples": SAMPLES, "seq": SEQ, **CONFIG, **extra},
        "rows": rows,
        "extra_of_search": extra_of_search(rows),
    }
    with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=2)
    os.replace(f.name, out / "memory_vs_depth.json")
    (out / "memory_vs_depth.md").write_text(table(rows) + "\n", encoding="utf-8")
    print(table(rows))
    if result["extra_of_search"] is not None:
        e = result["extra_of_search"]
        print(f"the search's extra over the fixed rules grew by {e['growth_mb']:.0f} MB")
    print(f"wrote {out / 'memory_vs_depth.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
