"""``PruneContext``: everything a method may look at, built once per ``prune()`` call.

Built by :func:`build_context` (the "data" stage: device, backend, token sample, FLOPs model,
neuron budget, the unpruned teacher copy). The expensive statistics are computed lazily, on
first use, and memoised (also across calls, through the ``cache=`` dict of ``prune()``):
``activation_stats()`` (one forward pass with hooks), ``d2()``, ``r2()`` and ``head_stats()``;
the passes themselves are called through kcm_cuda.pruning.stages.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from kcm_cuda.dispatch import resolve_backend
from kcm_cuda.pruning import stages
from kcm_cuda.pruning.adapters import FFNAdapter
from kcm_cuda.pruning.blockwise import is_offloaded, map_blocks
from kcm_cuda.pruning.cache import fingerprint, model_fingerprint
from kcm_cuda.pruning.d2 import D2Result, d2_scores
from kcm_cuda.pruning.data import TokenizedSample, prepare_sample
from kcm_cuda.pruning.flops import FlopsModel
from kcm_cuda.pruning.heads import HeadEnergyRecorder, HeadStats, proportional_split
from kcm_cuda.pruning.masks import resolve_min_keep, width_quotas
from kcm_cuda.pruning.options import PruneOptions
from kcm_cuda.pruning.r2_cache import cached_r2_scores, resolve_r2_cache


@dataclass
class PruneContext:
    model: nn.Module  # the caller's model (never modified)
    teacher: nn.Module  # an eval-mode copy on ``device``, FFN chunking off
    adapter: FFNAdapter
    options: PruneOptions
    sample: TokenizedSample
    device: torch.device
    backend_name: str | None  # the resolved kernel backend (None: the method uses no kernel)
    fm: FlopsModel
    k_total: int  # FFN neurons kept in total (the FLOPs budget)
    keep_min: list[int]  # per layer, at least
    quotas: list[int]  # per layer, the budget's width-proportional share (D2 votes)
    sizes: list[int]  # per layer, FFN neurons before pruning
    w2_norms: list[torch.Tensor]  # per layer, ||W2[:, i]||
    tokenizer: object | None = None
    labels: object | None = None
    chunking: int = 0  # the model's feed-forward chunk size (restored on the pruned copy)
    cache: dict | None = None
    cache_hits: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    r2_iterations: list[int] | None = None
    head_plan: object | None = None  # heads=True: heads.HeadPlan (set by heads.plan_heads)
    d2_kcm_iterations: list[list[int]] | None = None
    r2_disk: dict | None = None  # R2's on-disk cache: its directory and whether it was a hit
    # the structure search (structure.py): unlabeled rows held out from the sample (its
    # held-out mode only), and the methods whose error-allocation curves the activation pass
    # computes layer by layer (the search's candidates with allocation="error")
    heldout: TokenizedSample | None = None
    curve_methods: tuple[str, ...] = ()
    _memo: dict = field(default_factory=dict, repr=False)

    # -- lazily computed statistics ------------------------------------------------------
    def gram_plan(self) -> tuple[bool, tuple[str, ...], bool]:
        """What the activation pass does with each layer's activation Gram: (keep every
        layer's Gram, the methods whose error curves it computes from the Gram of the layer
        at hand, whether those curves are centred). A method whose within-layer order needs
        more than one layer's statistics, or ``method="obs"``, keeps every Gram."""
        from kcm_cuda.pruning.allocation import CENTERED_RECONSTRUCTIONS
        from kcm_cuda.pruning.methods import METHODS

        o = self.options
        methods = set(self.curve_methods)
        if o.allocation == "error":
            methods.add(o.method)
        layer_local = {m for m in methods if _layer_local(METHODS[m])}
        keep = bool(METHODS[o.method].needs_grams or methods - layer_local)
        centered = o.reconstruction() in CENTERED_RECONSTRUCTIONS
        return keep, tuple(sorted(layer_local)), centered

    def _on_gram(self, methods: tuple[str, ...], centered: bool):
        """The activation pass's per-layer Gram consumer: each method's error curve."""
        from kcm_cuda.pruning.activations import token_means
        from kcm_cuda.pruning.allocation import curve_key, layer_error_curve
        from kcm_cuda.pruning.methods import METHODS

        def on_gram(layer, gram, input_sq, one, block):
            n = one.n_tokens
            w2 = self.adapter.w2(block).weight
            out = {}
            for m in methods:
                scores = METHODS[m].layer_scores(one, [self.w2_norms[layer]])[0]
                out[curve_key(m, centered)] = layer_error_curve(
                    scores, gram, token_means(one)[0], n, w2, input_sq / max(n, 1),
                    centered=centered,
                )
            return out

        return on_gram

    def _model_fp(self) -> str | None:
        """The weights' fingerprint (None for a model with offloaded weights: not memoised)."""
        if "model_fp" not in self._memo:
            offloaded = any(p.device.type == "meta" for p in self.teacher.parameters())
            self._memo["model_fp"] = None if offloaded else model_fingerprint(self.teacher)
        return self._memo["model_fp"]

    def activation_stats(self):
        """Per layer and batch Σ_tokens a_i² of the teacher (plus, with d2_mode="kcm", the
        diag(C) of the first batches); timed as "activations"."""
        if "stats" in self._memo:
            return self._memo["stats"]
        o = self.options
        t0 = time.perf_counter()
        key = None
        if self.cache is not None and self._model_fp() is not None:
            sample_fp = fingerprint([self.sample.input_ids, self.sample.attention_mask])
            key = ("activations", self._model_fp(), sample_fp, o.batch_size)
            keep, curves, centered = self.gram_plan()
            if keep or curves:
                key += ("grams", keep, curves, centered)
            if o.experimental.d2_mode == "kcm":
                key += (
                    o.experimental.d2_kcm_batches,
                    o.experimental.sigma,
                    o.experimental.alpha,
                    o.experimental.max_iter,
                    o.precision,
                )
                key += (self.backend_name,)
        if key is not None and key in self.cache:
            stats = self.cache[key]
            self.cache_hits.append("activations")
        else:
            stats = stages.collect_activation_stats(
                self.teacher,
                self.adapter,
                self.sample,
                batch_size=o.batch_size,
                device=self.device,
                progress=o.progress,
                kcm_batches=o.experimental.d2_kcm_batches if o.experimental.d2_mode == "kcm" else 0,
                kcm_options=dict(
                    sigma=o.experimental.sigma,
                    alpha=o.experimental.alpha,
                    max_iter=o.experimental.max_iter,
                    precision=o.precision,
                    backend=o.backend,
                ),
                **self._gram_options(),
            )
            if key is not None:
                self.cache[key] = stats
        if stats.kcm_iterations is not None:
            self.d2_kcm_iterations = stats.kcm_iterations
        self._memo["stats"] = stats
        self.timings["activations"] = self.timings.get("activations", 0.0)
        self.timings["activations"] += time.perf_counter() - t0
        return stats

    def _gram_options(self) -> dict:
        keep, curves, centered = self.gram_plan()
        out: dict = {"grams": True} if keep else {}
        if curves:
            out["on_gram"] = self._on_gram(curves, centered)
        return out

    def d2(self) -> D2Result:
        if "d2" not in self._memo:
            stats = self.activation_stats()
            t0 = time.perf_counter()
            self._memo["d2"] = d2_scores(
                stats, self.w2_norms, self.quotas, self.options.experimental.d2_mode
            )
            self.timings["activations"] += time.perf_counter() - t0
        return self._memo["d2"]

    def r2(self) -> list[torch.Tensor]:
        """S_R2 per layer (float64); timed as "r2"."""
        if "r2" in self._memo:
            return self._memo["r2"]
        o = self.options
        t0 = time.perf_counter()
        key = None
        if self.cache is not None and self._model_fp() is not None:
            key = (
                "r2",
                self._model_fp(),
                o.experimental.r2_points,
                o.experimental.sigma,
                o.experimental.alpha,
                o.experimental.max_iter,
            )
            key += (o.precision, self.backend_name)
        if key is not None and key in self.cache:
            r2, iters = self.cache[key]
            self.cache_hits.append("r2")
        else:

            def compute():
                return stages.r2_scores(
                    self.teacher,
                    self.adapter,
                    points=o.experimental.r2_points,
                    sigma=o.experimental.sigma,
                    alpha=o.experimental.alpha,
                    max_iter=o.experimental.max_iter,
                    precision=o.precision,
                    backend=o.backend,
                    device=self.device,
                    progress=o.progress,
                )

            directory = resolve_r2_cache(o.r2_cache)
            r2, iters, on_disk = cached_r2_scores(
                self.teacher,
                self.adapter,
                directory,
                compute,
                points=o.experimental.r2_points,
                sigma=o.experimental.sigma,
                alpha=o.experimental.alpha,
                max_iter=o.experimental.max_iter,
                precision=o.precision,
                backend_name=self.backend_name,
            )
            self.r2_disk = {
                "dir": None if directory is None else str(directory),
                "hit": on_disk,
            }
            if key is not None:
                self.cache[key] = (r2, iters)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.r2_iterations = iters
        self._memo["r2"] = r2
        self.timings["r2"] = time.perf_counter() - t0
        return r2

    def head_stats(self) -> HeadStats:
        """The teacher's head energies on the sample (memoised; in ``cache`` when given):
        recorded during the D2 activation pass when that pass still has to run, else one pass
        of their own; timed as "head_energies"."""
        if "head_stats" in self._memo:
            return self._memo["head_stats"]
        o = self.options
        key = None
        if self.cache is not None:
            sample_fp = fingerprint([self.sample.input_ids, self.sample.attention_mask])
            key = ("head_stats", self._model_fp(), sample_fp, o.batch_size)
            if key in self.cache:
                self.cache_hits.append("head_stats")
                self._memo["head_stats"] = self.cache[key]
                return self.cache[key]
        stats = None
        if "stats" not in self._memo:
            rec = HeadEnergyRecorder(self.teacher, self.adapter)
            try:
                self.activation_stats()
            finally:
                shared = rec.detach()
            if shared.n_batches == self.sample.n_batches(o.batch_size):
                stats = shared
        if stats is None:
            t0 = time.perf_counter()
            stats = stages.collect_head_stats(
                self.teacher,
                self.adapter,
                self.sample,
                batch_size=o.batch_size,
                device=self.device,
                progress=o.progress,
            )
            self.timings["head_energies"] = time.perf_counter() - t0
        if key is not None:
            self.cache[key] = stats
        self._memo["head_stats"] = stats
        return stats


