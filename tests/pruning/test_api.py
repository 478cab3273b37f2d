"""prune(): methods, heads, determinism, argument errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kcm_cuda.pruning import METHODS, prune


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs(method, bert, tokenizer, sentences):
    from kcm_cuda.pruning.methods import METHODS as REGISTRY

    labelled = REGISTRY[method].needs_labels  # kwon: random labels, one per sentence
    r = prune(
        bert,
        sentences,
        0.7,
        method=method,
        scale=False,
        tokenizer=tokenizer,
        progress=False,
        samples=96,
        **({"labels": [i % 2 for i in range(len(sentences))]} if labelled else {}),
    )
    assert r.report["method"] == method
    assert set(r.masks) == {0, 1, 2}
    assert all(m.dtype == torch.bool and m.numel() == 96 for m in r.masks.values())
    if not labelled:  # kwon's tuned mask values are its scales
        assert all(s is None for s in r.scales.values())
    assert r.report["uses_labels"] is labelled
    assert r.report["flops"]["ratio"] <= 0.7
    assert set(r.report["versions"]) >= {"torch", "transformers", "kcm_cuda"}
    assert "masks" in r.report["timings_s"]
    if method in ("kcm", "r2"):
        assert all(i >= 1 for i in r.report["r2_iterations"])
    assert "layer" in r.summary()


@pytest.mark.parametrize("kind", ["base", "qa"])
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_heads(family, kind, builders, tokenizer, sentences):
    model = builders[family](kind, vocab_size=tokenizer.vocab_size)
    r = prune(model, sentences, 0.7, tokenizer=tokenizer, progress=False, samples=96)
    assert type(r.model) is type(model)
    enc = tokenizer(sentences[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = r.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert all(torch.isfinite(v).all() for v in out.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize(
    "merge", ["mean_rank", "energy_weighted", "d2_r2_tiebreak", "r2_within_d2", "weighted"]
)
def test_merge_options(merge, distilbert, tokenizer, sentences):
    r = prune(
        distilbert,
        sentences,
        0.7,
        experimental=dict(merge=merge, r2_points="input", d2_mode="energy"),
        scale=False,
        tokenizer=tokenizer,
        progress=False,
        samples=96,
    )
    assert r.report["options"]["experimental"]["merge"] == merge


def test_same_seed_same_masks(bert, tokenizer, sentences):
    kw = dict(reconstruct="scale", tokenizer=tokenizer, progress=False, samples=64)
    a = prune(bert, sentences, 0.6, seed=7, **kw)
    b = prune(bert, sentences, 0.6, seed=7, **kw)
    for i in a.masks:
        assert torch.equal(a.masks[i], b.masks[i])
        assert torch.equal(a.scales[i], b.scales[i])
    c = prune(bert, sentences, 0.6, method="random", seed=8, **kw)
    d = prune(bert, sentences, 0.6, method="random", seed=9, **kw)
    assert any(not torch.equal(c.masks[i], d.masks[i]) for i in c.masks)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)


def test_unsupported_architecture_names_class(sentences, tokenizer):
    with pytest.raises(TypeError, match="Tiny"):
        prune(Tiny(), sentences, 0.7, tokenizer=tokenizer)
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        prune(transformers.GPT2LMHeadModel(cfg), sentences, 0.7, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="model must be"):
        prune("bert-base-uncased", sentences, 0.7, tokenizer=tokenizer)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"method": "fisher"}, ValueError, "method"),
        ({"samples": 0}, ValueError, "samples"),
        ({"max_length": 1}, ValueError, "max_length"),
        ({"seed": -1}, ValueError, "seed"),
        ({"experimental": {"sigma": 0.0}}, ValueError, "sigma"),
        ({"experimental": {"alpha": float("nan")}}, ValueError, "alpha"),
        ({"scale": "yes"}, TypeError, "scale"),
        ({"experimental": {"scale_lambda": -1.0}}, ValueError, "scale_lambda"),
        ({"min_keep": 2.0}, ValueError, "min_keep"),
        ({"backend": "cuda"}, ValueError, "cuda"),
        ({"backend": "nope"}, ValueError, "backend"),
        ({"device": "nonsense"}, ValueError, "device"),
        ({"experimental": {"r2_points": "both"}}, ValueError, "r2_points"),
        ({"experimental": {"d2_mode": "x"}}, ValueError, "d2_mode"),
        ({"experimental": {"merge": "x"}}, ValueError, "merge"),
    ],
)
def test_bad_arguments(kwargs, exc, match, bert, tokenizer, sentences):
    kwargs = {"method": "kcm", **kwargs}  # a method that runs the kernels checks backend=
    with pytest.raises(exc, match=match):
        prune(bert, sentences, 0.7, tokenizer=tokenizer, progress=False, **kwargs)


def test_feed_forward_chunking_model(builders, tokenizer, sentences):
    model = builders["bert"]("seqcls", vocab_size=tokenizer.vocab_size)
    model.config.chunk_size_feed_forward = 4
    for layer in model.bert.encoder.layer:
        layer.chunk_size_feed_forward = 4
    r = prune(model, sentences, 0.7, tokenizer=tokenizer, progress=False, samples=64)
    assert all(layer.chunk_size_feed_forward == 4 for layer in r.model.bert.encoder.layer)
    assert all(layer.chunk_size_feed_forward == 4 for layer in model.bert.encoder.layer)


def test_cache_reuses_expensive_stages(bert, tokenizer, sentences):
    cache: dict = {}
    kw = dict(method="kcm", tokenizer=tokenizer, progress=False, samples=64, scale=False)
    a = prune(bert, sentences, 0.7, cache=cache, **kw)
    assert a.report["cached_stages"] == [] and len(cache) == 2
    b = prune(bert, sentences, 0.6, cache=cache, experimental={"merge": "weighted"}, **kw)
    assert b.report["cached_stages"] == ["activations", "r2"]
    fresh = prune(bert, sentences, 0.6, experimental={"merge": "weighted"}, **kw)
    for i in b.masks:
        assert torch.equal(b.masks[i], fresh.masks[i])
    c = prune(bert, sentences, 0.6, cache=cache, seed=3, **kw)  # new sample: new activations
    assert c.report["cached_stages"] == ["r2"]
    with torch.no_grad():
        bert.bert.encoder.layer[0].output.dense.weight.mul_(1.5)  # new weights: nothing reused
    d = prune(bert, sentences, 0.6, cache=cache, seed=3, **kw)
    assert d.report["cached_stages"] == []
    with pytest.raises(TypeError, match="cache"):
        prune(bert, sentences, 0.6, cache=[], **kw)


def test_d2_kcm_mode(distilbert, tokenizer, sentences):
    r = prune(
        distilbert,
        sentences,
        0.7,
        method="d2",
        experimental=dict(d2_mode="kcm", d2_kcm_batches=2),
        scale=False,
        tokenizer=tokenizer,
        progress=False,
        samples=96,
        batch_size=32,
    )
    its = r.report["d2_kcm_iterations"]
    assert len(its) == 2 and all(len(x) == 2 and min(x) >= 1 for x in its)
    assert r.report["flops"]["ratio"] <= 0.7
