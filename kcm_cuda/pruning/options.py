"""``PruneOptions``: every option of :func:`kcm_cuda.prune`, validated in one place.

``PruneOptions(flops=0.6, method="kcm", ...)`` checks and normalises each field when it is
built (one clear ``TypeError`` / ``ValueError`` per bad value); the pipeline stages read the
result and never re-check. ``as_report()`` is the ``options`` block of the report.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from kcm_cuda.pruning.allocation import ALLOCATIONS
from kcm_cuda.pruning.d2 import D2_MODES
from kcm_cuda.pruning.flops import check_flops
from kcm_cuda.pruning.layout import LAYOUTS
from kcm_cuda.pruning.merge import DEFAULT_MERGE, MERGES
from kcm_cuda.pruning.r2 import R2_POINTS, SIGMA_RULES
from kcm_cuda.pruning.r2_cache import resolve_r2_cache

# Reconstruction variants (kcm_cuda.pruning.reconstruct) and their modes.
RECONSTRUCTIONS = ("none", "bias", "scale", "ridge")
RECONSTRUCT_MODES = ("sequential", "oneshot")
# The default pipeline (measured, docs/RESULTS.md): FLAP's
# selection (standardised fluctuation, one global sort) with the ridge refit of W2 and b2.
DEFAULT_METHOD = "flap"
# What scale=True (and reconstruct=None) runs, unless the method names its own default.
DEFAULT_RECONSTRUCTION = "ridge"


def check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def check_float(name: str, value: object, lo: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < lo or (lo_open and v == lo):
        op = ">" if lo_open else ">="
        raise ValueError(f"{name} must be a finite number {op} {lo}, got {value!r}")
    return v


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


@dataclass
class ExperimentalOptions:
    """Variants kept for the paper's pipeline (``method="kcm_paper"``) and for research: each
    was measured and none beat the defaults (docs/RESULTS.md). Passed to ``prune()`` as
    ``experimental={"merge": "weighted", ...}`` (or an ``ExperimentalOptions``)."""

    reconstruct_mode: str = "sequential"  # or "oneshot": refit on the teacher's inputs
    merge: str = DEFAULT_MERGE  # R2D2 merge (kcm_cuda.pruning.merge.MERGES)
    r2_points: str = "output"  # R2's points: "output" (W2 columns) or "input" ([W1 rows, b1])
    r2_weight: float = 0.25  # merge="weighted": R2's weight
    merge_bins: int = 20  # merge="r2_within_d2": bins
    d2_mode: str = "votes"  # "votes", "energy", "kcm" (R2 on the first batches' activations)
    d2_kcm_batches: int = 4  # d2_mode="kcm": batches
    sigma: float | str = 1.0  # the RBF kernel's width, or "median" (per layer)
    alpha: float = 0.01  # the convex solver's step
    max_iter: int = 100  # the convex solver's iterations
    scale_lambda: float = 0.01  # Scale: ridge towards m = 1 (relative to the mean diagonal)
    scale_retries: int = 2  # Scale: solves with λ × 10 before a layer falls back to m = 1
    head_split: str = "per_mac"  # heads=True: how the budget is split (heads.JOINT_SPLITS)
    head_score: str = "votes"  # heads=True: which heads (heads.HEAD_SCORES)
    head_refit: bool = True  # heads=True: ridge refit of O's kept columns (with reconstruction)
    # heads=True on grouped-query decoders: remove the same number of query heads from every
    # group ("per_group": lower perplexity than whole groups on the small LM, 1 seed,
    # benchmarks/results/cpu-amd-epyc/lm_gqa_heads) or whole KV groups ("groups")
    gqa_heads: str = "per_group"
    kwon_rearrange: bool = True  # kwon: mask rearrangement step
    kwon_tune: bool = True  # kwon: least-squares mask tuning step
    # structure="search": the candidates are judged by K-fold cross-fitting on the calibration
    # rows themselves (each judged row by a one-shot refit fitted without its fold; the model
    # returned is fitted on every row). 0: the search of before, on ``search_rows`` unlabeled
    # rows held out from the calibration sample (drawn beside it, or split off it when data
    # is short), which the returned model is not fitted on
    search_folds: int = 4
    search_rows: int = 128
    # structure="search", held-out mode only: how many of the best candidates by the one-shot
    # proxy are built with both refits (one-shot, sequential) before the criterion picks
    search_finalists: int = 1
    # structure="search": a simpler structure (fewer parts away from FFN-only / uniform widths /
    # the first score) within this many paired standard errors of the lowest criterion is
    # kept instead (0: always the lowest)
    search_tie_se: float = 1.0
    # the FFN refit's bias change (b2 / down_proj): None = where the family's class holds one
    # (not Mistral / Qwen2: the weights alone, measured as good; kcm_cuda.pruning.layout.
    # refit_bias); True / False force it (True on Mistral / Qwen2: kcm_mlp_bias, load_pruned only)
    refit_bias: bool | None = None

    def __post_init__(self) -> None:
        from kcm_cuda.pruning.heads import GQA_STRUCTURES, HEAD_SCORES, JOINT_SPLITS

        self.reconstruct_mode = check_choice(
            "reconstruct_mode", self.reconstruct_mode, RECONSTRUCT_MODES
        )
        self.merge = check_choice("merge", self.merge, MERGES)
        self.r2_points = check_choice("r2_points", self.r2_points, R2_POINTS)
        self.r2_weight = check_float("r2_weight", self.r2_weight, 0.0)
        if self.r2_weight > 1:
            raise ValueError(f"r2_weight must be in [0, 1], got {self.r2_weight}")
        self.merge_bins = check_int("merge_bins", self.merge_bins, 1)
        self.d2_mode = check_choice("d2_mode", self.d2_mode, D2_MODES)
        self.d2_kcm_batches = check_int("d2_kcm_batches", self.d2_kcm_batches, 1)
        if isinstance(self.sigma, str):
            self.sigma = check_choice("sigma", self.sigma, SIGMA_RULES)
        else:
            self.sigma = check_float("sigma", self.sigma, 0.0, lo_open=True)
        self.alpha = check_float("alpha", self.alpha, 0.0, lo_open=True)
        self.max_iter = check_int("max_iter", self.max_iter, 1)
        self.scale_lambda = check_float("scale_lambda", self.scale_lambda, 0.0)
        self.scale_retries = check_int("scale_retries", self.scale_retries, 0)
        self.head_split = check_choice("head_split", self.head_split, JOINT_SPLITS)
        self.head_score = check_choice("head_score", self.head_score, HEAD_SCORES)
        self.head_refit = check_bool("head_refit", self.head_refit)
        self.gqa_heads = check_choice("gqa_heads", self.gqa_heads, GQA_STRUCTURES)
        self.kwon_rearrange = check_bool("kwon_rearrange", self.kwon_rearrange)
        self.kwon_tune = check_bool("kwon_tune", self.kwon_tune)
        self.search_folds = check_int("search_folds", self.search_folds, 0)
        if self.search_folds == 1:
            raise ValueError("search_folds must be 0 (held-out rows) or at least 2, got 1")
        self.search_rows = check_int("search_rows", self.search_rows, 8)
        self.search_tie_se = check_float("search_tie_se", self.search_tie_se, 0.0)
        self.search_finalists = check_int("search_finalists", self.search_finalists, 1)
        if self.refit_bias is not None:
            self.refit_bias = check_bool("refit_bias", self.refit_bias)

    @classmethod
    def from_value(cls, value: object) -> ExperimentalOptions:
        """``None`` (the defaults), a dict of its fields, or an ``ExperimentalOptions``."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return cls(**{f.name: getattr(value, f.name) for f in fields(cls)})
        if not isinstance(value, Mapping):
            raise TypeError(
                "experimental must be a dict of experimental options or an ExperimentalOptions, "
                f"got {type(value).__name__}"
            )
        unknown = sorted(set(value) - EXPERIMENTAL_NAMES)
        if unknown:
            raise TypeError(
                f"unknown experimental option(s) {unknown}; known: {sorted(EXPERIMENTAL_NAMES)}"
            )
        return cls(**value)

    def changed(self) -> dict:
        """The fields that differ from their defaults."""
        base = ExperimentalOptions()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(base, f.name)
        }