def _layer_local(method) -> bool:
    """Whether ``method``'s within-layer order comes from one layer's statistics alone."""
    from kcm_cuda.pruning.methods.base import ScoreMethod

    if not isinstance(method, ScoreMethod):
        return False
    return type(method).layer_scores is not ScoreMethod.layer_scores


# -- the data stage -------------------------------------------------------------------------
def ffn_flops_model(model: nn.Module, adapter: FFNAdapter, seq_len: float, sizes) -> FlopsModel:
    """The FFN-only FLOPs model of ``model`` (decoders: gated MLP, GQA, causal attention, the
    LM head reported beside the budget)."""
    cfg = model.config
    d = adapter.hidden_size(cfg)
    if not adapter.causal:
        return FlopsModel(seq_len, d, tuple(sizes))
    d_h = adapter.head_size(cfg)
    h, h_kv = adapter.num_heads(cfg), adapter.num_kv_heads(cfg)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = int(getattr(out, "out_features", 0) or 0)
    return FlopsModel(
        seq_len,
        d,
        tuple(sizes),
        ffn_mats=adapter.ffn_matrices,
        proj_width=float(2 * h * d_h + 2 * h_kv * d_h),
        attn_width=h * d_h,
        causal=True,
        lm_head=seq_len * d * vocab,
    )


