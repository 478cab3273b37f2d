"""The structure stage: which structure the default prunes with, measured on the user's own
model and unlabeled data (``structure="search"``, the default of ``prune()``).

The structure of a pruned model is more than its neuron score: whether attention heads are
removed too and how the budget is split between heads and neurons, how many neurons each
layer keeps (the layer allocation), and which score picks them inside a layer. No fixed rule
for these held on models and tasks it was not chosen on (docs/RESULTS.md), so the parts the
caller leaves open are chosen per model by a label-free measurement:

  candidates   the parts the caller leaves open (``open_axes``): heads off / on and the
               head/neuron split (``per_mac`` / ``proportional``), the layer allocation
               (``uniform``; ``global``: the score's own sort across layers; ``error``: each
               layer's measured output error per removed neuron, from its activation Gram),
               and the neuron score (``flap`` / ``wanda_sp``). An option the caller sets
               (``heads=``, ``allocation=``, ``method=``, an experimental ``head_split``) fixes
               that part. A candidate whose budget its structure cannot reach (FFN-only below
               the attention floor) is left out. The search runs in two stages (``STAGES``):
               first heads × split with the first score and allocation (flap, uniform), then
               score × allocation with the heads the first stage chose: 3 + 5 new candidates
               instead of the 18 of every combination.
  criterion    computed on unlabeled rows held out from those the statistics and the refit
               are fitted on (``ctx.heldout``): for a classifier the mean KL(teacher ‖ student)
               of the class distributions (what the user keeps is the teacher's decision;
               KL sees a shift of the distribution before it flips a label, and needs no
               label); for a causal LM the student's mean NLL per held-out token (that *is*
               the quantity a user of an LM cares about, teacher-free); for a regression head
               the squared error to the teacher's output relative to the teacher's variance;
               for a model without a head the squared error of the final hidden states
               relative to their energy (what any head put on top would read). Lower is better.
  proxy        every candidate is judged with a one-shot refit that costs no pass over the
               calibration data: its kept W2 columns and b2 (and, with heads, O's kept
               columns) are the ridge solution of the same problem as the default's refit but
               on the teacher's inputs, a sub-solve of the full Grams the activation pass
               collected once (``ActivationStats.grams`` / ``o_grams``). The candidate's blocks
               are built physically, one block at a time, and the held-out rows run through
               them (``proxy_criteria``).
  finalists    the best candidate by the proxy (``search_finalists``, experimental, default
               1) is built twice: with the one-shot refit (``oneshot_student``: no data pass)
               and with the default's full sequential refit (reconstruct.py); the one with
               the lower criterion is returned. Which refit generalises better differs by
               model, so it is measured too.

"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from kcm_cuda.pruning.activations import real_tokens
from kcm_cuda.pruning.blockwise import _to as move_to
from kcm_cuda.pruning.blockwise import (
    capture_block_inputs,
    detached_copy,
    executing,
    hidden_store,
    is_offloaded,
    model_inputs,
    run_block,
    set_block,
    skeleton_copy,
)
from kcm_cuda.pruning.flops import BudgetError
from kcm_cuda.pruning.heads import plan_heads
from kcm_cuda.pruning.layout import refit_bias
from kcm_cuda.pruning.masks import width_quotas
from kcm_cuda.pruning.methods import METHODS
from kcm_cuda.pruning.methods.base import ScoreMethod, Selection
from kcm_cuda.pruning.progress import progress_bar
from kcm_cuda.pruning.reconstruct import (
    LinearRefit,
    apply_ffn_refit,
    apply_o_refit,
    reconstruct,
)
from kcm_cuda.pruning.safety import finite_refit

SEARCH_METHODS = ("flap", "wanda_sp")
SEARCH_ALLOCATIONS = ("uniform", "global", "error")
SEARCH_SPLITS = ("per_mac", "proportional")
CRITERIA = {
    "kl": "mean KL(teacher || student) of the output distributions on held-out rows",
    "nll": "the student's mean NLL per held-out token",
    "relative_mse": "squared error to the teacher's outputs / the teacher's variance",
    "hidden_error": "squared error of the final hidden states / their energy",
}


@dataclass(frozen=True)
class Structure:
    method: str
    allocation: str
    heads: bool
    head_split: str | None = None  # heads only

    def as_dict(self) -> dict:
        out = {"method": self.method, "allocation": self.allocation, "heads": self.heads}
        if self.heads:
            out["head_split"] = self.head_split
        return out

    def label(self) -> str:
        heads = f"heads ({self.head_split} split)" if self.heads else "FFN neurons only"
        return f"{self.method}, {self.allocation} widths, {heads}"


# -- what is searched -------------------------------------------------------------------------
def fixed_reason(opts) -> str | None:
    """Why these options run no search (None: the open parts are searched)."""
    if opts.structure != "search":
        return "structure='fixed'"
    if opts.reconstruction() != "ridge":  # the proxy is that refit
        return f"reconstruct={opts.reconstruction()!r}: the search measures the ridge refit"
    if METHODS[opts.method].selects_heads:
        return f"method={opts.method!r} chooses its own structure"
    return None


NOTHING_OPEN = "every part of the structure was given (method=, allocation=, heads=)"


def open_axes(opts, adapter, model: nn.Module) -> dict[str, tuple]:
    """Per structure part, the choices the search tries (a single choice: fixed). Empty when
    nothing is searched (:func:`fixed_reason`, or nothing left open)."""
    if fixed_reason(opts) is not None:
        return {}
    scored = isinstance(METHODS[opts.method], ScoreMethod)
    axes: dict[str, tuple] = {}
    axes["method"] = SEARCH_METHODS if not opts.method_given else (opts.method,)
    if opts.allocation_given or not scored:
        axes["allocation"] = (opts.allocation,)
    else:
        axes["allocation"] = SEARCH_ALLOCATIONS
    offloaded = any(is_offloaded(b) for b in adapter.layers(model))
    if getattr(opts, "heads_auto", False):
        axes["heads"] = (False,) if offloaded else (False, True)
    else:
        axes["heads"] = (bool(opts.heads),)
    split = opts.experimental.head_split
    default_split = type(opts.experimental)().head_split
    open_split = split == default_split and True in axes["heads"]
    axes["head_split"] = SEARCH_SPLITS if open_split else (split,)
    return axes if len(candidates(axes)) > 1 else {}


# The search holds every layer's FFN-input (and O-input) Gram in float64 on the CPU: it runs
# only when they take at most this share of the memory available now.
GRAM_MEMORY_SHARE = 0.25


def gram_bytes(adapter, model: nn.Module, heads: bool) -> int:
    """Bytes of the Grams the search's one-shot refits read (float64, every layer)."""
    sizes = adapter.intermediate_sizes(model)
    total = sum(n * n for n in sizes)
    if heads:
        cfg = model.config
        d_attn = adapter.num_heads(cfg) * adapter.head_size(cfg)
        total += len(sizes) * d_attn * d_attn
    return 8 * total


