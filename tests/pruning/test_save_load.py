"""Saving, loading back and never touching the user's model."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

from kcm_cuda.pruning import load_pruned, prune
from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.physical import apply_masks_in_place


def _inputs(tokenizer, sentences, n=16):
    enc = tokenizer(
        sentences[:n], padding=True, truncation=True, max_length=32, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


def _hash_dir(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "family,kind,scale",
    [
        ("bert", "seqcls", True),
        ("bert", "base", False),
        ("distilbert", "qa", True),
        ("distilbert", "seqcls", False),
        ("roberta", "seqcls", True),
    ],
)
def test_reload_equals_masked_model(tmp_path, tokenizer, sentences, builders, family, kind, scale):
    model = builders[family](kind, vocab_size=tokenizer.vocab_size)
    recon = "scale" if scale else "none"  # per-neuron factors: the masked model reproduces it
    r = prune(
        model, sentences, 0.65, reconstruct=recon, tokenizer=tokenizer, progress=False, samples=128
    )
    masked = copy.deepcopy(model)
    adapter = get_adapter(masked)
    apply_masks_in_place(
        masked,
        adapter,
        [r.masks[i] for i in sorted(r.masks)],
        [r.scales[i] for i in sorted(r.scales)],
    )
    inputs = _inputs(tokenizer, sentences)
    ref = _outputs(masked, inputs)
    for got in (_outputs(r.model, inputs),):
        for a, b in zip(ref, got, strict=True):
            assert (a - b).abs().max() <= 1e-4
    out = r.save(tmp_path / "pruned")
    loaded = load_pruned(out)
    assert type(loaded) is type(model)
    assert adapter.intermediate_sizes(loaded) == r.report["kept_per_layer"]
    for a, b in zip(ref, _outputs(loaded, inputs), strict=True):
        assert (a - b).abs().max() <= 1e-4
    # the directory: config with per-layer sizes, weights, tokenizer, report
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kcm_intermediate_sizes"] == r.report["kept_per_layer"]
    assert (out / "model.safetensors").is_file()
    assert (out / "tokenizer_config.json").is_file()
    rep = json.loads((out / "kcm_report.json").read_text())
    assert rep["flops"]["ratio"] <= 0.65 + 1e-9
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_output_exists_needs_overwrite(tmp_path, bert, tokenizer, sentences):
    r = prune(
        bert, sentences, 0.7, method="random", scale=False, tokenizer=tokenizer, progress=False
    )
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="overwrite"):
        r.save(out)
    assert (out / "keep.txt").read_text() == "user file"
    r.save(out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert load_pruned(out) is not None


def test_load_pruned_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_pruned(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_pruned(tmp_path / "empty")
    with pytest.raises(TypeError, match="path"):
        load_pruned(3)  # type: ignore[arg-type]


def test_user_model_and_directory_untouched(tmp_path, tokenizer, sentences, builders):
    import transformers

    src = tmp_path / "user_model"
    builders["bert"](vocab_size=tokenizer.vocab_size).save_pretrained(src)
    tokenizer.save_pretrained(src)
    before = _hash_dir(src)
    model = transformers.BertForSequenceClassification.from_pretrained(src)
    model.train()  # the user's mode must survive
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    r = prune(model, sentences, 0.6, scale=True, tokenizer=tokenizer, progress=False, samples=64)
    r.save(tmp_path / "out")
    assert _hash_dir(src) == before
    assert model.training
    assert model.config.intermediate_size == 96
    assert not hasattr(model.config, "kcm_intermediate_sizes")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert n_hooks == sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()
    )
    assert r.model is not model


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_plain_from_pretrained_loads_padded_save(tmp_path, tokenizer, sentences, builders, family):
    import transformers

    model = builders[family]("seqcls", vocab_size=tokenizer.vocab_size)
    kw = dict(method="magnitude", allocation="global", tokenizer=tokenizer, progress=False)
    r = prune(model, sentences, 0.65, samples=128, **kw)
    sizes = r.report["kept_per_layer"]
    assert len(set(sizes)) > 1  # heterogeneous: padding is exercised
    inputs = _inputs(tokenizer, sentences)
    ref = _outputs(r.model, inputs)
    padded = r.save(tmp_path / "padded")
    cls = getattr(transformers, type(model).__name__)
    plain = cls.from_pretrained(padded).eval()
    adapter = get_adapter(plain)
    assert adapter.intermediate_sizes(plain) == [max(sizes)] * len(sizes)
    for a, b in zip(ref, _outputs(plain, inputs), strict=True):
        assert (a - b).abs().max() <= 1e-4
    assert get_adapter(model).intermediate_sizes(load_pruned(padded)) == sizes
    # unpadded: smallest files, only load_pruned reads it
    compact = r.save(tmp_path / "compact", padded=False)
    assert (compact / "model.safetensors").stat().st_size < (
        padded / "model.safetensors"
    ).stat().st_size
    loaded = load_pruned(compact)
    for a, b in zip(ref, _outputs(loaded, inputs), strict=True):
        assert (a - b).abs().max() <= 1e-4
    with pytest.raises((RuntimeError, ValueError)):
        cls.from_pretrained(compact)
