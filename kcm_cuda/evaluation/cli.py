"""``kcm-eval``: the accuracy evaluation of KCM pruning (the project's main job).

With no arguments: the packaged all-MiniLM-L6-v2 fine-tuned on the VADER movie-review snippets
(binary sentiment), pruned at several FLOPs budgets by the default (prune() with its structure
search) and the label-free peers a user could pick instead, scored on the whole test split;
writes report.json, report.md and accuracy_vs_flops.png to --output (out/accuracy).

Profiles (explicit flags override them):
  cpu   (default without a GPU; what `make run` does) a fixed, stated amount of work: full
        fine-tune for 2 epochs (no time guard: progress and an ETA are printed inside each
        epoch), then the grid of budgets {budgets} x the methods
        {methods}
        with 512 unlabeled sentences per seed; the number of seeds (at most {seeds}) is chosen
        UP FRONT from a per-run time estimate so that the grid takes at most {target:g} minutes
        on a slow 2-core CPU (another process using one core), and printed before anything
        runs. Every planned run is run (--seeds N: exactly N seeds, no sizing).
  full  (default with a GPU) the paper's protocol widened: full fine-tune, budgets 0.8 0.7
        0.6 0.5 0.4, the cpu grid's methods plus the labelled anchor kwon, kcm, d2, magnitude,
        wanda_sp and the default with attention heads pruned, 10 seeds of 2048 sentences.

kcm-eval exits with status 1 when the grid measured no pruned model (the report is written).

Language models (--task lm-vader, --task lm-FILE.txt [--model DIR]): perplexity of pruned
causal LMs on held-out lines, the default vs its fixed rules vs FLAP vs Wanda-sp (with bias
compensation) at 0.8 / 0.7 / 0.6 (kcm_cuda.evaluation.lm_grid; report in out/lm/).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from collections.abc import Sequence

import torch

__all__ = ["build_parser", "main"]

# The cpu profile's grid (`make run`): edit these two constants to change what it runs.
CPU_GRID_BUDGETS = (0.7, 0.6, 0.5)
# The default (flap selection + ridge reconstruction) against the label-free peers a user could
# pick instead: FLAP as published (bias compensation), Wanda-sp + bias compensation, the
# paper's KCM pipeline (mean-rank R2D2 + Scale), KCM's data-driven score D2 with the same ridge
# reconstruction, and random. The labelled anchor `kwon` costs minutes per prune on this CPU:
# it is in the full profile and measured in benchmarks/results/cpu-amd-epyc/kwon/.
CPU_GRID_METHODS = (
    "random",
    "kcm_paper:reconstruct=scale",
    "flap:reconstruct=bias",
    "wanda_sp:reconstruct=bias",
    "d2:reconstruct=ridge",
    "flap:reconstruct=ridge,structure=fixed",  # the default's fixed rules, without the search
    "default",  # prune() as a user calls it: the structure search
)
CPU_GRID_MAX_SEEDS = 3
CPU_GRID_TARGET_MIN = 12.0  # the grid's length on a slow 2-core CPU, estimated up front
# Seconds per run on an idle 2-core CPU (this project's machine) for the default model and
# task (all-MiniLM-L6-v2, 512 sentences, 2,131 test sentences), from
# benchmarks/results/cpu-amd-epyc/default_vs_peers_vader-movie (eval ~5.3 s, prune per
# method) and, for methods not measured there, a conservative guess. One-off stage costs are
# paid once per grid (R2 solve) or once per seed (activation statistics), then memoised.
EST_EVAL_S = 5.5
EST_PRUNE_S = {
    "random": 0.2,
    "magnitude": 0.2,
    "r2": 0.3,
    "d2": 0.3,
    "kcm": 0.4,
    "kcm_paper": 0.4,
    "flap": 1.0,
    "wanda_sp": 1.0,
    # the structure search: activations with Grams, 8 one-shot candidates on 128 held-out
    # rows, the winner's two refits (measured: benchmarks/results/cpu-amd-epyc/prune_time)
    "default": 20.0,
}
EST_PRUNE_OTHER_S = 10.0  # a method without a measurement (e.g. kwon's labelled passes)
EST_SCALE_S = 5.5  # Scale / a reconstruction on top of the selection
EST_ONCE_PER_GRID_S = 16.0  # R2's kernel solve
EST_ONCE_PER_SEED_S = 4.0  # activation statistics of the seed's sample
SLOW_FACTOR = 2.5  # a slow 2-core CPU with another process using one core, vs idle

PROFILES = {
    "cpu": {
        "budgets": CPU_GRID_BUDGETS,
        "methods": CPU_GRID_METHODS,
        "scale": "off",
        "seeds": None,  # sized up front (plan_cpu_grid)
        "samples": 512,
        "finetune": "full",
        "epochs": 2,
        "finetune_budget": None,
        "time_limit": None,
    },
    "full": {
        "budgets": (0.8, 0.7, 0.6, 0.5, 0.4),
        "methods": CPU_GRID_METHODS
        + (
            "kwon",
            "kcm",
            "d2",
            "magnitude",
            "wanda_sp",
            "flap:reconstruct=ridge,heads=true,structure=fixed",
        ),
        "scale": "off",
        "seeds": 10,
        "samples": 2048,
        "finetune": "full",
        "epochs": 4,
        "finetune_budget": None,
        "time_limit": None,
    },
}


def estimate_run_s(method: str, scale: bool) -> float:
    """Idle-CPU seconds of one run (prune + test evaluation) of ``method``."""
    from kcm_cuda.evaluation.grid import parse_method

    spec = parse_method(method)
    opts = dict(spec.options)
    t = EST_EVAL_S + EST_PRUNE_S.get(spec.name, EST_PRUNE_OTHER_S)
    rec = opts.get("reconstruct", "none")
    if scale or opts.get("scale") in ("on", True) or rec not in ("none", None):
        t += EST_SCALE_S
    return t


def plan_cpu_grid(
    budgets,
    methods,
    scales,
    max_seeds: int = CPU_GRID_MAX_SEEDS,
    target_min: float = CPU_GRID_TARGET_MIN,
) -> tuple[int, str]:
    """(seeds, the plan as one line): the most seeds (1..max_seeds) whose estimated grid time
    on a slow 2-core CPU fits ``target_min`` minutes (at least 1)."""
    from kcm_cuda.evaluation.grid import _cells, parse_method

    cells = _cells(budgets, [parse_method(m) for m in methods], scales)
    per_seed = sum(estimate_run_s(m.label, s) for _, m, s in cells) + EST_ONCE_PER_SEED_S
    seeds = 1
    for n in range(max_seeds, 0, -1):
        if (EST_ONCE_PER_GRID_S + n * per_seed) * SLOW_FACTOR <= 60 * target_min:
            seeds = n
            break
    idle = EST_ONCE_PER_GRID_S + seeds * per_seed
    plan = (
        f"cpu grid: {len(budgets)} budget(s) x {len(cells) // max(1, len(budgets))} method "
        f"variant(s) = {len(cells)} cells x {seeds} seed(s) = {len(cells) * seeds} runs, all "
        f"of them run; estimated {idle / 60:.1f} min on an idle 2-core CPU, "
        f"{SLOW_FACTOR * idle / 60:.1f} min on a slow one (seeds chosen up front to fit "
        f"{target_min:g} min there, at most {max_seeds}; --seeds N overrides; estimate for "
        "the default model and task)"
    )
    return seeds, plan


def _budgets(text: str) -> tuple[float, ...]:
    out = []
    for part in text.replace(",", " ").split():
        try:
            c = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"budget {part!r} is not a number") from None
        if not 0 < c <= 1:
            raise argparse.ArgumentTypeError(
                f"budget {c:g} is outside (0, 1]: a budget is the fraction of FLOPs kept"
            )
        out.append(c)
    if not out:
        raise argparse.ArgumentTypeError("no budgets given")
    return tuple(out)


def _epilog() -> str:
    """The module doc's profiles, with the grid's constants written out as values."""
    text = (__doc__ or "").split("\n\n", 1)[1]
    return text.format(
        budgets=" ".join(f"{c:g}" for c in CPU_GRID_BUDGETS),
        methods=("\n        ").join(
            textwrap.wrap(", ".join(CPU_GRID_METHODS), 80, break_on_hyphens=False)
        ),
        seeds=CPU_GRID_MAX_SEEDS,
        target=CPU_GRID_TARGET_MIN,
    )


def build_parser() -> argparse.ArgumentParser:
    from kcm_cuda.evaluation.grid import known_methods

    p = argparse.ArgumentParser(
        prog="kcm-eval",
        description="Accuracy of label-free pruning (the default and its peers) on a "
        "fine-tuned model (default: all-MiniLM-L6-v2 on the VADER movie-review snippets), or "
        "perplexity of pruned causal LMs (--task lm-*).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(),
    )
    p.add_argument(
        "--task",
        default="vader-movie",
        help="vader-movie (default), vader-movie-rating, vader-amazon, vader-nyt, "
        "vader-tweets, glue/<name> (needs the "
        "`datasets` package and a network), or file:PATH; language models: lm-vader (the "
        "small LLaMA-architecture LM trained here on the shipped text), lm-vader-deep (a "
        "deeper Qwen2-architecture LM, 8 layers, trained here on the same text) or "
        "lm-FILE.txt (a local text file, one document per line; with --model DIR a local "
        "causal LM)",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="a local labelled .tsv/.csv/.jsonl (columns --text-column, "
        "--label-column): hash-split 60/20/20, overrides --task",
    )
    p.add_argument(
        "--text-column", default="sentence", help="--data: the text column (default sentence)"
    )
    p.add_argument(
        "--text-pair-column",
        default=None,
        help="--data: a second text column for sentence pairs (default none)",
    )
    p.add_argument(
        "--label-column", default="label", help="--data: the label column (default label)"
    )
    p.add_argument("--regression", action="store_true", help="--data labels are real numbers")
    p.add_argument(
        "--model",
        default=None,
        help="model directory or hub name (BERT, DistilBERT or RoBERTa; a bare encoder gets "
        "a new task head, a *ForSequenceClassification keeps its own); default: the packaged "
        "all-MiniLM-L6-v2",
    )
    p.add_argument(
        "--profile",
        choices=("auto", "cpu", "full"),
        default="auto",
        help="auto: full with a GPU, cpu otherwise",
    )
    p.add_argument(
        "--budgets",
        type=_budgets,
        default=None,
        help="FLOPs fractions kept, e.g. '0.8,0.7,0.6,0.5'",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="selection methods to compare (default: the profile's). 'default' runs prune() "
        "as a user who passes no method= does (the structure search chooses). Known: "
        + " ".join(known_methods())
        + " (kwon uses labels: the grid draws its sample from the labelled train split). "
        "Variants as name:key=value,key=value with any prune() option (e.g. "
        "flap:reconstruct=ridge,heads=true or d2:allocation=uniform); scale=on|off pins Scale "
        "for that method whatever --scale says; a budget a variant cannot reach is reported "
        "as not run",
    )
    p.add_argument(
        "--scale", choices=("off", "on", "both"), default=None, help="cpu: off, full: both"
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="unlabeled samples per cell (cpu profile: sized up front, at most 3; full: 10)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="unlabeled pool sentences (LMs: calibration sequences) per prune (default: "
        "the profile's, cpu 512, full 2048; LMs 128)",
    )
    p.add_argument(
        "--prune-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to every prune() call (e.g. scale_lambda=0.1)",
    )
    p.add_argument(
        "--finetune",
        default=None,
        help="how the dense model is fine-tuned before pruning: full (every weight; auto = "
        "full), head (the "
        "classifier head only, the encoder frozen), top:K (the head and the top K layers)",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="fine-tuning epochs (cpu profile: 2, full: 4)"
    )
    p.add_argument(
        "--finetune-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="no fine-tune epoch is started that would end past it (default none); a "
        "fine-tune it cuts short is used but never cached",
    )
    p.add_argument(
        "--lr", type=float, default=5e-5, help="fine-tuning learning rate (AdamW; 5e-5)"
    )
    p.add_argument(
        "--finetune-seed", type=int, default=0, help="seed of the fine-tune (its head, order)"
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=128,
        help="tokens per sentence for fine-tuning, pruning and scoring (128)",
    )
    lm = p.add_argument_group("language models (--task lm-*)")
    lm.add_argument("--window", type=int, default=None, help="perplexity window (tokens)")
    lm.add_argument("--stride", type=int, default=None, help="< window (default window/2)")
    lm.add_argument("--max-test-tokens", type=int, default=None, help="cap the held-out text")
    p.add_argument(
        "--device",
        default="auto",
        help="where to fine-tune, prune and score: auto (cuda when available, else cpu), "
        "cpu, cuda, cuda:N",
    )
    p.add_argument("--cache-dir", default=None, help="default $KCM_CUDA_CACHE or ~/.cache/kcm_cuda")
    p.add_argument(
        "--output",
        default="out/accuracy",
        help="report directory: report.md, report.json, accuracy_vs_flops.png (default "
        "out/accuracy; language models: out/lm); never inside the input model",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="MINUTES",
        help="wall-clock guard on the whole run: no seed round is started that would end "
        "past it (default none: the cpu profile sizes its grid up front instead)",
    )
    p.add_argument("--no-cache", action="store_true", help="fine-tune again, do not cache")
    p.add_argument(
        "--resume",
        action="store_true",
        help="go on from the runs an interrupted kcm-eval left in --output (runs.partial.jsonl)",
    )
    p.add_argument(
        "--save-predictions",
        action="store_true",
        help="also write predictions.npz (every run's test logits) for paired analyses",
    )
    return p


def config_from_args(args: argparse.Namespace):
    from kcm_cuda.evaluation.finetune import FinetuneSettings, resolve_mode
    from kcm_cuda.evaluation.grid import GridConfig, parse_method, resolve_device
    from kcm_cuda.evaluation.grid import _parse_value as parse_value

    dev = resolve_device(args.device)
    profile = args.profile
    if profile == "auto":
        profile = "full" if dev.type == "cuda" else "cpu"
    prof = PROFILES[profile]
    methods = tuple(args.methods) if args.methods else prof["methods"]
    for m in methods:
        parse_method(m)
    scale = args.scale or prof["scale"]
    scales = {"off": (False,), "on": (True,), "both": (False, True)}[scale]
    opts = {}
    for item in args.prune_option:
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise ValueError(f"--prune-option {item!r} is not KEY=VALUE")
        opts[k.strip()] = parse_value(v.strip())
    ft_mode = args.finetune or prof["finetune"]
    resolve_mode(ft_mode, dev)
    limit = args.time_limit if args.time_limit is not None else prof["time_limit"]
    ft_budget = args.finetune_budget
    if ft_budget is None:
        ft_budget = prof["finetune_budget"]
    seeds = args.seeds if args.seeds is not None else prof["seeds"]
    budgets = args.budgets or prof["budgets"]
    plan = None
    if seeds is None:
        seeds, plan = plan_cpu_grid(budgets, methods, scales)
    ft = FinetuneSettings(
        mode=ft_mode,
        seed=args.finetune_seed,
        epochs=args.epochs if args.epochs is not None else prof["epochs"],
        lr=args.lr,
        max_length=args.max_length,
        time_budget_s=60.0 * ft_budget if ft_budget else None,
    )
    return GridConfig(
        task=args.task,
        model=args.model,
        budgets=budgets,
        methods=methods,
        scales=scales,
        seeds=seeds,
        samples=args.samples if args.samples is not None else prof["samples"],
        max_length=args.max_length,
        device=str(dev),
        cache_dir=args.cache_dir,
        output=args.output,
        finetune=ft,
        prune_options=opts,
        time_limit_s=None if not limit else 60.0 * limit,
        profile=profile,
        save_predictions=args.save_predictions,
        use_cache=not args.no_cache,
        resume=args.resume,
        plan=plan,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.task.startswith(("lm-", "lm:")):
        from kcm_cuda.evaluation.lm_grid import main_lm

        return main_lm(args)
    from kcm_cuda.evaluation.datasets import task_from_file
    from kcm_cuda.evaluation.report import write_report
    from kcm_cuda.evaluation.runner import run_grid

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        config = config_from_args(args)
        config.validate()
        from kcm_cuda.pruning.safety import check_output_path  # never into the input model

        check_output_path(config.output, {"input model": args.model}, allow_contains=True)
        task = None
        if args.data:
            task = task_from_file(
                args.data,
                kind="regression" if args.regression else "classification",
                text_column=args.text_column,
                text_pair_column=args.text_pair_column,
                label_column=args.label_column,
            )
        t0 = time.perf_counter()
        log(
            f"kcm-eval: profile {config.profile}, device {config.device}, "
            f"torch threads {torch.get_num_threads()}"
        )
        if config.plan:
            log(config.plan)
        report = run_grid(config, task=task, log=log)
        paths = write_report(report, config.output)
    except (ValueError, TypeError, OSError, RuntimeError) as e:  # one line, no traceback
        print(f"kcm-eval: error: {(str(e).strip().splitlines() or [repr(e)])[0]}", file=sys.stderr)
        return 2
    if not report["runs"]:
        print(
            "kcm-eval: error: no pruned model was measured "
            f"({report.get('stopped_early') or _not_run_reason(report) or 'empty grid'}); "
            f"the report ({paths['md'].resolve()}) has the dense model only",
            file=sys.stderr,
        )
        return 1
    from kcm_cuda.evaluation.report import format_markdown

    md = format_markdown(report)
    tables = md.split("\n## ", 1)
    if len(tables) > 1:
        print("\n## " + tables[1].split("![")[0].rstrip())
    log(f"\ndone in {time.perf_counter() - t0:.0f}s; report: {paths['md'].resolve()}")
    log(f"  {paths['json'].resolve()}\n  {paths['png'].resolve()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def _not_run_reason(report: dict) -> str | None:
    """The first cell the options could not reach, in words (None when every cell ran)."""
    nr = report.get("not_run") or []
    if not nr:
        return None
    more = f" (and {len(nr) - 1} more cell(s))" if len(nr) > 1 else ""
    return f"not run: c = {nr[0]['budget']:g}, {nr[0]['method']}: {nr[0]['reason']}{more}"