def available_memory() -> int | None:
    """Bytes of memory available now (Linux), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def too_big_for_search(adapter, model: nn.Module, axes: dict[str, tuple]) -> str | None:
    """Why the search cannot hold this model's Grams (None: it can)."""
    need = gram_bytes(adapter, model, True in axes.get("heads", ()))
    free = available_memory()
    if free is None or need <= GRAM_MEMORY_SHARE * free:
        return None
    return (
        f"the search's Grams would take {need / 2**30:.1f} GiB, more than "
        f"{GRAM_MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB available: the fixed rules "
        "(structure='fixed') ran; set heads= / allocation= / method= to choose yourself"
    )


def candidates(axes: dict[str, tuple]) -> list[Structure]:
    out = []
    for m, a, h in itertools.product(axes["method"], axes["allocation"], axes["heads"]):
        if h:
            out.extend(Structure(m, a, True, s) for s in axes["head_split"])
        else:
            out.append(Structure(m, a, False))
    return out


# -- one candidate's context and selection ------------------------------------------------------
SHARED_MEMO = ("stats", "head_stats", "model_fp", "r2")


def candidate_context(ctx, st: Structure):
    """A copy of ``ctx`` set up for ``st`` (options, FLOPs model, neuron budget; the heads
    planned); the expensive statistics are shared. BudgetError when ``st`` cannot reach the
    budget."""
    from kcm_cuda.pruning.context import flops_budget

    o = copy.copy(ctx.options)
    o.method, o.allocation, o.heads = st.method, st.allocation, st.heads
    if st.heads:
        o.experimental = replace(o.experimental, head_split=st.head_split)
    fm, k_total = flops_budget(
        ctx.teacher, ctx.adapter, o, st.heads, ctx.sample.mean_tokens, ctx.sizes, ctx.keep_min
    )
    memo = {k: ctx._memo[k] for k in SHARED_MEMO if k in ctx._memo}
    c = replace(
        ctx,
        options=o,
        fm=fm,
        k_total=k_total,
        quotas=width_quotas(k_total, ctx.sizes),
        head_plan=None,
        cache_hits=ctx.cache_hits,
        timings=ctx.timings,
        _memo=memo,
    )
    if st.heads:
        plan_heads(c)
    return c


