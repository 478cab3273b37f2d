"""tqdm progress bars that can be switched off (progress=False) and write to stderr."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress_bar(
    it: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True, **kw
) -> Iterable[T]:
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but never fail a prune for a progress bar
        return it
    return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True, **kw)
