"""Planning of the evaluation grid: which methods exist and which need labels, method specs
(``name:key=value,...``), the grid's configuration and its (budget, method, Scale) cells, the
project's default method and reconstruction, the device. Running it: runner.py; scoring the
runs: scoring.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kcm_cuda.evaluation.finetune import FinetuneSettings

DEFAULT_BUDGETS = (0.8, 0.7, 0.6, 0.5)
ALL_METHODS = ("kcm", "r2", "d2", "magnitude", "random")
# methods known to need labels when the pruning registry (kcm_cuda.pruning.methods) is absent
LABEL_METHODS_FALLBACK = frozenset({"kwon"})


def _registry() -> dict | None:
    try:
        from kcm_cuda.pruning.methods import METHODS as registry  # noqa: N811
    except ImportError:
        return None
    return registry if isinstance(registry, dict) else None


def known_methods() -> tuple[str, ...]:
    """The method names prune() accepts (the registry's, else kcm_cuda.pruning.api.METHODS)."""
    reg = _registry()
    if reg is not None:
        return tuple(reg)
    try:
        from kcm_cuda.pruning.api import METHODS
    except ImportError:  # pragma: no cover - pruning layer missing
        return ALL_METHODS
    return tuple(METHODS)


def needs_labels(name: str) -> bool:
    """Whether method ``name`` selects with labels (registry ``needs_labels``)."""
    reg = _registry()
    if reg is not None and name in reg:
        return bool(getattr(reg[name], "needs_labels", False))
    return name in LABEL_METHODS_FALLBACK


def default_method() -> str:
    """The method prune() runs when neither the caller nor the structure search picks one."""
    try:
        from kcm_cuda.pruning.options import DEFAULT_METHOD
    except ImportError:  # pragma: no cover - pruning layer missing
        return "kcm"
    return DEFAULT_METHOD


# A grid row named "default" runs prune() exactly as a user who passes no method= does (the
# structure search, kcm_cuda.pruning.structure, then chooses the neuron score too).
DEFAULT_SPEC = "default"


def default_reconstruction(method: str | None = None) -> str | None:
    """The reconstruction prune() runs for ``method`` (default: the default method) with its
    default options."""
    try:
        from kcm_cuda.pruning.options import PruneOptions

        return PruneOptions(method=method or default_method()).reconstruction()
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class MethodSpec:
    """A method and its variant options, written ``name`` or ``name:key=value,key=value``
    (e.g. ``kcm:merge=weighted,r2_weight=0.25``, ``d2:d2_mode=energy``)."""

    name: str
    options: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options)


def _parse_value(v: str) -> object:
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def parse_method(spec: str | MethodSpec) -> MethodSpec:
    if isinstance(spec, MethodSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"method must be a non-empty string, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    known = known_methods()
    if name not in known and name not in LABEL_METHODS_FALLBACK and name != DEFAULT_SPEC:
        raise ValueError(f"unknown method {name!r} in {spec!r}; known: {list(known)}")
    opts = []
    if rest:
        for item in rest.split(","):
            k, eq, v = item.partition("=")
            if not eq or not k.strip():
                raise ValueError(f"method option {item!r} in {spec!r} is not key=value")
            opts.append((k.strip(), _parse_value(v.strip())))
    return MethodSpec(name, tuple(opts))


@dataclass
class GridConfig:
    task: str = "vader-movie"
    model: str | None = None  # None: the packaged all-MiniLM-L6-v2
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    methods: tuple[str, ...] = ALL_METHODS
    scales: tuple[bool, ...] = (False, True)
    seeds: int = 10
    samples: int = 2048
    max_length: int = 128
    device: str = "auto"
    cache_dir: str | None = None
    output: str = "out/accuracy"
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    prune_options: dict = field(default_factory=dict)  # passed to every prune() call
    # wall-clock budget of the whole run_grid (fine-tune included): no seed round is started
    # that would end past it, and no run is started once it has passed
    time_limit_s: float | None = None
    profile: str = "custom"
    save_predictions: bool = False  # write <output>/predictions.npz (per-run test logits)
    use_cache: bool = True  # reuse / store the fine-tuned model in <cache_dir>/finetuned
    resume: bool = False  # go on from <output>/runs.partial.jsonl of an interrupted grid
    eval_batch_size: int = 128
    # how the grid was sized (the cpu profile: cells, seeds and the time estimate), for the report
    plan: str | None = None
    prune_progress: bool | None = None  # prune stage bars; None: when stderr is a terminal

    def validate(self) -> None:
        if not self.budgets:
            raise ValueError("budgets must not be empty")
        for c in self.budgets:
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
                raise ValueError(f"every budget must be a FLOPs fraction in (0, 1], got {c!r}")
        if not self.methods:
            raise ValueError("methods must not be empty")
        _cells(self.budgets, [parse_method(m) for m in self.methods], self.scales or (False,))
        if not self.scales or any(not isinstance(s, bool) for s in self.scales):
            raise ValueError(f"scales must be a non-empty tuple of booleans, got {self.scales!r}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be an int >= 1, got {self.seeds!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be an int >= 1, got {self.samples!r}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError(f"time limit must be > 0, got {self.time_limit_s!r}")


def cpu_defaults() -> dict:
    """The grid that fits the 15-minute budget of `make run` on a 2-core CPU (see cli.py)."""
    return {
        "budgets": (0.7, 0.6),
        "methods": ("kcm", "d2", "r2", "magnitude", "random"),
        "scales": (False,),
        "seeds": 3,
        "samples": 512,
    }


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def _cells(budgets, methods: list[MethodSpec], scales) -> list[tuple]:
    """(budget, method, scale) cells. A method spec with its own ``scale=`` option (e.g.
    ``kcm:scale=true``) runs with that value only, whatever the grid's scales are."""
    out = []
    for c in budgets:
        for m in methods:
            opts = dict(m.options)
            if "scale" in opts:
                fixed = opts.pop("scale")
                fixed = {"on": True, "off": False}.get(fixed, fixed)
                if not isinstance(fixed, bool):
                    raise ValueError(f"method {m.label!r}: scale must be on/off or true/false")
                base = MethodSpec(m.name, tuple(opts.items()))
                if (c, base, fixed) not in out:
                    out.append((c, base, fixed))
                continue
            for s in scales:
                if (c, m, s) not in out:
                    out.append((c, m, s))
    return out


def model_label(model: str | None) -> str:
    return "all-MiniLM-L6-v2 (packaged)" if model in (None, "default") else str(model)