def head_flops_model(
    model: nn.Module, adapter: FFNAdapter, seq_len: float, sizes, gqa_heads: str = "per_group"
) -> FlopsModel:
    """The FLOPs model with attention heads (``heads=True``). Encoders: every head a unit of
    4·s·d·d_h + 2·s²·d_h. Grouped-query decoders: the units of ``gqa_heads`` (flops.py,
    heads.HeadLayout), a query head costing 2·s·d·d_h + s²·d_h (causal) and a KV head
    2·s·d·d_h; the rest (gated MLP, LM head) as :func:`ffn_flops_model`."""
    from dataclasses import replace

    from kcm_cuda.pruning.heads import head_layouts

    d_h = adapter.head_size(model.config)
    if not adapter.grouped:
        return FlopsModel(
            seq_len,
            adapter.hidden_size(model.config),
            tuple(sizes),
            heads=tuple(adapter.head_counts(model)),
            head_size=d_h,
        )
    layouts = head_layouts(model, adapter, gqa_heads)
    base = ffn_flops_model(model, adapter, seq_len, sizes)
    s, d = seq_len, base.hidden
    per_q = 2.0 * s * d * d_h + (1.0 if base.causal else 2.0) * s * s * d_h
    per_kv = 2.0 * s * d * d_h
    first = layouts[0]
    if gqa_heads == "groups":
        cost, fixed = first.group_size * per_q + per_kv, 0.0
    else:
        cost, fixed = first.n_kv * per_q, first.n_kv * per_kv
    return replace(
        base,
        heads=tuple(lay.units for lay in layouts),
        head_size=d_h,
        head_cost=cost,
        heads_per_unit=first.heads_per_unit,
        attention_fixed=fixed,
    )


