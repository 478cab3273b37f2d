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
    hm = selection.head_masks
    kept_heads = [int(m.sum()) for m in hm] if hm is not None else None
    kept_units = fm.units_of(kept_heads) if kept_heads is not None else None
    before, after = fm.total(), fm.total(kept, kept_units)
    kv_plan = getattr(ctx.head_plan, "kv_heads_kept_per_layer", None)
    o_refit = getattr(recon, "o_refit", None)
    refit = recon.name != "none"
    layers = []
    for i, (n, k) in enumerate(zip(sizes, kept, strict=True)):
        row = {"layer": i, "neurons": n, "kept": k, "kept_fraction": k / n if n else 0.0}
        if kept_heads is not None:
            row["heads"] = len(hm[i])
            row["heads_kept"] = kept_heads[i]
            if kv_plan is not None:
                row["kv_heads_kept"] = kv_plan[i]
        if o_refit is not None:
            row["o_refit"] = o_refit.refit[i]
            row["o_refit_error_before"] = o_refit.error_before[i]
            row["o_refit_error_after"] = o_refit.error_after[i]
            row["o_refit_target_energy"] = o_refit.target_energy[i]
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
            "neurons_kept": ctx.k_total if kept_heads is None else sum(kept),
            "neurons_total": sum(sizes),
        },
        "kept_per_layer": kept,
        "heads_kept_per_layer": kept_heads,
        "r2_iterations": r2_iters,
        "layers": layers,
        "timings_s": ctx.timings,
    }
    if fm.lm_head:
        # the LM head is never pruned and lies outside the budget (like a task head); the
        # ratio of the whole model with it, for the record
        report["flops"].update(
            lm_head=fm.lm_head,
            ratio_with_lm_head=(after + fm.lm_head) / (before + fm.lm_head),
        )
    if fm.heads is not None:
        report["flops"].update(
            per_head=fm.per_head,
            joint_floor=fm.joint_floor(o.min_heads),
            heads_kept=(
                sum(kept_heads) if kept_heads is not None else sum(fm.heads) * fm.heads_per_unit
            ),
            heads_total=sum(fm.heads) * fm.heads_per_unit,
        )
        if fm.heads_per_unit > 1 or fm.attention_fixed:
            report["flops"].update(per_head_unit=fm.per_head, heads_per_unit=fm.heads_per_unit)
    if ctx.head_plan is not None:
        report["heads"] = ctx.head_plan.as_report()
    if refit and recon.notes:
        report["reconstruct_notes"] = recon.notes
    if selection.info:
        report["selection"] = selection.info
    if ctx.cache is not None:
        report["cached_stages"] = ctx.cache_hits
    if ctx.r2_disk is not None:
        report["r2_disk_cache"] = ctx.r2_disk
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
        + (f", heads kept {fl['heads_kept']}/{fl['heads_total']}" if "heads_kept" in fl else "")
    )
    head = f"{'layer':>5} {'kept':>7} {'of':>6} {'frac':>6}"
    has_heads = report.get("heads_kept_per_layer") is not None
    if has_heads:
        head += f" {'heads':>6}"
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
        if has_heads:
            line += f" {str(row['heads_kept']) + '/' + str(row['heads']):>6}"
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