def candidate_selection(cctx) -> Selection:
    sel = METHODS[cctx.options.method].select(cctx)
    if cctx.options.heads and sel.head_masks is None and cctx.head_plan is not None:
        sel.head_masks = cctx.head_plan.head_masks
    return sel


def _same_selection(a: Selection, b: Selection) -> bool:
    if len(a.masks) != len(b.masks) or (a.head_masks is None) != (b.head_masks is None):
        return False
    if not all(bool(torch.equal(x, y)) for x, y in zip(a.masks, b.masks, strict=True)):
        return False
    if a.head_masks is None:
        return True
    return all(bool(torch.equal(x, y)) for x, y in zip(a.head_masks, b.head_masks, strict=True))


# -- the criterion on held-out rows -------------------------------------------------------------
class _Passthrough(nn.Module):
    """A block slot of the output model: hands its input on (the blocks already ran)."""

    def __init__(self, as_tuple: bool, like: nn.Module | None = None) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if like is not None and hasattr(like, attr):
                setattr(self, attr, getattr(like, attr))

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


class _Inject(_Passthrough):
    """The last block slot of the output model: returns the final hidden states it is given."""

    def __init__(self, as_tuple: bool, like: nn.Module | None = None) -> None:
        super().__init__(as_tuple, like)
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        h = self.hidden.to(hidden_states.device, hidden_states.dtype)
        return (h,) if self.as_tuple else h


