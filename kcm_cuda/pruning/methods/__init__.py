"""Selection methods, one file each. ``METHODS``: name → instance (the registry ``prune()``,
the command lines and the options use). Add a method: write ``methods/<name>.py`` with a
:class:`~kcm_cuda.pruning.methods.base.Method` subclass and register it here."""

from __future__ import annotations

from kcm_cuda.pruning.methods.base import Method, ScoreMethod, Selection, topk_selection
from kcm_cuda.pruning.methods.d2 import D2
from kcm_cuda.pruning.methods.flap import FLAP
from kcm_cuda.pruning.methods.kcm import KCM
from kcm_cuda.pruning.methods.kcm_paper import KCMPaper
from kcm_cuda.pruning.methods.kwon import Kwon
from kcm_cuda.pruning.methods.magnitude import Magnitude
from kcm_cuda.pruning.methods.obs import OBS
from kcm_cuda.pruning.methods.r2 import R2
from kcm_cuda.pruning.methods.random import Random
from kcm_cuda.pruning.methods.wanda_sp import WandaSP

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        KCM(), R2(), D2(), Magnitude(), Random(), FLAP(), WandaSP(), KCMPaper(), Kwon(), OBS()
    )  # fmt: skip
}

__all__ = ["METHODS", "Method", "ScoreMethod", "Selection", "topk_selection"]
