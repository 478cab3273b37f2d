"""``kcm-eval --task lm-vader`` / ``--task lm-FILE.txt [--model DIR]``: perplexity of pruned
causal LMs (LLaMA / Mistral / Qwen2 ...) against the dense model and the label-free peers.

lm-vader        the shipped text (the VADER snippets, lm_data.py) and the small
                LLaMA-architecture LM trained on it here (lm_train.py; trained once, cached).
                The numbers are for that small model, not for a real LLM.
lm-PATH         a local text file, one document per line (hash split 85/5/10 into train /
                calibration / held-out test). With --model DIR: a local causal LM checkpoint
                (any ``AutoModelForCausalLM`` directory with its tokenizer); without it, the
                small LM is trained (and cached) on the file's train lines.

Per budget c (FLOPs fraction kept) x method x seed: prune() on ``samples`` sequences of
``seq_len`` tokens drawn (by the seed) from the calibration split, then the sliding-window
perplexity (perplexity.py) of the pruned model on the held-out split. The report has the
dense and pruned perplexities, the wall time of every prune and every evaluation, and each
method's paired difference in mean NLL per token against the default (same budget and seed,
per-window differences, with their standard error).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DEFAULT_LM_METHODS",
    "LMGridConfig",
    "format_lm_markdown",
    "run_lm_grid",
    "write_lm_report",
]

# the shipped text with the second, deeper small LM (lm_train.DEEP_LM_SETTINGS)
DEEP_TASK = "lm-vader-deep"
# "default": prune() as a user runs it (no method=: the structure search chooses).
DEFAULT_METHOD = "default"
FIXED_RULES = "flap:reconstruct=ridge,structure=fixed"
# The default, its fixed rules, FLAP as published (bias compensation), Wanda-sp + bias.
DEFAULT_LM_METHODS = (
    DEFAULT_METHOD,
    FIXED_RULES,
    "flap:reconstruct=bias",
    "wanda_sp:reconstruct=bias",
)
DEFAULT_LM_BUDGETS = (0.8, 0.7, 0.6)
METHOD_NAMES = {
    DEFAULT_METHOD: "default (structure search)",
    FIXED_RULES: "fixed rules (flap + ridge)",
    "flap:reconstruct=bias": "FLAP (+ bias, as published)",
    "wanda_sp:reconstruct=bias": "Wanda-sp (+ bias)",
    "d2:reconstruct=ridge": "D2 + ridge",
    "random": "random",
}


@dataclass
class LMGridConfig:
    task: str = "lm-vader"
    model: str | None = None  # a local causal-LM directory; None: the small LM
    budgets: tuple[float, ...] = DEFAULT_LM_BUDGETS
    methods: tuple[str, ...] = DEFAULT_LM_METHODS
    seeds: int = 1
    samples: int = 128  # calibration sequences per prune
    seq_len: int = 128  # tokens per calibration sequence
    window: int | None = None  # None: the small LM's context, else min(1024, model positions)
    stride: int | None = None  # None: window // 2
    batch_size: int = 16
    max_test_tokens: int | None = None  # cap on the held-out stream (None: all of it)
    device: str = "cpu"
    cache_dir: str | None = None
    output: str = "out/lm"
    use_cache: bool = True
    prune_options: dict = field(default_factory=dict)
    lm_settings: object = None  # lm_train.LMSettings for the small LM (None: the default)

    def validate(self) -> None:
        if not self.task.startswith(("lm-", "lm:")) or len(self.task) <= 3:
            raise ValueError(f"not an LM task: {self.task!r} (lm-vader or lm-PATH)")
        if not self.budgets or not all(0 < c <= 1 for c in self.budgets):
            raise ValueError(f"budgets must lie in (0, 1], got {self.budgets}")
        if not self.methods:
            raise ValueError("no methods")
        for m in self.methods:
            parse_method(m)
        for name in ("seeds", "samples", "seq_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def text_name(self) -> str:
        return "vader" if self.task == DEEP_TASK else self.task[3:]

    def small_lm_settings(self):
        """The small LM's settings: given, or the task's (lm-vader-deep: DEEP_LM_SETTINGS)."""
        if self.lm_settings is not None:
            return self.lm_settings
        if self.task == DEEP_TASK:
            from kcm_cuda.evaluation.lm_train import DEEP_LM_SETTINGS

            return DEEP_LM_SETTINGS
        return None


def _value(v: str) -> object:
    low = v.lower()
    if low in ("true", "on", "yes"):
        return True
    if low in ("false", "off", "no"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_method(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,key=value`` → (name, options)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"method {spec!r} has no name")
    opts = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"method {spec!r}: option {item!r} is not key=value")
        opts[k.strip()] = _value(v.strip())
    return name, opts


def method_label(spec: str) -> str:
    return METHOD_NAMES.get(spec, spec)


def _versions() -> dict:
    import tokenizers
    import transformers

    import kcm_cuda

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "kcm_cuda": getattr(kcm_cuda, "__version__", "?"),
    }


def _device_info(dev: torch.device) -> dict:
    info = {
        "device": str(dev),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    with contextlib.suppress(OSError):
        info["load_average_start"] = list(os.getloadavg())
    return info


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _weights_digest(model) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _unigram_ppl(train: torch.Tensor, test: torch.Tensor, vocab: int) -> float:
    """Add-one unigram perplexity of the held-out stream (the floor a LM must beat)."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return math.exp(-float(logp[test[1:]].mean()))


