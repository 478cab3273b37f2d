"""Attention-head removal: shrinking, the masked equivalent, zero-padded heads, save / reload
with per-layer head counts, the joint FLOPs model, bad inputs (tiny models, all families)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from kcm_cuda.pruning import load_pruned
from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.flops import FlopsModel
from kcm_cuda.pruning.physical import (
    HEADS_FIELD,
    apply_head_masks_in_place,
    apply_masks_in_place,
    prune_heads_in_place,
    prune_in_place,
)
from kcm_cuda.pruning.saving import save_pruned

FAMILIES = ("bert", "distilbert", "roberta")


def _inputs(tokenizer, sentences, n=12):
    enc = tokenizer(
        sentences[:n], padding=True, truncation=True, max_length=32, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _out(model, inputs):
    with torch.no_grad():
        o = model(**inputs)
    return [v for v in o.values() if isinstance(v, torch.Tensor)]


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _head_masks(n_layers, n_heads=4):
    # layer 0 keeps a single head, layer 1 keeps heads 1 and 3, others keep 0, 2, 3
    pats = [[False, True, False, False], [False, True, False, True], [True, False, True, True]]
    return [torch.tensor(pats[min(i, 2)][:n_heads]) for i in range(n_layers)]


@pytest.mark.parametrize("family", FAMILIES)
def test_shrunk_heads_equal_masked_model(family, builders, tokenizer, sentences):
    model = builders[family]("seqcls", vocab_size=tokenizer.vocab_size)
    adapter = get_adapter(model)
    masks = _head_masks(len(adapter.layers(model)))
    inputs = _inputs(tokenizer, sentences)
    dense = _out(model, inputs)
    masked = apply_head_masks_in_place(copy.deepcopy(model), adapter, masks)
    ref = _out(masked, inputs)
    assert _max_diff(ref, dense) > 1e-3  # the masks do change the model
    shrunk = prune_heads_in_place(copy.deepcopy(model), adapter, masks)
    assert adapter.head_counts(shrunk) == [int(m.sum()) for m in masks]
    assert getattr(shrunk.config, HEADS_FIELD) == [int(m.sum()) for m in masks]
    d_h = adapter.head_size(shrunk.config)
    for block, m in zip(adapter.layers(shrunk), masks, strict=True):
        k = int(m.sum())
        assert adapter.q(block).out_features == k * d_h
        assert adapter.v(block).out_features == k * d_h
        assert adapter.o(block).in_features == k * d_h
    assert _max_diff(ref, _out(shrunk, inputs)) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_padded_heads_add_nothing(family, builders, tokenizer, sentences):
    model = builders[family]("base", vocab_size=tokenizer.vocab_size)
    adapter = get_adapter(model)
    masks = _head_masks(len(adapter.layers(model)))
    shrunk = prune_heads_in_place(copy.deepcopy(model), adapter, masks)
    inputs = _inputs(tokenizer, sentences)
    ref = _out(shrunk, inputs)
    padded = copy.deepcopy(shrunk)
    d_h = adapter.head_size(padded.config)
    for block in adapter.layers(padded):
        adapter.pad_heads(block, 4, d_h)
    assert adapter.head_counts(padded) == [4] * len(masks)
    # the zero heads' contexts (O's input columns) are exactly zero
    ctx = []
    hooks = [
        adapter.o(b).register_forward_pre_hook(lambda _m, a: ctx.append(a[0]))
        for b in adapter.layers(padded)
    ]
    got = _out(padded, inputs)
    for h in hooks:
        h.remove()
    for c, m in zip(ctx, masks, strict=True):
        k = int(m.sum())
        assert bool((c[..., k * d_h :] == 0).all())
        assert bool((c[..., : k * d_h] != 0).any())
    assert _max_diff(ref, got) <= 1e-5  # the same up to float summation order


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [True, False])
def test_save_reload_heads_and_neurons(tmp_path, family, padded, builders, tokenizer, sentences):
    model = builders[family]("seqcls", vocab_size=tokenizer.vocab_size)
    adapter = get_adapter(model)
    blocks = adapter.layers(model)
    hmasks = _head_masks(len(blocks))
    gen = torch.Generator().manual_seed(0)
    nmasks = []
    for i, b in enumerate(blocks):
        n = adapter.w1(b).out_features
        m = torch.rand(n, generator=gen) < (0.3 + 0.2 * i)
        m[0] = True
        nmasks.append(m)
    masked = copy.deepcopy(model)
    apply_masks_in_place(masked, adapter, nmasks)
    apply_head_masks_in_place(masked, adapter, hmasks)
    inputs = _inputs(tokenizer, sentences)
    ref = _out(masked, inputs)
    pruned = prune_in_place(copy.deepcopy(model), adapter, nmasks)
    prune_heads_in_place(pruned, adapter, hmasks)
    assert _max_diff(ref, _out(pruned, inputs)) <= 1e-4
    out = save_pruned(pruned, tmp_path / "p", padded=padded)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg[HEADS_FIELD] == [int(m.sum()) for m in hmasks]
    assert cfg[adapter.heads_field] == 4  # the head size stays hidden / 4
    loaded = load_pruned(out)
    assert adapter.head_counts(loaded) == [int(m.sum()) for m in hmasks]
    assert adapter.intermediate_sizes(loaded) == [int(m.sum()) for m in nmasks]
    assert _max_diff(ref, _out(loaded, inputs)) <= 1e-4
    if padded:  # plain from_pretrained loads it, zero heads and neurons included
        plain = getattr(transformers, cfg["architectures"][0]).from_pretrained(str(out)).eval()
        assert adapter.head_counts(plain) == [4] * len(blocks)
        assert _max_diff(ref, _out(plain, inputs)) <= 1e-4
    else:
        with pytest.raises(Exception):  # noqa: B017 - transformers' own size-mismatch error
            getattr(transformers, cfg["architectures"][0]).from_pretrained(str(out))


def test_ffn_only_save_has_no_heads_field(tmp_path, bert):
    adapter = get_adapter(bert)
    out = save_pruned(copy.deepcopy(bert), tmp_path / "p")
    assert HEADS_FIELD not in json.loads((out / "config.json").read_text())
    assert adapter.head_counts(load_pruned(out)) == [4] * len(adapter.layers(bert))


def test_bad_head_masks(bert):
    adapter = get_adapter(bert)
    n = len(adapter.layers(bert))
    ok = [torch.ones(4, dtype=torch.bool) for _ in range(n)]
    with pytest.raises(ValueError, match="keeps no head"):
        prune_heads_in_place(
            copy.deepcopy(bert), adapter, [torch.zeros(4, dtype=torch.bool)] + ok[1:]
        )
    with pytest.raises(ValueError, match="bool tensor of 4 entries"):
        prune_heads_in_place(copy.deepcopy(bert), adapter, [torch.ones(3, dtype=torch.bool)] * n)
    with pytest.raises(ValueError, match="bool tensor"):
        apply_head_masks_in_place(copy.deepcopy(bert), adapter, [torch.ones(4)] * n)
    with pytest.raises(ValueError, match="head masks for"):
        prune_heads_in_place(copy.deepcopy(bert), adapter, ok[:1])
    block = adapter.layers(bert)[0]
    with pytest.raises(ValueError, match="at least 1 attention head"):
        adapter.shrink_heads(block, torch.tensor([], dtype=torch.long), 8)
    with pytest.raises(ValueError, match="head indices"):
        adapter.shrink_heads(block, torch.tensor([4]), 8)
    with pytest.raises(ValueError, match="cannot pad"):
        adapter.pad_heads(block, 3, 8)


def test_load_rejects_nonzero_head_padding_and_bad_counts(tmp_path, bert):
    adapter = get_adapter(bert)
    pruned = prune_heads_in_place(copy.deepcopy(bert), adapter, _head_masks(3))
    out = save_pruned(pruned, tmp_path / "p")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[HEADS_FIELD] = [1, 2]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="one head count for each of 3 layers"):
        load_pruned(out)
    cfg[HEADS_FIELD] = [0, 2, 3]
    cfg_path.write_text(json.dumps(cfg))
    # a count below 1 is refused with config.json's other checks, before anything is built
    with pytest.raises(ValueError, match="kcm_attention_heads must be a list of whole numbers"):
        load_pruned(out)
    # the padded file stores 4 heads per layer; claiming 1 in layer 1 exposes non-zero heads
    cfg[HEADS_FIELD] = [1, 1, 3]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="padding heads .* are not zero"):
        load_pruned(out)


def test_joint_flops_model():
    s, d, H, dh = 40.0, 384, 12, 32
    fm = FlopsModel(s, d, (1536,) * 6, heads=(H,) * 6, head_size=dh)
    ffn_only = FlopsModel(s, d, (1536,) * 6)
    # full heads cost exactly the FFN-only attention term
    assert fm.per_head * H == pytest.approx(ffn_only.attention_per_layer)
    assert fm.total() == pytest.approx(ffn_only.total())
    assert fm.per_head == 4 * s * d * dh + 2 * s * s * dh
    floor = fm.joint_floor(1)
    assert floor == pytest.approx(6 * fm.per_head / fm.total())
    assert floor < 0.05 < 0.3 < ffn_only.attention_floor
    kept_heads = [1, 2, 3, 4, 5, 6]
    k = fm.neuron_budget(0.3, kept_heads=kept_heads)
    budget = 0.3 * fm.total()
    assert fm.total_from_count(k, kept_heads) <= budget
    assert fm.total_from_count(k + 1, kept_heads) > budget
    assert fm.total([k, 0, 0, 0, 0, 0], kept_heads) == pytest.approx(
        fm.total_from_count(k, kept_heads)
    )
    with pytest.raises(ValueError, match="attention floor"):
        ffn_only.neuron_budget(0.3)
    with pytest.raises(ValueError, match="kept heads alone"):
        fm.neuron_budget(0.01, kept_heads=[12] * 6)
    with pytest.raises(ValueError, match="head_size"):
        FlopsModel(s, d, (1536,), heads=(12,))
    with pytest.raises(ValueError, match="head counts for"):
        FlopsModel(s, d, (1536,), heads=(12, 12), head_size=32)
    with pytest.raises(ValueError, match="FFN-only"):
        _ = ffn_only.per_head
