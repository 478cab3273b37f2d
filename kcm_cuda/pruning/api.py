"""``prune()``: model + unlabeled data → scores → FLOPs-constrained global masks → Scale →
a physically pruned copy of the model, with a report. The input model is never modified.

Stages (each timed in ``report["timings_s"]``):
  data         draw and tokenize the unlabeled sample
  activations  one forward pass with hooks (D2 statistics)                  [kcm, d2]
  r2           RBF kernel + batched convex-coefficient solve per layer     [kcm, r2]
  masks        merge, FLOPs budget, global top-k
  scale        bottom-up least-squares rescaling (when scale=True)
  prune        physical removal of the pruned neurons
"""

from __future__ import annotations

import copy
import math
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kcm_cuda.dispatch import resolve_backend
from kcm_cuda.pruning.activations import collect_activation_stats
from kcm_cuda.pruning.adapters import FFNAdapter, get_adapter
from kcm_cuda.pruning.cache import fingerprint, model_fingerprint
from kcm_cuda.pruning.d2 import D2_MODES, d2_scores
from kcm_cuda.pruning.data import TokenizedSample, prepare_sample
from kcm_cuda.pruning.flops import FlopsModel, check_flops
from kcm_cuda.pruning.masks import global_topk, resolve_min_keep
from kcm_cuda.pruning.merge import DEFAULT_MERGE, MERGES, merge_scores
from kcm_cuda.pruning.physical import prune_in_place
from kcm_cuda.pruning.r2 import R2_POINTS, r2_scores
from kcm_cuda.pruning.saving import save_pruned
from kcm_cuda.pruning.scale import scale_and_prune

METHODS = ("kcm", "r2", "d2", "magnitude", "random")


@dataclass
class PruneResult:
    """What :func:`prune` returns. ``model``: the physically pruned copy (eval mode);
    ``masks`` / ``scales``: per layer index, the kept neurons (bool, original width) and the
    Scale factors of the kept neurons (None without Scale); ``report``: a JSON-able dict."""

    model: nn.Module
    masks: dict[int, torch.Tensor]
    scales: dict[int, torch.Tensor | None]
    report: dict
    tokenizer: object | None = field(default=None, repr=False)

    def save(self, path: str | Path, overwrite: bool = False, *, padded: bool = True) -> Path:
        """Save model, config (per-layer FFN sizes), tokenizer and report atomically.
        ``padded``: store the FFNs zero-padded to the widest layer so that plain
        ``from_pretrained`` loads it too (see kcm_cuda.pruning.saving)."""
        return save_pruned(
            self.model,
            path,
            tokenizer=self.tokenizer,
            report=self.report,
            overwrite=overwrite,
            padded=padded,
        )

    def summary(self) -> str:
        return format_summary(self.report)


