"""Reliability round three (issue: the new paths — search, standard layout, ONNX export,
load_pruned): each fault found by hand, as a test that failed before its fix."""

from __future__ import annotations

import pytest
import torch

from kcm_cuda.pruning import prune
from tests.pruning.conftest import tiny_decoder, token_batch


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
@pytest.mark.parametrize("method", ["flap", "wanda_sp"])
def test_flap_and_wanda_sp_with_bias_compensation_run_on_every_decoder(family, method):
    """FLAP as published (and Wanda-sp + bias) on Qwen2 / Mistral: the bias compensation is
    written as the down_proj bias those classes lack (kcm_mlp_bias, read by load_pruned)."""
    lm = tiny_decoder(family)
    r = prune(
        lm, token_batch(n=64, width=20), 0.7, method=method, reconstruct="bias",
        progress=False, samples=64,
    )  # fmt: skip
    assert r.report["reconstruct"] == "bias"
    ids = torch.randint(3, lm.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.isfinite(r.model(input_ids=ids).logits).all()
    assert getattr(r.model.config, "kcm_mlp_bias", None)


def test_standard_layout_on_llama_only_keeps_head_counts_its_config_accepts(tmp_path):
    """8 query / 2 KV heads, hidden 64, c = 0.8 with heads: 6 heads (what the budget gave)
    do not divide hidden_size, which LlamaConfig refuses; the layout keeps a count it accepts,
    and the output loads in plain transformers."""
    import transformers

    lm = tiny_decoder("llama", heads=8, kv_heads=2, hidden=64)
    r = prune(
        lm, token_batch(n=64, width=20), 0.8, layout="standard", heads=True, progress=False,
        samples=64,
    )  # fmt: skip
    n = r.model.config.num_attention_heads
    assert 64 % n == 0 and n < 8
    out = r.save(tmp_path / "m")
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, r.model(input_ids=ids).logits)


def test_standard_layout_of_a_per_layer_output_is_refused_before_the_prune(monkeypatch):
    from kcm_cuda.pruning import context
    from kcm_cuda.pruning.adapters import get_adapter
    from kcm_cuda.pruning.physical import prune_heads_in_place, record_heads

    lm = tiny_decoder("llama", heads=4, kv_heads=2)
    ad = get_adapter(lm)
    masks = [torch.tensor([True, True, True, True]), torch.tensor([True, False, True, False]),
             torch.tensor([True, True, True, True])]  # fmt: skip
    prune_heads_in_place(lm, ad, masks)
    record_heads(lm, ad)
    called = []
    monkeypatch.setattr(context, "prepare_sample", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match="differ by layer"):
        prune(lm, token_batch(n=64, width=20), 0.7, layout="standard", progress=False)
    assert not called  # nothing was read or pruned


# -- load_pruned of damaged configs: one line naming config.json and the field, before building
def _saved_llama(tmp_path):
    lm = tiny_decoder("llama")
    r = prune(lm, token_batch(n=64, width=20), 0.7, progress=False, samples=64, heads=False,
              structure="fixed")  # fmt: skip
    return r.save(tmp_path / "m")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("rms_norm_eps", float("nan"), "rms_norm_eps is nan, not a finite number"),
        ("rope_theta", float("inf"), "rope_theta is inf"),
        ("architectures", 3, "architectures must be a list"),
        ("num_attention_heads", 0, "num_attention_heads = 0 is not a whole number"),
        ("num_hidden_layers", 10**9, "num_hidden_layers = 1000000000 is not a whole number"),
        ("hidden_size", "64", "hidden_size = '64' is not a whole number"),
        ("num_hidden_layers", True, "num_hidden_layers = True"),
        ("dtype", "bogus", "dtype = 'bogus' is not a dtype name"),
        ("kcm_intermediate_sizes", 5, "kcm_intermediate_sizes must be a list"),
        ("kcm_intermediate_sizes", ["a", "b", "c"], "kcm_intermediate_sizes must be a list"),
        ("kcm_intermediate_sizes", [-1, 2, 3], "kcm_intermediate_sizes must be a list"),
        ("kcm_intermediate_sizes", [1.5, 2, 3], "kcm_intermediate_sizes must be a list"),
    ],
)
def test_load_pruned_refuses_a_damaged_config_in_one_line(tmp_path, field, value, match):
    import json

    from kcm_cuda import load_pruned

    out = _saved_llama(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg[field] = value
    (out / "config.json").write_text(json.dumps(cfg))  # json writes NaN / Infinity
    with pytest.raises(ValueError, match=match) as info:
        load_pruned(out)
    assert "config.json" in str(info.value) and "\n" not in str(info.value)


def test_load_pruned_refuses_dtypes_and_devices_that_hold_no_model(tmp_path):
    from kcm_cuda import load_pruned

    out = _saved_llama(tmp_path)
    with pytest.raises(ValueError, match="dtype must be"):
        load_pruned(out, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="meta"):
        load_pruned(out, device="meta")


def test_load_pruned_casts_one_odd_tensor_to_the_weights_dtype(tmp_path):
    from safetensors.torch import load_file, save_file

    from kcm_cuda import load_pruned

    out = _saved_llama(tmp_path)
    state = load_file(out / "model.safetensors")
    name = next(k for k in state if k.endswith("o_proj.weight"))
    state[name] = state[name].half()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    model = load_pruned(out)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(3, 128, (1, 8))).logits).all()
