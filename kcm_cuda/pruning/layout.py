"""The layout of the pruned model: per-layer widths (``layout="per_layer"``, the default) or the
standard layout (``layout="standard"``), in which every layer keeps the same FFN width and the
same attention heads, so the result is an ordinary checkpoint of its own architecture: plain
``AutoModelFor*.from_pretrained`` loads it at its pruned size, without kcm_cuda, and so does
what reads the stock config can (tested here: transformers, and ONNX export of encoders; an
engine's own limits on head counts are its own: README's engine notes).

What the standard layout constrains:
  FFN widths   every layer keeps ⌊k / L⌋ neurons (k: the budget's neurons, L: layers), the
               best by the method's score within the layer; the config's ``intermediate_size``
               is that width.
  heads        decoders (LLaMA / Mistral / Qwen2): every layer keeps the same head units
               (``gqa_heads="per_group"``: the same number of query heads in every KV group,
               the KV heads kept; ``"groups"``: the same number of whole KV groups); the config
               gets ``num_attention_heads``, ``num_key_value_heads`` and an explicit
               ``head_dim``. Encoders (BERT / DistilBERT / RoBERTa): their classes derive the
               head size from ``hidden_size / num_attention_heads``, so a config cannot say
               "fewer heads of the same size": their heads stay whole (``heads=True`` is an
               error, ``heads="auto"`` means no heads).
  refit        only parameters the stock class holds: LLaMA's ``mlp_bias`` (the refit's
               down_proj bias), encoders' own FFN output bias; Mistral / Qwen2 have no MLP or
               O bias, so their refit fits the weights alone (as it does by default in the
               per-layer layout too: :func:`refit_bias`; ``reconstruct="bias"``, which is a
               bias alone, is refused there).
  methods      score-based methods (the allocation decides the widths); ``kwon`` / ``obs``,
               which choose their own structure, are refused.

The structure search (``structure="search"``) searches within the constraint: the allocation
is fixed to these equal widths and, on encoders, heads stay off.
"""

from __future__ import annotations

import torch

LAYOUTS = ("per_layer", "standard")


def check_layout(opts, adapter, score_based: bool, model: torch.nn.Module | None = None) -> None:
    """Resolve and check ``opts`` (a PruneOptions) against ``layout="standard"`` for this model
    family (``score_based``: the method ranks neurons, so the allocation sets the widths) and
    ``model``: a clear ValueError, before any pass over the data, for what the layout cannot
    honour."""
    if opts.layout != "standard":
        return
    if model is not None:
        heads = adapter.head_counts(model)
        kv = adapter.kv_head_counts(model) if adapter.grouped else heads
        if len(set(heads)) > 1 or len(set(kv)) > 1:
            raise ValueError(
                f"layout='standard' needs the same heads in every layer, and this model's "
                f"differ by layer (query heads {heads}"
                + (f", KV heads {kv}" if adapter.grouped else "")
                + "): it is a per-layer output; prune it with layout='per_layer', or prune "
                "the original model with layout='standard'"
            )
    if not score_based:
        raise ValueError(
            f"layout='standard' needs a score-based method (the widths are set per layer): "
            f"method={opts.method!r} chooses its own structure; use layout='per_layer'"
        )
    if opts.allocation_given and opts.allocation != "uniform":
        raise ValueError(
            f"layout='standard' keeps the same FFN width in every layer: allocation="
            f"{opts.allocation!r} is not possible (leave it out, or 'uniform')"
        )
    opts.allocation, opts.allocation_given = "uniform", True
    if not adapter.causal:
        if opts.heads is True and not opts.heads_auto:
            raise ValueError(
                f"layout='standard' keeps {adapter.name}'s heads whole: its config derives the "
                "head size from hidden_size / num_attention_heads, so it cannot hold fewer "
                "heads; use heads=False (or layout='per_layer' to prune heads)"
            )
        opts.heads, opts.heads_auto = False, False
    if opts.experimental.refit_bias is True and not can_hold_ffn_bias(adapter):
        raise ValueError(
            f"layout='standard': {adapter.name}'s class has no MLP bias, so the refit cannot "
            "give down_proj one (experimental refit_bias=True); leave refit_bias unset"
        )
    if opts.reconstruction() == "bias" and not can_hold_ffn_bias(adapter):
        raise ValueError(
            f"layout='standard': reconstruct='bias' writes a down_proj bias, which "
            f"{adapter.name}'s class cannot hold; use reconstruct='ridge' (weights only) or "
            "layout='per_layer'"
        )


def can_hold_ffn_bias(adapter) -> bool:
    """Whether the family's stock class holds a bias on the FFN output (encoders: always;
    LLaMA: ``mlp_bias``; Mistral / Qwen2: no)."""
    return not adapter.causal or adapter.mlp_bias_field is not None