def flops_budget(
    model: nn.Module,
    adapter: FFNAdapter,
    options: PruneOptions,
    heads: bool,
    seq_len: float,
    sizes,
    keep_min: list[int],
) -> tuple[FlopsModel, int]:
    """The FLOPs model and the neuron budget of ``options.flops``: FFN-only, or with heads
    (provisional: the heads stage, heads.plan_heads, sets the final split). BudgetError when
    the structure cannot reach the budget."""
    o = options
    if heads:
        fm = head_flops_model(model, adapter, seq_len, sizes, o.experimental.gqa_heads)
        return fm, proportional_split(fm, o.flops, o.min_heads, sum(keep_min))[1]
    fm = ffn_flops_model(model, adapter, seq_len, sizes)
    lower = "prune heads too to go lower"
    if o.layout == "standard" and not adapter.causal:  # heads are what this layout keeps
        lower = (
            f"the standard layout keeps {adapter.name}'s heads whole; layout='per_layer' prunes "
            "heads and goes lower"
        )
    return fm, fm.neuron_budget(o.flops, sum(keep_min), lower=lower)


def resolve_device(model: nn.Module, device: object) -> torch.device:
    if device is None:
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    return dev


def resolve_tokenizer(model: nn.Module, tokenizer: object, data: object) -> object | None:
    if tokenizer is not None or isinstance(data, Mapping):
        return tokenizer
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not name:
        raise ValueError(
            "a tokenizer is needed for text data and the model does not say where it came "
            "from: pass tokenizer="
        )
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear message
        raise ValueError(
            f"could not load a tokenizer for {name!r} ({type(exc).__name__}); pass tokenizer="
        ) from None


def set_ff_chunking(model: nn.Module, value: int) -> int:
    """Set every ``chunk_size_feed_forward`` to ``value``; return the previous (first) one."""
    previous = int(getattr(model.config, "chunk_size_feed_forward", 0) or 0)
    for module in model.modules():
        if hasattr(module, "chunk_size_feed_forward"):
            module.chunk_size_feed_forward = value
    return previous