class HeldoutCriterion:
    """The criterion of :mod:`structure` on ``ctx.heldout``: final hidden states per held-out
    batch (one stream per model) → the model's outputs (the model's own embeddings, norm and
    head, run on a copy without its blocks) → one number, lower is better."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.adapter = ctx.adapter
        self.sample = ctx.heldout
        self.device = ctx.device
        # causal LMs: smaller batches (the vocabulary-wide logits of a batch are materialised)
        bs = ctx.options.batch_size
        self.batch_size = min(bs, 8) if ctx.adapter.causal else bs
        self.store = hidden_store(ctx.teacher, ctx.adapter, self.sample, ctx.device)
        self.calls, self.inputs = capture_block_inputs(
            ctx.teacher, ctx.adapter, self.sample, self.batch_size, store=self.store
        )
        self._head: nn.Module | None = None
        self._inject: _Inject | None = None
        self.kind: str | None = None
        # a causal LM with its LM head is judged by its own NLL (no teacher needed)
        out_emb = getattr(ctx.teacher, "get_output_embeddings", None)
        self.lm = bool(ctx.adapter.causal and out_emb is not None and out_emb() is not None)
        self.teacher_final: list[torch.Tensor] | None = None
        self._teacher_out: list | None = None  # the teacher's outputs per batch (computed once)

    # the output part of the model, with every block replaced
    def _output_model(self) -> nn.Module:
        if self._head is not None:
            return self._head
        teacher, adapter = self.ctx.teacher, self.adapter
        blocks = adapter.layers(teacher)
        with executing(blocks[0], self.device) as (b0, dev):  # tensor or tuple, per version
            call = self.calls[0]
            out = b0(self.inputs[0].to(dev), *move_to(call.args, dev), **move_to(call.kwargs, dev))
        as_tuple = isinstance(out, (tuple, list))
        head = skeleton_copy(teacher, adapter)
        for i, b in enumerate(blocks):
            last = i == len(blocks) - 1
            slot = _Inject(as_tuple, b) if last else _Passthrough(as_tuple, b)
            set_block(head, adapter, i, slot)
            if last:
                self._inject = slot
        head.eval()
        self._head = head
        return head

    def _outputs(self, hidden: torch.Tensor, batch: dict):
        head = self._output_model()
        self._inject.hidden = hidden
        extra = {"use_cache": False} if self.adapter.causal else {}
        try:
            return head(**model_inputs(head, batch), **extra)
        finally:
            self._inject.hidden = None

    def _batches(self):
        from kcm_cuda.pruning.blockwise import input_device

        return self.sample.batches(self.batch_size, input_device(self._output_model()))

    def teacher_stream(self) -> list[torch.Tensor]:
        """The teacher's final hidden states on the held-out rows (computed once)."""
        if self.teacher_final is None:
            self.teacher_final = run_stream(
                self.ctx.teacher, self.adapter, self.calls, self.inputs, self.device
            )
        return self.teacher_final

    @torch.no_grad()
    def values(self, streams: list[list[torch.Tensor]]) -> list[float]:
        """The criterion of each stream of final hidden states."""
        need_teacher = not self.lm
        t_final = self.teacher_stream() if need_teacher else None
        if need_teacher and self._teacher_out is None:
            self._teacher_out = [
                self._outputs(t_final[b], batch) for b, batch in enumerate(self._batches())
            ]
        num = [0.0] * len(streams)
        den = [0.0] * len(streams)
        for b, batch in enumerate(self._batches()):
            mask = batch["attention_mask"]
            ref = self._teacher_out[b] if need_teacher else None
            for s, stream in enumerate(streams):
                out = self._outputs(stream[b], batch)
                n, d = self._score(
                    out, ref, batch, mask, stream[b], None if ref is None else t_final[b]
                )
                num[s] += n
                den[s] += d
        return [n / d if d > 0 else float("nan") for n, d in zip(num, den, strict=True)]

    def _score(self, out, ref, batch, mask, h_s, h_t) -> tuple[float, float]:
        """(numerator, denominator) of this batch's contribution."""
        logits = getattr(out, "logits", None)
        if self.lm and logits is not None and logits.dim() == 3:
            self.kind = "nll"
            ids = batch["input_ids"]
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -lp.gather(-1, ids[:, 1:].unsqueeze(-1).to(lp.device)).squeeze(-1)
            m = (mask[:, 1:] * mask[:, :-1]).to(nll.device).bool()
            return float(nll[m].double().sum()), float(m.sum())
        if logits is not None and logits.shape[-1] >= 2:
            self.kind = "kl"
            return _kl(ref.logits, logits, mask if logits.dim() == 3 else None)
        if logits is not None:  # regression
            self.kind = "relative_mse"
            t, s = ref.logits.double(), logits.double()
            return float(((s - t) ** 2).sum()), float(((t - t.mean()) ** 2).sum()) + 1e-12
        start = getattr(out, "start_logits", None)
        if start is not None and getattr(out, "end_logits", None) is not None:
            self.kind = "kl"
            pad = (1 - mask).bool().to(start.device)
            n1, d1 = _kl(ref.start_logits.masked_fill(pad, -1e4), start.masked_fill(pad, -1e4))
            n2, d2 = _kl(
                ref.end_logits.masked_fill(pad, -1e4), out.end_logits.masked_fill(pad, -1e4)
            )
            return n1 + n2, d1 + d2
        self.kind = "hidden_error"
        hs = getattr(out, "last_hidden_state", None)
        ht = getattr(ref, "last_hidden_state", None)
        if hs is None or ht is None:
            hs, ht = h_s, h_t
        s = real_tokens(hs.double(), mask.to(hs.device))
        t = real_tokens(ht.double(), mask.to(ht.device))
        return float(((s - t) ** 2).sum()), float((t**2).sum()) + 1e-30


def _kl(t_logits: torch.Tensor, s_logits: torch.Tensor, mask=None) -> tuple[float, float]:
    """Σ KL(softmax t ‖ softmax s) over rows (or the real tokens of 3-D logits), count."""
    lt = torch.log_softmax(t_logits.double(), dim=-1)
    ls = torch.log_softmax(s_logits.double().to(lt.device), dim=-1)
    kl = (lt.exp() * (lt - ls)).sum(dim=-1)
    if mask is not None:
        m = mask.to(kl.device).bool()
        return float(kl[m].sum()), float(m.sum())
    return float(kl.sum()), float(kl.numel())


def run_stream(model, adapter, calls, inputs, device) -> list[torch.Tensor]:
    """The final hidden states of ``model``'s blocks, run one block at a time from ``inputs``
    (the first block's inputs per batch)."""
    h = [x.clone() for x in inputs]
    for blk in adapter.layers(model):
        with executing(blk, device) as (b, dev):
            for i, call in enumerate(calls):
                h[i] = run_block(b, call, h[i], dev)
    return h