def refit_bias(opts, adapter) -> bool:
    """Whether the refit fits a bias change of the FFN output (b2 / down_proj) besides the
    weights: ``experimental refit_bias`` when set; otherwise where the family's stock class
    holds one (encoders, LLaMA's ``mlp_bias``), not on Mistral / Qwen2, in either layout.
    Measured on the deep Qwen2 LM (3 seeds, benchmarks/results/cpu-amd-epyc/layout_lm_deep):
    the weight-only refit costs +0.0001 / +0.0001 / +0.0004 / +0.0007 nats per token at
    c = 0.8 / 0.7 / 0.6 / 0.5 (perplexity ratio <= 1.001), and its output loads in the stock
    class (the padded save with plain from_pretrained too)."""
    given = opts.experimental.refit_bias
    if given is not None:
        return bool(given)
    if opts.reconstruction() == "bias":  # FLAP's bias compensation *is* a bias (kcm_mlp_bias)
        return True
    return can_hold_ffn_bias(adapter)


def equal_counts(sizes: list[int], k_total: int, keep_min: list[int]) -> list[int]:
    """The same neuron count in every layer, ⌊k_total / L⌋ (at most the narrowest layer, at
    least the largest ``keep_min``): the standard layout's widths."""
    k = min(min(sizes), k_total // max(len(sizes), 1))
    return [max(k, max(keep_min))] * len(sizes)


def equal_units(k_units: int, n_layers: int, min_units: int, max_units: int) -> int:
    """Head units per layer in the standard layout: ⌊k_units / L⌋ within [min, max]."""
    return min(max_units, max(min_units, k_units // max(n_layers, 1)))


def config_accepts_heads(config, n_heads: int, n_kv: int) -> bool:
    """Whether the model's own config class accepts these head counts (with the head size
    written out): what transformers validates (LLaMA: hidden_size divisible by the heads)."""
    d = config.to_dict()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d.update(num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim)
    for key in ("model_type", "transformers_version", "architectures"):
        d.pop(key, None)
    try:
        type(config)(**d)
    except Exception:  # noqa: BLE001 - any validation failure means "not these counts"
        return False
    return True


def stock_head_units(config, layout, units: int, lo: int, hi: int, neuron_budget) -> int:
    """The head units per layer nearest ``units`` (below first, then above) whose head counts
    the config class accepts and whose FLOPs leave a neuron budget (``neuron_budget(u)``
    raises BudgetError when not); ValueError, before any pruning, when none does."""
    from kcm_cuda.pruning.flops import BudgetError

    tried = []
    for u in [*range(units, lo - 1, -1), *range(units + 1, hi + 1)]:
        n_q, n_kv = layout.kept_counts(u)
        if not config_accepts_heads(config, n_q, n_kv):
            tried.append(n_q)
            continue
        try:
            neuron_budget(u)
        except BudgetError:
            continue
        return u
    raise ValueError(
        f"layout='standard': no head count {type(config).__name__} accepts fits this budget "
        f"(refused: {sorted(set(tried))} query heads with hidden_size {config.hidden_size}); "
        "use heads=False or layout='per_layer'"
    )


def write_stock_config(model: torch.nn.Module, adapter) -> None:
    """Write the pruned shapes into the config's own fields (every layer alike: checked) and
    drop the per-layer ``kcm_*`` records, so the model is an ordinary checkpoint."""
    from kcm_cuda.pruning.physical import HEADS_FIELD, KV_HEADS_FIELD, SIZES_FIELD

    cfg = model.config
    sizes = adapter.intermediate_sizes(model)
    if len(set(sizes)) > 1:
        raise RuntimeError(f"standard layout: the FFN widths differ by layer ({sizes})")
    setattr(cfg, adapter.intermediate_field, sizes[0])
    heads = adapter.head_counts(model)
    kv = adapter.kv_head_counts(model) if adapter.grouped else heads
    if len(set(heads)) > 1 or len(set(kv)) > 1:
        raise RuntimeError(f"standard layout: the head counts differ by layer ({heads}, {kv})")
    if adapter.causal:
        d_h = adapter.head_size(cfg)
        cfg.head_dim = d_h  # explicit: hidden_size / heads no longer gives it
        setattr(cfg, adapter.heads_field, heads[0])
        if adapter.kv_heads_field is not None:
            setattr(cfg, adapter.kv_heads_field, kv[0])
    elif heads[0] != adapter.num_heads(cfg):
        raise RuntimeError("standard layout: an encoder's heads must stay whole")
    for name in (SIZES_FIELD, HEADS_FIELD, KV_HEADS_FIELD):
        if hasattr(cfg, name):
            delattr(cfg, name)
