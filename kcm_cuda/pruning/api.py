"""``prune()``: model + unlabeled data → a selection method → FLOPs-constrained masks →
reconstruction → a physically pruned copy of the model, with a report. The input model is
never modified.

Stages (each timed in ``report["timings_s"]``; one file each):
  data         options, device, the unlabeled sample, FLOPs budget  (options.py, context.py)
  activations  one forward pass with hooks, on first use              (activations.py, d2.py)
  r2           RBF kernel + convex-coefficient solve, on first use    (r2.py)
  masks        the method's selection: scores → global top-k          (methods/, masks.py)
  scale|ridge|bias|prune  reconstruction + physical removal           (reconstruct.py, physical.py)
  report                                                              (report.py)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kcm_cuda.pruning import safety
from kcm_cuda.pruning.activations import collect_activation_stats
from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.context import (
    MIN_HELDOUT,
    build_context,
    resolve_device,
    set_ff_chunking,
)
from kcm_cuda.pruning.heads import collect_head_stats, plan_heads
from kcm_cuda.pruning.layout import check_layout, write_stock_config
from kcm_cuda.pruning.methods import METHODS as METHOD_REGISTRY
from kcm_cuda.pruning.methods import ScoreMethod
from kcm_cuda.pruning.options import PruneOptions
from kcm_cuda.pruning.r2 import r2_scores
from kcm_cuda.pruning.reconstruct import reconstruct
from kcm_cuda.pruning.report import build_report, format_summary
from kcm_cuda.pruning.saving import save_pruned
from kcm_cuda.pruning.structure import (
    NOTHING_OPEN,
    fixed_reason,
    fixed_report,
    open_axes,
    search_does_not_fit,
    search_structure,
)

# The method names (the registry is kcm_cuda.pruning.methods.METHODS).
METHODS = tuple(METHOD_REGISTRY)
# The expensive passes are re-exported for callers; tools that memoise them patch
# kcm_cuda.pruning.stages, where the context looks them up.
__all__ = [
    "METHODS",
    "PruneResult",
    "collect_activation_stats",
    "collect_head_stats",
    "prune",
    "r2_scores",
]


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
    head_masks: dict[int, torch.Tensor] | None = None  # heads pruned: per layer, kept heads
    source_dirs: list[Path] = field(default_factory=list, repr=False)  # input dirs, protected

    def save(
        self, path: str | Path, overwrite: bool = False, *, padded: bool = True, onnx: bool = False
    ) -> Path:
        """Save model, config (per-layer FFN sizes), tokenizer and report atomically.
        ``padded``: store the FFNs zero-padded to the widest layer so that plain
        ``from_pretrained`` loads it too (see kcm_cuda.pruning.saving). ``onnx``: also write
        ``model.onnx`` (encoders, at the pruned size: kcm_cuda.onnx_export), checked in ONNX
        Runtime before anything is published."""
        also = ()
        if onnx:
            from kcm_cuda.onnx_export import ONNX_NAME, export_onnx

            def write_onnx(directory: Path) -> None:
                export_onnx(self.model, directory / ONNX_NAME)

            also = (write_onnx,)
        return save_pruned(
            self.model,
            path,
            tokenizer=self.tokenizer,
            report=self.report,
            overwrite=overwrite,
            padded=padded,
            protect=tuple(self.source_dirs),  # never the input model's directory
            also=also,
        )

    def summary(self) -> str:
        return format_summary(self.report)


# -- the pipeline -------------------------------------------------------------------------
def prune(
    model: nn.Module,
    data: object,
    flops: float = 0.6,
    *,
    tokenizer: object | None = None,
    device: str | torch.device | None = None,
    cache: dict | None = None,
    **options: object,
) -> PruneResult:
    """Prune the FFN neurons (and, where measured better, attention heads) of an encoder
    (BERT / DistilBERT / RoBERTa) or a decoder LM (LLaMA / Mistral / Qwen2) to keep ``flops``
    of its FLOPs, using unlabeled ``data`` only.

    method: "flap" (default: FLAP's standardised fluctuation, one global sort), "kcm" (R2D2),
      "kcm_paper" (mean-rank R2D2 + Scale), "d2", "r2", "wanda_sp", "magnitude"
      (||W1[i]||·||W2[:, i]||), "random" (kcm_cuda.pruning.methods.METHODS).
    scale: True runs the default reconstruction ("ridge"; kcm_paper: "scale"), False none
      (when reconstruct= is not given). The default, flap + ridge, is the measured best
      (docs/RESULTS.md).
    seed: orders the unlabeled sample (which ``samples`` rows are drawn from ``data``, so the
      activation statistics and D2's votes) and seeds method="random"'s scores; R2 does not
      depend on it. Same seed, same data, same options → the same masks.
    allocation: how the budget is split over layers (kcm_cuda.pruning.allocation): "auto"
      (default: "uniform" when the reconstruction is "ridge", else "global"; with the ridge
      refit the selection score's uneven widths lost 3 pt at c = 0.4, docs/RESULTS.md),
      "global" (one global sort of the method's scores), "standardised" (scores
      standardised per layer, then one global sort), "uniform" (width-proportional), "error"
      (each layer's measured output error per pruned neuron, from its activation Gram).
    r2_cache: R2's scores depend only on the weights and R2's options, so they are cached on
      disk by default: True → $KCM_CUDA_CACHE/r2 or ~/.cache/kcm_cuda/r2; a directory; False →
      off. Entries are written atomically, safe to delete; a corrupt one is recomputed with a
      warning (kcm_cuda.pruning.r2_cache). report["r2_disk_cache"] says whether it was a hit.
    reconstruct: "none", "bias" (FLAP bias compensation), "scale" (per-neuron rescaling) or
      "ridge" (least-squares refit of the kept W2 columns and b2) (kcm_cuda.pruning.reconstruct);
      ridge_lambda: the ridge refit's λ, relative to the mean diagonal of its Gram matrix.
    labels: for methods that use labels, one per row of ``data``.
    heads: prune attention heads too, under the same FLOPs budget (kcm_cuda.pruning.heads):
      True, False, or "auto" (default: True with the ridge refit at flops <= 0.7, where heads
      and neurons together measured never worse and at c = 0.4 2 pt better than neurons only,
      docs/RESULTS.md; False otherwise); min_heads: heads kept per layer at least (>= 1).
    layout: "per_layer" (default: each layer keeps its own width and heads; load it with
      kcm_cuda.load_pruned, or the padded save with plain from_pretrained at the widest
      layer's cost) or "standard" (every layer the same FFN width and heads: an ordinary
      checkpoint, which plain from_pretrained loads at its pruned size; encoders keep their
      heads whole; kcm_cuda.pruning.layout).
    data: list of texts, list of (text, text) pairs, a .txt/.jsonl/.csv/.tsv path, or a
      pre-tokenized dict {"input_ids", "attention_mask"}; ``samples`` sequences are drawn with
      ``seed`` and tokenized to ``max_length``.
    precision: the R2 kernel's ("auto": tf32 on sm_80+ GPUs, else ieee; "ieee", "tf32x3",
      "tf32"). min_keep: neurons kept per layer at least (int, or a fraction of the layer).
      scale_samples: sequences used by the reconstruction. batch_size: sequences per forward
      batch (= per D2 vote).
    experimental: a dict (or kcm_cuda.pruning.options.ExperimentalOptions) of the variants
      kept for the paper's pipeline and for research, none of which beat the defaults
      (docs/RESULTS.md): reconstruct_mode, merge, r2_points, r2_weight, merge_bins, d2_mode,
      d2_kcm_batches, sigma, alpha, max_iter, scale_lambda, scale_retries, head_split,
      head_score, head_refit, kwon_rearrange, kwon_tune (their meanings: ExperimentalOptions).
      Given flat (``merge=...``, as before they moved) they still work, with a FutureWarning.
    cache: a dict shared between calls to reuse R2 scores and activation statistics
      (see kcm_cuda.pruning.cache); None: compute everything.
    """
    t_start = time.perf_counter()
    adapter = get_adapter(model)
    opts = PruneOptions.from_call(flops, options)
    safety.check_finite(model)  # before the long steps: NaN in, NaN out
    if not adapter.causal:
        return _run(model, adapter, data, opts, tokenizer, device, cache, t_start)
    # decoders are read in place, block by block: no dropout while measuring
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        return _run(model, adapter, data, opts, tokenizer, device, cache, t_start)
    finally:
        for m, training in modes.items():
            m.training = training


def _run(model, adapter, data, opts, tokenizer, device, cache, t_start) -> PruneResult:
    if opts.flops >= 1.0:  # nothing to remove: no refit, no heads, no search; the same weights
        opts.reconstruct, opts.heads, opts.heads_auto = "none", False, False
        opts.structure = "fixed"
    # layout="standard": what it allows on this family and method
    check_layout(opts, adapter, isinstance(METHOD_REGISTRY[opts.method], ScoreMethod), model)
    axes = open_axes(opts, adapter, model)  # the structure parts left open, to be measured
    folds = opts.experimental.search_folds
    too_big = None
    if axes:  # one layer's statistics must fit where the search runs (never all layers')
        too_big = search_does_not_fit(adapter, model, axes, resolve_device(model, device), folds)
    if too_big:
        import warnings

        warnings.warn(f"structure search skipped: {too_big}", stacklevel=3)
        axes = {}
    # held-out mode (search_folds=0): rows drawn beside the sample; else none are held out
    holdout = opts.experimental.search_rows if axes and folds == 0 else 0
    ctx = build_context(
        model, adapter, data, opts, tokenizer=tokenizer, device=device, cache=cache, holdout=holdout
    )
    if axes and folds == 0 and ctx.heldout is None:
        structure = fixed_report(
            "too few unlabeled rows to hold some out: the fixed rules (structure='fixed') ran"
        )
        axes = {}
    elif axes and folds and ctx.sample.n_sequences < max(MIN_HELDOUT, 2 * folds):
        structure = fixed_report(
            f"too few unlabeled rows ({ctx.sample.n_sequences}) to cross-fit {folds} folds: "
            "the fixed rules (structure='fixed') ran"
        )
        axes = {}
    elif not axes:
        structure = fixed_report(too_big or fixed_reason(opts) or NOTHING_OPEN)
    if axes:
        t0 = time.perf_counter()
        before = _stats_time(ctx)
        outcome = search_structure(ctx, axes)
        ctx, selection, pruned, recon = (
            outcome.ctx,
            outcome.selection,
            outcome.student,
            outcome.recon,
        )
        # the search's own time (candidates, proxy, the winner's refits), not its statistics
        ctx.timings["structure"] = time.perf_counter() - t0 - (_stats_time(ctx) - before)
        return _finish(model, ctx, selection, pruned, recon, outcome.report, t_start)

    method = METHOD_REGISTRY[opts.method]
    if opts.heads and not method.selects_heads:
        t0 = time.perf_counter()
        before = _stats_time(ctx)
        plan_heads(ctx)  # the head masks, and the neuron budget they leave
        ctx.timings["heads"] = time.perf_counter() - t0 - (_stats_time(ctx) - before)
    t0 = time.perf_counter()
    before = _stats_time(ctx)
    selection = method.select(ctx)
    ctx.timings["masks"] = time.perf_counter() - t0 - (_stats_time(ctx) - before)
    if opts.heads and selection.head_masks is None and ctx.head_plan is not None:
        selection.head_masks = ctx.head_plan.head_masks

    t0 = time.perf_counter()
    pruned, recon = reconstruct(ctx, selection)
    ctx.timings["prune" if recon.name == "none" else recon.name] = time.perf_counter() - t0
    return _finish(model, ctx, selection, pruned, recon, structure, t_start)


def _finish(model, ctx, selection, pruned, recon, structure, t_start) -> PruneResult:
    ctx.teacher = None  # free it before the report
    if ctx.options.layout == "standard":  # every layer alike: the stock config fields say so
        write_stock_config(pruned, ctx.adapter)
    set_ff_chunking(pruned, ctx.chunking)
    pruned.eval()
    setattr(pruned, safety.SOURCES_ATTR, safety.model_sources(model))  # save_pruned protects them
    safety.check_finite(
        pruned, what="after the reconstruction, the pruned model's", then="try reconstruct='none'"
    )
    ctx.timings["total"] = time.perf_counter() - t_start

    report = build_report(ctx, selection, recon)
    report["structure"] = structure
    return PruneResult(
        model=pruned,
        masks=dict(enumerate(selection.masks)),
        scales=dict(enumerate(recon.scales)),
        report=report,
        tokenizer=ctx.tokenizer,
        head_masks=dict(enumerate(selection.head_masks)) if selection.head_masks else None,
        source_dirs=safety.model_sources(model),
    )


def _stats_time(ctx) -> float:
    """Time the selection spent in the lazily computed statistics (timed on their own)."""
    t = ctx.timings
    return t.get("activations", 0.0) + t.get("r2", 0.0) + t.get("head_energies", 0.0)
