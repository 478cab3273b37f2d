"""Running the evaluation grid: fine-tune once, then prune at every (budget, method, Scale,
seed) and score the pruned model on the whole test split. The grid's plan (methods, cells,
configuration): grid.py; the summary and paired differences: scoring.py.

Seeds change the unlabeled sample the pruner draws from the pool (as in the paper: results
averaged over seeds). A method that needs labels (``needs_labels``: e.g. kwon) is given the
TRAIN split's labelled examples instead (texts or pairs, and ``labels=``), never the pool or the
test split; its rows say "uses labels". The pruner gets the whole classifier (task head
included) and returns a pruned classifier. The loop runs seed-major (all cells for seed 0,
then seed 1, ...). An optional time limit (--time-limit; no profile sets one: the cpu profile
sizes its grid up front instead) is checked before each seed round against the duration of the
previous round: when reached it leaves every cell with fewer seeds instead of leaving cells
empty, and the report and the exit status say so.

Work reused across runs:
  * the test split is tokenised once into length-sorted padded batches;
  * the fine-tuned model is cached on disk (finetune.py);
  * R2 scores (weights only) and D2 activation statistics (weights + sample) are memoised by
    content for the duration of the grid: the same model and the same sample give the same
    numbers, so budgets and methods sharing them pay for them once (``score_memo``);
  * a pruned model identical to one already scored (same masks and scales) is not scored
    again (its metrics are copied and the run says so).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch

from kcm_cuda.evaluation.datasets import TaskData, default_cache_dir, get_task
from kcm_cuda.evaluation.finetune import finetune, resolve_mode, split_metrics
from kcm_cuda.evaluation.grid import (  # noqa: F401 - also re-exported (kcm_cuda/cli.py, users)
    DEFAULT_BUDGETS,
    DEFAULT_SPEC,
    GridConfig,
    MethodSpec,
    _cells,
    cpu_defaults,
    default_method,
    known_methods,
    model_label,
    needs_labels,
    parse_method,
    resolve_device,
)
from kcm_cuda.evaluation.modeling import SentenceClassifier, predict, resolve_model_path, tokenize
from kcm_cuda.evaluation.scoring import _what_ran, save_predictions, summarise
from kcm_cuda.pruning.flops import BudgetError

__all__ = [
    "DEFAULT_BUDGETS",
    "GridConfig",
    "MethodSpec",
    "cpu_defaults",
    "parse_method",
    "run_grid",
    "score_memo",
]


# --- memoisation of the seed/budget-independent work of prune() ----------------------------------


def _tensor_digest(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())


def _model_digest(model: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.state_dict().items():
        h.update(name.encode())
        _tensor_digest(h, p)
    return h.hexdigest()


def _key_part(x: object) -> str:
    if isinstance(x, torch.Tensor):
        h = hashlib.blake2b(digest_size=16)
        _tensor_digest(h, x)
        return "T" + h.hexdigest()
    if isinstance(x, torch.nn.Module):
        return "M" + _model_digest(x)
    if hasattr(x, "input_ids") and hasattr(x, "attention_mask"):  # TokenizedSample
        parts = [_key_part(x.input_ids), _key_part(x.attention_mask)]
        tt = getattr(x, "token_type_ids", None)
        parts.append(_key_part(tt) if tt is not None else "-")
        return "S" + "|".join(parts)
    if isinstance(x, (list, tuple)):
        return "[" + ",".join(_key_part(v) for v in x) + "]"
    if isinstance(x, dict):
        return "{" + ",".join(f"{k}:{_key_part(v)}" for k, v in sorted(x.items())) + "}"
    return type(x).__name__ + ":" + repr(x)


@contextlib.contextmanager
def score_memo(stats: dict | None = None):
    """Within the block, kcm_cuda.pruning's R2 scores and D2 activation statistics are
    memoised by content (model weights, sample tokens, options): exact reuse, no
    approximation. ``stats`` (if given) counts hits and misses."""
    try:
        from kcm_cuda.pruning import stages
    except ImportError:  # pragma: no cover - pruning layer missing
        yield
        return
    stats = stats if stats is not None else {}
    originals = {}
    cache: dict[str, object] = {}

    def wrap(name: str, fn: Callable):
        def memoised(*args, **kwargs):
            key = (
                name
                + _key_part(list(args))
                + _key_part({k: v for k, v in kwargs.items() if k not in ("progress",)})
            )
            if key in cache:
                stats[name + "_hits"] = stats.get(name + "_hits", 0) + 1
                return copy.deepcopy(cache[key])
            stats[name + "_misses"] = stats.get(name + "_misses", 0) + 1
            out = fn(*args, **kwargs)
            cache[key] = copy.deepcopy(out)
            return out

        return memoised

    for name in ("r2_scores", "collect_activation_stats", "collect_head_stats"):
        fn = getattr(stages, name, None)
        if callable(fn):
            originals[name] = fn
            setattr(stages, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(stages, name, fn)


# --- the grid ----------------------------------------------------------------------------------


def _versions() -> dict:
    import transformers

    import kcm_cuda

    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "kcm_cuda": getattr(kcm_cuda, "__version__", "?"),
    }
    return v


def _device_info(dev: torch.device) -> dict:
    info = {
        "device": str(dev),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def _load() -> list[float] | None:
    """1/5/15-minute load averages (timings on a shared machine need them to be read)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _masks_digest(result) -> str:
    """Identity of a pruned model: its masks AND every weight of the returned model, so that
    runs whose masks agree but whose reconstruction (bias, ridge, O refit) differs are never
    taken for the same model."""
    h = hashlib.blake2b(digest_size=16)
    for i in sorted(result.masks):
        _tensor_digest(h, result.masks[i].to(torch.bool))
    heads = getattr(result, "head_masks", None)
    if heads:
        for i in sorted(heads):
            _tensor_digest(h, heads[i].to(torch.bool))
    h.update(_model_digest(result.model).encode())
    return h.hexdigest()


