"""The small LM: trained, cached as a standard HF directory, reloaded; cut short: not cached."""

from __future__ import annotations

import torch
from lm_fixtures import make_lines, tiny_settings

from kcm_cuda.evaluation.lm_data import split_lines
from kcm_cuda.evaluation.lm_train import META_FILE, cache_key, load_small_lm


def test_train_cache_and_reload(tmp_path, monkeypatch):
    monkeypatch.setenv("KCM_CUDA_CACHE", str(tmp_path / "cache"))
    text = split_lines("tiny", make_lines(400))
    s = tiny_settings()
    logs = []
    model, tok, meta = load_small_lm(text, s, log=logs.append, log_every=1)
    assert meta["cached"] is False and not meta["cut_short"]
    assert meta["steps_run"] == 2
    assert any("ETA" in m for m in logs)
    cdir = tmp_path / "cache" / "lm" / cache_key(text, s)
    assert meta["cache_path"] == str(cdir)
    assert (cdir / META_FILE).is_file() and (cdir / "config.json").is_file()
    assert not [p for p in cdir.parent.iterdir() if ".tmp" in p.name]  # atomic: no leftovers
    cfg = model.config
    assert (cfg.model_type, cfg.num_key_value_heads, cfg.num_attention_heads) == ("llama", 2, 4)
    model2, tok2, meta2 = load_small_lm(text, s, log=logs.append)
    assert meta2["cached"] is True
    assert tok2.get_vocab() == tok.get_vocab()
    x = torch.tensor([[tok.bos_token_id, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model2(input_ids=x).logits, model.eval()(input_ids=x).logits)
    # same seed, same settings: the same model when trained again
    model3, _, _ = load_small_lm(text, s, use_cache=False, log=logs.append)
    with torch.no_grad():
        torch.testing.assert_close(model3.eval()(input_ids=x).logits, model(input_ids=x).logits)


def test_cut_short_training_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("KCM_CUDA_CACHE", str(tmp_path / "cache"))
    text = split_lines("tiny", make_lines(400))
    s = tiny_settings(steps=50)
    _, _, meta = load_small_lm(text, s, time_budget_s=0.0, log=lambda m: None)
    assert meta["cut_short"] is True and meta["steps_run"] < 50
    assert "cache_path" not in meta
    assert not (tmp_path / "cache" / "lm" / cache_key(text, s)).exists()


def test_qwen2_architecture_trains_caches_and_reloads(tmp_path, monkeypatch):
    """The deeper LM's family: a Qwen2ForCausalLM (Q/K/V biases), cached and reloaded as such;
    the LLaMA settings' cache key is the one made before the architecture field existed."""
    import dataclasses
    import hashlib
    import json

    from kcm_cuda.evaluation.lm_train import CACHE_FORMAT, DEEP_LM_SETTINGS

    monkeypatch.setenv("KCM_CUDA_CACHE", str(tmp_path / "cache"))
    text = split_lines("tiny", make_lines(400))
    s = tiny_settings(architecture="qwen2", num_layers=3)
    model, tok, meta = load_small_lm(text, s, log=lambda m: None)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    model2, tok2, meta2 = load_small_lm(text, s, log=lambda m: None)
    assert meta2["cached"] is True and type(model2).__name__ == "Qwen2ForCausalLM"
    # the reloaded tokenizer is the trained one (not the family's own class)
    probe = ["don't stop 12345 café!!  ok", "The movie's plot\twas\u00a0fine... 3.5/10"]
    assert [tok2(x)["input_ids"] for x in probe] == [tok(x)["input_ids"] for x in probe]
    x = torch.tensor([[tok.bos_token_id, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model2(input_ids=x).logits, model.eval()(input_ids=x).logits)
    llama = tiny_settings()
    old = dataclasses.asdict(llama)
    del old["architecture"]
    payload = {"format": CACHE_FORMAT, "text": text.fingerprint(("train", "test")), "settings": old}
    expect = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    assert cache_key(text, llama) == expect != cache_key(text, s)
    assert DEEP_LM_SETTINGS.architecture == "qwen2" and DEEP_LM_SETTINGS.num_layers >= 8