EXPERIMENTAL_NAMES = frozenset(f.name for f in fields(ExperimentalOptions))


# heads="auto" prunes heads at this budget and below (with the ridge refit). On MiniLM (3 seeds,
# benchmarks/results/cpu-amd-epyc/accuracy) heads + neurons vs neurons only, both uniform:
# -0.0 / +0.4 / +0.2 / -0.0 / +2.0 pt at c = 0.8 / 0.7 / 0.6 / 0.5 / 0.4 (SE 0.3-0.5), and only
# heads reach below the attention floor (c = 0.3: 81.4 %); at 0.8 they gain nothing for a slower
# prune. On the small LM at c = 0.5: perplexity 106.8 against 115.5 (1 seed).
HEADS_AUTO_MAX_FLOPS = 0.7
# structure=: "search" (default) measures the structure left open (heads=, allocation=,
# method= not given) on held-out unlabeled rows (kcm_cuda.pruning.structure); "fixed" applies
# the rules above (uniform widths under the ridge refit, heads at flops <= 0.7, flap)
STRUCTURES = ("search", "fixed")


@dataclass
class PruneOptions:
    """The options of ``prune()`` (see its docstring for each one's meaning); research
    variants are in ``experimental`` (:class:`ExperimentalOptions`)."""

    flops: float = 0.6
    method: str | None = None  # None: DEFAULT_METHOD, or the structure search's choice
    scale: bool = True
    reconstruct: str | None = None  # None: scale=True → the default, scale=False → "none"
    ridge_lambda: float = 0.01
    labels: Sequence | None = None
    # For labelled methods on an encoder without a task head: a callable (module or function)
    # mapping (last_hidden_state, attention_mask) to logits.
    classifier: object | None = None
    # True / False, or "auto": heads and neurons under one budget when the ridge refit runs and
    # flops <= HEADS_AUTO_MAX_FLOPS (measured: benchmarks/results/cpu-amd-epyc/accuracy), FFN
    # neurons only otherwise
    heads: bool | str = "auto"
    min_heads: int = 1  # heads=True: heads kept per layer at least (>= 1)
    samples: int = 512  # calibration sentences: 512 lost nothing against 2048 (RESULTS.md)
    max_length: int = 128
    seed: int = 0
    backend: str = "auto"
    progress: bool = True
    batch_size: int = 32
    min_keep: int | float = 0.01
    precision: str = "auto"  # "auto": tf32 on sm_80+ CUDA, ieee elsewhere
    # sequences the reconstruction reads (None: every calibration sequence, ``samples``)
    scale_samples: int | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    # per-layer widths (kcm_cuda.pruning.allocation.ALLOCATIONS); "auto": "uniform" under the
    # ridge refit (measured: allocation_with_ridge_*), the method's own "global" otherwise
    allocation: str = "auto"
    r2_cache: bool | str | os.PathLike = True  # R2 scores on disk (kcm_cuda.pruning.r2_cache)
    structure: str = "search"  # STRUCTURES: measure what heads= / allocation= / method= leave open
    # LAYOUTS: "per_layer" widths and heads, or "standard" (every layer alike: an ordinary
    # checkpoint of its architecture, kcm_cuda.pruning.layout)
    layout: str = "per_layer"
    experimental: ExperimentalOptions | Mapping | None = None

    def __post_init__(self) -> None:
        from kcm_cuda.pruning.methods import METHODS

        self.flops = check_flops(self.flops)
        # not fields: what the caller left open (the structure search may choose it)
        self.method_given = self.method is not None
        self.allocation_given = self.allocation != "auto"
        if self.method is None:
            self.method = DEFAULT_METHOD
        self.method = check_choice("method", self.method, tuple(METHODS))
        self.structure = check_choice("structure", self.structure, STRUCTURES)
        self.layout = check_choice("layout", self.layout, LAYOUTS)
        self.scale = check_bool("scale", self.scale)
        if self.reconstruct is not None:
            self.reconstruct = check_choice("reconstruct", self.reconstruct, RECONSTRUCTIONS)
        self.ridge_lambda = check_float("ridge_lambda", self.ridge_lambda, 0.0)
        if self.classifier is not None and not callable(self.classifier):
            raise TypeError(
                "classifier must be callable (last_hidden_state, attention_mask) -> logits, "
                f"got {type(self.classifier).__name__}"
            )
        if self.heads != "auto":
            self.heads = check_bool("heads", self.heads)
        self.min_heads = check_int("min_heads", self.min_heads, 1)
        self.samples = check_int("samples", self.samples, 1)
        self.max_length = check_int("max_length", self.max_length, 2)
        self.seed = check_int("seed", self.seed, 0)
        self.batch_size = check_int("batch_size", self.batch_size, 1)
        self.allocation = check_choice("allocation", self.allocation, ("auto", *ALLOCATIONS))
        resolve_r2_cache(self.r2_cache)  # type / emptiness check
        if self.scale_samples is not None:
            self.scale_samples = check_int("scale_samples", self.scale_samples, 1)
        self.progress = bool(self.progress)
        self.experimental = ExperimentalOptions.from_value(self.experimental)
        lab = self.labels
        if lab is not None and (isinstance(lab, (str, bytes)) or not hasattr(lab, "__len__")):
            raise TypeError(f"labels must be a sequence (one per row), not {type(lab).__name__}")
        method = METHODS[self.method]
        if method.needs_labels and self.labels is None:
            raise ValueError(f"method {self.method!r} uses labels: pass labels= aligned with data")
        ridge = self.reconstruction() == "ridge"
        if self.allocation == "auto":
            self.allocation = "uniform" if ridge else "global"
        self.heads_auto = self.heads == "auto"  # not a field: whether heads= was left to us
        if self.heads_auto:
            self.heads = bool(
                ridge and self.flops <= HEADS_AUTO_MAX_FLOPS and not method.selects_heads
            )

    @classmethod
    def from_call(cls, flops: object, options: Mapping) -> PruneOptions:
        """``prune(model, data, flops, **options)``'s options. An experimental option given
        flat (``merge="weighted"``, as before it moved) still works, with a FutureWarning that
        names its new place; an unknown name is a TypeError listing the known ones."""
        flat = dict(options)
        moved = sorted(set(flat) & EXPERIMENTAL_NAMES)
        unknown = sorted(set(flat) - OPTION_NAMES - EXPERIMENTAL_NAMES)
        if unknown:
            raise TypeError(
                f"prune() got unknown option(s) {unknown}; known: {sorted(OPTION_NAMES)}, "
                f"and in experimental={{...}}: {sorted(EXPERIMENTAL_NAMES)}"
            )
        if moved:
            import warnings

            warnings.warn(
                f"prune({', '.join(f'{n}=' for n in moved)}...) is an experimental option now: "
                f"pass experimental={{{', '.join(repr(n) + ': ...' for n in moved)}}}",
                FutureWarning,
                stacklevel=3,
            )
            flat = nest_experimental(flat)
        return cls(flops=flops, **flat)

    def reconstruction(self) -> str:
        """The reconstruction that runs: ``reconstruct`` when given, otherwise the method's
        (or the global) default when ``scale`` is True, else "none"."""
        if self.reconstruct is not None:
            return self.reconstruct
        if not self.scale:
            return "none"
        from kcm_cuda.pruning.methods import METHODS

        return METHODS[self.method].default_reconstruct or DEFAULT_RECONSTRUCTION

    def as_report(self) -> dict:
        """The report's ``options`` block: the public options flat, the experimental ones under
        ``"experimental"`` (all of them: a report says exactly what ran)."""
        skip = {
            "flops",
            "method",
            "scale",
            "labels",
            "classifier",
            "progress",
            "text_column",
            "text_pair_column",
            "experimental",
        }
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out["labels"] = None if self.labels is None else len(self.labels)
        if isinstance(self.r2_cache, os.PathLike):
            out["r2_cache"] = str(self.r2_cache)
        out["classifier"] = None if self.classifier is None else type(self.classifier).__name__
        exp = self.experimental
        out["experimental"] = {f.name: getattr(exp, f.name) for f in fields(exp)}
        return out


OPTION_NAMES = frozenset(f.name for f in fields(PruneOptions)) - {"flops"}


def report_options(options: Mapping) -> dict:
    """A report's ``options`` block in the current layout: one written before the experimental
    options moved (all of them flat) gets them under ``"experimental"``."""
    out = dict(options)
    exp = dict(out.get("experimental") or {})
    for name in EXPERIMENTAL_NAMES & set(out):
        exp.setdefault(name, out.pop(name))
    out["experimental"] = exp
    return out


def nest_experimental(options: Mapping) -> dict:
    """``options`` for ``prune()`` with any experimental option given flat (a grid's method
    spec such as ``kcm:merge=weighted``) moved into ``experimental`` (no warning: the caller
    speaks for its user)."""
    out = dict(options)
    moved = EXPERIMENTAL_NAMES & set(out)
    if not moved:
        return out
    given = out.get("experimental")
    exp = ExperimentalOptions.from_value(given).changed() if given else {}
    for name in moved:
        exp[name] = out.pop(name)
    out["experimental"] = exp
    return out
