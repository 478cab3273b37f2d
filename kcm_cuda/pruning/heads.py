"""Attention-head scores (KCM style) and the joint head + neuron selection under one FLOPs budget.

D2 on heads — head output energy. Head h of a layer reaches the residual stream only through
its slice of the output projection: its contribution on the real tokens t of a batch is the
(t × d) matrix ctx_h · W_O[:, h]ᵀ (ctx_h: the head's context, the O input's columns
h·d_h … (h+1)·d_h−1). Its energy on batch b is the Frobenius norm of that matrix,
e_h(b) = sqrt(tr(W_O,hᵀ W_O,h · ctx_hᵀ ctx_h)), from a forward pre-hook on O. A neuron's D2 energy
‖a_i‖₂·‖W2[:, i]‖₂ is exactly the Frobenius norm of its own contribution a_i · W2[:, i]ᵀ, so the
two energies measure the same thing (what a unit adds to the residual stream, before the
LayerNorm) and are directly comparable. Each batch votes for the top-k_l heads of each layer
(like D2 on neurons), ties broken by R2 (``head_scores``).

R2 on heads — representativeness of each head's slice of the output projection: points = the
flattened W_O[:, h-slice] (H points of d·d_h), K = rbf_kernel(points / σ_l),
C = kcm_coefficients(K),
score C_hh. σ_l is the median pairwise distance of the layer's points (``sigma="median"``; with
σ = 1 these points, ~7 apart on MiniLM, give K ≈ I and C ≈ I: no information), or a number.

Joint selection (``split_budget``): how many heads and how many neurons to keep for a FLOPs
fraction c, each head costing 4·s·d·d_h + 2·s²·d_h MACs and each neuron 2·s·d (flops.py):
  per_mac       every unit ranked by its squared energy (mean over batches of e(b)², which adds
                up over orthogonal contributions) per MAC, kept best first until the budget is
                spent: the energy a unit adds to the residual stream per MAC it costs
  zscore        every unit ranked by its log squared energy standardised within its kind
                (heads, neurons), kept best first (each charged its own cost) until the budget
                is spent
  proportional  the same fraction c of the heads as of the whole (ignores the scores)
At least ``min_heads`` heads per layer are always kept (≥ 1: the transformers forward cannot run
a layer without heads). The neuron count then fills what the kept heads leave of the budget.

Grouped-query attention (decoders: n_q query heads reading n_kv KV heads, g = n_q / n_kv per
group): what is removed is a head *unit* (``HeadLayout``), chosen by ``gqa_heads``:
  groups     a whole KV group (its K and V rows, its g query heads and their O columns); the
             layer keeps n_kv' KV heads and n_kv'·g query heads. A group's energy and score
             are the sums of its query heads'.
  per_group  one query head in every group (K and V stay): every group keeps the same g' query
             heads, its g' best by score; the layer keeps n_kv·g' query heads. Unit j's energy
             and score are the sums over the groups of each group's j-th best head's.
The split and the selection then run on units exactly as on the encoders' heads (``min_heads``
counts query heads, rounded up to whole units) and the unit choice is turned back into a mask
over the query heads (``HeadLayout.head_mask``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kcm_cuda.pruning.activations import real_tokens
from kcm_cuda.pruning.adapters import FFNAdapter
from kcm_cuda.pruning.blockwise import (
    capture_block_inputs,
    executing,
    hidden_store,
    map_blocks,
    run_block,
)
from kcm_cuda.pruning.d2 import combine_with_tiebreak, vote_fractions
from kcm_cuda.pruning.data import TokenizedSample
from kcm_cuda.pruning.flops import BudgetError, FlopsModel
from kcm_cuda.pruning.masks import global_topk, width_quotas
from kcm_cuda.pruning.progress import progress_bar
from kcm_cuda.pruning.r2 import diag_coefficients

JOINT_SPLITS = ("per_mac", "zscore", "proportional")
HEAD_SCORES = ("votes", "energy", "r2")
GQA_STRUCTURES = ("groups", "per_group")


@dataclass
class HeadStats:
    energy: list[torch.Tensor]  # per layer: (n_batches, H) float64, e_h(b) (Frobenius norm)

    @property
    def n_batches(self) -> int:
        return int(self.energy[0].shape[0]) if self.energy else 0

    def mean(self) -> list[torch.Tensor]:
        return [e.mean(dim=0) for e in self.energy]


def head_energies(x: torch.Tensor, mask: torch.Tensor | None, o: nn.Linear, d_h: int):
    """Per head (float64 (H,)) the Frobenius norm of its contribution ctx_h · W_O[:, h]ᵀ over
    the real tokens of one batch (``x``: O's input; ``mask``: (B, T) 0/1, None: all real)."""
    if mask is not None and mask.shape == x.shape[:-1]:
        ctx = real_tokens(x, mask.to(x.device)).double()  # (t, H·d_h)
    else:
        ctx = x.reshape(-1, x.shape[-1]).double()
    t, width = ctx.shape
    h = width // d_h
    c = ctx.reshape(t, h, d_h).transpose(0, 1)  # (H, t, d_h)
    W = o.weight.detach().double().reshape(-1, h, d_h).transpose(0, 1)
    gram_ctx = c.transpose(1, 2) @ c  # (H, d_h, d_h)
    gram_w = W.transpose(1, 2) @ W  # (H, d_h, d_h)
    sq = (gram_ctx * gram_w).sum(dim=(1, 2)).clamp_min(0)
    return sq.sqrt().cpu()


class HeadEnergyRecorder:
    """Forward hooks that record each batch's head energies during any forward pass of
    ``model`` (so it can share a pass with other hooks, e.g. the D2 neuron statistics): a
    pre-hook on the model takes each batch's ``attention_mask`` (padding excluded; absent:
    every token is real), a pre-hook on every layer's O computes the energies. The b-th call of
    a layer's O is batch b, both in a whole-model pass and in a block-by-block one (all batches
    are embedded first, then each block runs over them). ``detach()`` removes the hooks and
    returns the :class:`HeadStats`."""

    def __init__(self, model: nn.Module, adapter: FFNAdapter) -> None:
        self.blocks = adapter.layers(model)
        self.d_h = adapter.head_size(model.config)
        self.masks: list[torch.Tensor | None] = []
        self.per_layer: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self.handles = [model.register_forward_pre_hook(self._take_mask, with_kwargs=True)]
        self.handles += [
            adapter.o(b).register_forward_pre_hook(self._hook(i)) for i, b in enumerate(self.blocks)
        ]

    def _take_mask(self, _module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        self.masks.append(mask)

    def _hook(self, idx: int):
        def hook(module, args):
            b = len(self.per_layer[idx])
            mask = self.masks[b] if b < len(self.masks) else None
            self.per_layer[idx].append(head_energies(args[0], mask, module, self.d_h))

        return hook

    def detach(self) -> HeadStats:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if not all(self.per_layer):  # no forward pass ran (e.g. statistics served from a memo)
            return HeadStats([torch.zeros(0, 0, dtype=torch.float64) for _ in self.per_layer])
        return HeadStats([torch.stack(x) for x in self.per_layer])


@torch.no_grad()
def collect_head_stats(
    model: nn.Module,
    adapter: FFNAdapter,
    sample: TokenizedSample,
    *,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
) -> HeadStats:
    """One block-by-block pass over ``sample`` (kcm_cuda.pruning.blockwise) recording every
    head's energy per batch, padding excluded (prefer attaching a :class:`HeadEnergyRecorder`
    to a pass that runs anyway)."""
    blocks = adapter.layers(model)
    d_h = adapter.head_size(model.config)
    per_layer: list[list[torch.Tensor]] = [[] for _ in blocks]
    current: dict = {}

    def make_hook(idx: int):
        def hook(module, args):
            per_layer[idx].append(head_energies(args[0], current["mask"], module, d_h))

        return hook

    calls, hidden = capture_block_inputs(
        model, adapter, sample, batch_size, store=hidden_store(model, adapter, sample, device)
    )
    bar = progress_bar(
        range(len(blocks)), total=len(blocks), desc="head energies", enabled=progress, unit="layer"
    )
    for i in bar:
        with executing(blocks[i], device) as (block, dev):
            handle = adapter.o(block).register_forward_pre_hook(make_hook(i))
            try:
                for b, call in enumerate(calls):
                    current["mask"] = call.mask.to(dev)
                    hidden[b] = run_block(block, call, hidden[b], dev)
            finally:
                handle.remove()
    return HeadStats([torch.stack(x) for x in per_layer])


def mean_square(energies: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the mean over batches of e(b)²: a unit's squared contribution norm, which
    adds up over units whose contributions are orthogonal (what ``split_budget`` compares)."""
    return [(e.double() ** 2).mean(dim=0) for e in energies]


def head_points(adapter: FFNAdapter, block: nn.Module, head_size: int) -> torch.Tensor:
    """(H, d·d_h) float32: row h = the flattened W_O[:, h·d_h:(h+1)·d_h]."""
    W = adapter.o(block).weight.detach().float()
    d, width = W.shape
    h = width // head_size
    return W.reshape(d, h, head_size).transpose(0, 1).reshape(h, d * head_size).contiguous()


def head_r2_scores(
    model: nn.Module,
    adapter: FFNAdapter,
    *,
    sigma: float | str = "median",
    alpha: float = 0.01,
    max_iter: int = 100,
    precision: str = "ieee",
    backend: str = "auto",
    device: torch.device | None = None,
) -> tuple[list[torch.Tensor], list[int]]:
    """R2 per head (float64 (H,), higher = less expressible by the other heads' O slices) and
    solver iterations per layer."""
    if not (
        sigma == "median"
        or (
            isinstance(sigma, (int, float))
            and not isinstance(sigma, bool)
            and math.isfinite(sigma)
            and sigma > 0
        )
    ):
        raise ValueError(f"head sigma must be 'median' or a number > 0, got {sigma!r}")
    d_h = adapter.head_size(model.config)
    dev = device or torch.device("cpu")
    sets = []
    for p in map_blocks(model, adapter, lambda b: head_points(adapter, b, d_h)):
        if sigma == "median":
            dist = torch.cdist(p.double(), p.double())
            off = dist[~torch.eye(p.shape[0], dtype=torch.bool)]
            s = float(off.median()) if off.numel() and float(off.median()) > 0 else 1.0
        else:
            s = float(sigma)
        sets.append(p / s)
    return diag_coefficients(
        sets,
        sigma=1.0,
        alpha=alpha,
        max_iter=max_iter,
        precision=precision,
        backend=backend,
        device=dev,
        desc="R2 (heads)",
    )


def head_scores(
    stats: HeadStats,
    quotas: list[int],
    *,
    mode: str = "votes",
    r2: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Global head scores per layer (float64 (H,)), comparable across layers.

    votes   fraction of batches voting for the head (top-quota of its layer), ties broken by
            R2 when given, else by mean energy
    energy  mean energy
    r2      R2 alone (needs ``r2``)
    """
    if mode not in HEAD_SCORES:
        raise ValueError(f"head score mode must be one of {HEAD_SCORES}, got {mode!r}")
    mean = stats.mean()
    if mode == "energy":
        return mean
    if mode == "r2":
        if r2 is None:
            raise ValueError("head score mode 'r2' needs R2 scores")
        return [x.double() for x in r2]
    votes = vote_fractions(stats.energy, quotas)
    tie = [x.double() for x in r2] if r2 is not None else mean
    return combine_with_tiebreak(votes, tie, 1.0 / max(stats.n_batches, 1))


def split_budget(
    fm: FlopsModel,
    c: float,
    head_energy: list[torch.Tensor],
    neuron_energy: list[torch.Tensor],
    *,
    split: str = "per_mac",
    min_heads: int = 1,
    min_neurons: int = 0,
) -> tuple[int, int]:
    """(heads kept, neurons kept) in total for FLOPs fraction ``c`` (see the module doc).
    ``head_energy`` / ``neuron_energy``: per layer, each unit's squared energy
    (:func:`mean_square` of the per-batch energies)."""
    if split not in JOINT_SPLITS:
        raise ValueError(f"split must be one of {JOINT_SPLITS}, got {split!r}")
    if fm.heads is None:
        raise ValueError("split_budget needs a FlopsModel with heads and head_size")
    n_layers = len(fm.heads)
    if isinstance(min_heads, bool) or not isinstance(min_heads, int) or min_heads < 1:
        raise ValueError(f"min_heads must be an int >= 1, got {min_heads!r}")
    _check_min_heads(fm, min_heads)
    min_units = fm.min_units(min_heads)
    floor_heads = min_units * n_layers
    floor = fm.total_from_count(min_neurons, floor_heads) / fm.total()
    if c < floor:
        raise BudgetError(
            f"flops={c:g} is below the joint floor {floor:.4f} ({min_heads} head(s) per layer"
            f" and {min_neurons} neurons); use flops >= {math.ceil(floor * 1000) / 1000:.3f}"
        )
    total_heads = sum(fm.heads)
    budget = c * fm.total() * (1 + 1e-12)
    if split == "proportional":
        return proportional_split(fm, c, min_heads, min_neurons)
    else:
        he = torch.cat([e.double().flatten() for e in head_energy])
        ne = torch.cat([e.double().flatten() for e in neuron_energy])
        if he.numel() != total_heads or ne.numel() != sum(fm.sizes):
            raise ValueError("energies do not match the FlopsModel's heads / neurons")
        if split == "per_mac":
            hv, nv = he / fm.per_head, ne / fm.per_neuron
        else:
            hv, nv = _zscore_log(he), _zscore_log(ne)
        # the min_heads best heads of every layer are kept first
        forced = torch.zeros(total_heads, dtype=torch.bool)
        start = 0
        for e in head_energy:
            n = e.numel()
            forced[start + torch.topk(e.double(), min_units).indices] = True
            start += n
        value = torch.cat([hv, nv])
        is_head = torch.cat(
            [torch.ones(total_heads, dtype=torch.bool), torch.zeros(ne.numel(), dtype=torch.bool)]
        )
        cost = torch.where(is_head, fm.per_head, fm.per_neuron).double()
        order = torch.sort(value, descending=True, stable=True).indices
        spent = fm.total_from_count(min_neurons, floor_heads)
        k_h = floor_heads
        for j in order.tolist():
            if bool(is_head[j]):
                if bool(forced[j]):
                    continue
                if spent + float(cost[j]) <= budget:
                    spent += float(cost[j])
                    k_h += 1
            elif spent + float(cost[j]) <= budget:
                spent += float(cost[j])
            if budget - spent < fm.per_neuron:
                break
    k_n = fm.neuron_budget(c, min_neurons, kept_heads=k_h)
    return k_h, k_n


def proportional_split(
    fm: FlopsModel, c: float, min_heads: int = 1, min_neurons: int = 0
) -> tuple[int, int]:
    """(heads, neurons) keeping the fraction ``c`` of the heads (at least ``min_heads`` per
    layer, within the budget) and the neurons the rest of the budget pays for."""
    if fm.heads is None:
        raise ValueError("proportional_split needs a FlopsModel with heads and head_size")
    _check_min_heads(fm, min_heads)
    floor_heads = fm.min_units(min_heads) * len(fm.heads)
    floor = fm.total_from_count(min_neurons, floor_heads) / fm.total()
    if c < floor:
        raise BudgetError(
            f"flops={c:g} is below the joint floor {floor:.4f} ({min_heads} head(s) per layer"
            f" and {min_neurons} neurons); use flops >= {math.ceil(floor * 1000) / 1000:.3f}"
        )
    budget = c * fm.total() * (1 + 1e-12)
    total_heads = sum(fm.heads)
    k_h = min(total_heads, max(floor_heads, round(c * total_heads)))
    while k_h > floor_heads and fm.total_from_count(min_neurons, k_h) > budget:
        k_h -= 1
    return k_h, fm.neuron_budget(c, min_neurons, kept_heads=k_h)


def _check_min_heads(fm: FlopsModel, min_heads: int) -> None:
    most = min(fm.heads) * fm.heads_per_unit
    if min_heads > most:
        what = "heads" if fm.heads_per_unit == 1 else "query heads"
        raise ValueError(f"min_heads={min_heads} exceeds a layer's {most} {what}")


def _zscore_log(x: torch.Tensor) -> torch.Tensor:
    y = torch.log(x.clamp_min(1e-30))
    sd = float(y.std()) if y.numel() > 1 else 0.0
    return (y - y.mean()) / (sd if sd > 0 else 1.0)


def select_heads(
    scores: list[torch.Tensor], k_heads: int, min_heads: int = 1
) -> list[torch.Tensor]:
    """Bool masks over each layer's heads keeping ``k_heads`` in total, best global scores
    first, at least ``min_heads`` per layer."""
    return global_topk(scores, k_heads, [min(min_heads, int(s.numel())) for s in scores])


def head_quotas(k_heads: int, heads: list[int] | tuple[int, ...]) -> list[int]:
    """Each layer's share of ``k_heads`` (for the votes), proportional to its head count."""
    total = sum(heads)
    return [max(1, round(k_heads * h / total)) for h in heads]


# -- grouped-query attention: head units ---------------------------------------------------
@dataclass(frozen=True)
class HeadLayout:
    """One layer's heads as removable units: ``structure`` "heads" (every head on its own:
    encoders), "groups" or "per_group" (grouped-query attention, see the module doc)."""

    structure: str
    n_q: int  # query heads
    n_kv: int  # key/value heads

    @property
    def group_size(self) -> int:
        return self.n_q // self.n_kv

    @property
    def units(self) -> int:
        return {"heads": self.n_q, "groups": self.n_kv, "per_group": self.group_size}[
            self.structure
        ]

    @property
    def heads_per_unit(self) -> int:
        return {"heads": 1, "groups": self.group_size, "per_group": self.n_kv}[self.structure]

    def kept_counts(self, n_units: int) -> tuple[int, int]:
        """(query heads, KV heads) a layer keeps with ``n_units`` units."""
        if self.structure == "groups":
            return n_units * self.group_size, n_units
        return n_units * self.heads_per_unit, self.n_kv

    def unit_values(self, per_head: torch.Tensor) -> torch.Tensor:
        """A per-query-head quantity (energy, score: float64 (n_q,)) summed into units:
        groups: over each group's heads; per_group: unit j = Σ over groups of each group's
        j-th largest (so the values do not increase with j)."""
        x = per_head.double().flatten()
        if self.structure == "heads":
            return x
        grid = x.reshape(self.n_kv, self.group_size)
        if self.structure == "groups":
            return grid.sum(dim=1)
        return torch.sort(grid, dim=1, descending=True).values.sum(dim=0)

    def head_mask(self, per_head_score: torch.Tensor, n_units: int) -> torch.Tensor:
        """Bool over the query heads keeping ``n_units`` units, the best by ``per_head_score``
        (groups: the groups with the largest summed score; per_group: in every group its
        ``n_units`` best heads)."""
        score = per_head_score.double().flatten()
        keep = torch.zeros(self.n_q, dtype=torch.bool)
        if self.structure == "heads":
            keep[torch.topk(score, n_units).indices] = True
            return keep
        grid = keep.reshape(self.n_kv, self.group_size)
        if self.structure == "groups":
            best = torch.topk(self.unit_values(score), n_units).indices
            grid[best] = True
        else:
            best = torch.topk(score.reshape(self.n_kv, self.group_size), n_units, dim=1).indices
            grid.scatter_(1, best, True)
        return grid.reshape(-1)


def head_layouts(model: nn.Module, adapter: FFNAdapter, structure: str) -> list[HeadLayout]:
    """Every layer's :class:`HeadLayout` (``structure`` one of ``GQA_STRUCTURES`` for a
    grouped-query model; ignored, "heads", otherwise)."""
    q = adapter.head_counts(model)
    if not adapter.grouped:
        return [HeadLayout("heads", n, n) for n in q]
    if structure not in GQA_STRUCTURES:
        raise ValueError(f"gqa_heads must be one of {GQA_STRUCTURES}, got {structure!r}")
    kv = adapter.kv_head_counts(model)
    layouts = [HeadLayout(structure, a, b) for a, b in zip(q, kv, strict=True)]
    for i, lay in enumerate(layouts):
        if lay.n_kv < 1 or lay.n_q % lay.n_kv:
            raise ValueError(f"layer {i}: {lay.n_q} query heads for {lay.n_kv} KV heads")
    key = (lambda x: x.group_size) if structure == "groups" else (lambda x: x.n_kv)
    if len({key(x) for x in layouts}) > 1:
        what = "query heads per KV head" if structure == "groups" else "KV heads"
        raise ValueError(
            f"heads=True with gqa_heads={structure!r} needs every layer to have the same number "
            f"of {what} (got {[key(x) for x in layouts]}: a model pruned before under the other "
            "structure)"
        )
    return layouts


# -- the heads stage of prune() ------------------------------------------------------------
@dataclass
class HeadPlan:
    """What the heads stage decided: the kept heads (bool per layer over its heads), the
    totals of the split, and how."""

    head_masks: list[torch.Tensor]
    k_heads: int  # query heads kept in total
    k_neurons: int
    split: str
    score: str
    r2_iterations: list[int] | None = None
    structure: str = "heads"  # "heads" (encoders) or the GQA structure (gqa_heads)
    kv_heads_kept_per_layer: list[int] | None = None  # grouped-query attention

    def as_report(self) -> dict:
        out = {
            "split": self.split,
            "score": self.score,
            "heads_kept": self.k_heads,
            "neurons_kept": self.k_neurons,
            "heads_kept_per_layer": [int(m.sum()) for m in self.head_masks],
            "head_r2_iterations": self.r2_iterations,
        }
        if self.structure != "heads":
            out["gqa_heads"] = self.structure
            out["kv_heads_kept_per_layer"] = self.kv_heads_kept_per_layer
        return out


def plan_heads(ctx) -> HeadPlan:
    """The heads stage (``heads=True``): split the FLOPs budget between heads and neurons
    (``head_split``), pick the heads (``head_score``), and set the context's neuron budget
    (``ctx.k_total``, ``ctx.quotas``) for the neuron method that runs next."""
    from kcm_cuda.pruning.d2 import batch_energies

    o = ctx.options
    stats = ctx.head_stats()
    layouts = head_layouts(ctx.teacher, ctx.adapter, o.experimental.gqa_heads)
    head_energy = [
        lay.unit_values(e) for lay, e in zip(layouts, mean_square(stats.energy), strict=True)
    ]
    if o.experimental.head_split == "proportional":
        k_units, k_n = proportional_split(ctx.fm, o.flops, o.min_heads, sum(ctx.keep_min))
    else:
        neuron_energy = mean_square(batch_energies(ctx.activation_stats(), ctx.w2_norms))
        k_units, k_n = split_budget(
            ctx.fm,
            o.flops,
            head_energy,
            neuron_energy,
            split=o.experimental.head_split,
            min_heads=o.min_heads,
            min_neurons=sum(ctx.keep_min),
        )
    standard = o.layout == "standard"
    if standard:  # the same head units in every layer (layout.py); the neurons get the rest
        from kcm_cuda.pruning.layout import equal_units, stock_head_units

        lo, hi = ctx.fm.min_units(o.min_heads), min(lay.units for lay in layouts)
        per_layer = equal_units(k_units, len(layouts), lo, hi)
        # only head counts the model's config class accepts (LLaMA: hidden_size divisible by
        # the head count): the nearest below, else above, within the budget
        per_layer = stock_head_units(
            ctx.teacher.config, layouts[0], per_layer, lo, hi,
            lambda u: ctx.fm.neuron_budget(o.flops, sum(ctx.keep_min), kept_heads=u * len(layouts)),
        )  # fmt: skip
        k_units = per_layer * len(layouts)
        k_n = ctx.fm.neuron_budget(o.flops, sum(ctx.keep_min), kept_heads=k_units)
    if k_n != ctx.k_total:
        ctx.k_total = k_n
        ctx.quotas = width_quotas(k_n, ctx.sizes)
        ctx._memo.pop("d2", None)  # the D2 votes depend on the quotas
    r2 = iters = None
    if o.experimental.head_score in ("votes", "r2"):
        r2, iters = head_r2_scores(
            ctx.teacher,
            ctx.adapter,
            alpha=o.experimental.alpha,
            max_iter=o.experimental.max_iter,
            precision=o.precision,
            backend=o.backend,
            device=ctx.device,
        )
    n_q = [lay.n_q for lay in layouts]
    quotas = head_quotas(k_units * ctx.fm.heads_per_unit, n_q)
    scores = head_scores(stats, quotas, mode=o.experimental.head_score, r2=r2)
    if standard:
        masks = [lay.head_mask(x, per_layer) for lay, x in zip(layouts, scores, strict=True)]
    elif ctx.adapter.grouped:  # whole units per layer, then the query heads of those units
        unit_scores = [lay.unit_values(x) for lay, x in zip(layouts, scores, strict=True)]
        unit_masks = select_heads(unit_scores, k_units, ctx.fm.min_units(o.min_heads))
        masks = [
            lay.head_mask(x, int(m.sum()))
            for lay, x, m in zip(layouts, scores, unit_masks, strict=True)
        ]
    else:
        masks = select_heads(scores, k_units, o.min_heads)
    plan = HeadPlan(
        masks,
        sum(int(m.sum()) for m in masks),
        k_n,
        o.experimental.head_split,
        o.experimental.head_score,
    )
    plan.r2_iterations = iters
    if ctx.adapter.grouped:
        plan.structure = o.experimental.gqa_heads
        plan.kv_heads_kept_per_layer = [
            int(m.reshape(lay.n_kv, lay.group_size).any(dim=1).sum())
            for lay, m in zip(layouts, masks, strict=True)
        ]
    ctx.head_plan = plan
    return plan