# -- the one-shot proxy -------------------------------------------------------------------------
class _OneShot:
    """One layer's one-shot ridge refits for any kept subset, from the teacher's Grams: the
    target is the teacher's own output (W x, bias excluded), the inputs the teacher's."""

    def __init__(self, gram, total, n_tokens, W, has_bias: bool, dev) -> None:
        self.G = gram.to(dev, torch.float64)
        self.s = total.to(dev, torch.float64)
        self.N = float(n_tokens)
        self.W = W.detach().to(dev, torch.float64)  # (d, n)
        self.GW = self.G @ self.W.t()  # (n, d)
        self.sW = self.s @ self.W.t()  # (d,)
        self.yy = float((self.W.t() * self.GW).sum())
        self.has_bias = has_bias
        self.dev = dev

    def fit(self, keep: torch.Tensor, lam: float):
        """(W (d, k), db (d,), fell_back, error before, error after, target energy)."""
        idx = keep.to(self.dev).nonzero().flatten()
        k, d = int(idx.numel()), self.W.shape[0]
        fit = LinearRefit(k, d, self.dev, fit_bias=self.has_bias)
        Gk = self.G[idx][:, idx]
        Ck = self.GW[idx]
        if self.has_bias:
            sk = self.s[idx]
            top = torch.cat([Gk, sk.unsqueeze(1)], dim=1)
            n = torch.tensor([self.N], dtype=torch.float64, device=self.dev)
            Gk = torch.cat([top, torch.cat([sk, n]).unsqueeze(0)], dim=0)
            Ck = torch.cat([Ck, self.sW.unsqueeze(0)], dim=0)
        fit.G, fit.C, fit.yy, fit.tokens = Gk, Ck, torch.tensor(self.yy), int(self.N)
        W0 = self.W[:, idx]
        if k == self.W.shape[1]:  # nothing removed: the teacher's own output, nothing to refit
            e0 = fit.error(W0)
            return W0.cpu(), torch.zeros(d, dtype=torch.float64), False, e0, e0, self.yy
        W, db, fell_back = fit.ridge(W0, lam)
        W, db, fell_back = finite_refit(W, db, W0.cpu(), fell_back)
        return W, db, fell_back, fit.error(W0), fit.error(W, db), self.yy


def _layer_refits(ctx, layer: int, tb: nn.Module, bdev, heads: bool):
    stats = ctx.activation_stats()
    adapter = ctx.adapter
    w2 = adapter.w2(tb)
    bias = refit_bias(ctx.options, adapter)
    ffn = _OneShot(
        stats.grams[layer], stats.sums[layer].sum(dim=0), stats.n_tokens, w2.weight, bias, bdev
    )
    attn = None
    if heads:
        o = adapter.o(tb)
        attn = _OneShot(
            stats.o_grams[layer],
            stats.o_sums[layer],
            stats.n_tokens,
            o.weight,
            o.bias is not None,
            bdev,
        )
    return ffn, attn


def _oneshot_block(ctx, tb, bdev, layer, sel: Selection, ffn, attn, recon=None) -> nn.Module:
    """A copy of teacher block ``tb`` pruned to ``sel`` with the one-shot refits written in
    (``recon``: a ReconstructionResult to record each refit into)."""
    adapter = ctx.adapter
    lam = float(ctx.options.ridge_lambda)
    d_h = adapter.head_size(ctx.teacher.config)
    sb = detached_copy(tb, bdev)
    hm = sel.head_masks[layer] if sel.head_masks is not None else None
    if hm is not None and not bool(hm.all()):
        cols = hm.cpu().repeat_interleave(d_h)
        Wo, dbo, fb, e0, e1, yy = attn.fit(cols, lam)
        adapter.shrink_heads(sb, hm.cpu(), d_h)
        if not fb:
            apply_o_refit(adapter.o(sb), Wo, dbo)
        if recon is not None and recon.o_refit is not None:
            recon.o_refit.record(fb, e0, e1, yy)
    elif recon is not None and recon.o_refit is not None:
        recon.o_refit.skip()
    keep = sel.masks[layer]
    W, db, fb, e0, e1, yy = ffn.fit(keep, lam)
    apply_ffn_refit(adapter, sb, keep.to(bdev), W, db, ffn.has_bias)
    if recon is not None:
        recon.record(None, fb, lam, e0, e1, yy)
    return sb


