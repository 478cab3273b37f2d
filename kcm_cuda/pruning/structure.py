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
  criterion    for a classifier the mean KL(teacher ‖ student) of the class distributions
               (what the user keeps is the teacher's decision; KL sees a shift of the
               distribution before it flips a label, and needs no label); for a causal LM the
               student's mean NLL per token (that *is* the quantity a user of an LM cares
               about, teacher-free); for a regression head the squared error to the teacher's
               output relative to the teacher's variance; for a model without a head the
               squared error of the final hidden states relative to their energy (what any
               head put on top would read). Lower is better.
  cross-fit    no row is held out (``search_folds``, default 4): the calibration rows are cut
               into K folds (contiguous parts of the seeded draw) and the criterion is
               computed on up to ``JUDGED_TOKENS`` real tokens of them, fold after fold
               (:func:`judged_rows`: an LM's long rows fill it inside one fold, a classifier's
               short ones spread over all), each row through the candidate refit *without its
               fold* (the fold-out refit is a sub-solve: Gram of all rows minus Gram of the
               fold).
               The masks come from every row's statistics; the model returned is refit on
               every row. ``search_folds=0``: the search of before, on ``search_rows`` rows held
               out from the calibration sample (which the returned model does not see).
  proxy        every candidate is judged with a one-shot refit that costs no pass of its own
               over the calibration data: its kept W2 columns and b2 (and, with heads, O's
               kept columns) are the ridge solution of the same problem as the default's
               refit but on the teacher's inputs, a sub-solve of the layer's Gram. The
               candidate's blocks are built physically, one block at a time, and the judged
               rows run through them (``proxy_criteria``).
  memory       nothing is held for every layer: the activation pass computes each layer's
               Gram, hands it to the error allocation's curve (one vector per score) and drops
               it; each proxy pass runs the teacher over the calibration rows block by block
               beside the candidates' streams (:class:`CalibrationStream`), so at any time one
               layer's per-fold Grams exist, in float64 on the execution device (float32
               products per batch). The search is skipped, with a warning, only when one
               layer's statistics do not fit (:func:`search_does_not_fit`).
  ties         the criterion on a few thousand tokens has a noise floor: when a simpler
               structure (fewer parts away from FFN-only, uniform widths, the first score,
               the default split) is within ``search_tie_se`` paired standard errors (over the
               judged rows) of the lowest criterion, the simpler one is kept (:func:`pick`;
               ``report["structure"]["tie_rule"]``).
  refit        cross-fitted: the winner is refit on every row with the default's sequential
               refit (``reconstruct_mode="oneshot"``: the one-shot refit). Held-out mode: the
               best candidate (``search_finalists``) is built with both refits and the lower
               held-out criterion is returned.

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
from kcm_cuda.pruning.blockwise import (
    block_device,
    capture_block_inputs,
    detached_copy,
    executing,
    hidden_store,
    input_device,
    is_offloaded,
    model_inputs,
    move_to,
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


# The search holds one layer's statistics at a time (module doc, "memory"): per fold an
# (n × n) Gram of the FFN's input and, with heads, a (d_attn × d_attn) one of O's input, their
# total and one fold-out copy, and the one-shot refit's working copy, all float64 on the
# execution device. It runs when that takes at most this share of the device's free memory.
LAYER_MEMORY_SHARE = 0.5


def layer_bytes(adapter, model: nn.Module, heads: bool, folds: int) -> int:
    """Bytes the search holds for its largest layer (float64; see LAYER_MEMORY_SHARE)."""
    copies = max(folds, 1) + 3
    n = max(adapter.intermediate_sizes(model))
    total = copies * n * n
    if heads:
        cfg = model.config
        d_attn = adapter.num_heads(cfg) * adapter.head_size(cfg)
        total += copies * d_attn * d_attn
    return 8 * total


def available_memory(device: torch.device | None = None) -> int | None:
    """Bytes free now on ``device`` (CUDA: the allocator's view; else the host's
    MemAvailable, Linux), None when unknown."""
    if device is not None and device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def search_does_not_fit(
    adapter, model: nn.Module, axes: dict[str, tuple], device: torch.device, folds: int
) -> str | None:
    """Why the search cannot hold one layer's statistics on ``device`` (None: it can)."""
    need = layer_bytes(adapter, model, True in axes.get("heads", ()), folds)
    free = available_memory(device)
    if free is None or need <= LAYER_MEMORY_SHARE * free:
        return None
    return (
        f"one layer's search statistics would take {need / 2**30:.1f} GiB, more than "
        f"{LAYER_MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free on {device}: the fixed "
        "rules (structure='fixed') ran; set heads= / allocation= / method= to choose "
        "yourself, or experimental={'search_folds': 2} to hold fewer Grams"
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


@dataclass
class Judged:
    """The rows a criterion is computed on: one part of the sample per fold (``fold`` None:
    held-out rows, judged by models fitted on every calibration row)."""

    fold: int | None
    sample: object  # TokenizedSample


# The rows judged, at most this many real tokens in all (every candidate runs them once per
# stage, so this bounds the search's cost on a causal LM's long rows as on short sentences).
JUDGED_TOKENS = 6144


def fold_bounds(n_rows: int, folds: int) -> list[int]:
    """Row boundaries of ``folds`` contiguous folds of the sample's seeded order."""
    return [(f * n_rows + folds - 1) // folds for f in range(folds + 1)]


def judged_rows(sample, folds: int, tokens: int = JUDGED_TOKENS) -> list[Judged]:
    """The rows the cross-fitted criterion judges, each by a model fitted without its fold:
    the rows of folds 0, 1, … in order until they hold ``tokens`` real tokens (at least one
    row). Long rows (an LM's) fill the budget inside the first fold, so each candidate needs
    one fold-out refit per layer; short rows (a classifier's) spread it over every fold.
    The sample's order is the seeded draw, so each fold is a random part of the data."""
    bounds = fold_bounds(sample.n_sequences, folds)
    lengths = sample.attention_mask.sum(dim=1)
    out, left = [], tokens
    for f in range(folds):
        lo, hi = bounds[f], bounds[f + 1]
        if hi <= lo:
            continue
        fits = int((lengths[lo:hi].cumsum(0) <= left).sum())
        part = sample.part(lo, lo + max(1, fits))
        out.append(Judged(f, part))
        left -= part.n_tokens
        if left <= 0 or fits < hi - lo:
            break
    return out


class HeldoutCriterion:
    """The criterion of :mod:`structure` on the judged rows (``ctx.heldout`` in the held-out
    mode, else :func:`judged_rows` of the calibration sample): final hidden states per batch
    (one stream per model) → the model's outputs (the model's own embeddings, norm and head,
    run on a copy without its blocks) → one number, lower is better. ``batch_fold[b]``: the
    fold whose fold-out model judges batch b (None: the model fitted on every row)."""

    def __init__(self, ctx, judged: list[Judged] | None = None, n_folds: int = 1) -> None:
        self.ctx = ctx
        self.n_folds = n_folds
        self.adapter = ctx.adapter
        self.judged = judged if judged is not None else [Judged(None, ctx.heldout)]
        self.device = ctx.device
        # causal LMs: smaller batches (the vocabulary-wide logits of a batch are materialised)
        bs = ctx.options.batch_size
        self.batch_size = min(bs, 8) if ctx.adapter.causal else bs
        self.calls, self.inputs, self.batch_fold = [], [], []
        for part in self.judged:
            store = hidden_store(ctx.teacher, ctx.adapter, part.sample, ctx.device)
            calls, inputs = capture_block_inputs(
                ctx.teacher, ctx.adapter, part.sample, self.batch_size, store=store
            )
            self.calls += calls
            self.inputs += inputs
            self.batch_fold += [part.fold] * len(calls)
        self.folds = sorted({f for f in self.batch_fold if f is not None})
        self._head: nn.Module | None = None
        self._inject: _Inject | None = None
        self.kind: str | None = None
        # a causal LM with its LM head is judged by its own NLL (no teacher needed)
        out_emb = getattr(ctx.teacher, "get_output_embeddings", None)
        self.lm = bool(ctx.adapter.causal and out_emb is not None and out_emb() is not None)
        self.teacher_final: list[torch.Tensor] | None = None
        self._teacher_out: list | None = None  # the teacher's outputs per batch (computed once)
        # per stream of the last values() call: each judged row's numerator; and the rows'
        # denominators (the same for every stream), for paired differences between models
        self.row_num: list[torch.Tensor] = []
        self.row_den: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return sum(p.sample.n_sequences for p in self.judged)

    @property
    def tokens(self) -> int:
        return sum(p.sample.n_tokens for p in self.judged)

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
        dev = input_device(self._output_model())
        for part in self.judged:
            yield from part.sample.batches(self.batch_size, dev)

    def teacher_stream(self) -> list[torch.Tensor]:
        """The teacher's final hidden states on the judged rows (computed once)."""
        if self.teacher_final is None:
            self.teacher_final = run_stream(
                self.ctx.teacher, self.adapter, self.calls, self.inputs, self.device
            )
        return self.teacher_final

    @torch.no_grad()
    def values(self, streams: list[list[torch.Tensor]]) -> list[float]:
        """The criterion of each stream of final hidden states (per-row parts: ``row_num``,
        ``row_den``)."""
        need_teacher = not self.lm
        t_final = self.teacher_stream() if need_teacher else None
        if need_teacher and self._teacher_out is None:
            self._teacher_out = [
                self._outputs(t_final[b], batch) for b, batch in enumerate(self._batches())
            ]
        nums: list[list[torch.Tensor]] = [[] for _ in streams]
        dens: list[torch.Tensor] = []
        for b, batch in enumerate(self._batches()):
            mask = batch["attention_mask"]
            ref = self._teacher_out[b] if need_teacher else None
            for s, stream in enumerate(streams):
                out = self._outputs(stream[b], batch)
                n, d = self._score(
                    out, ref, batch, mask, stream[b], None if ref is None else t_final[b]
                )
                nums[s].append(n.double().cpu())
                if s == 0:
                    dens.append(d.double().cpu())
        self.row_num = [torch.cat(x) for x in nums]
        self.row_den = torch.cat(dens) if dens else torch.zeros(0, dtype=torch.float64)
        den = float(self.row_den.sum())
        return [float(x.sum()) / den if den > 0 else float("nan") for x in self.row_num]

    def _score(self, out, ref, batch, mask, h_s, h_t) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of the batch: (numerator, denominator) of its contribution."""
        logits = getattr(out, "logits", None)
        if self.lm and logits is not None and logits.dim() == 3:
            self.kind = "nll"
            ids = batch["input_ids"]
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -lp.gather(-1, ids[:, 1:].unsqueeze(-1).to(lp.device)).squeeze(-1)
            m = (mask[:, 1:] * mask[:, :-1]).to(nll.device).double()
            return (nll.double() * m).sum(dim=1), m.sum(dim=1)
        if logits is not None and logits.shape[-1] >= 2:
            self.kind = "kl"
            return _kl(ref.logits, logits, mask if logits.dim() == 3 else None)
        if logits is not None:  # regression
            self.kind = "relative_mse"
            t, s = ref.logits.double(), logits.double().to(ref.logits.device)
            num = ((s - t) ** 2).reshape(t.shape[0], -1).sum(dim=1)
            den = ((t - t.mean()) ** 2).reshape(t.shape[0], -1).sum(dim=1) + 1e-12 / t.shape[0]
            return num, den
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
        m = mask.to(ht.device).double().unsqueeze(-1)
        t = ht.double() * m
        s = hs.double().to(ht.device) * m
        num = ((s - t) ** 2).sum(dim=(1, 2))
        den = (t**2).sum(dim=(1, 2)) + 1e-30 / t.shape[0]
        return num, den


def _kl(t_logits: torch.Tensor, s_logits: torch.Tensor, mask=None):
    """Per row: Σ KL(softmax t ‖ softmax s) (over the real tokens of 3-D logits), count."""
    lt = torch.log_softmax(t_logits.double(), dim=-1)
    ls = torch.log_softmax(s_logits.double().to(lt.device), dim=-1)
    kl = (lt.exp() * (lt - ls)).sum(dim=-1)
    if mask is not None:
        m = mask.to(kl.device).double()
        return (kl * m).sum(dim=1), m.sum(dim=1)
    return kl, torch.ones_like(kl)


def paired_se(num_a: torch.Tensor, num_b: torch.Tensor, den: torch.Tensor) -> float:
    """The standard error of criterion(a) − criterion(b) over the judged rows (rows as the
    units: a row's tokens are not independent)."""
    d = (num_a - num_b).double()
    if d.numel() < 2 or float(den.sum()) <= 0:
        return float("inf")
    return float(d.std(unbiased=True)) * math.sqrt(d.numel()) / float(den.sum())


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
        fit = LinearRefit(0, d, self.dev, fit_bias=False)  # its statistics are set here
        fit.k, fit.fit_bias = k, self.has_bias
        m = k + 1 if self.has_bias else k
        Gk = torch.empty(m, m, dtype=torch.float64, device=self.dev)
        Gk[:k, :k] = self.G[idx.unsqueeze(1), idx]
        Ck = torch.empty(m, d, dtype=torch.float64, device=self.dev)
        Ck[:k] = self.GW[idx]
        if self.has_bias:
            Gk[:k, k] = Gk[k, :k] = self.s[idx]
            Gk[k, k] = self.N
            Ck[k] = self.sW
        fit.G, fit.C, fit.yy, fit.tokens = Gk, Ck, torch.tensor(self.yy), int(self.N)
        W0 = self.W[:, idx]
        if k == self.W.shape[1]:  # nothing removed: the teacher's own output, nothing to refit
            e0 = fit.error(W0)
            return W0.cpu(), torch.zeros(d, dtype=torch.float64), False, e0, e0, self.yy
        W, db, fell_back = fit.ridge(W0, lam)
        solved = not fell_back
        W, db, fell_back = finite_refit(W, db, W0.cpu(), fell_back)
        e0, e1 = fit.last_errors
        if solved and fell_back:  # not finite: plain pruning kept
            e1 = e0
        return W, db, fell_back, e0, e1, self.yy


# -- one layer's statistics, from the teacher's calibration stream ---------------------------------
class FoldGrams:
    """One Linear's input statistics on the calibration rows, per fold: Σ x xᵀ (float64),
    Σ x and the token count, accumulated from float32 products per batch on the device."""

    def __init__(self, folds: int) -> None:
        self.G: list[torch.Tensor | None] = [None] * folds
        self.s: list[torch.Tensor | None] = [None] * folds
        self.N = [0] * folds

    def add(self, f: int, x: torch.Tensor) -> None:
        g = (x.t() @ x).double()
        sm = x.sum(dim=0, dtype=torch.float64)
        self.G[f] = g if self.G[f] is None else self.G[f].add_(g)
        self.s[f] = sm if self.s[f] is None else self.s[f].add_(sm)
        self.N[f] += int(x.shape[0])

    def total(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(G, s, N) over every row."""
        parts = [i for i, g in enumerate(self.G) if g is not None]
        G, s = self.G[parts[0]].clone(), self.s[parts[0]].clone()
        for i in parts[1:]:
            G.add_(self.G[i])
            s.add_(self.s[i])
        return G, s, sum(self.N)

    def without(self, total, f: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(G, s, N) over every row but fold ``f``'s."""
        G, s, N = total
        if self.G[f] is None:
            return G.clone(), s.clone(), N
        return G - self.G[f], s - self.s[f], N - self.N[f]


class CalibrationStream:
    """The teacher run block by block over the calibration sample (as the activation pass
    runs it), collecting at each layer the input statistics of W2 (and, with ``o_grams``, of
    the attention output projection O) per fold: what every candidate's one-shot refit of
    that layer is a sub-solve of. One layer's statistics exist at a time."""

    def __init__(self, ctx, folds: int, o_grams: bool, judged: list[int] | None = None) -> None:
        """``folds``: how the rows are cut; ``judged``: the folds whose fold-out statistics
        are needed (each its own bucket, the other rows one more; None: every fold)."""
        folds = max(1, folds)
        judged = list(range(folds)) if judged is None else list(judged)
        self.ctx, self.o_grams = ctx, o_grams
        self.bucket = {f: i for i, f in enumerate(judged)}  # fold → its statistics' bucket
        self.buckets = len(judged) + (len(judged) < folds)
        rest = len(judged)
        lookup = torch.tensor([self.bucket.get(f, rest) for f in range(folds)])
        sample, bs = ctx.sample, ctx.options.batch_size
        store = hidden_store(ctx.teacher, ctx.adapter, sample, ctx.device)
        # batched fold by fold: every batch's statistics go to one bucket
        self.calls, self.hidden, self.batch_bucket = [], [], []
        bounds = fold_bounds(sample.n_sequences, folds)
        for f in range(folds):
            if bounds[f + 1] <= bounds[f]:
                continue
            part = sample.part(bounds[f], bounds[f + 1])
            calls, hidden = capture_block_inputs(ctx.teacher, ctx.adapter, part, bs, store=store)
            self.calls += calls
            self.hidden += hidden
            self.batch_bucket += [int(lookup[f])] * len(calls)

    @torch.no_grad()
    def layer(self, tb: nn.Module, dev) -> tuple[FoldGrams, FoldGrams | None]:
        """Run teacher block ``tb`` (the next one) over the calibration rows: its statistics."""
        adapter = self.ctx.adapter
        ffn = FoldGrams(self.buckets)
        att = FoldGrams(self.buckets) if self.o_grams else None
        cur: dict = {}

        def hook_for(acc: FoldGrams):
            def hook(_module, args):
                acc.add(cur["bucket"], real_tokens(args[0], cur["mask"]).float())

            return hook

        handles = [adapter.w2(tb).register_forward_pre_hook(hook_for(ffn))]
        if att is not None:
            handles.append(adapter.o(tb).register_forward_pre_hook(hook_for(att)))
        try:
            for b, call in enumerate(self.calls):
                cur["mask"] = call.mask.to(dev)
                cur["bucket"] = self.batch_bucket[b]
                self.hidden[b] = run_block(tb, call, self.hidden[b], dev)
        finally:
            for h in handles:
                h.remove()
        return ffn, att


def _layer_refits(ctx, tb: nn.Module, bdev, ffn_stats, o_stats) -> tuple:
    """The one-shot refits of one layer from its statistics ((G, s, N) each; O's None
    without heads)."""
    adapter = ctx.adapter
    w2 = adapter.w2(tb)
    ffn = _OneShot(*ffn_stats, w2.weight, refit_bias(ctx.options, adapter), bdev)
    attn = None
    if o_stats is not None:
        o = adapter.o(tb)
        attn = _OneShot(*o_stats, o.weight, o.bias is not None, bdev)
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
    """Each selection's criterion after the one-shot refit (see the module doc): one pass
    of the teacher over the calibration rows, block by block; at each layer, per fold, the
    fold-out refit of every selection and the fold's judged rows run through it."""
    adapter, dev, teacher = ctx.adapter, ctx.device, ctx.teacher
    streams = [[x.clone() for x in crit.inputs] for _ in sels]
    blocks = adapter.layers(teacher)
    heads = any(s.head_masks is not None for s in sels)
    folds = crit.folds
    cal = CalibrationStream(ctx, crit.n_folds, heads, judged=folds or None)
    groups = [(None, [b for b, f in enumerate(crit.batch_fold) if f is None])]
    if folds:
        groups = [(f, [b for b, g in enumerate(crit.batch_fold) if g == f]) for f in folds]
    bar = progress_bar(
        range(len(blocks)),
        total=len(blocks),
        desc="structure",
        enabled=ctx.options.progress,
        unit="layer",
    )
    for layer in bar:
        with executing(blocks[layer], dev) as (tb, bdev):
            ffn_g, o_g = cal.layer(tb, bdev)
            ffn_all = ffn_g.total()
            o_all = o_g.total() if o_g is not None else None
            for f, batches in groups:
                i = None if f is None else cal.bucket[f]
                ffn_s = ffn_all if i is None else ffn_g.without(ffn_all, i)
                o_s = None if o_g is None else (o_all if i is None else o_g.without(o_all, i))
                ffn, attn = _layer_refits(ctx, tb, bdev, ffn_s, o_s)
                del ffn_s, o_s
                for si, sel in enumerate(sels):
                    sb = _oneshot_block(ctx, tb, bdev, layer, sel, ffn, attn)
                    for b in batches:
                        streams[si][b] = run_block(sb, crit.calls[b], streams[si][b], bdev)
                    del sb
                del ffn, attn
            del ffn_g, o_g, ffn_all, o_all
    return crit.values(streams)


@torch.no_grad()
def oneshot_student(ctx, sel: Selection):
    """The physically pruned model with the one-shot refits on every calibration row (one
    pass of the teacher: each layer's refit is a sub-solve of its Gram, made and dropped
    layer by layer), and its ReconstructionResult."""
    from kcm_cuda.pruning.physical import record_heads, record_mlp_bias, record_sizes
    from kcm_cuda.pruning.reconstruct import ORefitResult, ReconstructionResult

    adapter = ctx.adapter
    recon = ReconstructionResult("ridge", "oneshot", [], tokens=ctx.sample.n_tokens)
    heads = sel.head_masks is not None
    if heads:
        recon.o_refit = ORefitResult()
    cal = CalibrationStream(ctx, 1, heads)
    student = skeleton_copy(ctx.teacher, adapter)
    for layer, blk in enumerate(adapter.layers(ctx.teacher)):
        with executing(blk, ctx.device) as (tb, bdev):
            ffn_g, o_g = cal.layer(tb, bdev)
            o_s = o_g.total() if o_g is not None else None
            ffn, attn = _layer_refits(ctx, tb, bdev, ffn_g.total(), o_s)
            del ffn_g, o_g, o_s
            sb = _oneshot_block(ctx, tb, bdev, layer, sel, ffn, attn, recon)
            del ffn, attn
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


def _complexity(st: Structure, axes: dict[str, tuple]) -> int:
    """How many parts of ``st`` differ from the simplest structure the axes allow (FFN
    neurons only, uniform widths, the first score, the default split)."""
    simple_alloc = "uniform" if "uniform" in axes["allocation"] else axes["allocation"][0]
    n = int(st.heads and False in axes["heads"])
    n += int(st.allocation != simple_alloc)
    n += int(st.method != axes["method"][0])
    n += int(st.heads and st.head_split != axes["head_split"][0])
    return n


def pick(live: list, rows: dict, axes: dict[str, tuple], se_units: float) -> tuple:
    """The candidate the search keeps among ``live`` ((structure, ctx, selection, value)):
    the lowest criterion, unless a simpler structure (:func:`_complexity`) is within
    ``se_units`` paired standard errors of it (``rows[structure]``: its per-row numerators);
    then the simplest of those (the lower criterion among equals). Returns (pick, tie info)."""
    best = min(live, key=lambda x: _rank_value(x[3]))
    if se_units <= 0 or not math.isfinite(_rank_value(best[3])):
        return best, None
    num_b, den = rows[best[0]]
    ties = []
    for x in live:
        if x is best or not math.isfinite(_rank_value(x[3])):
            continue
        se = paired_se(rows[x[0]][0], num_b, den)
        if x[3] - best[3] <= se_units * se:
            ties.append((x, se))
    simpler = [t for t in ties if _complexity(t[0][0], axes) < _complexity(best[0], axes)]
    if not simpler:
        return best, None
    chosen, se = min(simpler, key=lambda t: (_complexity(t[0][0], axes), t[0][3]))
    info = {
        "lowest": best[0].as_dict(),
        "lowest_criterion": best[3],
        "kept": chosen[0].as_dict(),
        "difference": chosen[3] - best[3],
        "se": se,
    }
    return chosen, info


def search_structure(ctx, axes: dict[str, tuple]) -> SearchOutcome:
    """Run the search (module doc) and return the winner, fully reconstructed."""
    t0 = time.perf_counter()
    o = ctx.options
    ex = o.experimental
    ctx.curve_methods = tuple(axes["method"]) if "error" in axes["allocation"] else ()
    if True in axes["heads"]:
        ctx.head_stats()  # shares the activation pass when it runs now
    ctx.activation_stats()
    folds = ex.search_folds if ctx.heldout is None else 0
    if folds:
        crit = HeldoutCriterion(ctx, judged_rows(ctx.sample, folds), n_folds=folds)
    else:
        crit = HeldoutCriterion(ctx)
    rows: list[dict] = []
    seen: dict[Structure, dict] = {}
    row_nums: dict[Structure, tuple] = {}
    live: list[tuple[Structure, object, Selection, float]] = []
    ties: list[dict] = []
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
            for (st, cctx, sel), v, num in zip(todo, values, crit.row_num, strict=True):
                seen[st]["criterion"] = v
                row_nums[st] = (num, crit.row_den)
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
        if not any(math.isfinite(_rank_value(x[3])) for x in live):
            raise ValueError(
                f"the structure search's criterion ({crit.kind}) is not finite for any "
                "candidate: the model's outputs are NaN / inf on the unlabeled rows (a float16 "
                "model that overflows? load it in bfloat16 or float32); nothing was pruned"
            )
        chosen, tie = pick(live, row_nums, axes, ex.search_tie_se)
        if tie is not None:
            ties.append({"stage": stage, **tie})
        best = chosen[0]
        at = {
            "method": best.method,
            "allocation": best.allocation,
            "heads": best.heads,
            "head_split": best.head_split or at["head_split"],
        }
    t_proxy = time.perf_counter() - t0
    for x in live:
        if x[0] != best:
            seen[x[0]]["se_vs_chosen"] = paired_se(
                row_nums[x[0]][0], row_nums[best][0], crit.row_den
            )

    winner = next(x for x in live if x[0] == best)
    ranked = [winner] + sorted(
        (x for x in live if x is not winner), key=lambda x: _rank_value(x[3])
    )
    finalists = [winner] if folds else ranked[: max(1, ex.search_finalists)]
    result = None
    for st, cctx, sel, proxy in finalists:
        row = seen[st]
        # the one-shot model's criterion is its proxy value (the same blocks, the same rows):
        # it is built only when it wins (or for a study's hook)
        row["criterion_oneshot_refit"] = proxy
        if FINALIST_HOOK is not None and not folds:
            FINALIST_HOOK(st, "oneshot", oneshot_student(cctx, sel)[0], proxy)
        tried = [("oneshot", proxy)]
        student = recon = None
        if ex.reconstruct_mode == "sequential":
            # every calibration row (cross-fitted mode: the judged rows too, so this model's
            # criterion on them would be in-sample and is not compared with the proxy's)
            student, recon = reconstruct(cctx, sel)
            if folds:
                tried = [("sequential", proxy)]
            else:
                stream = run_stream(student, ctx.adapter, crit.calls, crit.inputs, ctx.device)
                value = crit.values([stream])[0]
                row["criterion_sequential_refit"] = value
                tried.append(("sequential", value))
            if FINALIST_HOOK is not None:
                FINALIST_HOOK(st, "sequential", student, tried[-1][1])
        for mode, v in tried:
            if result is None or _rank_value(v) < _rank_value(result[0]):
                result = (v, st, mode, cctx, sel, student if mode == "sequential" else None, recon)
    value, st, mode, cctx, sel, student, recon = result
    if mode == "oneshot":
        student, recon = oneshot_student(cctx, sel)
        if FINALIST_HOOK is not None and folds:
            FINALIST_HOOK(st, "oneshot", student, value)
    runner = next((x[0] for x in ranked if x[0] != st), None)
    chosen = {**st.as_dict(), "refit": mode}
    for row in rows:  # strict JSON in memory too: an undefined number is None
        for key, v in list(row.items()):
            if isinstance(v, float) and not math.isfinite(v):
                row[key] = None
    judged = (
        f"{folds}-fold cross-fit: each judged row by the one-shot refit fitted without its fold"
        if folds
        else "rows held out from the calibration sample"
    )
    report = {
        "criterion": crit.kind,
        "criterion_meaning": CRITERIA.get(crit.kind or "", ""),
        "judged_on": judged,
        "folds": folds,
        "judged_rows": crit.rows,
        "judged_tokens": crit.tokens,
        "heldout_rows": crit.rows,  # (the name before cross-fitting; = judged_rows)
        "fitted_rows": ctx.sample.n_sequences,
        "searched": {k: list(v) for k, v in axes.items() if len(v) > 1},
        "fixed": {k: v[0] for k, v in axes.items() if len(v) == 1},
        "stages": [list(p) for p in STAGES],
        "proxy": "one-shot ridge refit, a sub-solve of each layer's Gram (one layer at a time)",
        "tie_rule": {
            "se_units": ex.search_tie_se,
            "meaning": "a simpler structure within this many paired SEs of the lowest "
            "criterion is kept",
            "applied": ties,
        },
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