def load_lm(config: LMGridConfig, text, log: Callable[[str], None]):
    """(model, tokenizer, info) for the config: a local checkpoint, or the small LM."""
    if config.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(config.model).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"--model {config.model}: not a local directory (nothing is downloaded here)"
            )
        from transformers import AutoConfig

        from kcm_cuda.pruning.saving import load_pruned, needs_load_pruned

        tokenizer = AutoTokenizer.from_pretrained(path)
        if needs_load_pruned(AutoConfig.from_pretrained(path)):  # our per-layer output
            model = load_pruned(path, dtype="float32")
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
        from kcm_cuda.pruning.safety import check_finite

        check_finite(model, then="nothing was evaluated or pruned")  # before the long steps
        n = sum(p.numel() for p in model.parameters())
        return (
            model,
            tokenizer,
            {"kind": "local checkpoint", "path": str(path.resolve()), "parameters": n},
        )
    from kcm_cuda.evaluation.lm_train import load_small_lm

    model, tokenizer, meta = load_small_lm(
        text,
        config.small_lm_settings(),
        cache_dir=config.cache_dir,
        use_cache=config.use_cache,
        log=log,
    )
    return model, tokenizer, {"kind": "small LM trained here", **meta}


def _arch(model) -> dict:
    c = model.config
    keys = (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "rope_theta",
        "tie_word_embeddings",
    )
    out = {k: getattr(c, k, None) for k in keys}
    out["parameters"] = sum(p.numel() for p in model.parameters())
    return out