@torch.no_grad()
def proxy_criteria(ctx, crit: HeldoutCriterion, sels: list[Selection]) -> list[float]:
    """Each selection's criterion after the one-shot refit (see the module doc)."""
    adapter, dev, teacher = ctx.adapter, ctx.device, ctx.teacher
    streams = [[x.clone() for x in crit.inputs] for _ in sels]
    blocks = adapter.layers(teacher)
    heads = any(s.head_masks is not None for s in sels)
    bar = progress_bar(
        range(len(blocks)),
        total=len(blocks),
        desc="structure",
        enabled=ctx.options.progress,
        unit="layer",
    )
    for layer in bar:
        with executing(blocks[layer], dev) as (tb, bdev):
            ffn, attn = _layer_refits(ctx, layer, tb, bdev, heads)
            for si, sel in enumerate(sels):
                sb = _oneshot_block(ctx, tb, bdev, layer, sel, ffn, attn)
                for b, call in enumerate(crit.calls):
                    streams[si][b] = run_block(sb, call, streams[si][b], bdev)
                del sb
    return crit.values(streams)


@torch.no_grad()
def oneshot_student(ctx, sel: Selection):
    """The physically pruned model with the one-shot refits (no pass over the data: every
    refit is a sub-solve of the calibration Grams), and its ReconstructionResult."""
    from kcm_cuda.pruning.blockwise import block_device
    from kcm_cuda.pruning.physical import record_heads, record_mlp_bias, record_sizes
    from kcm_cuda.pruning.reconstruct import ORefitResult, ReconstructionResult

    adapter = ctx.adapter
    stats = ctx.activation_stats()
    recon = ReconstructionResult("ridge", "oneshot", [], tokens=stats.n_tokens)
    heads = sel.head_masks is not None
    if heads:
        recon.o_refit = ORefitResult()
    student = skeleton_copy(ctx.teacher, adapter)
    for layer, blk in enumerate(adapter.layers(ctx.teacher)):
        with executing(blk, ctx.device) as (tb, bdev):
            ffn, attn = _layer_refits(ctx, layer, tb, bdev, heads)
            sb = _oneshot_block(ctx, tb, bdev, layer, sel, ffn, attn, recon)
            set_block(student, adapter, layer, sb.to(block_device(blk)))
    record_sizes(student, adapter)
    record_mlp_bias(student, adapter)
    if heads:
        record_heads(student, adapter)
    if sel.scales is not None:
        recon.notes.append("the selection's own scales were replaced by the reconstruction")
    if any(recon.fallback):
        recon.notes.append(
            f"ridge (one-shot): plain pruning kept in layer(s) "
            f"{[i for i, f in enumerate(recon.fallback) if f]} (solve failed or did not help)"
        )
    return student, recon


# -- the stage -------------------------------------------------------------------------------------
# Studies only (benchmarks/structure_search.py): called with (structure, refit mode, student,
# criterion) for every finalist model, so that each one can be measured on labelled test data.
FINALIST_HOOK = None

# The search runs in stages, each over the candidates that differ in its parts, the other
# parts at the best found so far (coordinate search: 3 + 5 new candidates instead of 18).
STAGES = (("heads", "head_split"), ("method", "allocation"))


@dataclass
class SearchOutcome:
    ctx: object  # the winner's context
    selection: Selection
    student: nn.Module  # the winner, reconstructed
    recon: object
    report: dict


def _stage_structures(axes: dict[str, tuple], parts: tuple[str, ...], at: dict) -> list:
    sub = {k: (axes[k] if k in parts else (at[k],)) for k in axes}
    return candidates(sub)


