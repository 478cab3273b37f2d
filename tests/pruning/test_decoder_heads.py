"""Attention-head pruning of grouped-query decoders (LLaMA / Mistral / Qwen2): the two structures
(``gqa_heads="groups"``: whole KV groups; ``"per_group"``: the same number of query heads out
of every group), their FLOPs, the masked reference, save / load_pruned / the padded form,
generation with a KV cache, the O refit without a bias, and the bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch

import kcm_cuda
from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.context import ffn_flops_model, head_flops_model
from kcm_cuda.pruning.data import prepare_sample
from kcm_cuda.pruning.heads import (
    HeadEnergyRecorder,
    HeadLayout,
    collect_head_stats,
    head_layouts,
)
from kcm_cuda.pruning.physical import apply_head_masks_in_place, apply_masks_in_place
from tests.pruning.conftest import DECODER_FAMILIES, tiny_decoder, token_batch

HEADS, KV_HEADS, D_H = 8, 2, 8  # tiny_decoder(hidden=64): 4 query heads per KV head
STRUCTURES = ("groups", "per_group")


def _model(family: str = "llama"):
    return tiny_decoder(family, heads=HEADS, kv_heads=KV_HEADS)


def _prune(model, structure: str, **options):
    options.setdefault("progress", False)
    experimental = {"gqa_heads": structure, "head_split": "proportional"}
    experimental.update(options.pop("experimental", {}))
    return kcm_cuda.prune(
        model, token_batch(), flops=0.6, heads=True, experimental=experimental, **options
    )


def _shapes(model) -> list[tuple[int, int, int]]:
    """Per layer: (query heads, KV heads, the module's num_key_value_groups)."""
    return [
        (
            b.self_attn.q_proj.out_features // D_H,
            b.self_attn.k_proj.out_features // D_H,
            b.self_attn.num_key_value_groups,
        )
        for b in model.model.layers
    ]


def _flops_of(model, s: float) -> float:
    """The blocks' MACs of a (pruned) LLaMA-family model counted from its shapes alone."""
    d = model.config.hidden_size
    total = 0.0
    for q, kv, _ in _shapes(model):
        total += s * d * (2 * q * D_H + 2 * kv * D_H) + s * s * q * D_H  # causal attention
    for b in model.model.layers:
        total += 3 * s * d * b.mlp.gate_proj.out_features
    return total


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_prune_heads_structure_flops_save_load_generate(family, structure, tmp_path):
    model = _model(family)
    res = _prune(model, structure)
    rep, pruned = res.report, res.model
    shapes = _shapes(pruned)
    assert sum(q for q, _, _ in shapes) < 3 * HEADS, "no head was pruned"
    for q, kv, groups in shapes:
        assert groups == q // kv and q % kv == 0
        if structure == "groups":
            assert q == kv * (HEADS // KV_HEADS)  # whole groups: g stays
        else:
            assert kv == KV_HEADS  # K and V untouched, the same g' in every group
    assert rep["heads"]["gqa_heads"] == structure
    assert rep["heads_kept_per_layer"] == [q for q, _, _ in shapes]
    assert rep["heads"]["kv_heads_kept_per_layer"] == [kv for _, kv, _ in shapes]
    assert [row["kv_heads_kept"] for row in rep["layers"]] == [kv for _, kv, _ in shapes]
    # the FLOPs the report gives are those of the shapes, within the budget
    s = rep["data"]["mean_tokens"]
    assert rep["flops"]["before"] == pytest.approx(_flops_of(model, s))
    assert rep["flops"]["after"] == pytest.approx(_flops_of(pruned, s))
    assert rep["flops"]["ratio"] <= 0.6 + 1e-9
    assert rep["flops"]["ratio"] > 0.5
    assert get_adapter(pruned).head_size(pruned.config) == D_H
    assert pruned.config.num_attention_heads == HEADS
    for b in pruned.model.layers:  # the refit adds no O bias
        assert b.self_attn.o_proj.bias is None

    ids = token_batch(3, 16, seed=3)["input_ids"]
    ref = _logits(pruned, ids)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    prompt = ids[:2, :5]
    g_mem = pruned.generate(prompt, use_cache=True, **kw)
    assert torch.equal(g_mem, pruned.generate(prompt, use_cache=False, **kw))
    for padded in (True, False):
        out = tmp_path / f"pruned-{padded}"
        res.save(out, padded=padded)
        loaded = kcm_cuda.load_pruned(out)
        assert _shapes(loaded) == shapes
        assert (_logits(loaded, ids) - ref).abs().max() <= 1e-4
        assert torch.equal(loaded.generate(prompt, use_cache=True, **kw), g_mem)
    if family == "llama":  # the padded save is a plain LLaMA checkpoint (zero heads, mlp_bias)
        plain = type(model).from_pretrained(tmp_path / "pruned-True")
        assert _shapes(plain) == [(HEADS, KV_HEADS, HEADS // KV_HEADS)] * 3
        assert (_logits(plain, ids) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("structure", STRUCTURES)
def test_pruned_model_is_the_masked_dense_model(structure):
    """reconstruct="none": removing the heads (and their KV groups) is zeroing their O columns."""
    model = _model("llama")
    res = _prune(model, structure, reconstruct="none")
    adapter = get_adapter(model)
    head_masks = [res.head_masks[i] for i in range(3)]
    assert not all(bool(m.all()) for m in head_masks)
    masked = apply_head_masks_in_place(copy.deepcopy(model), adapter, head_masks)
    masked = apply_masks_in_place(masked, adapter, [res.masks[i] for i in range(3)])
    ids = token_batch(3, 16, seed=4)["input_ids"]
    assert (_logits(res.model, ids) - _logits(masked, ids)).abs().max() <= 1e-4
    assert (_logits(res.model, ids) - _logits(model, ids)).abs().max() > 1e-3


def test_o_refit_lowers_the_error_without_a_bias():
    res = _prune(_model("llama"), "per_group")
    refit = [row for row in res.report["layers"] if row["heads_kept"] < HEADS]
    assert refit and any(row["o_refit"] for row in refit)
    for row in refit:
        assert row["o_refit_error_after"] <= row["o_refit_error_before"]
        if row["o_refit"]:
            assert row["o_refit_error_after"] < row["o_refit_error_before"]


@pytest.mark.parametrize("structure", [None, *STRUCTURES])
def test_default_split_runs_and_keeps_the_budget(structure):
    experimental = {} if structure is None else {"gqa_heads": structure}
    res = kcm_cuda.prune(
        _model("mistral"),
        token_batch(),
        flops=0.6,
        heads=True,
        progress=False,
        experimental=experimental,
        structure="fixed",  # the split is the default one, not searched
    )
    assert res.report["flops"]["ratio"] <= 0.6 + 1e-9
    assert res.report["heads"]["split"] == "per_mac"
    assert res.report["heads"]["gqa_heads"] == (structure or "per_group")  # the default


def test_head_layout_units():
    energy = torch.tensor([1.0, 5.0, 2.0, 0.0, 3.0, 2.5, 9.0, 1.0])  # 2 groups of 4
    groups = HeadLayout("groups", 8, 2)
    assert (groups.units, groups.heads_per_unit) == (2, 4)
    assert groups.unit_values(energy).tolist() == [8.0, 15.5]
    assert groups.head_mask(energy, 1).tolist() == [False] * 4 + [True] * 4
    per_group = HeadLayout("per_group", 8, 2)
    assert (per_group.units, per_group.heads_per_unit) == (4, 2)
    # unit j: each group's j-th largest, summed
    assert per_group.unit_values(energy).tolist() == [14.0, 5.0, 3.5, 1.0]
    assert per_group.head_mask(energy, 2).tolist() == [
        False, True, True, False, True, False, True, False,
    ]  # fmt: skip


@pytest.mark.parametrize("structure", STRUCTURES)
def test_decoder_head_flops_model(structure):
    """Every unit kept costs what the FFN-only decoder model says; a unit costs its heads."""
    model = _model("llama")
    adapter = get_adapter(model)
    sizes = adapter.intermediate_sizes(model)
    s, d = 20.0, 64
    fm = head_flops_model(model, adapter, s, sizes, structure)
    assert fm.total() == pytest.approx(ffn_flops_model(model, adapter, s, sizes).total())
    per_q = 2 * s * d * D_H + s * s * D_H
    per_kv = 2 * s * d * D_H
    if structure == "groups":
        assert fm.heads == (KV_HEADS,) * 3
        assert fm.per_head == pytest.approx(4 * per_q + per_kv)
    else:
        assert fm.heads == (HEADS // KV_HEADS,) * 3
        assert fm.per_head == pytest.approx(KV_HEADS * per_q)
        assert fm.attention_fixed == pytest.approx(KV_HEADS * per_kv)
    assert fm.units_of([HEADS, 4, 2]) == ([2, 1, 0] if structure == "groups" else [4, 2, 1])


def test_head_energies_exclude_padding():
    """Right-padded causal sequences: what the padding positions hold changes nothing, and
    the energies recorded during the activation pass equal their own block-by-block pass."""
    from kcm_cuda.pruning.activations import collect_activation_stats

    model = _model("qwen2")
    adapter = get_adapter(model)
    cpu = torch.device("cpu")
    data = token_batch(20, 16)
    other = {k: v.clone() for k, v in data.items()}
    pad = other["attention_mask"] == 0
    assert bool(pad.any())
    other["input_ids"][pad] = 77

    def stats(d):
        sample = prepare_sample(d, None, samples=20, max_length=16, seed=0, causal=True)
        return sample, collect_head_stats(model, adapter, sample, batch_size=8, device=cpu)

    sample, a = stats(data)
    _, b = stats(other)
    assert a.n_batches == 3
    for x, y in zip(a.energy, b.energy, strict=True):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)
    rec = HeadEnergyRecorder(model, adapter)
    try:
        collect_activation_stats(model, adapter, sample, batch_size=8, device=cpu, progress=False)
    finally:
        shared = rec.detach()
    for x, y in zip(a.energy, shared.energy, strict=True):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)


def test_bad_structure_is_a_value_error():
    with pytest.raises(ValueError, match="gqa_heads must be one of"):
        _prune(_model("llama"), "kv")


def test_min_heads_above_the_query_heads_is_refused():
    with pytest.raises(ValueError, match="min_heads=9 exceeds a layer's 8 query heads"):
        _prune(_model("llama"), "groups", min_heads=9)


def test_min_heads_rounds_up_to_whole_units():
    res = _prune(_model("llama"), "groups", min_heads=5)  # 2 groups of 4: both kept
    assert res.report["heads_kept_per_layer"] == [HEADS] * 3


def test_layouts_need_a_uniform_structure():
    model = _model("llama")
    adapter = get_adapter(model)
    blocks = adapter.layers(model)
    adapter.shrink_heads(blocks[0], torch.tensor([0, 1, 4, 5]), D_H)  # per_group: g' = 2
    with pytest.raises(ValueError, match="same number of query heads per KV head"):
        head_layouts(model, adapter, "groups")
    assert [lay.units for lay in head_layouts(model, adapter, "per_group")] == [2, 4, 4]


def test_kwon_is_refused_on_decoders():
    with pytest.raises(ValueError, match="not supported for LLaMA"):
        kcm_cuda.prune(_model("llama"), token_batch(), flops=0.6, method="kwon", labels=[0] * 48)