def run_lm_grid(
    config: LMGridConfig,
    *,
    prune_fn: Callable | None = None,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Run the grid; returns the report dict (write it with ``write_lm_report``).
    ``checkpoint(report)`` is called after every seed round but the last (``seeds_done``
    says how many rounds it holds), e.g. to write a partial report."""
    config.validate()
    # as in the sentence grid (runner.py): oneDNN caches prepacked weights per shape, and
    # every pruned model has new widths; plain BLAS keeps the CPU process's memory flat
    dev = _resolve_device(config.device)
    no_onednn = _onednn_disabled() if dev.type == "cpu" else contextlib.nullcontext()
    with no_onednn:
        return _run_lm_grid(config, prune_fn, log, checkpoint)


@contextlib.contextmanager
def _onednn_disabled():
    prev = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = prev


def _run_lm_grid(config: LMGridConfig, prune_fn, log, checkpoint) -> dict:
    from kcm_cuda.evaluation.lm_data import encode_stream, load_lm_text
    from kcm_cuda.evaluation.lm_train import pack_blocks
    from kcm_cuda.evaluation.perplexity import paired_difference, sliding_window_nll

    if prune_fn is None:
        import kcm_cuda

        prune_fn = kcm_cuda.prune
    t_all = time.perf_counter()
    dev = _resolve_device(config.device)
    text = load_lm_text(config.text_name, config.cache_dir)
    log(f"text {text.name}: {text.sizes()} lines ({text.notes['split']})")
    model, tokenizer, lm_info = load_lm(config, text, log)
    model.to(dev).eval()
    positions = getattr(model.config, "max_position_embeddings", None) or 1024
    window = config.window or (positions if config.model is None else min(1024, positions))
    window = min(window, positions)
    stride = config.stride or max(1, window // 2)
    seq_len = min(config.seq_len, positions)

    test_ids = encode_stream(tokenizer, text.test)
    if config.max_test_tokens and test_ids.numel() > config.max_test_tokens:
        test_ids = test_ids[: config.max_test_tokens]
    calib = pack_blocks(encode_stream(tokenizer, text.calibration), seq_len)
    calib_data = {"input_ids": calib, "attention_mask": torch.ones_like(calib)}
    samples = min(config.samples, calib.shape[0])
    if samples < config.samples:
        log(
            f"WARNING: the calibration split has {calib.shape[0]} sequences of {seq_len} "
            f"tokens, fewer than --samples {config.samples}: using all of them"
        )

    def evaluate(m) -> tuple[dict, float]:
        t0 = time.perf_counter()
        r = sliding_window_nll(
            m, test_ids, window=window, stride=stride, batch_size=config.batch_size, device=dev
        )
        return r, time.perf_counter() - t0

    dense_digest = _weights_digest(model)
    dense, dense_s = evaluate(model)
    log(
        f"dense: perplexity {dense['ppl']:.2f} on {dense['tokens']} held-out tokens "
        f"({dense['windows']} windows of {window}, stride {stride}) in {dense_s:.1f}s"
    )
    lm_block = {k: v for k, v in lm_info.items() if k != "curve"}
    if config.model is None:
        lm_block["unigram_test_ppl"] = _unigram_ppl(
            encode_stream(tokenizer, text.train), test_ids, len(tokenizer)
        )
    report: dict = {
        "kind": "lm_perplexity",
        "task": config.task,
        "text": {"name": text.name, "source": text.source, "sizes": text.sizes(), **text.notes},
        "model": _arch(model),
        "lm": lm_block,
        "config": {
            **{k: v for k, v in asdict(config).items() if k != "lm_settings"},
            "window": window,
            "stride": stride,
            "seq_len": seq_len,
            "samples": samples,
            "calibration_sequences": int(calib.shape[0]),
            "test_tokens": int(test_ids.numel()),
        },
        "device": _device_info(dev),
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dense": {
            "ppl": dense["ppl"],
            "nll": dense["nll"],
            "tokens": dense["tokens"],
            "windows": dense["windows"],
            "eval_seconds": dense_s,
        },
        "runs": [],
        "errors": [],
    }
    n_runs = len(config.budgets) * len(config.methods) * config.seeds
    k = 0
    cache: dict = {}
    for seed in range(config.seeds):
        for c in config.budgets:
            results: dict[str, dict] = {}
            for spec in config.methods:
                k += 1
                name, opts = parse_method(spec)
                from kcm_cuda.pruning.options import nest_experimental

                opts = nest_experimental({**config.prune_options, **opts})
                t0 = time.perf_counter()
                try:
                    res = prune_fn(
                        model,
                        calib_data,
                        flops=c,
                        method=None if name == DEFAULT_METHOD else name,
                        seed=seed,
                        samples=samples,
                        max_length=seq_len,
                        device=dev,
                        progress=False,
                        cache=cache,
                        **opts,
                    )
                except Exception as e:  # noqa: BLE001 - recorded, the grid goes on
                    err = {
                        "budget": c,
                        "method": spec,
                        "seed": seed,
                        "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(limit=8),
                    }
                    report["errors"].append(err)
                    log(f"[{k}/{n_runs}] c={c:g} {spec} seed {seed}: prune FAILED: {err['error']}")
                    continue
                prune_s = time.perf_counter() - t0
                pruned = res.model.to(dev).eval()
                r, eval_s = evaluate(pruned)
                rep = res.report or {}
                results[spec] = r
                run = {
                    "budget": c,
                    "method": spec,
                    "label": method_label(spec),
                    "seed": seed,
                    "ppl": r["ppl"],
                    "nll": r["nll"],
                    "prune_seconds": prune_s,
                    "eval_seconds": eval_s,
                    "flops_ratio": (rep.get("flops") or {}).get("ratio"),
                    "flops_ratio_with_lm_head": (rep.get("flops") or {}).get("ratio_with_lm_head"),
                    "parameters": sum(p.numel() for p in pruned.parameters()),
                    "kept_per_layer": rep.get("kept_per_layer"),
                    "heads_kept_per_layer": rep.get("heads_kept_per_layer"),
                    "kv_heads_kept_per_layer": (rep.get("heads") or {}).get(
                        "kv_heads_kept_per_layer"
                    ),
                    "prune_timings_s": rep.get("timings_s"),
                    # the structure search's choice (None: no search ran)
                    "structure": (rep.get("structure") or {}).get("chosen"),
                }
                report["runs"].append(run)
                log(
                    f"[{k}/{n_runs}] c={c:g} {method_label(spec)} seed {seed}: perplexity "
                    f"{r['ppl']:.2f} (dense {dense['ppl']:.2f}); prune {prune_s:.1f}s, "
                    f"eval {eval_s:.1f}s"
                )
                del pruned, res
            ref_spec = DEFAULT_METHOD if DEFAULT_METHOD in results else config.methods[0]
            ref = results.get(ref_spec)
            for run in report["runs"]:
                if run["budget"] != c or run["seed"] != seed:
                    continue
                run["vs_dense"] = paired_difference(results[run["method"]], dense)
                if ref is not None and run["method"] != ref_spec:
                    d = paired_difference(results[run["method"]], ref)
                    run["vs_default"] = {"reference": ref_spec, **d}
        if checkpoint is not None and seed + 1 < config.seeds:
            report["summary"] = summarise(report["runs"], config.methods)
            report["seeds_done"] = seed + 1
            report["wall_seconds"] = time.perf_counter() - t_all
            checkpoint(report)
    report["seeds_done"] = config.seeds
    report["summary"] = summarise(report["runs"], config.methods)
    # prune() reads a decoder in place: every prune must leave the dense model as it was
    report["dense_unchanged"] = _weights_digest(model) == dense_digest
    if not report["dense_unchanged"]:
        log("WARNING: the dense model's weights changed during the grid")
    report["wall_seconds"] = time.perf_counter() - t_all
    with contextlib.suppress(OSError):
        report["device"]["load_average_end"] = list(os.getloadavg())
    return report


def _mean_sd(xs: Sequence[float]) -> dict:
    a = np.asarray(xs, dtype=float)
    return {
        "mean": float(a.mean()),
        "sd": float(a.std(ddof=1)) if a.size > 1 else None,
        "n": int(a.size),
    }


def summarise(runs: list[dict], methods: Sequence[str]) -> list[dict]:
    """One row per (budget, method): perplexity over seeds, wall times, the paired Δ NLL
    vs the default pooled over seeds (mean of the per-seed Δ; SE = sqrt(Σ SE²)/n)."""
    rows = []
    budgets = sorted({r["budget"] for r in runs}, reverse=True)
    for c in budgets:
        for spec in methods:
            rs = [r for r in runs if r["budget"] == c and r["method"] == spec]
            if not rs:
                continue
            row = {
                "budget": c,
                "method": spec,
                "label": method_label(spec),
                "ppl": _mean_sd([r["ppl"] for r in rs]),
                "prune_seconds": _mean_sd([r["prune_seconds"] for r in rs]),
                "eval_seconds": _mean_sd([r["eval_seconds"] for r in rs]),
                "flops_ratio": _mean_sd(
                    [r["flops_ratio"] for r in rs if r.get("flops_ratio") is not None]
                )
                if any(r.get("flops_ratio") is not None for r in rs)
                else None,
            }
            vs = [r["vs_default"] for r in rs if "vs_default" in r]
            if vs:
                n = len(vs)
                delta = sum(v["delta_nll"] for v in vs) / n
                se = math.sqrt(sum(v["se"] ** 2 for v in vs)) / n
                row["vs_default"] = {
                    "delta_nll": delta,
                    "se": se,
                    "ppl_ratio": math.exp(delta),
                    "seeds": n,
                    "reference": vs[0]["reference"],
                }
            rows.append(row)
    return rows


# --- report ------------------------------------------------------------------------------------


def _f(x, digits=2) -> str:
    return (
        "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"
    )


def format_lm_markdown(report: dict) -> str:
    lm = report["lm"]
    arch = report["model"]
    cfg = report["config"]
    dev = report["device"]
    lines = [f"# Perplexity of pruned causal LMs: {report['task']}", ""]
    if lm.get("kind") == "small LM trained here":
        lines += [
            "**These numbers are for a small LLaMA-architecture LM trained on this machine "
            "on the shipped text, not for a real LLM.** They show how the pruning methods "
            "compare on a model with the LLaMA block structure (GQA attention, gated SiLU "
            "MLP, RoPE, RMSNorm); a real checkpoint is one command away (README, "
            '"Language models (decoders)").',
            "",
        ]
    s = lm.get("settings") or {}
    lines += [
        "## Model",
        "",
        f"- {lm.get('kind')}: `{arch.get('model_type')}`, {arch['parameters'] / 1e6:.2f}M "
        f"parameters, {arch.get('num_hidden_layers')} layers, hidden {arch.get('hidden_size')}, "
        f"{arch.get('num_attention_heads')} query heads / {arch.get('num_key_value_heads')} KV "
        f"heads (head_dim {arch.get('head_dim')}), gated MLP {arch.get('intermediate_size')} "
        f"({arch.get('hidden_act')}), vocabulary {arch.get('vocab_size')}, context "
        f"{arch.get('max_position_embeddings')}, tied embeddings {arch.get('tie_word_embeddings')}",
    ]
    if lm.get("kind") == "small LM trained here":
        lines += [
            f"- trained here: {lm.get('steps_run')} steps x {s.get('batch_size')} blocks of "
            f"{s.get('context')} tokens ({lm.get('train_tokens')} train tokens), AdamW lr "
            f"{s.get('lr')} cosine, seed {s.get('seed')}, in {_f(lm.get('train_seconds'), 0)} s "
            f"(+ {_f(lm.get('tokenizer_seconds'), 1)} s for the BPE tokenizer) with "
            f"{lm.get('torch_threads')} torch threads; cached at `{lm.get('cache_path')}`",
            f"- block perplexity (each {s.get('context')}-token block on its own): train "
            f"{_f(lm.get('train_block_ppl'), 1)}, held-out {_f(lm.get('test_block_ppl'), 1)}; "
            f"add-one unigram held-out perplexity {_f(lm.get('unigram_test_ppl'), 1)}",
        ]
    else:
        lines.append(f"- checkpoint: `{lm.get('path')}`")
    t = report["text"]
    lines += [
        f"- text: {t['source']}; lines {t['sizes']}; {t.get('split')}",
        f"- held-out: {cfg['test_tokens']} tokens, sliding window {cfg['window']}, stride "
        f"{cfg['stride']} (each token scored once); calibration: {cfg['samples']} sequences of "
        f"{cfg['seq_len']} tokens drawn by the seed from {cfg['calibration_sequences']}",
        f"- device: {dev.get('device')} ({dev.get('processor')}, {dev.get('cpu_count')} cores, "
        f"{dev.get('torch_threads')} torch threads), load average at start "
        f"{dev.get('load_average_start')}, at end {dev.get('load_average_end')}; "
        f"{report['date']}; versions {report['versions']}",
        f"- seeds: {report.get('seeds_done')} of {cfg['seeds']} run; whole grid "
        f"{_f(report.get('wall_seconds'), 0)} s; dense "
        f"weights unchanged after every prune: {report.get('dense_unchanged')}",
        "",
        "## Perplexity",
        "",
        f"Dense: **{_f(report['dense']['ppl'])}** (evaluated in "
        f"{_f(report['dense']['eval_seconds'], 1)} s).",
        "",
        "| c (FLOPs kept) | method | perplexity | FLOPs ratio | prune s | eval s |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["summary"]:
        p = row["ppl"]
        ppl = _f(p["mean"]) + (f" ± {_f(p['sd'])}" if p.get("sd") is not None else "")
        fr = row.get("flops_ratio")
        lines.append(
            f"| {row['budget']:g} | {row['label']} | {ppl} | {_f(fr['mean'], 3) if fr else '–'} | "
            f"{_f(row['prune_seconds']['mean'], 1)} | {_f(row['eval_seconds']['mean'], 1)} |"
        )
    lines += [
        "",
        "± is the standard deviation over seeds (the seed draws the calibration sequences). "
        "Wall times are means over seeds; the first prune of a seed also pays for the "
        "activation statistics that later prunes of the same seed reuse (prune(cache=...)).",
        "",
        "## Paired comparison with the default",
        "",
        "Δ = mean NLL per held-out token of the method minus that of the default (same "
        "budget, same seed, same windows), in nats; SE from the per-window differences "
        "(windows as units), pooled over seeds. ppl ratio = exp(Δ) = its perplexity / the "
        "default's. Δ > 0: the default is better.",
        "",
        "| c | method | Δ NLL vs default | SE | z | ppl ratio |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["summary"]:
        v = row.get("vs_default")
        if not v:
            continue
        z = v["delta_nll"] / v["se"] if v["se"] else float("nan")
        lines.append(
            f"| {row['budget']:g} | {row['label']} | {v['delta_nll']:+.4f} | {v['se']:.4f} | "
            f"{_f(z, 1)} | {v['ppl_ratio']:.3f} |"
        )
    if report.get("errors"):
        lines += ["", "## Errors", ""]
        for e in report["errors"]:
            lines.append(f"- c={e['budget']:g} {e['method']} seed {e['seed']}: `{e['error']}`")
    return "\n".join(lines) + "\n"


def write_lm_report(report: dict, outdir: str | os.PathLike) -> dict[str, Path]:
    """report.json + report.md under ``outdir``, each written atomically."""
    from kcm_cuda.evaluation.report import _atomic_write, _clean, _json_default

    out = Path(outdir)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    data = json.dumps(_clean(report), indent=2, default=_json_default, allow_nan=False)
    _atomic_write(paths["json"], data.encode())
    _atomic_write(paths["md"], format_lm_markdown(report).encode())
    return paths


def main_lm(args, log: Callable[[str], None] | None = None) -> int:
    """The ``kcm-eval --task lm-*`` entry (args: cli.build_parser()'s namespace)."""
    if log is None:

        def log(msg: str) -> None:
            print(msg, flush=True)

    out = args.output if args.output != "out/accuracy" else "out/lm"
    opts = {}
    for item in args.prune_option:
        k, eq, v = item.partition("=")
        if not eq or not k:
            print(f"kcm-eval: error: --prune-option {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        opts[k.strip()] = _value(v.strip())
    config = LMGridConfig(
        task=args.task,
        model=args.model,
        budgets=tuple(args.budgets) if args.budgets else DEFAULT_LM_BUDGETS,
        methods=tuple(args.methods) if args.methods else DEFAULT_LM_METHODS,
        seeds=args.seeds if args.seeds is not None else 1,
        samples=args.samples if args.samples is not None else 128,
        seq_len=args.max_length,
        window=getattr(args, "window", None),
        stride=getattr(args, "stride", None),
        max_test_tokens=getattr(args, "max_test_tokens", None),
        device=args.device,
        cache_dir=args.cache_dir,
        output=out,
        use_cache=not args.no_cache,
        prune_options=opts,
    )
    t0 = time.perf_counter()
    try:
        config.validate()
        log(
            f"kcm-eval: {config.task}, device {config.device}, "
            f"torch threads {torch.get_num_threads()}"
        )

        def partial(rep: dict) -> None:
            write_lm_report(rep, out)
            log(f"(partial report, {rep['seeds_done']} of {config.seeds} seeds: {out})")

        report = run_lm_grid(config, log=log, checkpoint=partial)
        paths = write_lm_report(report, out)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"kcm-eval: error: {e}", file=sys.stderr)
        return 2
    md = format_lm_markdown(report)
    print("\n## Perplexity" + md.split("\n## Perplexity", 1)[1], flush=True)
    if not report["runs"]:
        print(
            f"kcm-eval: error: no pruned model was measured ({len(report['errors'])} prune "
            f"error(s)); the report ({paths['md'].resolve()}) has the dense model only",
            file=sys.stderr,
        )
        return 1
    log(f"done in {time.perf_counter() - t0:.0f}s; report: {paths['md'].resolve()}")
    log(f"  {paths['json'].resolve()}")
    return 0
