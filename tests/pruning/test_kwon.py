"""The labelled anchor ``kwon`` (Kwon et al. 2022) on tiny models with random labels: Fisher
shapes and signs, the FLOPs budget of the search, rearrangement and tuning invariants,
physical pruning equal to the masked model, labels plumbing and its errors."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from kcm_cuda import prune
from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.data import prepare_sample
from kcm_cuda.pruning.fisher import collect_mask_grads, default_logits_fn, layer_parts, masked
from kcm_cuda.pruning.methods.kwon import (
    JointFlops,
    apply_masked,
    pruned_loss,
    rearrange_layer,
    search_masks,
    select_kwon,
    tune_masks,
)


def _labels(n: int, seed: int = 0, k: int = 2) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(k) for _ in range(n)]


@pytest.fixture
def labelled(sentences):
    return sentences, _labels(len(sentences))


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_fisher_shapes_nonnegative_and_weights_untouched(builders, tokenizer, labelled, family):
    model = builders[family]("seqcls", vocab_size=tokenizer.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = get_adapter(model)
    texts, labels = labelled
    sample = prepare_sample(texts, tokenizer, samples=40, labels=labels, seed=1)
    parts = layer_parts(model, adapter)
    g = collect_mask_grads(model, parts, sample, default_logits_fn, batch_size=16)
    n_layers = len(adapter.layers(model))
    assert len(g.heads) == len(g.neurons) == n_layers
    for gh, gn, p in zip(g.heads, g.neurons, parts, strict=True):
        assert gh.shape == (40, p.n_heads)
        assert gn.shape == (40, p.w2.in_features)
        assert gh.abs().sum() > 0 and gn.abs().sum() > 0
    for f in g.head_fisher() + g.neuron_fisher():
        assert (f >= 0).all() and torch.isfinite(f).all()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_per_example_grads_match_single_example_backward(bert, tokenizer, labelled):
    texts, labels = labelled
    adapter = get_adapter(bert)
    parts = layer_parts(bert, adapter)
    sample = prepare_sample(texts, tokenizer, samples=6, labels=labels, seed=2)
    g = collect_mask_grads(bert, parts, sample, default_logits_fn, batch_size=6)
    # Example 3 alone, masks as plain (units,) leaves: its gradient must equal row 3.
    batch = {"input_ids": sample.input_ids[3:4], "attention_mask": sample.attention_mask[3:4]}
    if sample.token_type_ids is not None:
        batch["token_type_ids"] = sample.token_type_ids[3:4]
    hm = [torch.ones(p.n_heads, requires_grad=True) for p in parts]
    nm = [torch.ones(p.w2.in_features, requires_grad=True) for p in parts]
    with masked(parts, hm, nm):
        logits = bert(**batch).logits
        loss = torch.nn.functional.cross_entropy(logits, sample.labels[3:4])
        grads = torch.autograd.grad(loss, hm + nm)
    for i in range(len(parts)):
        torch.testing.assert_close(grads[i], g.heads[i][3], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[len(parts) + i], g.neurons[i][3], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("c", [0.9, 0.7, 0.5, 0.35])
def test_search_respects_budget_and_maximises_kept_fisher(c):
    gen = torch.Generator().manual_seed(0)
    hf = [torch.rand(4, generator=gen) * 5 for _ in range(3)]
    nf = [torch.rand(50, generator=gen) for _ in range(3)]
    fm = JointFlops(seq_len=12.0, hidden=32, head_dim=8, heads=(4, 4, 4), neurons=(50, 50, 50))
    res = search_masks(hf, nf, fm, c)
    h = sum(int(m.sum()) for m in res.head_masks)
    n = sum(int(m.sum()) for m in res.neuron_masks)
    assert (h, n) == (res.n_heads, res.n_neurons)
    assert fm.total(h, n) <= c * fm.total()
    assert all(int(m.sum()) >= 1 for m in res.head_masks)  # one head per layer at least
    # One more neuron would break the budget (or every neuron is kept).
    assert n == 150 or fm.total(h, n + 1) > c * fm.total()
    masks = res.head_masks + res.neuron_masks
    kept = sum(float(f[m].sum()) for f, m in zip(hf + nf, masks, strict=True))
    assert kept == pytest.approx(res.kept_fisher)
    # Brute force over the number of heads: nothing beats the search.
    all_n = torch.cat(nf).sort(descending=True).values
    for hh in range(3, 13):
        rest = c * fm.total() - hh * fm.per_head
        if rest < 0:
            break
        nn_ = min(int(rest // fm.per_neuron), 150)
        best_h = _best_heads_with_one_per_layer(hf, hh)
        assert res.kept_fisher >= (best_h + float(all_n[:nn_].double().sum())) * (1 - 1e-9)


def _best_heads_with_one_per_layer(hf, hh):
    tops = [float(f.double().max()) for f in hf]
    rest = torch.cat([f.double().sort(descending=True).values[1:] for f in hf]).sort(
        descending=True
    )
    return sum(tops) + float(rest.values[: hh - len(hf)].sum())


def test_search_below_floor_is_a_clear_error():
    fm = JointFlops(seq_len=12.0, hidden=32, head_dim=8, heads=(4, 4), neurons=(10, 10))
    hf = [torch.ones(4), torch.ones(4)]
    nf = [torch.ones(10), torch.ones(10)]
    with pytest.raises(ValueError, match="below the floor"):
        search_masks(hf, nf, fm, 0.01)


def test_rearrangement_never_raises_the_blockdiag_loss():
    gen = torch.Generator().manual_seed(3)
    for trial in range(20):
        n_units, n_ex = 12, 9
        base = torch.randn(n_ex, 3, generator=gen)
        grads = base @ torch.randn(3, n_units, generator=gen) + 0.3 * torch.randn(
            n_ex, n_units, generator=gen
        )
        fisher = grads.pow(2).sum(0)
        k = 1 + trial % (n_units - 1)
        mask = torch.zeros(n_units, dtype=torch.bool)
        mask[fisher.argsort(descending=True)[:k]] = True  # the diagonal (search) choice
        new = rearrange_layer(mask, grads)
        assert int(new.sum()) == k
        assert pruned_loss(grads, ~new) <= pruned_loss(grads, ~mask) + 1e-9


def test_rearrangement_uses_the_offdiagonal_fisher():
    # Units 0 and 1 have the largest Fisher but opposite gradients (pruning both together is
    # cheap): the diagonal choice keeps them; the rearrangement must find a cheaper pruned set.
    g = torch.tensor([[3.0, -3.0, 0.5, 2.0], [1.0, -1.0, 0.4, 2.0]])
    diag = torch.tensor([True, True, False, False])  # keep the 2 largest-Fisher units
    new = rearrange_layer(diag, g)
    assert int(new.sum()) == 2
    assert not torch.equal(new, diag)
    assert pruned_loss(g, ~new) < pruned_loss(g, ~diag)


def test_mask_tuning_lowers_reconstruction_error(bert, tokenizer, labelled):
    texts, labels = labelled
    adapter = get_adapter(bert)
    parts = layer_parts(bert, adapter)
    sample = prepare_sample(texts, tokenizer, samples=64, labels=labels, seed=0)
    gen = torch.Generator().manual_seed(0)
    hm = [torch.ones(p.n_heads, dtype=torch.bool) for p in parts]
    nm = [torch.rand(p.w2.in_features, generator=gen) < 0.8 for p in parts]
    info = tune_masks(bert, parts, sample, hm, nm, batch_size=16)
    assert info.stopped_at is None
    assert len(info.error_before) == len(parts)
    for e0, e1 in zip(info.error_before, info.error_after, strict=True):
        assert e1 < e0
    for s, m in zip(info.neuron_scales, nm, strict=True):
        assert s is not None and s.shape == (int(m.sum()),)


def _masked_reference_logits(model, adapter, sel, batch):
    ref = apply_masked(copy.deepcopy(model), adapter, sel)
    with torch.no_grad():
        return ref(**batch).logits


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_prune_kwon_physical_equals_masked(builders, tokenizer, labelled, family):
    model = builders[family]("seqcls", vocab_size=tokenizer.vocab_size)
    texts, labels = labelled
    res = prune(
        model,
        texts,
        0.5,
        method="kwon",
        labels=labels,
        tokenizer=tokenizer,
        samples=64,
        progress=False,
    )
    rep = res.report
    assert rep["uses_labels"] is True and rep["selection"]["uses_labels"] is True
    assert rep["flops"]["ratio"] <= 0.5 + 1e-12
    adapter = get_adapter(model)
    assert adapter.head_counts(res.model) == rep["heads_kept_per_layer"]
    assert adapter.intermediate_sizes(res.model) == rep["kept_per_layer"]
    # The same selection folded into an unshrunk copy (masked model) gives the same outputs.
    sample = prepare_sample(texts, tokenizer, samples=64, labels=labels, seed=0)
    sel = select_kwon(copy.deepcopy(model), adapter, sample, 0.5, default_logits_fn, batch_size=32)
    assert [int(h.sum()) for h in sel.head_masks] == rep["heads_kept_per_layer"]
    enc = tokenizer(texts[:16], padding=True, return_tensors="pt")
    with torch.no_grad():
        got = res.model(**enc).logits
    want = _masked_reference_logits(model, adapter, sel, dict(enc))
    assert (got - want).abs().max() <= 1e-4


def test_prune_kwon_with_encoder_and_classifier(tokenizer, labelled, builders):
    model = builders["bert"]("base", vocab_size=tokenizer.vocab_size)
    head = torch.nn.Linear(model.config.hidden_size, 2)
    texts, labels = labelled

    def classifier(hidden, mask):
        return head(hidden[:, 0])

    res = prune(
        model,
        texts,
        0.6,
        method="kwon",
        labels=labels,
        classifier=classifier,
        tokenizer=tokenizer,
        samples=48,
        progress=False,
    )
    assert res.report["uses_labels"] is True
    with pytest.raises(ValueError, match="no task head"):
        prune(
            model,
            texts,
            0.6,
            method="kwon",
            labels=labels,
            tokenizer=tokenizer,
            samples=48,
            progress=False,
        )


def test_labels_follow_the_drawn_rows(tokenizer, sentences):
    labels = list(range(len(sentences)))  # label = row index
    s = prepare_sample(sentences, tokenizer, samples=25, seed=7, labels=labels)
    assert torch.equal(s.labels, s.rows)
    sub = s.subset(5)
    assert torch.equal(sub.labels, s.labels[:5])
    ids = {
        "input_ids": torch.arange(40).view(10, 4) + 5,
        "attention_mask": torch.ones(10, 4, dtype=torch.long),
    }
    s2 = prepare_sample(ids, None, samples=4, seed=3, labels=torch.arange(10))
    assert torch.equal(s2.labels, s2.rows)


@pytest.mark.parametrize(
    "labels, err, match",
    [
        ([0, 1], ValueError, "aligned"),
        (["pos", "neg"] * 150, TypeError, "not strings"),
        ([[0, 1]] * 300, ValueError, "1-D"),
        ([-1] + [0] * 299, ValueError, ">= 0"),
        ([float("nan")] * 300, ValueError, "NaN"),
        ([None] * 300, ValueError, "None"),
        (5, TypeError, "sequence"),
        ([True, False] * 150, TypeError, "integers or floats"),
    ],
)
def test_bad_labels_are_clear_errors(tokenizer, sentences, labels, err, match):
    with pytest.raises(err, match=match):
        prepare_sample(sentences, tokenizer, samples=10, labels=labels)


def test_kwon_label_errors_through_prune(bert, tokenizer, sentences, tmp_path):
    with pytest.raises(ValueError, match="uses labels"):
        prune(bert, sentences, 0.6, method="kwon", tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="aligned"):
        prune(
            bert, sentences, 0.6, method="kwon", labels=[0, 1], tokenizer=tokenizer, progress=False
        )
    with pytest.raises(ValueError, match="out of range"):
        prune(
            bert,
            sentences,
            0.6,
            method="kwon",
            labels=[5] * len(sentences),
            tokenizer=tokenizer,
            samples=32,
            progress=False,
        )
    f = tmp_path / "d.txt"
    f.write_text("\n".join(sentences), encoding="utf-8")
    with pytest.raises(ValueError, match="file path cannot be aligned"):
        prune(
            bert,
            str(f),
            0.6,
            method="kwon",
            labels=[0] * len(sentences),
            tokenizer=tokenizer,
            progress=False,
        )
    with pytest.raises(TypeError, match="classifier must be callable"):
        prune(
            bert,
            sentences,
            0.6,
            method="kwon",
            labels=[0] * len(sentences),
            classifier=3,
            tokenizer=tokenizer,
            progress=False,
        )


def test_tuning_errors_match_the_measured_ffn_error(bert, tokenizer, labelled):
    """Layer 0 (its heads are never tuned): the reported FFN errors before / after tuning are
    the measured squared distance of the sublayer output (pre-LayerNorm) to the dense one."""
    texts, labels = labelled
    adapter = get_adapter(bert)
    parts = layer_parts(bert, adapter)
    sample = prepare_sample(texts, tokenizer, samples=48, labels=labels, seed=4)
    gen = torch.Generator().manual_seed(1)
    hm = [torch.rand(p.n_heads, generator=gen) < 0.7 for p in parts]
    for h in hm:
        h[0] = True
    nm = [torch.rand(p.w2.in_features, generator=gen) < 0.8 for p in parts]
    info = tune_masks(bert, parts, sample, hm, nm, batch_size=16)

    def ffn0_error(neuron_values):
        err = 0.0
        for batch in sample.batches(16, "cpu"):
            keep = batch["attention_mask"].bool()
            got = {}
            h = parts[0].ln_ffn.register_forward_pre_hook(
                lambda _m, a, got=got, keep=keep: got.__setitem__("y", a[0][keep].double())
            )
            try:
                with torch.no_grad():
                    bert(**batch)
                    dense = got["y"]
                    with masked(parts, [m.float() for m in hm], neuron_values):
                        bert(**batch)
            finally:
                h.remove()
            err += float((got["y"] - dense).pow(2).sum())
        return err

    binary = [m.float() for m in nm]
    tuned = []
    for m, s in zip(nm, info.neuron_scales, strict=True):
        v = torch.zeros(m.numel())
        v[m] = s
        tuned.append(v)
    assert ffn0_error(binary) == pytest.approx(info.error_before[0], rel=1e-4)
    assert ffn0_error(tuned) == pytest.approx(info.error_after[0], rel=1e-4)
    assert info.error_after[0] < info.error_before[0]


def test_kwon_save_and_reload_equal(bert, tokenizer, labelled, tmp_path):
    from kcm_cuda import load_pruned

    texts, labels = labelled
    res = prune(
        bert,
        texts,
        0.4,
        method="kwon",
        labels=labels,
        tokenizer=tokenizer,
        samples=64,
        progress=False,
    )
    path = res.save(tmp_path / "kwon")
    back = load_pruned(path)
    adapter = get_adapter(back)
    assert adapter.head_counts(back) == res.report["heads_kept_per_layer"]
    assert adapter.intermediate_sizes(back) == res.report["kept_per_layer"]
    enc = tokenizer(texts[:12], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert (back(**enc).logits - res.model(**enc).logits).abs().max() <= 1e-4
