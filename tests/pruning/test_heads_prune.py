"""prune(heads=True): joint head + neuron pruning under one FLOPs budget, the O refit,
save / reload, and FFN-only staying what it was."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from kcm_cuda.pruning import load_pruned, prune
from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.heads import HEAD_SCORES, JOINT_SPLITS
from kcm_cuda.pruning.physical import HEADS_FIELD, apply_head_masks_in_place, apply_masks_in_place


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


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_heads_reach_low_budgets_and_reload(tmp_path, family, builders, tokenizer, sentences):
    model = builders[family]("seqcls", vocab_size=tokenizer.vocab_size)
    adapter = get_adapter(model)
    r = prune(model, sentences, 0.3, heads=True, tokenizer=tokenizer, progress=False, samples=96)
    rep = r.report
    assert rep["flops"]["ratio"] <= 0.3 + 1e-9
    assert rep["flops"]["attention_floor"] > 0.3  # unreachable without heads
    kept_heads = rep["heads_kept_per_layer"]
    assert kept_heads == adapter.head_counts(r.model)
    assert all(1 <= k <= 4 for k in kept_heads) and sum(kept_heads) < 4 * len(kept_heads)
    assert kept_heads == [int(r.head_masks[i].sum()) for i in sorted(r.head_masks)]
    assert rep["heads"]["heads_kept"] == sum(kept_heads)
    assert rep["flops"]["heads_kept"] == sum(kept_heads)
    assert adapter.intermediate_sizes(r.model) == rep["kept_per_layer"]
    assert "heads" in r.summary()
    inputs = _inputs(tokenizer, sentences)
    ref = _out(r.model, inputs)
    for padded in (True, False):
        out = r.save(tmp_path / f"p{padded}", padded=padded)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg[HEADS_FIELD] == kept_heads
        loaded = load_pruned(out)
        assert adapter.head_counts(loaded) == kept_heads
        assert _max_diff(ref, _out(loaded, inputs)) <= 1e-4
    plain = getattr(transformers, cfg["architectures"][0]).from_pretrained(str(tmp_path / "pTrue"))
    assert _max_diff(ref, _out(plain.eval(), inputs)) <= 1e-4


def test_without_reconstruction_equals_the_masked_model(bert, tokenizer, sentences):
    r = prune(
        bert,
        sentences,
        0.4,
        heads=True,
        scale=False,
        tokenizer=tokenizer,
        progress=False,
        samples=96,
    )
    adapter = get_adapter(bert)
    masked = copy.deepcopy(bert)
    apply_masks_in_place(masked, adapter, [r.masks[i] for i in sorted(r.masks)])
    apply_head_masks_in_place(masked, adapter, [r.head_masks[i] for i in sorted(r.head_masks)])
    inputs = _inputs(tokenizer, sentences)
    assert _max_diff(_out(masked, inputs), _out(r.model, inputs)) <= 1e-4
    assert _max_diff(_out(bert, inputs), _out(r.model, inputs)) > 1e-3


def test_o_refit_lowers_the_attention_error(bert, tokenizer, sentences):
    # the sequential refit's O pass (the search may return its one-shot model instead)
    kw = dict(heads=True, tokenizer=tokenizer, progress=False, samples=96, structure="fixed")
    r = prune(bert, sentences, 0.35, **kw)
    rows = [row for row in r.report["layers"] if row["heads_kept"] < row["heads"]]
    assert rows
    for row in rows:
        if row["o_refit"]:
            assert row["o_refit_error_after"] < row["o_refit_error_before"]
    assert any(row["o_refit"] for row in rows)
    r0 = prune(bert, sentences, 0.35, experimental={"head_refit": False}, **kw)
    assert "o_refit" not in r0.report["layers"][0]
    assert [r0.head_masks[i].tolist() for i in r0.head_masks] == [
        r.head_masks[i].tolist() for i in r.head_masks
    ]


@pytest.mark.parametrize("split", JOINT_SPLITS)
@pytest.mark.parametrize("score", HEAD_SCORES)
def test_every_split_and_head_score(split, score, distilbert, tokenizer, sentences):
    r = prune(
        distilbert,
        sentences,
        0.5,
        heads=True,
        experimental=dict(head_split=split, head_score=score),
        scale=False,
        tokenizer=tokenizer,
        progress=False,
        samples=96,
    )
    assert r.report["flops"]["ratio"] <= 0.5 + 1e-9
    assert r.report["heads"]["split"] == split and r.report["heads"]["score"] == score
    assert all(int(m.sum()) >= 1 for m in r.head_masks.values())


def test_min_heads(bert, tokenizer, sentences):
    r = prune(
        bert,
        sentences,
        0.4,
        heads=True,
        min_heads=2,
        scale=False,
        tokenizer=tokenizer,
        progress=False,
        samples=96,
    )
    assert all(k >= 2 for k in r.report["heads_kept_per_layer"])


def test_ffn_only_is_unchanged_and_below_floor_says_heads(bert, tokenizer, sentences):
    kw = dict(tokenizer=tokenizer, progress=False, samples=96, scale=False)
    r = prune(bert, sentences, 0.7, **kw)
    assert r.head_masks is None
    assert r.report["heads_kept_per_layer"] is None and "heads" not in r.report
    assert "heads_kept" not in r.report["flops"]
    assert get_adapter(bert).head_counts(r.model) == [4, 4, 4]
    r2 = prune(bert, sentences, 0.7, heads=False, **kw)
    assert all(torch.equal(r.masks[i], r2.masks[i]) for i in r.masks)
    with pytest.raises(ValueError, match="prune heads too"):
        prune(bert, sentences, 0.2, **kw)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(heads="yes"), TypeError, "heads"),
        (dict(heads=True, experimental={"head_split": "greedy"}), ValueError, "head_split"),
        (dict(heads=True, experimental={"head_score": "best"}), ValueError, "head_score"),
        (dict(heads=True, min_heads=0), ValueError, "min_heads"),
        (dict(heads=True, experimental={"head_refit": "no"}), TypeError, "head_refit"),
        (dict(heads=True, min_heads=5), ValueError, "min_heads"),
        (dict(heads=True, flops=0.01), ValueError, "joint floor"),
    ],
)
def test_bad_head_options(kwargs, exc, match, bert, tokenizer, sentences):
    kwargs = dict(kwargs)
    flops = kwargs.pop("flops", 0.5)
    with pytest.raises(exc, match=match):
        prune(bert, sentences, flops, tokenizer=tokenizer, progress=False, samples=96, **kwargs)


def test_cache_reuses_head_stats(bert, tokenizer, sentences):
    cache: dict = {}
    kw = dict(heads=True, scale=False, tokenizer=tokenizer, progress=False, samples=96)
    a = prune(bert, sentences, 0.5, cache=cache, **kw)
    b = prune(bert, sentences, 0.5, cache=cache, **kw)
    assert "head_stats" in b.report["cached_stages"]
    assert all(torch.equal(a.head_masks[i], b.head_masks[i]) for i in a.head_masks)


def test_evaluation_digest_tells_head_masks_apart(bert, tokenizer, sentences):
    from kcm_cuda.evaluation.runner import _masks_digest

    kw = dict(scale=False, tokenizer=tokenizer, progress=False, samples=96)
    r = prune(bert, sentences, 0.5, heads=True, **kw)
    other = copy.copy(r)
    other.head_masks = {i: torch.ones_like(m) for i, m in r.head_masks.items()}
    assert _masks_digest(r) != _masks_digest(other)
    assert _masks_digest(r) == _masks_digest(copy.copy(r))


def test_heads_after_memoised_activation_stats(bert, tokenizer, sentences):
    # kcm-eval memoises the D2 pass: the heads stage must then run its own head pass
    from kcm_cuda.evaluation.runner import score_memo

    kw = dict(scale=False, tokenizer=tokenizer, progress=False, samples=96)
    stats: dict = {}
    with score_memo(stats):
        prune(bert, sentences, 0.5, **kw)
        r = prune(bert, sentences, 0.5, heads=True, **kw)
        again = prune(bert, sentences, 0.5, heads=True, **kw)
    assert stats.get("collect_activation_stats_hits", 0) >= 1
    assert stats.get("collect_head_stats_hits", 0) >= 1
    assert "head_energies" in r.report["timings_s"]
    ref = prune(bert, sentences, 0.5, heads=True, **kw)  # shared pass, no memo
    for i in ref.head_masks:
        assert torch.equal(ref.head_masks[i], r.head_masks[i])
        assert torch.equal(ref.head_masks[i], again.head_masks[i])


@pytest.mark.parametrize("variant", ["bias", "ridge", "scale"])
def test_heads_with_every_reconstruction(tmp_path, variant, bert, tokenizer, sentences):
    r = prune(
        bert,
        sentences,
        0.35,
        heads=True,
        reconstruct=variant,
        tokenizer=tokenizer,
        progress=False,
        samples=96,
    )
    assert r.report["reconstruct"] == variant
    assert r.report["flops"]["ratio"] <= 0.35 + 1e-9
    inputs = _inputs(tokenizer, sentences)
    loaded = load_pruned(r.save(tmp_path / "p"))
    assert _max_diff(_out(r.model, inputs), _out(loaded, inputs)) <= 1e-4


def test_o_refit_is_the_ridge_solution_of_the_first_layer(bert, tokenizer, sentences):
    """Layer 0 sees the same input in teacher and student, so its refit O must be
    argmin ||X W'ᵀ + db − (O_t(ctx_t) − b)||² + λ'||W' − W||², X = the kept heads' contexts
    (λ' = 0.01 · mean diag XᵀX, the bias unpenalised), computed here from plain forwards."""
    from kcm_cuda.pruning.data import prepare_sample
    from kcm_cuda.pruning.physical import prune_heads_in_place

    kw = dict(heads=True, tokenizer=tokenizer, progress=False, samples=48, max_length=32)
    r = prune(bert, sentences, 0.35, **kw)
    hm = [r.head_masks[i] for i in range(len(r.head_masks))]
    assert not bool(hm[0].all()), "the budget must prune heads in layer 0"
    adapter = get_adapter(bert)
    student = prune_heads_in_place(copy.deepcopy(bert), adapter, hm)
    sample = prepare_sample(sentences, tokenizer, samples=48, max_length=32, seed=0)
    mask = sample.attention_mask.bool()
    seen = {}

    def tap(name):
        def hook(_m, args, out):
            seen[name] = (args[0][mask].double(), out[mask].double())

        return hook

    o_t, o_s = adapter.o(adapter.layers(bert)[0]), adapter.o(adapter.layers(student)[0])
    handles = [o_t.register_forward_hook(tap("t")), o_s.register_forward_hook(tap("s"))]
    with torch.no_grad():
        for m in (bert, student):
            m(input_ids=sample.input_ids, attention_mask=sample.attention_mask)
    for h in handles:
        h.remove()
    X = torch.cat([seen["s"][0], torch.ones(len(seen["s"][0]), 1, dtype=torch.float64)], 1)
    Z = seen["t"][1] - o_s.bias.double()
    W0 = o_s.weight.detach().double()
    k = W0.shape[1]
    pen = torch.zeros(k + 1, dtype=torch.float64)
    pen[:k] = 0.01 * float((X[:, :k] ** 2).sum(0).mean())
    prior = torch.cat([W0.t(), torch.zeros(1, W0.shape[0], dtype=torch.float64)])
    theta = torch.linalg.solve(X.t() @ X + torch.diag(pen), X.t() @ Z + pen[:, None] * prior)
    o_r = adapter.o(adapter.layers(r.model)[0])
    assert r.report["layers"][0]["o_refit"]
    assert torch.allclose(o_r.weight.double(), theta[:k].t(), atol=2e-4, rtol=1e-3)
    assert torch.allclose(o_r.bias.double(), o_s.bias.double() + theta[k], atol=2e-4, rtol=1e-3)
    assert float((o_r.weight.detach().double() - W0).abs().max()) > 1e-3  # the refit changed O


def test_heads_with_oneshot_reconstruction(tmp_path, bert, tokenizer, sentences):
    kw = dict(heads=True, tokenizer=tokenizer, progress=False, samples=48)
    r = prune(bert, sentences, 0.35, experimental={"reconstruct_mode": "oneshot"}, **kw)
    rows = [row for row in r.report["layers"] if row["heads_kept"] < row["heads"]]
    assert rows and any(row["o_refit"] for row in rows)
    for row in rows:
        assert row["o_refit_error_after"] <= row["o_refit_error_before"]
    inputs = _inputs(tokenizer, sentences)
    loaded = load_pruned(r.save(tmp_path / "p"))
    assert _max_diff(_out(r.model, inputs), _out(loaded, inputs)) <= 1e-4