def _metric_names(task: TaskData) -> list[str]:
    if task.kind == "regression":
        return ["pearson", "spearman", "mse"]
    if task.num_labels == 2:
        return ["accuracy", "roc_auc", "positive_rate"]
    return ["accuracy"]


def run_grid(
    config: GridConfig,
    *,
    task: TaskData | None = None,
    prune_fn: Callable | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the whole evaluation and return the report dict (report.write_report saves it)."""
    config.validate()
    t_start = time.perf_counter()
    load_start = _load()
    dev = resolve_device(config.device)
    methods = [parse_method(m) for m in config.methods]
    if prune_fn is None:
        from kcm_cuda.pruning import prune as prune_fn  # noqa: N813
    cache_dir = default_cache_dir(config.cache_dir)

    t0 = time.perf_counter()
    if task is None:
        task = get_task(config.task, cache_dir)
    data_s = time.perf_counter() - t0
    log(f"task {task.name}: " + ", ".join(f"{k} {v}" for k, v in task.sizes().items()))

    model_path = resolve_model_path(config.model)
    t0 = time.perf_counter()
    clf, ft_info, tokenizer = finetune(
        task,
        model_path,
        config.finetune,
        device=dev,
        cache_dir=cache_dir,
        use_cache=config.use_cache,
        log=log,
    )
    finetune_wall = time.perf_counter() - t0

    test_texts = [e.text for e in task.test]
    test_batches = tokenize(
        tokenizer, test_texts, max_length=config.max_length, batch_size=config.eval_batch_size
    ).to(dev)
    clf.to(dev).eval()
    t0 = time.perf_counter()
    dense_logits = predict(clf, test_batches, dev)
    dense_eval_s = time.perf_counter() - t0
    dense = split_metrics(task, dense_logits, task.test)
    n_test = len(task.test)
    if "accuracy" in dense:
        a = dense["accuracy"]
        dense["accuracy_test_stderr"] = math.sqrt(a * (1 - a) / n_test)
    log("dense: " + _fmt_metrics(dense) + f"  (test eval {dense_eval_s:.1f}s)")

    pool = list(task.pool)
    runs: list[dict] = []
    scored: dict[str, dict] = {}
    memo_stats: dict = {}
    # prune()'s own cache (R2 scores, activation statistics by model + sample fingerprint),
    # shared by the grid's runs: the stages survive a refactor that the memo's wrapping misses
    prune_cache: dict | None = {} if _accepts(prune_fn, "cache") else None
    cells = _cells(config.budgets, methods, config.scales)
    total_runs = len(cells) * config.seeds
    grid_t0 = time.perf_counter()
    stopped_early = None
    not_run: dict[tuple, str] = {}  # (budget, method, scale) → why the options cannot reach it
    done = 0
    round_s = 0.0
    ckpt = _Checkpoint(config, ft_info, task)
    labels = np.array([e.label for e in task.test]) if task.kind == "classification" else None
    resumed = ckpt.load(labels) if config.resume else {}
    if resumed:
        log(f"resuming: {len(resumed)} finished runs found in {ckpt.path}")
    # oneDNN caches prepacked weights per (shape, layer width): with dynamic padding and a new
    # FFN width per pruned model the CPU process grew by ~100 MB per run (4-5 GB over the
    # default grid) for no speed gain on this workload; plain BLAS keeps memory flat.
    no_onednn = _onednn_disabled() if dev.type == "cpu" else contextlib.nullcontext()
    with ckpt, score_memo(memo_stats), no_onednn:
        for seed in range(config.seeds):
            round_t0 = time.perf_counter()
            elapsed = round_t0 - t_start
            if (
                config.time_limit_s is not None
                and seed > 0
                and elapsed + round_s > config.time_limit_s
            ):
                stopped_early = (
                    f"time limit {config.time_limit_s:.0f}s: after {elapsed:.0f}s, another seed "
                    f"round (~{round_s:.0f}s) would exceed it; ran {seed} of {config.seeds} "
                    f"seeds ({done} of {total_runs} runs)"
                )
                break
            for c, m, s in cells:
                elapsed = time.perf_counter() - t_start
                if config.time_limit_s is not None and elapsed > config.time_limit_s:
                    stopped_early = (
                        f"time limit {config.time_limit_s:.0f}s reached inside seed {seed} "
                        f"after {done} of {total_runs} runs"
                    )
                    break
                done += 1
                if (c, m.label, s, seed) in resumed:
                    run = resumed[(c, m.label, s, seed)]
                    runs.append(run)
                    scored.setdefault(
                        run["mask_digest"],
                        (run["metrics"], run.get("_correct"), run.get("_logits")),
                    )
                    ckpt.append(run)
                    log(f"[{done}/{total_runs}] c={c:g} {m.label} seed={seed}: resumed")
                    continue
                if (c, m.label, s) in not_run:
                    log(f"[{done}/{total_runs}] c={c:g} {m.label} seed={seed}: not run")
                    continue
                log(f"[{done}/{total_runs}] c={c:g} {m.label} seed={seed}: pruning ...")
                try:
                    run = _one_run(
                        prune_fn,
                        clf,
                        task,
                        pool,
                        tokenizer,
                        test_batches,
                        dev,
                        config,
                        c,
                        m,
                        s,
                        seed,
                        scored,
                        memo_stats,
                        prune_cache,
                    )
                except BudgetError as e:  # this budget with these options: skip the cell
                    why = (str(e).strip().splitlines() or [repr(e)])[0]
                    not_run[(c, m.label, s)] = why
                    log(f"[{done}/{total_runs}] c={c:g} {m.label} seed={seed}: NOT RUN: {why}")
                    continue
                runs.append(run)
                ckpt.append(run)
                reused = run.get("reused_stages") or []
                log(
                    f"[{done}/{total_runs}] c={c:g} {m.label}"
                    + ("" if "reconstruct=" in m.label else f" reconstruct={run['reconstruct']}")
                    + " "
                    f"seed={seed}{' (uses labels)' if run.get('uses_labels') else ''}: "
                    f"{_fmt_metrics(run['metrics'])} "
                    f"(prune {run['prune_seconds']:.1f}s"
                    f"{' with ' + ', '.join(reused) + ' reused' if reused else ''}, "
                    f"eval {run['eval_seconds']:.1f}s"
                    f"{', identical to an earlier run' if run.get('reused_eval') else ''})"
                )
            if stopped_early:
                break
            round_s = time.perf_counter() - round_t0
            if seed == 0:  # the one-off R2 solve (memoised afterwards) is not a round's cost
                r2_times = [(r.get("prune_timings_s") or {}).get("r2", 0.0) for r in runs]
                round_s -= max(r2_times, default=0.0)
    ckpt.remove()
    if stopped_early:
        log("STOPPED EARLY: " + stopped_early)
    grid_s = time.perf_counter() - grid_t0
    summary = summarise(runs, dense, _metric_names(task), default=DEFAULT_SPEC)
    predictions = None
    if config.save_predictions:
        os.makedirs(config.output, exist_ok=True)
        predictions = os.path.join(config.output, "predictions.npz")
        save_predictions(runs, dense_logits, predictions, [e.label for e in task.test])
    for r in runs:
        r.pop("_correct", None)
        r.pop("_logits", None)
    report = {
        "title": f"KCM pruning accuracy: {model_label(config.model)} on {task.name}",
        "task": {
            "name": task.name,
            "kind": task.kind,
            "num_labels": task.num_labels,
            "sizes": task.sizes(),
            "source": task.source,
            "notes": task.notes,
            "test_positive_rate": float(np.mean([int(e.label) == 1 for e in task.test]))
            if task.kind == "classification"
            else None,
        },
        "model": {"name": model_label(config.model), "path": str(model_path)},
        "finetune": ft_info,
        "dense": dense,
        "config": {
            "profile": config.profile,
            "budgets": list(config.budgets),
            "methods": [m.label for m in methods],
            "scales": list(config.scales),
            "seeds": config.seeds,
            "samples": config.samples,
            "max_length": config.max_length,
            "prune_options": config.prune_options,
            "finetune": asdict(config.finetune)
            | {"resolved_mode": resolve_mode(config.finetune.mode, dev)},
            "time_limit_s": config.time_limit_s,
            "plan": config.plan,
            "default_method": DEFAULT_SPEC,
        },
        "ran": _what_ran(runs, config.seeds),
        "environment": _device_info(dev)
        | {"versions": _versions(), "load_average_start": load_start, "load_average_end": _load()},
        "metrics": _metric_names(task),
        "runs": runs,
        "summary": summary,
        "stopped_early": stopped_early,
        "not_run": [
            {"budget": c, "method": label, "scale": sc, "reason": why}
            for (c, label, sc), why in not_run.items()
        ],
        "predictions_file": predictions,
        "memo": memo_stats,
        "timings_s": {
            "data": data_s,
            "finetune_wall": finetune_wall,
            "dense_eval": dense_eval_s,
            "grid": grid_s,
            "total": time.perf_counter() - t_start,
        },
    }
    return report


@contextlib.contextmanager
def _onednn_disabled():
    prev = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = prev


class _Checkpoint:
    """Finished runs appended to <output>/runs.partial.jsonl as the grid goes (with their test
    logits), so that an interrupted grid can go on with ``resume=True``; removed when the grid
    ends. Lines from another model / task / sampling setup are ignored (fingerprint)."""

    def __init__(self, config: GridConfig, ft_info: dict, task: TaskData) -> None:
        self.path = os.path.join(config.output, "runs.partial.jsonl")
        payload = {
            "finetune": ft_info.get("key"),
            "task": task.fingerprint(),
            "test": [e.id for e in task.test],
            "samples": config.samples,
            "max_length": config.max_length,
            "prune_options": _key_part(config.prune_options),
        }
        self.fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[
            :16
        ]
        self._fh = None
        self._resume = config.resume

    def load(self, labels: np.ndarray | None) -> dict[tuple, dict]:
        out: dict[tuple, dict] = {}
        if not os.path.isfile(self.path):
            return out
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the interruption
                if rec.get("fingerprint") != self.fingerprint:
                    continue
                run = rec["run"]
                logits = rec.get("logits")
                if logits is not None:
                    run["_logits"] = np.asarray(logits, dtype=np.float32)
                    if labels is not None:
                        run["_correct"] = run["_logits"].argmax(axis=1) == labels
                run["resumed"] = True
                out[(run["budget"], run["method"], run["scale"], run["seed"])] = run
        return out

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._fh = open(self.path, "a" if self._resume else "w", encoding="utf-8")  # noqa: SIM115
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def append(self, run: dict) -> None:
        if self._fh is None:
            return
        plain = {k: v for k, v in run.items() if not k.startswith("_")}
        logits = run.get("_logits")
        rec = {
            "fingerprint": self.fingerprint,
            "run": plain,
            "logits": None if logits is None else np.round(logits, 4).tolist(),
        }
        self._fh.write(json.dumps(rec, default=float) + "\n")
        self._fh.flush()

    def remove(self) -> None:
        self.__exit__()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _accepts(fn: Callable, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params and params[name].kind != inspect.Parameter.VAR_POSITIONAL


def _reconstruct_label(rep: dict, opts: dict, scale: bool) -> str:
    """The reconstruction that ran: the prune report's ``reconstruct`` when it has one, else the
    method's ``reconstruct=`` option, else Scale on/off as "scale" / "none"."""
    r = rep.get("reconstruct")
    if isinstance(r, dict):
        r = r.get("method") or r.get("name")
    if r:
        return str(r)
    if opts.get("reconstruct"):
        return str(opts["reconstruct"])
    return "scale" if scale else "none"


def _one_run(
    prune_fn,
    clf: SentenceClassifier,
    task,
    pool,
    tokenizer,
    test_batches,
    dev,
    config,
    c,
    m: MethodSpec,
    s,
    seed,
    scored,
    memo_stats: dict | None = None,
    prune_cache: dict | None = None,
) -> dict:
    opts = dict(config.prune_options)
    opts.update(dict(m.options))
    labelled = needs_labels(m.name)
    if labelled:  # the TRAIN split's labelled examples, never the pool or the test split
        data = [e.text for e in task.train]
        opts["labels"] = [e.label for e in task.train]
    else:
        data = pool
    # reconstruct= supersedes the scale alias; the "default" row runs prune()'s own defaults
    if "reconstruct" not in opts and m.name != DEFAULT_SPEC:
        opts["scale"] = s
    if prune_cache is not None:
        opts.setdefault("cache", prune_cache)
    progress = config.prune_progress
    if progress is None:
        import sys

        progress = sys.stderr.isatty()
    before = dict(memo_stats or {})
    from kcm_cuda.pruning.options import nest_experimental

    opts = nest_experimental(opts)  # a spec's kcm:merge=... is prune(experimental={...})
    t0 = time.perf_counter()
    result = prune_fn(
        clf.model,
        data,
        c,
        method=None if m.name == DEFAULT_SPEC else m.name,
        tokenizer=tokenizer,
        samples=config.samples,
        max_length=config.max_length,
        seed=seed,
        device=dev,
        progress=progress,
        **opts,
    )
    prune_s = time.perf_counter() - t0
    digest = _masks_digest(result)
    rep = result.report or {}
    reused = sorted(
        k[: -len("_hits")]
        for k, v in (memo_stats or {}).items()
        if k.endswith("_hits") and v > before.get(k, 0)
    )
    reused += [f"{h} (prune cache)" for h in rep.get("cached_stages") or [] if h not in reused]
    run = {
        "budget": c,
        "method": m.label,
        "base_method": m.name,
        "options": dict(m.options),
        "scale": s,
        "reconstruct": _reconstruct_label(rep, opts, s),
        "uses_labels": bool(labelled or rep.get("uses_labels")),
        "seed": seed,
        "prune_seconds": prune_s,
        "prune_timings_s": rep.get("timings_s"),
        "reused_stages": reused,
        "flops_ratio": (rep.get("flops") or {}).get("ratio"),
        "kept_per_layer": rep.get("kept_per_layer"),
        "heads_kept_per_layer": rep.get("heads_kept_per_layer"),
        "structure": (rep.get("structure") or {}).get("chosen"),  # the search's choice
        "r2_iterations": rep.get("r2_iterations"),
        "mask_digest": digest,
    }
    if digest in scored:
        run["metrics"] = dict(scored[digest][0])
        run["_correct"] = scored[digest][1]
        run["_logits"] = scored[digest][2]
        run["eval_seconds"] = 0.0
        run["reused_eval"] = True
        return run
    pruned = SentenceClassifier(result.model.to(dev))
    t0 = time.perf_counter()
    logits = predict(pruned, test_batches, dev)
    run["eval_seconds"] = time.perf_counter() - t0
    run["metrics"] = split_metrics(task, logits, task.test)
    if task.kind == "classification":
        labels = np.array([int(e.label) for e in task.test])
        run["_correct"] = logits.argmax(axis=1) == labels
    run["_logits"] = logits
    scored[digest] = (run["metrics"], run.get("_correct"), logits)
    return run


def _fmt_metrics(m: dict) -> str:
    short = {
        "accuracy": "acc",
        "roc_auc": "auc",
        "positive_rate": "pos",
        "pearson": "pearson",
        "spearman": "spearman",
    }
    return " ".join(f"{short[k]} {v:.4f}" for k, v in m.items() if k in short)
