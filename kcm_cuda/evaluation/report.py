"""report.json + report.md + accuracy_vs_flops.png from the runner's report dict."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from kcm_cuda.evaluation.scoring import default_rows
from kcm_cuda.pruning.saving import finite_json

__all__ = ["format_markdown", "plot", "write_report"]

METHOD_ORDER = ("random", "magnitude", "r2", "d2", "kcm")
PRIMARY = {"classification": ("accuracy", "roc_auc"), "regression": ("pearson", "spearman")}
NAMES = {
    "accuracy": "accuracy",
    "roc_auc": "ROC-AUC",
    "positive_rate": "pos. rate",
    "pearson": "Pearson",
    "spearman": "Spearman",
    "mse": "MSE",
}


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


_clean = finite_json  # NaN / Inf → None so that report.json is strict JSON


def _sort_key(row: dict):
    base = row["method"].split(":")[0]
    order = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
    return (order, row["method"], row["scale"])


def _pm(stat: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not stat or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "n/a"
    m = stat["mean"] * scale
    se = stat.get("stderr") or 0.0
    if stat.get("n", 1) > 1:
        return f"{m:.{digits}f} ± {se * scale:.{digits}f}"
    return f"{m:.{digits}f}"


def _converged(value) -> str:
    return {True: "yes", False: "no", None: "unknown"}.get(value, str(value))


def _grid_line(report: dict) -> str:
    """What ran (from the runs), not only what was configured."""
    cfg = report["config"]
    ran = report.get("ran") or {}
    counts = ran.get("seeds_per_cell") or []
    if not counts:
        seeds = f"no run finished (planned {cfg['seeds']} seed(s))"
    elif len(counts) == 1:
        seeds = f"{counts[0]} seed(s) per cell"
    else:
        seeds = f"{counts[0]}-{counts[-1]} seeds per cell"
    if counts and (len(counts) > 1 or counts[0] != cfg["seeds"]):
        seeds += f" (planned {cfg['seeds']})"
    recs = ran.get("reconstructions")
    if recs is None:
        recs = ["scale" if s else "none" for s in cfg["scales"]]
    parts = [
        f"budgets {cfg['budgets']}, methods {cfg['methods']}",
        f"reconstruction that ran: {', '.join(recs) or 'none'}",
        f"{ran.get('runs', len(report.get('runs', [])))} runs in {ran.get('cells', '?')} cells, "
        f"{seeds} (a seed = an unlabeled sample of {cfg['samples']} pool sentences; a method "
        "that uses labels draws it from the labelled train split)",
        f"max length {cfg['max_length']}, profile `{cfg['profile']}`",
    ]
    if ran.get("uses_labels"):
        parts.append(f"methods that use labels: {', '.join(ran['uses_labels'])}")
    if ran.get("runs_with_reused_stages"):
        parts.append(
            f"{ran['runs_with_reused_stages']} run(s) reused stages memoised by an earlier run "
            "(their prune time excludes them; marked †)"
        )
    if ran.get("runs_with_reused_eval"):
        parts.append(
            f"{ran['runs_with_reused_eval']} run(s) gave a model identical to an earlier one "
            "(scored once)"
        )
    if cfg.get("prune_options"):
        parts.append(f"prune options {cfg['prune_options']}")
    line = "; ".join(parts)
    if cfg.get("plan"):
        line += f". Plan: {cfg['plan']}"
    return line


def format_markdown(report: dict) -> str:
    kind = report["task"]["kind"]
    metrics = report["metrics"]
    dense = report["dense"]
    ft = report["finetune"]
    env = report["environment"]
    lines = [f"# {report['title']}", ""]
    sizes = report["task"]["sizes"]
    lines += [
        f"- **Task**: `{report['task']['name']}` ({kind}); source: {report['task']['source']}",
        f"- **Splits**: train {sizes['train']}, dev {sizes['dev']} (from train), unlabeled pool "
        f"{sizes['pool']} (texts only), test {sizes['test']}; "
        f"{report['task']['notes'].get('split', '')}",
        f"- **Model**: {report['model']['name']}",
        f"- **Fine-tune**: mode `{ft.get('mode')}`"
        + (f", head L2 {ft['head_l2']:g}" if "head_l2" in ft else "")
        + (f", best epoch {ft['best_epoch']}" if "best_epoch" in ft else "")
        + f", converged: {_converged(ft.get('converged'))} ({ft.get('convergence', '')})"
        + (
            f", calibrated: {ft.get('calibrated')} (dev positive-rate gap "
            f"{100 * ft['calibration_gap']:.1f} pt)"
            if "calibration_gap" in ft
            else ""
        )
        + f", {ft.get('seconds', 0):.0f}s"
        + (" (reused from cache)" if ft.get("cached") else "")
        + (
            " (cut short by the time budget: not cached)"
            if ft.get("stopped_by_time_budget")
            else ""
        ),
        f"- **Pruning grid**: {_grid_line(report)}",
        f"- **Device**: {env['device']}"
        + (f" ({env['gpu']})" if env.get("gpu") else f", {env.get('cpu_count')} CPU cores")
        + (
            f"; load average {env['load_average_start'][0]:.1f} at start, "
            f"{env['load_average_end'][0]:.1f} at end"
            if env.get("load_average_start") and env.get("load_average_end")
            else ""
        )
        + "; versions: "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "- **Time**: " + ", ".join(f"{k} {v:.0f}s" for k, v in report["timings_s"].items()),
        "",
    ]
    if report.get("relabelled"):
        lines += [f"> Note: {report['relabelled']}.", ""]
    if report.get("stopped_early"):
        lines += [f"> **Stopped early**: {report['stopped_early']}.", ""]
    for nr in report.get("not_run") or []:
        sc = " + Scale" if nr["scale"] else ""
        lines += [f"> **Not run**: c = {nr['budget']:g}, `{nr['method']}`{sc}: {nr['reason']}.", ""]
    dense_bits = []
    for name in metrics:
        if name in dense:
            scale = 100.0 if name in ("accuracy", "positive_rate") else 1.0
            d = 1 if scale == 100.0 else 3
            dense_bits.append(f"{NAMES[name]} {dense[name] * scale:.{d}f}")
    if "true_positive_rate_of_labels" in dense:
        dense_bits.append(f"true positive rate {100 * dense['true_positive_rate_of_labels']:.1f}")
    if "accuracy_test_stderr" in dense:
        dense_bits.append(
            f"test-set standard error of an accuracy ≈ {100 * dense['accuracy_test_stderr']:.1f} pt"
        )
    lines += ["**Dense model** (test): " + ", ".join(dense_bits), ""]
    lines += [
        "Cells: mean ± standard error over seeds (n = seeds run; a single value has no ± ). "
        "A difference below ~2 standard errors (of the seeds, and of the test set) is not a "
        "difference. Drop = dense − mean, in points. Always compare with `random`. "
        "Δacc vs X (paired): accuracy difference to method X (same budget, Scale off; `no "
        "Scale`: the same method without Scale; `best label-free peer`: the label-free method "
        "other than the default (the row marked **(the default)**: "
        f"`{report['config'].get('default_method', 'kcm')}`) with the highest mean accuracy "
        "at that budget, named under each table) with the standard error of the difference "
        "paired over test sentences (the test-set noise both share cancels; seeds are averaged "
        "first). Reconstruction: what ran after the selection (`none`, `scale`, ...). "
        "A method marked *uses labels* saw the labelled train split: it is not label-free.",
        "",
    ]
    by_budget: dict = {}
    for row in report["summary"]:
        by_budget.setdefault(row["budget"], []).append(row)
    for c in sorted(by_budget, reverse=True):
        rows = sorted(by_budget[c], key=_sort_key)
        lines.append(f"## FLOPs budget c = {c:g}")
        lines.append("")
        head = ["method", "reconstruction", "FLOPs kept"]
        for name in metrics:
            head.append(NAMES[name])
            if name in ("accuracy", "pearson", "spearman", "roc_auc"):
                head.append("drop")
        refs = [
            ref
            for ref in ("random", "d2", "no Scale", "best label-free peer")
            if any(ref in (r.get("paired_accuracy_diff") or {}) for r in rows)
        ]
        head += [f"Δacc vs {ref} (paired)" for ref in refs]
        head += ["n", "prune s"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        dense_row = ["**dense**", "", "1.000"]
        for name in metrics:
            scale = 100.0 if name in ("accuracy", "positive_rate") else 1.0
            d = 1 if scale == 100.0 else 3
            dense_row.append(f"{dense[name] * scale:.{d}f}" if name in dense else "")
            if name in ("accuracy", "pearson", "spearman", "roc_auc"):
                dense_row.append("")
        dense_row += [""] * (len(refs) + 2)
        lines.append("| " + " | ".join(dense_row) + " |")
        defaults = default_rows(rows, report["config"].get("default_method", "kcm"))
        for row in rows:
            cells = [
                f"`{row['method']}`"
                + (" **(the default)**" if any(row is d for d in defaults) else "")
                + (" (uses labels)" if row.get("uses_labels") else ""),
                row.get("reconstruct") or ("scale" if row["scale"] else "none"),
                f"{row['flops_ratio']:.3f}" if row.get("flops_ratio") else "?",
            ]
            for name in metrics:
                scale = 100.0 if name in ("accuracy", "positive_rate") else 1.0
                d = 1 if scale == 100.0 else 3
                cells.append(_pm(row.get(name), scale, d))
                if name in ("accuracy", "pearson", "spearman", "roc_auc"):
                    drop = (row.get(name) or {}).get("drop_vs_dense")
                    cells.append(
                        f"{drop * scale:+.{d}f}" if drop is not None and math.isfinite(drop) else ""
                    )
            for ref in refs:
                pd = (row.get("paired_accuracy_diff") or {}).get(ref)
                cells.append(f"{100 * pd['diff']:+.1f} ± {100 * pd['stderr']:.1f}" if pd else "")
            cells.append(
                str(row["n_seeds"])
                + (
                    ""
                    if not row["identical_masks_across_seeds"] or row["n_seeds"] == 1
                    else " (same mask)"
                )
            )
            cells.append(
                f"{row['prune_seconds']['mean']:.1f}" + (" †" if row.get("reused_stages") else "")
            )
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        peer = next((r.get("best_peer") for r in rows if r.get("best_peer")), None)
        if peer:
            lines += [f"Best label-free peer at c = {c:g}: `{peer}`.", ""]
    lines += ["![accuracy vs FLOPs](accuracy_vs_flops.png)", ""]
    return "\n".join(lines)


BASE_COLORS = {
    "random": "#7f7f7f",
    "magnitude": "#ff7f0e",
    "r2": "#9467bd",
    "d2": "#2ca02c",
    "kcm": "#d62728",
}
VARIANT_COLORS = ("#1f77b4", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#637939")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _styles(keys: list[tuple[str, bool]]) -> dict[tuple[str, bool], dict]:
    """One colour per method label (base methods fixed, variants from a palette), solid line
    and filled marker without Scale, dashed line and hollow marker with Scale."""
    labels = sorted({m for m, _ in keys}, key=lambda m: _sort_key({"method": m, "scale": False}))
    colors, markers = {}, {}
    n_variant = 0
    per_base: dict[str, int] = {}
    for m in labels:
        base = m.split(":")[0]
        k = per_base.get(base, 0)
        per_base[base] = k + 1
        if m in BASE_COLORS:
            colors[m] = BASE_COLORS[m]
        else:
            colors[m] = VARIANT_COLORS[n_variant % len(VARIANT_COLORS)]
            n_variant += 1
        markers[m] = MARKERS[k % len(MARKERS)]
    out = {}
    for m, sc in keys:
        out[(m, sc)] = {
            "color": colors[m],
            "marker": markers[m],
            "linestyle": "--" if sc else "-",
            "markerfacecolor": "white" if sc else colors[m],
        }
    return out


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = report["task"]["kind"]
    panels = [m for m in PRIMARY[kind] if m in report["metrics"]] or report["metrics"][:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels) + 2.6, 4.6), squeeze=False)
    series: dict = {}
    for row in report["summary"]:
        series.setdefault((row["method"], row["scale"]), []).append(row)
    styles = _styles(list(series))
    dense = report["dense"]
    for ax, name in zip(axes[0], panels, strict=False):
        scale = 100.0 if name == "accuracy" else 1.0
        for (method, sc), rows in sorted(series.items(), key=lambda kv: _sort_key(kv[1][0])):
            rows = sorted(rows, key=lambda r: r["budget"])
            xs = [r["flops_ratio"] or r["budget"] for r in rows]
            ys = [
                (r[name]["mean"] if r[name]["mean"] is not None else float("nan")) * scale
                for r in rows
            ]
            es = [(r[name]["stderr"] or 0.0) * scale for r in rows]
            ax.errorbar(
                xs,
                ys,
                yerr=es,
                capsize=3,
                linewidth=1.4,
                markersize=5,
                label=f"{method}" + (" + Scale" if sc else ""),
                **styles[(method, sc)],
            )
        if name in dense:
            ax.axhline(
                dense[name] * scale, color="black", linewidth=1, linestyle=":", label="dense"
            )
        ax.set_xlabel("FLOPs kept (fraction of dense)")
        ax.set_ylabel(NAMES[name] + (" (%)" if scale == 100.0 else ""))
        ax.set_title(f"{NAMES[name]} vs FLOPs (mean ± s.e. over seeds)", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right", frameon=False)
    fig.suptitle(report["title"], fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.5 / fig.get_figwidth(), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, outdir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md and accuracy_vs_flops.png into ``outdir``."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    clean = _clean(json.loads(json.dumps(report, default=_json_default)))
    paths = {
        "json": out / "report.json",
        "md": out / "report.md",
        "png": out / "accuracy_vs_flops.png",
    }
    _atomic_write(paths["json"], json.dumps(clean, indent=2, allow_nan=False).encode())
    _atomic_write(paths["md"], format_markdown(clean).encode())
    plot(clean, paths["png"])
    return paths
