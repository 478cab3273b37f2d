"""R2 scores cached on disk, by default.

R2 depends on neither the data nor the FLOPs budget: only on the points it reads from the
weights (W2's columns, or [W1 | b1]'s rows) and on its own options (points, sigma, alpha,
max_iter, precision, backend). So its scores are stored once per (fingerprint of those
points, options) and every later ``prune()`` of the same model reuses them, in any process.

Where: ``$KCM_CUDA_CACHE/r2/`` when that variable is set, else ``~/.cache/kcm_cuda/r2/``, or
the directory given as ``prune(..., r2_cache=PATH)``; ``r2_cache=False`` turns it off.
One small file per entry (``<key>.pt``: float64 scores per layer, solver iterations),
written atomically (temp file + rename), so concurrent runs never read half a file. Safe to
delete at any time. An unreadable or inconsistent entry is recomputed and rewritten, with a
warning; an unwritable directory only costs the reuse (a warning, the scores are still
returned).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from kcm_cuda.pruning.cache import fingerprint

FORMAT = 1


def r2_cache_dir_from_env() -> Path:
    """``$KCM_CUDA_CACHE/r2`` when the variable is set, else ``~/.cache/kcm_cuda/r2``."""
    env = os.environ.get("KCM_CUDA_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "kcm_cuda"
    return root / "r2"


def default_r2_cache_dir() -> Path:
    """Where ``r2_cache=True`` stores entries (the test suite points it at a temp dir)."""
    return r2_cache_dir_from_env()


def resolve_r2_cache(r2_cache: object) -> Path | None:
    """``True`` → the default directory, ``False`` → None (off), a str / PathLike → itself."""
    if r2_cache is True:
        return default_r2_cache_dir()
    if r2_cache is False or r2_cache is None:
        return None
    if isinstance(r2_cache, (str, os.PathLike)):
        if str(r2_cache) == "":
            raise ValueError("r2_cache must be True, False or a directory, got ''")
        return Path(r2_cache).expanduser()
    raise TypeError(
        f"r2_cache must be True, False or a directory path, got {type(r2_cache).__name__}"
    )


def r2_key(point_sets: Sequence[torch.Tensor], options: dict) -> str:
    """Hex key of (the points of every layer, R2's options, the file format)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(fingerprint(point_sets).encode())
    h.update(json.dumps({**options, "format": FORMAT}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _problem(entry: object, key: str, sizes: list[int]) -> str | None:
    if not isinstance(entry, dict):
        return f"not a dict but {type(entry).__name__}"
    if entry.get("format") != FORMAT or entry.get("key") != key:
        return "format or key mismatch"
    scores, iters = entry.get("scores"), entry.get("iters")
    if not isinstance(scores, list) or not isinstance(iters, list):
        return "scores / iterations missing"
    if len(scores) != len(sizes) or len(iters) != len(sizes):
        return f"{len(scores)} layers stored, {len(sizes)} expected"
    for s, n in zip(scores, sizes, strict=True):
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (n,):
            return "a layer's scores have the wrong shape"
        if not bool(torch.isfinite(s).all()):
            return "non-finite scores"
    if not all(isinstance(i, int) for i in iters):
        return "iterations are not integers"
    return None


def load_r2(directory: Path, key: str, sizes: list[int]):
    """(scores, iterations) of a valid entry, else None (a corrupt one warns)."""
    path = directory / f"{key}.pt"
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        problem = _problem(entry, key, sizes)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a cache miss
        problem = f"{type(exc).__name__}: {str(exc)[:200]}"
    if problem is not None:
        warnings.warn(
            f"R2 cache entry {path} is unusable ({problem}); recomputing it", stacklevel=3
        )
        return None
    return [s.double() for s in entry["scores"]], list(entry["iters"])


def store_r2(directory: Path, key: str, scores: list[torch.Tensor], iters: list[int]) -> bool:
    """Write the entry atomically; False (and a warning) when the directory is unwritable."""
    entry = {
        "format": FORMAT,
        "key": key,
        "scores": [s.detach().double().cpu().contiguous() for s in scores],
        "iters": [int(i) for i in iters],
    }
    tmp = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(entry, f)
        os.replace(tmp, directory / f"{key}.pt")
        return True
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        warnings.warn(
            f"could not write the R2 cache in {directory} ({exc}); the scores are not reused",
            stacklevel=3,
        )
        return False


def cached_r2_scores(
    model: torch.nn.Module,
    adapter,
    directory: Path | None,
    compute,
    *,
    points: str,
    sigma: float | str,
    alpha: float,
    max_iter: int,
    precision: str,
    backend_name: str | None,
) -> tuple[list[torch.Tensor], list[int], bool]:
    """(scores, iterations, hit): from ``directory`` when a valid entry exists, else
    ``compute()`` (which returns (scores, iterations)) and store it. ``directory`` None:
    always compute."""
    if directory is None:
        scores, iters = compute()
        return scores, iters, False
    from kcm_cuda.pruning.blockwise import map_blocks
    from kcm_cuda.pruning.r2 import neuron_points

    point_sets = map_blocks(model, adapter, lambda b: neuron_points(adapter, b, points))
    key = r2_key(
        point_sets,
        dict(
            points=points,
            sigma=sigma,
            alpha=alpha,
            max_iter=max_iter,
            precision=precision,
            backend=backend_name,
        ),
    )
    sizes = adapter.intermediate_sizes(model)
    hit = load_r2(directory, key, sizes)
    if hit is not None:
        return hit[0], hit[1], True
    scores, iters = compute()
    store_r2(directory, key, scores, iters)
    return scores, iters, False