# -- argument checks ----------------------------------------------------------------------
def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def _check_float(name: str, value: object, lo: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < lo or (lo_open and v == lo):
        op = ">" if lo_open else ">="
        raise ValueError(f"{name} must be a finite number {op} {lo}, got {value!r}")
    return v


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _resolve_device(model: nn.Module, device: object) -> torch.device:
    if device is None:
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    return dev


def _resolve_tokenizer(model: nn.Module, tokenizer: object, data: object) -> object | None:
    if tokenizer is not None or isinstance(data, Mapping):
        return tokenizer
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not name:
        raise ValueError(
            "a tokenizer is needed for text data and the model does not say where it came "
            "from: pass tokenizer="
        )
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear message
        raise ValueError(
            f"could not load a tokenizer for {name!r} ({type(exc).__name__}); pass tokenizer="
        ) from None


def _set_ff_chunking(model: nn.Module, value: int) -> int:
    """Set every ``chunk_size_feed_forward`` to ``value``; return the previous (first) one."""
    previous = int(getattr(model.config, "chunk_size_feed_forward", 0) or 0)
    for module in model.modules():
        if hasattr(module, "chunk_size_feed_forward"):
            module.chunk_size_feed_forward = value
    return previous


def _versions() -> dict:
    import transformers

    import kcm_cuda

    return {
        "kcm_cuda": getattr(kcm_cuda, "__version__", "?"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


# -- the pipeline -------------------------------------------------------------------------
def prune(
    model: nn.Module,
    data: object,
    flops: float = 0.6,
    *,
    method: str = "kcm",
    scale: bool = True,
    tokenizer: object | None = None,
    samples: int = 2048,
    max_length: int = 128,
    seed: int = 0,
    backend: str = "auto",
    device: str | torch.device | None = None,
    progress: bool = True,
    batch_size: int = 32,
    min_keep: int | float = 0.01,
    merge: str = DEFAULT_MERGE,
    r2_points: str = "output",
    r2_weight: float = 0.25,
    merge_bins: int = 20,
    d2_mode: str = "votes",
    d2_kcm_batches: int = 4,
    sigma: float = 1.0,
    alpha: float = 0.01,
    max_iter: int = 100,
    precision: str = "ieee",
    scale_lambda: float = 0.01,
    scale_samples: int = 256,
    scale_retries: int = 2,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    cache: dict | None = None,
) -> PruneResult:
    """Prune the FFN neurons of a BERT / DistilBERT (/ RoBERTa) model to keep ``flops`` of
    its FLOPs, using unlabeled ``data`` only.

    method: "kcm" (R2D2, default), "r2", "d2", "magnitude" (||W1[i]||·||W2[:, i]||), "random".
    scale: rescale the kept neurons (label-free least squares, bottom-up) before pruning.
    data: list of texts, list of (text, text) pairs, a .txt/.jsonl/.csv/.tsv path, or a
      pre-tokenized dict {"input_ids", "attention_mask"}; ``samples`` sequences are drawn with
      ``seed`` and tokenized to ``max_length``.
    Variant options:
      merge          R2D2 merge (kcm_cuda.pruning.merge.MERGES; default: D2 votes with
                     R2 breaking their ties, the best measured)
      r2_points      "output" (W2 columns) or "input" ([W1 rows, b1])
      r2_weight      R2's weight for merge="weighted"; merge_bins: for "r2_within_d2"
      d2_mode        "votes", "energy", or "kcm" (R2 on the activations of the first
                     ``d2_kcm_batches`` batches)
      sigma, alpha, max_iter, precision   R2 kernel and solver (also d2_mode="kcm")
      min_keep       neurons kept per layer at least: int, or a fraction of the layer
      scale_lambda   ridge towards m = 1, relative to the mean diagonal of the normal matrix
      scale_samples  sequences used by Scale
      scale_retries  solves with λ × 10 tried before a layer falls back to m = 1 (0: never)
      batch_size     sequences per forward batch (= per D2 vote)
    cache: a dict shared between calls to reuse R2 scores and activation statistics
      (see kcm_cuda.pruning.cache); None: compute everything.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    adapter = get_adapter(model)
    c = check_flops(flops)
    method = _check_choice("method", method, METHODS)
    if not isinstance(scale, bool):
        raise TypeError(f"scale must be True or False, got {type(scale).__name__}")
    samples = _check_int("samples", samples, 1)
    max_length = _check_int("max_length", max_length, 2)
    seed = _check_int("seed", seed, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    merge = _check_choice("merge", merge, MERGES)
    r2_points = _check_choice("r2_points", r2_points, R2_POINTS)
    d2_mode = _check_choice("d2_mode", d2_mode, D2_MODES)
    merge_bins = _check_int("merge_bins", merge_bins, 1)
    d2_kcm_batches = _check_int("d2_kcm_batches", d2_kcm_batches, 1)
    r2_weight = _check_float("r2_weight", r2_weight, 0.0)
    if r2_weight > 1:
        raise ValueError(f"r2_weight must be in [0, 1], got {r2_weight}")
    sigma = _check_float("sigma", sigma, 0.0, lo_open=True)
    alpha = _check_float("alpha", alpha, 0.0, lo_open=True)
    max_iter = _check_int("max_iter", max_iter, 1)
    scale_lambda = _check_float("scale_lambda", scale_lambda, 0.0)
    scale_samples = _check_int("scale_samples", scale_samples, 1)
    scale_retries = _check_int("scale_retries", scale_retries, 0)
    if cache is not None and not isinstance(cache, dict):
        raise TypeError(f"cache must be a dict or None, got {type(cache).__name__}")
    dev = _resolve_device(model, device)
    uses_kernels = method in ("kcm", "r2") or (method == "d2" and d2_mode == "kcm")
    backend_name = resolve_backend(backend, dev) if uses_kernels else None
    sizes = adapter.intermediate_sizes(model)
    keep_min = resolve_min_keep(min_keep, sizes)

    # -- data --------------------------------------------------------------------------------
    t0 = time.perf_counter()
    tok = _resolve_tokenizer(model, tokenizer, data)
    sample = prepare_sample(
        data,
        tok,
        samples=samples,
        max_length=max_length,
        seed=seed,
        text_column=text_column,
        text_pair_column=text_pair_column,
    )
    need = max(sizes)
    if sample.n_tokens < need:
        raise ValueError(
            f"the unlabeled sample has {sample.n_tokens} real tokens ({sample.n_sequences} "
            f"sequences); at least {need} (the widest layer's FFN size) are needed: pass more "
            "data or raise samples= / max_length="
        )
    timings["data"] = time.perf_counter() - t0

    fm = FlopsModel(sample.mean_tokens, adapter.hidden_size(model.config), tuple(sizes))
    k_total = fm.neuron_budget(c, sum(keep_min))
    quotas = [round(k_total * n / sum(sizes)) for n in sizes]

    teacher = copy.deepcopy(model).to(dev).eval()
    # Feed-forward chunking splits the FFN call per sequence chunk, which the hooks (that see
    # whole batches) do not expect; it saves memory only, so turn it off in our copy.
    chunking = _set_ff_chunking(teacher, 0)
    blocks = adapter.layers(teacher)
    w2_norms = [adapter.w2(b).weight.detach().float().norm(dim=0).cpu() for b in blocks]

    # -- scores ------------------------------------------------------------------------------
    r2_iters: list[int] | None = None
    d2 = None
    r2 = None
    model_fp = model_fingerprint(teacher) if cache is not None else ""
    cache_hits: list[str] = []
    d2_kcm_iters: list[list[int]] | None = None
    if method in ("kcm", "d2"):
        t0 = time.perf_counter()
        key = None
        if cache is not None:
            sample_fp = fingerprint([sample.input_ids, sample.attention_mask])
            key = ("activations", model_fp, sample_fp, batch_size)
            if d2_mode == "kcm":
                key += (d2_kcm_batches, sigma, alpha, max_iter, precision, backend_name)
        if key is not None and key in cache:
            stats = cache[key]
            cache_hits.append("activations")
        else:
            stats = collect_activation_stats(
                teacher,
                adapter,
                sample,
                batch_size=batch_size,
                device=dev,
                progress=progress,
                kcm_batches=d2_kcm_batches if d2_mode == "kcm" else 0,
                kcm_options=dict(
                    sigma=sigma,
                    alpha=alpha,
                    max_iter=max_iter,
                    precision=precision,
                    backend=backend,
                ),
            )
            if key is not None:
                cache[key] = stats
        d2 = d2_scores(stats, w2_norms, quotas, d2_mode)
        if stats.kcm_iterations is not None:
            d2_kcm_iters = stats.kcm_iterations
        timings["activations"] = time.perf_counter() - t0
    if method in ("kcm", "r2"):
        t0 = time.perf_counter()
        key = ("r2", model_fp, r2_points, sigma, alpha, max_iter, precision, backend_name)
        if cache is not None and key in cache:
            r2, r2_iters = cache[key]
            cache_hits.append("r2")
        else:
            r2, r2_iters = r2_scores(
                teacher,
                adapter,
                points=r2_points,
                sigma=sigma,
                alpha=alpha,
                max_iter=max_iter,
                precision=precision,
                backend=backend,
                device=dev,
                progress=progress,
            )
            if cache is not None:
                cache[key] = (r2, r2_iters)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        timings["r2"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if method == "kcm":
        assert d2 is not None and r2 is not None
        scores = merge_scores(
            r2,
            d2.scores,
            d2.energy,
            merge=merge,
            r2_weight=r2_weight,
            bins=merge_bins,
            d2_votes=d2.votes,
            vote_step=d2.vote_step,
        )
    elif method == "d2":
        assert d2 is not None
        scores = d2.scores
    elif method == "r2":
        assert r2 is not None
        scores = r2
    elif method == "magnitude":
        scores = [
            (adapter.w1(b).weight.detach().double().norm(dim=1) * w.double()).cpu()
            for b, w in zip(blocks, w2_norms, strict=True)
        ]
    else:
        gen = torch.Generator().manual_seed(seed)
        scores = [torch.rand(n, generator=gen, dtype=torch.float64) for n in sizes]
    masks = global_topk(scores, k_total, keep_min)
    timings["masks"] = time.perf_counter() - t0

    # -- scale + physical pruning --------------------------------------------------------------
    scale_info = None
    scales: list[torch.Tensor | None] = [None] * len(sizes)
    if scale:
        t0 = time.perf_counter()
        student = copy.deepcopy(teacher)
        scale_sample: TokenizedSample = sample.subset(scale_samples)
        scale_info = scale_and_prune(
            teacher,
            student,
            adapter,
            masks,
            scale_sample,
            lam=scale_lambda,
            retries=scale_retries,
            batch_size=batch_size,
            device=dev,
            progress=progress,
        )
        scales = list(scale_info.scales)
        pruned = student
        from kcm_cuda.pruning.physical import record_sizes

        record_sizes(pruned, adapter)
        timings["scale"] = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        pruned = prune_in_place(copy.deepcopy(teacher), adapter, masks)
        timings["prune"] = time.perf_counter() - t0
    del teacher
    _set_ff_chunking(pruned, chunking)
    pruned.eval()
    timings["total"] = time.perf_counter() - t_start

    kept = [int(m.sum()) for m in masks]
    report = _report(
        model,
        adapter,
        method,
        scale,
        c,
        fm,
        k_total,
        kept,
        sizes,
        r2_iters,
        scale_info,
        sample,
        timings,
        dev,
        backend_name,
        options=dict(
            samples=samples,
            max_length=max_length,
            seed=seed,
            batch_size=batch_size,
            min_keep=min_keep,
            merge=merge,
            r2_points=r2_points,
            r2_weight=r2_weight,
            merge_bins=merge_bins,
            d2_mode=d2_mode,
            d2_kcm_batches=d2_kcm_batches,
            sigma=sigma,
            alpha=alpha,
            max_iter=max_iter,
            precision=precision,
            scale_lambda=scale_lambda,
            scale_samples=scale_samples,
            scale_retries=scale_retries,
            backend=backend,
        ),
        extra={
            **({"cached_stages": cache_hits} if cache is not None else {}),
            **({"d2_kcm_iterations": d2_kcm_iters} if d2_kcm_iters is not None else {}),
        },
    )
    return PruneResult(
        model=pruned,
        masks={i: m for i, m in enumerate(masks)},
        scales={i: s for i, s in enumerate(scales)},
        report=report,
        tokenizer=tok,
    )


def _report(
    model,
    adapter: FFNAdapter,
    method,
    scale,
    c,
    fm: FlopsModel,
    k_total,
    kept,
    sizes,
    r2_iters,
    scale_info,
    sample: TokenizedSample,
    timings,
    dev,
    backend_name,
    options,
    extra,
) -> dict:
    before, after = fm.total(), fm.total(kept)
    layers = []
    for i, (n, k) in enumerate(zip(sizes, kept, strict=True)):
        row = {"layer": i, "neurons": n, "kept": k, "kept_fraction": k / n if n else 0.0}
        if r2_iters is not None:
            row["r2_iterations"] = r2_iters[i]
        if scale_info is not None:
            row["scale_fallback"] = scale_info.fallback[i]
            row["scale_lambda"] = scale_info.lambda_used[i]
            row["scale_error_unscaled"] = scale_info.error_unscaled[i]
            row["scale_error_scaled"] = scale_info.error_scaled[i]
            row["scale_target_energy"] = scale_info.target_energy[i]
        layers.append(row)
    return {
        "method": method,
        "scale": scale,
        "model_class": type(model).__name__,
        "architecture": adapter.name,
        "seed": options["seed"],
        "device": str(dev),
        "backend": backend_name,
        "options": options,
        "data": {
            "sequences": sample.n_sequences,
            "tokens": sample.n_tokens,
            "mean_tokens": sample.mean_tokens,
        },
        "flops": {
            "target": c,
            "before": before,
            "after": after,
            "ratio": after / before,
            "budget": c * before,
            "attention_floor": fm.attention_floor,
            "per_neuron": fm.per_neuron,
            "neurons_kept": k_total,
            "neurons_total": sum(sizes),
        },
        "kept_per_layer": kept,
        "r2_iterations": r2_iters,
        "layers": layers,
        "timings_s": timings,
        **extra,
        "versions": _versions(),
    }


def format_summary(report: dict) -> str:
    """A short text table: per layer kept neurons (+ R2 iterations, Scale fallback)."""
    lines = []
    fl = report["flops"]
    lines.append(
        f"method={report['method']} scale={report['scale']} "
        f"FLOPs {fl['ratio']:.4f} of dense (target {fl['target']:g}, "
        f"attention floor {fl['attention_floor']:.3f}); "
        f"neurons kept {fl['neurons_kept']}/{fl['neurons_total']}"
    )
    head = f"{'layer':>5} {'kept':>7} {'of':>6} {'frac':>6}"
    has_it = report.get("r2_iterations") is not None
    has_sc = report["layers"] and "scale_fallback" in report["layers"][0]
    if has_it:
        head += f" {'R2 it':>6}"
    if has_sc:
        head += f" {'rel.err':>8} {'(no Scale)':>10} {'fallback':>8}"
    lines.append(head)
    for row in report["layers"]:
        line = (
            f"{row['layer']:>5} {row['kept']:>7} {row['neurons']:>6} {row['kept_fraction']:>6.3f}"
        )
        if has_it:
            line += f" {row['r2_iterations']:>6}"
        if has_sc:
            te = row["scale_target_energy"] or 1.0
            rel, rel1 = row["scale_error_scaled"] / te, row["scale_error_unscaled"] / te
            fb = "yes" if row["scale_fallback"] else "no"
            line += f" {rel:>8.4f} {rel1:>10.4f} {fb:>8}"
        lines.append(line)
    t = report["timings_s"]
    lines.append("time (s): " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
    return "\n".join(lines)