def search_structure(ctx, axes: dict[str, tuple]) -> SearchOutcome:
    """Run the search (module doc) and return the winner, fully reconstructed."""
    t0 = time.perf_counter()
    o = ctx.options
    ctx.want_grams = True
    ctx.want_o_grams = True in axes["heads"]
    if ctx.want_o_grams:
        ctx.head_stats()  # shares the activation pass (with the Grams) when it runs now
    ctx.activation_stats()
    crit = HeldoutCriterion(ctx)
    rows: list[dict] = []
    seen: dict[Structure, dict] = {}
    live: list[tuple[Structure, object, Selection, float]] = []
    at = {k: v[0] for k, v in axes.items()}
    for stage, parts in enumerate(STAGES, start=1):
        todo = []
        for st in _stage_structures(axes, parts, at):
            if st in seen:
                continue
            row = {"structure": st.as_dict(), "stage": stage, "criterion": None}
            seen[st] = row
            rows.append(row)
            try:
                cctx = candidate_context(ctx, st)
                sel = candidate_selection(cctx)
            except BudgetError as exc:
                row["skipped"] = str(exc)
                continue
            twin = next((x for x in live if _same_selection(x[2], sel)), None)
            if twin is None:
                twin = next((x for x in todo if _same_selection(x[2], sel)), None)
            if twin is not None:
                row["same_masks_as"] = twin[0].as_dict()
                continue
            todo.append((st, cctx, sel))
        if todo:
            values = proxy_criteria(ctx, crit, [x[2] for x in todo])
            for (st, cctx, sel), v in zip(todo, values, strict=True):
                seen[st]["criterion"] = v
                live.append((st, cctx, sel, v))
        for row in rows:  # twins share their twin's value
            if "same_masks_as" in row and row["criterion"] is None:
                twin = next(x for x in live if x[0].as_dict() == row["same_masks_as"])
                row["criterion"] = twin[3]
        if not live:  # every candidate so far was skipped: the budget is out of reach
            raise BudgetError(
                f"flops={o.flops:g}: no structure can reach this budget "
                f"({'; '.join(r.get('skipped', '') for r in rows)})"
            )
        best = min(live, key=lambda x: _rank_value(x[3]))[0]
        at = {
            "method": best.method,
            "allocation": best.allocation,
            "heads": best.heads,
            "head_split": best.head_split or at["head_split"],
        }
    t_proxy = time.perf_counter() - t0

    ranked = sorted(live, key=lambda x: _rank_value(x[3]))
    finalists = ranked[: max(1, o.experimental.search_finalists)]
    best = None
    for st, cctx, sel, proxy in finalists:
        row = seen[st]
        # the one-shot model's criterion is its proxy value (the same blocks, the same rows):
        # it is built only when it wins (or for a study's hook)
        row["criterion_oneshot_refit"] = proxy
        if FINALIST_HOOK is not None:
            FINALIST_HOOK(st, "oneshot", oneshot_student(cctx, sel)[0], proxy)
        tried = [("oneshot", proxy)]
        student = recon = None
        # reconstruct_mode="oneshot" given: the one-shot refit only (from the Grams)
        if o.experimental.reconstruct_mode == "sequential":
            student, recon = reconstruct(cctx, sel)
            stream = run_stream(student, ctx.adapter, crit.calls, crit.inputs, ctx.device)
            value = crit.values([stream])[0]
            row["criterion_sequential_refit"] = value
            if FINALIST_HOOK is not None:
                FINALIST_HOOK(st, "sequential", student, value)
            tried.append(("sequential", value))
        for mode, v in tried:
            if best is None or _rank_value(v) < _rank_value(best[0]):
                best = (v, st, mode, cctx, sel, student if mode == "sequential" else None, recon)
    value, st, mode, cctx, sel, student, recon = best
    if mode == "oneshot":
        student, recon = oneshot_student(cctx, sel)
    runner = next((x[0] for x in ranked if x[0] != st), None)
    chosen = {**st.as_dict(), "refit": mode}
    report = {
        "criterion": crit.kind,
        "criterion_meaning": CRITERIA.get(crit.kind or "", ""),
        "heldout_rows": ctx.heldout.n_sequences,
        "heldout_tokens": ctx.heldout.n_tokens,
        "searched": {k: list(v) for k, v in axes.items() if len(v) > 1},
        "fixed": {k: v[0] for k, v in axes.items() if len(v) == 1},
        "stages": [list(p) for p in STAGES],
        "proxy": "one-shot ridge refit from the calibration Grams",
        "finalists": len(finalists),
        "candidates": rows,
        "chosen": chosen,
        "chosen_label": st.label() + f", {mode} refit",
        "chosen_criterion": value,
        "runner_up": runner.as_dict() if runner is not None else None,
        "runner_up_label": runner.label() if runner is not None else None,
        "proxy_s": t_proxy,
        "search_s": time.perf_counter() - t0,
    }
    return SearchOutcome(cctx, sel, student, recon, report)


def _rank_value(v: float | None) -> float:
    return v if v is not None and math.isfinite(v) else float("inf")


def fixed_report(reason: str) -> dict:
    """The ``structure`` block of a run that did not search."""
    return {"criterion": None, "candidates": [], "chosen": None, "not_searched": reason}
