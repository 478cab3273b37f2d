"""The report stage: the JSON-able dict ``prune()`` returns, and its text summary."""

from __future__ import annotations

import platform

import torch

from kcm_cuda.pruning.methods.base import Selection


def versions() -> dict:
    import transformers

    import kcm_cuda

    return {
        "kcm_cuda": getattr(kcm_cuda, "__version__", "?"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def build_report(ctx, selection: Selection, recon) -> dict:
    """``recon``: the ReconstructionResult of the reconstruction stage."""
    o, fm, sample = ctx.options, ctx.fm, ctx.sample
    sizes = ctx.sizes
    kept = [int(m.sum()) for m in selection.masks]
    r2_iters = ctx.r2_iterations
    heads_kept = None
    if selection.head_masks is not None:  # joint FLOPs: per kept head and per kept neuron
        from kcm_cuda.pruning.flops import FlopsModel

        heads_kept = [int(h.sum()) for h in selection.head_masks]
        fm = FlopsModel(
            fm.seq_len,
            fm.hidden,
            fm.sizes,
            heads=tuple(int(h.numel()) for h in selection.head_masks),
            head_size=ctx.adapter.head_size(ctx.model.config),
        )
        before, after = fm.total(), fm.total(kept, heads_kept)
    else:
        before, after = fm.total(), fm.total(kept)
    refit = recon.name != "none"
    layers = []
    for i, (n, k) in enumerate(zip(sizes, kept, strict=True)):
        row = {"layer": i, "neurons": n, "kept": k, "kept_fraction": k / n if n else 0.0}
        if r2_iters is not None:
            row["r2_iterations"] = r2_iters[i]
        if refit:
            row["reconstruct_fallback"] = recon.fallback[i]
            row["reconstruct_lambda"] = recon.lambda_used[i]
            row["reconstruct_error_before"] = recon.error_before[i]
            row["reconstruct_error_after"] = recon.error_after[i]
            row["reconstruct_target_energy"] = recon.target_energy[i]
        if recon.name == "scale":  # the names of the Scale-only reports
            row["scale_fallback"] = recon.fallback[i]
            row["scale_lambda"] = recon.lambda_used[i]
            row["scale_error_unscaled"] = recon.error_before[i]
            row["scale_error_scaled"] = recon.error_after[i]
            row["scale_target_energy"] = recon.target_energy[i]
        layers.append(row)
    from kcm_cuda.pruning.methods import METHODS

    report = {
        "method": o.method,
        "uses_labels": bool(METHODS[o.method].needs_labels),
        "scale": o.scale,
        "reconstruct": recon.name,
        "reconstruct_mode": recon.mode if refit else None,
        "model_class": type(ctx.model).__name__,
        "architecture": ctx.adapter.name,
        "seed": o.seed,
        "device": str(ctx.device),
        "backend": ctx.backend_name,
        "options": o.as_report(),
        "data": {
            "sequences": sample.n_sequences,
            "tokens": sample.n_tokens,
            "mean_tokens": sample.mean_tokens,
        },
        "flops": {
            "target": o.flops,
            "before": before,
            "after": after,
            "ratio": after / before,
            "budget": o.flops * before,
            "attention_floor": fm.attention_floor,
            "per_neuron": fm.per_neuron,
            "neurons_kept": ctx.k_total if heads_kept is None else sum(kept),
            "neurons_total": sum(sizes),
            **(
                {}
                if heads_kept is None
                else {
                    "per_head": fm.per_head,
                    "heads_kept": sum(heads_kept),
                    "heads_total": sum(fm.heads or ()),
                }
            ),
        },
        "heads_kept_per_layer": heads_kept,
        "kept_per_layer": kept,
        "r2_iterations": r2_iters,
        "layers": layers,
        "timings_s": ctx.timings,
    }
    if refit and recon.notes:
        report["reconstruct_notes"] = recon.notes
    if selection.info:
        report["selection"] = selection.info
    if ctx.cache is not None:
        report["cached_stages"] = ctx.cache_hits
    if ctx.d2_kcm_iterations is not None:
        report["d2_kcm_iterations"] = ctx.d2_kcm_iterations
    report["versions"] = versions()
    return report


def format_summary(report: dict) -> str:
    """A short text table: per layer kept neurons (+ R2 iterations, reconstruction error)."""
    lines = []
    fl = report["flops"]
    recon = report.get("reconstruct", "scale" if report.get("scale") else "none")
    lines.append(
        f"method={report['method']} reconstruct={recon} "
        f"FLOPs {fl['ratio']:.4f} of dense (target {fl['target']:g}, "
        f"attention floor {fl['attention_floor']:.3f}); "
        f"neurons kept {fl['neurons_kept']}/{fl['neurons_total']}"
    )
    head = f"{'layer':>5} {'kept':>7} {'of':>6} {'frac':>6}"
    has_it = report.get("r2_iterations") is not None
    first = report["layers"][0] if report["layers"] else {}
    prefix = "reconstruct_" if "reconstruct_fallback" in first else "scale_"
    has_rc = prefix + "fallback" in first
    before, after = ("error_before", "error_after")
    if prefix == "scale_":
        before, after = ("error_unscaled", "error_scaled")
    if has_it:
        head += f" {'R2 it':>6}"
    if has_rc:
        head += f" {'rel.err':>8} {'(pruned)':>10} {'fallback':>8}"
    lines.append(head)
    for row in report["layers"]:
        line = (
            f"{row['layer']:>5} {row['kept']:>7} {row['neurons']:>6} {row['kept_fraction']:>6.3f}"
        )
        if has_it:
            line += f" {row['r2_iterations']:>6}"
        if has_rc:
            te = row[prefix + "target_energy"] or 1.0
            rel, rel1 = row[prefix + after] / te, row[prefix + before] / te
            fb = "yes" if row[prefix + "fallback"] else "no"
            line += f" {rel:>8.4f} {rel1:>10.4f} {fb:>8}"
        lines.append(line)
    t = report["timings_s"]
    lines.append("time (s): " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
    return "\n".join(lines)
