"""``PruneOptions``: every option of :func:`kcm_cuda.prune`, validated in one place.

``PruneOptions(flops=0.6, method="kcm", ...)`` checks and normalises each field when it is
built (one clear ``TypeError`` / ``ValueError`` per bad value); the pipeline stages read the
result and never re-check. ``as_report()`` is the ``options`` block of the report.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields

from kcm_cuda.pruning.allocation import ALLOCATIONS
from kcm_cuda.pruning.d2 import D2_MODES
from kcm_cuda.pruning.flops import check_flops
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
class PruneOptions:
    """All options of ``prune()`` (see its docstring for each one's meaning)."""

    flops: float = 0.6
    method: str = DEFAULT_METHOD
    scale: bool = True
    reconstruct: str | None = None  # None: scale=True → the default, scale=False → "none"
    reconstruct_mode: str = "sequential"
    ridge_lambda: float = 0.01
    labels: Sequence | None = None
    # For labelled methods on an encoder without a task head: a callable (module or function)
    # mapping (last_hidden_state, attention_mask) to logits.
    classifier: object | None = None
    kwon_rearrange: bool = True  # kwon: mask rearrangement step
    kwon_tune: bool = True  # kwon: least-squares mask tuning step
    heads: bool = False
    head_split: str = "per_mac"  # heads=True: how the budget is split (heads.JOINT_SPLITS)
    head_score: str = "votes"  # heads=True: which heads (heads.HEAD_SCORES)
    min_heads: int = 1  # heads=True: heads kept per layer at least (>= 1)
    head_refit: bool = True  # heads=True: ridge refit of O's kept columns (with reconstruction)
    samples: int = 2048
    max_length: int = 128
    seed: int = 0
    backend: str = "auto"
    progress: bool = True
    batch_size: int = 32
    min_keep: int | float = 0.01
    merge: str = DEFAULT_MERGE
    r2_points: str = "output"
    r2_weight: float = 0.25
    merge_bins: int = 20
    d2_mode: str = "votes"
    d2_kcm_batches: int = 4
    sigma: float = 1.0
    alpha: float = 0.01
    max_iter: int = 100
    precision: str = "auto"  # "auto": tf32 on sm_80+ CUDA, ieee elsewhere
    scale_lambda: float = 0.01
    scale_samples: int = 256
    scale_retries: int = 2
    text_column: str | None = None
    text_pair_column: str | None = None
    allocation: str = "global"  # per-layer widths (kcm_cuda.pruning.allocation.ALLOCATIONS)
    r2_cache: bool | str | os.PathLike = True  # R2 scores on disk (kcm_cuda.pruning.r2_cache)

    def __post_init__(self) -> None:
        from kcm_cuda.pruning.methods import METHODS

        self.flops = check_flops(self.flops)
        self.method = check_choice("method", self.method, tuple(METHODS))
        self.scale = check_bool("scale", self.scale)
        if self.reconstruct is not None:
            self.reconstruct = check_choice("reconstruct", self.reconstruct, RECONSTRUCTIONS)
        self.reconstruct_mode = check_choice(
            "reconstruct_mode", self.reconstruct_mode, RECONSTRUCT_MODES
        )
        self.ridge_lambda = check_float("ridge_lambda", self.ridge_lambda, 0.0)
        if self.classifier is not None and not callable(self.classifier):
            raise TypeError(
                "classifier must be callable (last_hidden_state, attention_mask) -> logits, "
                f"got {type(self.classifier).__name__}"
            )
        self.kwon_rearrange = check_bool("kwon_rearrange", self.kwon_rearrange)
        self.kwon_tune = check_bool("kwon_tune", self.kwon_tune)
        self.heads = check_bool("heads", self.heads)
        from kcm_cuda.pruning.heads import HEAD_SCORES, JOINT_SPLITS

        self.head_split = check_choice("head_split", self.head_split, JOINT_SPLITS)
        self.head_score = check_choice("head_score", self.head_score, HEAD_SCORES)
        self.min_heads = check_int("min_heads", self.min_heads, 1)
        self.head_refit = check_bool("head_refit", self.head_refit)
        self.samples = check_int("samples", self.samples, 1)
        self.max_length = check_int("max_length", self.max_length, 2)
        self.seed = check_int("seed", self.seed, 0)
        self.batch_size = check_int("batch_size", self.batch_size, 1)
        self.merge = check_choice("merge", self.merge, MERGES)
        self.r2_points = check_choice("r2_points", self.r2_points, R2_POINTS)
        self.d2_mode = check_choice("d2_mode", self.d2_mode, D2_MODES)
        self.merge_bins = check_int("merge_bins", self.merge_bins, 1)
        self.d2_kcm_batches = check_int("d2_kcm_batches", self.d2_kcm_batches, 1)
        self.r2_weight = check_float("r2_weight", self.r2_weight, 0.0)
        if self.r2_weight > 1:
            raise ValueError(f"r2_weight must be in [0, 1], got {self.r2_weight}")
        if isinstance(self.sigma, str):
            self.sigma = check_choice("sigma", self.sigma, SIGMA_RULES)
        else:
            self.sigma = check_float("sigma", self.sigma, 0.0, lo_open=True)
        self.allocation = check_choice("allocation", self.allocation, ALLOCATIONS)
        resolve_r2_cache(self.r2_cache)  # type / emptiness check
        self.alpha = check_float("alpha", self.alpha, 0.0, lo_open=True)
        self.max_iter = check_int("max_iter", self.max_iter, 1)
        self.scale_lambda = check_float("scale_lambda", self.scale_lambda, 0.0)
        self.scale_samples = check_int("scale_samples", self.scale_samples, 1)
        self.scale_retries = check_int("scale_retries", self.scale_retries, 0)
        self.progress = bool(self.progress)
        lab = self.labels
        if lab is not None and (isinstance(lab, (str, bytes)) or not hasattr(lab, "__len__")):
            raise TypeError(f"labels must be a sequence (one per row), not {type(lab).__name__}")
        method = METHODS[self.method]
        if method.needs_labels and self.labels is None:
            raise ValueError(f"method {self.method!r} uses labels: pass labels= aligned with data")

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
        skip = {
            "flops",
            "method",
            "scale",
            "labels",
            "classifier",
            "progress",
            "text_column",
            "text_pair_column",
        }
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out["labels"] = None if self.labels is None else len(self.labels)
        if isinstance(self.r2_cache, os.PathLike):
            out["r2_cache"] = str(self.r2_cache)
        out["classifier"] = None if self.classifier is None else type(self.classifier).__name__
        return out