def check_token_ids(sample, model: nn.Module, tokenizer) -> None:
    """ValueError when the sample holds a token id (padding included: it is looked up too)
    outside the model's embedding table, naming the id and, when it is the tokenizer's padding
    token, saying so."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    if not isinstance(rows, int) or sample.input_ids.numel() == 0:
        return
    top = int(sample.input_ids.max())
    low = int(sample.input_ids.min())
    if low >= 0 and top < rows:
        return
    bad = top if top >= rows else low
    pad = getattr(tokenizer, "pad_token_id", None)
    what = f"token id {bad}"
    if pad is not None and bad == pad:
        what = f"the tokenizer's padding token {getattr(tokenizer, 'pad_token', '?')!r} (id {bad})"
    raise ValueError(
        f"{what} is outside the model's embedding table of {rows} rows: the tokenizer does not "
        "fit the model (a padding token added after training? set tokenizer.pad_token to one "
        "the model knows, e.g. its eos_token, or resize the model's embeddings)"
    )


def build_context(
    model: nn.Module,
    adapter: FFNAdapter,
    data: object,
    options: PruneOptions,
    *,
    tokenizer: object | None,
    device: object,
    cache: dict | None,
    holdout: int = 0,
) -> PruneContext:
    """Device, backend, token sample, FLOPs budget and the teacher copy (timed as "data").
    ``holdout``: also draw that many unlabeled rows beside the sample (``ctx.heldout``, see
    :func:`split_heldout`)."""
    from kcm_cuda.pruning.methods import METHODS

    if cache is not None and not isinstance(cache, dict):
        raise TypeError(f"cache must be a dict or None, got {type(cache).__name__}")
    o = options
    dev = resolve_device(model, device)
    if o.precision == "auto":  # tf32 on sm_80+ GPUs (R2 ranking measured unchanged), else ieee
        from kcm_cuda.kernels import default_precision

        o.precision = default_precision(dev)
    if (
        o.heads
        and not METHODS[o.method].selects_heads
        and any(is_offloaded(b) for b in adapter.layers(model))
    ):
        # heads are removed on a whole copy of the model, which offloaded (meta) blocks forbid
        if getattr(o, "heads_auto", False):
            o.heads = False  # heads="auto": FFN neurons only on such a model
        else:
            raise ValueError(
                "heads=True is not supported for a model with offloaded blocks (device_map with "
                "CPU / disk offload); use heads=False (FFN neurons only)"
            )
    if adapter.causal and METHODS[o.method].selects_heads:
        raise ValueError(
            f"method={o.method!r} selects heads with a task loss and is not supported for "
            f"{adapter.name} models; use heads=True with a label-free method instead"
        )
    METHODS[o.method].check_options(o)
    uses_kernels = METHODS[o.method].uses_kernels(o)
    backend_name = resolve_backend(o.backend, dev) if uses_kernels else None
    sizes = adapter.intermediate_sizes(model)
    keep_min = resolve_min_keep(o.min_keep, sizes)

    t0 = time.perf_counter()
    tok = resolve_tokenizer(model, tokenizer, data)
    sample = prepare_sample(
        data,
        tok,
        samples=o.samples + holdout,
        max_length=o.max_length,
        seed=o.seed,
        text_column=o.text_column,
        text_pair_column=o.text_pair_column,
        labels=o.labels,
        causal=adapter.causal,
        context=adapter.context_length(model.config),
    )
    check_token_ids(sample, model, tok)  # an id past the embedding table: one line
    sample, heldout = split_heldout(sample, o.samples, holdout)
    need = max(sizes)
    if sample.n_tokens < need:
        raise ValueError(
            f"the unlabeled sample has {sample.n_tokens} real tokens ({sample.n_sequences} "
            f"sequences); at least {need} (the widest layer's FFN size) are needed: pass more "
            "data or raise samples= / max_length="
        )
    labels = sample.labels  # the drawn rows' labels (checked and aligned by prepare_sample)
    data_s = time.perf_counter() - t0

    heads = bool(o.heads or METHODS[o.method].selects_heads)
    fm, k_total = flops_budget(model, adapter, o, heads, sample.mean_tokens, sizes, keep_min)
    quotas = width_quotas(k_total, sizes)

    if adapter.causal:
        # Decoders (possibly larger than the device, spread over devices or offloaded): the
        # caller's model is only read, one block at a time (kcm_cuda.pruning.blockwise).
        teacher, chunking = model, 0
    else:
        teacher = copy.deepcopy(model).to(dev).eval()
        # Feed-forward chunking splits the FFN call per sequence chunk, which the hooks (that
        # see whole batches) do not expect; it saves memory only, so turn it off in our copy.
        chunking = set_ff_chunking(teacher, 0)
    w2_norms = map_blocks(
        teacher, adapter, lambda b: adapter.w2(b).weight.detach().float().norm(dim=0).cpu()
    )
    return PruneContext(
        model=model,
        teacher=teacher,
        adapter=adapter,
        options=o,
        sample=sample,
        device=dev,
        backend_name=backend_name,
        fm=fm,
        k_total=k_total,
        keep_min=keep_min,
        quotas=quotas,
        sizes=sizes,
        w2_norms=w2_norms,
        tokenizer=tok,
        labels=labels,
        chunking=chunking,
        cache=cache,
        timings={"data": data_s},
        heldout=heldout,
    )


# Fewer held-out rows than this: the structure search does not run (a fixed structure).
MIN_HELDOUT = 8
# The held-out rows hold at most this many real tokens (long sequences: fewer rows; every
# candidate runs them once, so this bounds the search's cost on a causal LM's 128-token blocks
# as on 20-token sentences).
HELDOUT_TOKENS = 4096


def split_heldout(
    drawn: TokenizedSample, samples: int, holdout: int
) -> tuple[TokenizedSample, TokenizedSample | None]:
    """(calibration sample, held-out rows) from ``drawn`` (``samples + holdout`` rows drawn in
    seeded order). With enough data the calibration sample is exactly the ``samples`` rows a
    run without held-out rows draws and the held-out rows are the next ``holdout``; with
    fewer rows the held-out part shrinks to what is left beyond ``samples``, but to no less
    than a quarter of the data, split off the end of the drawn order; below
    :data:`MIN_HELDOUT` rows nothing is held out. The held-out rows are also cut to at most
    :data:`HELDOUT_TOKENS` real tokens (but never below :data:`MIN_HELDOUT` rows)."""
    if holdout <= 0:
        return drawn, None
    n = drawn.n_sequences
    h = min(holdout, max(n - samples, n // 4))
    if h < MIN_HELDOUT:
        return drawn.subset(min(samples, n)), None
    calib = drawn.subset(min(samples, n - h))
    lengths = drawn.attention_mask[n - h : n].sum(dim=1)
    fits = int((lengths.cumsum(0) <= HELDOUT_TOKENS).sum())
    h_kept = max(MIN_HELDOUT, fits)
    return calib, drawn.part(n - h, n - h + h_kept)
