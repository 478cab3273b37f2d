"""Decoder LLMs (LLaMA / Mistral / Qwen2 with grouped-query attention): prune through the public
API, save, reload, generate; block-by-block statistics; padding side, context length,
models spread over devices with accelerate."""

from __future__ import annotations

import copy

import pytest
import torch

import kcm_cuda
from kcm_cuda.pruning.activations import collect_activation_stats
from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.data import prepare_sample
from kcm_cuda.pruning.physical import apply_masks_in_place
from tests.pruning.conftest import DECODER_FAMILIES, tiny_bert, tiny_decoder, token_batch


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_prune_save_reload_generate(family, tmp_path):
    import transformers

    model = tiny_decoder(family)
    before = _state(model)
    data = token_batch()
    res = kcm_cuda.prune(model, data, flops=0.6, progress=False)
    assert _same_state(before, _state(model)), "the input model was modified"
    rep = res.report
    assert rep["architecture"] in ("LLaMA", "Mistral", "Qwen2")
    # the default: the structure search picks the score, the refit is the ridge
    assert rep["method"] == rep["structure"]["chosen"]["method"] and rep["reconstruct"] == "ridge"
    assert rep["flops"]["ratio"] <= 0.6 + 1e-9
    assert rep["flops"]["ratio"] > 0.55
    assert rep["flops"]["lm_head"] > 0
    pruned = res.model
    sizes = [b.mlp.gate_proj.out_features for b in pruned.model.layers]
    assert sizes == rep["kept_per_layer"] and sum(sizes) < 3 * 176
    for b in pruned.model.layers:  # gate, up and down shrink together; the refit's bias
        assert b.mlp.up_proj.out_features == b.mlp.gate_proj.out_features
        assert b.mlp.down_proj.in_features == b.mlp.gate_proj.out_features
        # where the stock class holds one (LLaMA's mlp_bias); Mistral / Qwen2: weights alone
        assert (b.mlp.down_proj.bias is not None) == (family == "llama")
        assert b.self_attn.k_proj.out_features == 2 * 16  # GQA untouched: 2 KV heads of 16

    ids = data["input_ids"][:3, :16]
    with torch.no_grad():
        ref = pruned(input_ids=ids).logits
    out = tmp_path / "pruned"
    res.save(out)
    loaded = kcm_cuda.load_pruned(out)
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - ref).abs().max() <= 1e-4
    assert [b.mlp.gate_proj.out_features for b in loaded.model.layers] == sizes

    cls = type(model)
    # the padded save is a plain checkpoint of the family (LLaMA: with mlp_bias=True)
    plain = cls.from_pretrained(out)
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - ref).abs().max() <= 1e-4
    if family != "llama":  # a down_proj bias the class cannot hold: refused, never dropped
        biased = kcm_cuda.prune(
            model,
            data,
            flops=0.6,
            progress=False,
            structure="fixed",
            experimental={"refit_bias": True},
        )
        biased.save(tmp_path / "biased")
        with pytest.raises(RuntimeError):
            cls.from_pretrained(tmp_path / "biased")
        back = kcm_cuda.load_pruned(tmp_path / "biased")
        with torch.no_grad():
            want = biased.model(input_ids=ids).logits
            assert (back(input_ids=ids).logits - want).abs().max() <= 1e-4

    prompt = ids[:2, :5]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    g_mem = pruned.generate(prompt, use_cache=True, **kw)
    g_load = loaded.generate(prompt, use_cache=True, **kw)
    g_nocache = loaded.generate(prompt, use_cache=False, **kw)
    assert g_mem.shape == (2, 13)
    assert torch.equal(g_mem, g_load) and torch.equal(g_load, g_nocache)
    assert isinstance(pruned, transformers.PreTrainedModel)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_generate_matches_masked_model(family):
    """Without a refit, the physically pruned model is the masked dense model: same tokens."""
    model = tiny_decoder(family)
    res = kcm_cuda.prune(model, token_batch(), flops=0.6, scale=False, progress=False)
    masked = apply_masks_in_place(
        copy.deepcopy(model), get_adapter(model), [res.masks[i] for i in range(3)]
    )
    prompt = token_batch(2, 6, seed=5)["input_ids"]
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, use_cache=True)
    assert torch.equal(res.model.generate(prompt, **kw), masked.generate(prompt, **kw))
    with torch.no_grad():
        d = (res.model(input_ids=prompt).logits - masked(input_ids=prompt).logits).abs().max()
    assert d <= 1e-4


@pytest.mark.parametrize(
    "options",
    [
        dict(method="flap", reconstruct="bias"),
        dict(method="wanda_sp", reconstruct="bias"),
        dict(method="d2"),
        dict(method="magnitude", reconstruct="scale"),
        dict(method="random", reconstruct="ridge", experimental={"reconstruct_mode": "oneshot"}),
        dict(method="kcm", backend="torch"),
        dict(method="obs"),
    ],
)
def test_methods_run_on_llama(options):
    model = tiny_decoder("llama")
    res = kcm_cuda.prune(model, token_batch(), flops=0.7, progress=False, **options)
    assert res.report["flops"]["ratio"] <= 0.7 + 1e-9
    with torch.no_grad():
        logits = res.model(input_ids=token_batch(2, 8)["input_ids"]).logits
    assert bool(torch.isfinite(logits).all())


def test_refit_lowers_the_layer_error():
    res = kcm_cuda.prune(tiny_decoder("llama"), token_batch(), flops=0.6, progress=False)
    for row in res.report["layers"]:
        assert row["reconstruct_error_after"] < row["reconstruct_error_before"]


def test_left_padding_is_moved_right():
    """A left-padded sample (a causal tokenizer's usual side) gives the same statistics and
    the same pruned model as the same sequences padded on the right."""
    model = tiny_decoder("llama")
    right = token_batch()
    n = right["attention_mask"].sum(dim=1)
    width = right["input_ids"].shape[1]
    left_ids = torch.zeros_like(right["input_ids"])
    left_mask = torch.zeros_like(right["attention_mask"])
    for i in range(len(n)):
        k = int(n[i])
        left_ids[i, width - k :] = right["input_ids"][i, :k]
        left_mask[i, width - k :] = 1
    left = {"input_ids": left_ids, "attention_mask": left_mask}
    assert not torch.equal(left_mask, right["attention_mask"])
    s, r = prepare_sample(left, None, causal=True), prepare_sample(right, None, causal=True)
    assert torch.equal(s.attention_mask, r.attention_mask)
    assert torch.equal(s.input_ids[s.attention_mask.bool()], r.input_ids[r.attention_mask.bool()])
    a = kcm_cuda.prune(model, left, flops=0.6, progress=False)
    b = kcm_cuda.prune(model, right, flops=0.6, progress=False)
    assert all(torch.equal(a.masks[i], b.masks[i]) for i in a.masks)
    ids = right["input_ids"][:2, :10]
    with torch.no_grad():
        assert (a.model(input_ids=ids).logits - b.model(input_ids=ids).logits).abs().max() < 1e-5


def test_padding_inside_a_sequence_is_refused():
    data = token_batch()
    data["attention_mask"][0, 2] = 0
    with pytest.raises(ValueError, match="padding between real tokens"):
        kcm_cuda.prune(tiny_decoder("llama"), data, flops=0.6, progress=False)


def test_sequences_longer_than_the_context_are_refused():
    model = tiny_decoder("llama", context=16)
    with pytest.raises(ValueError, match="context is 16 tokens"):
        kcm_cuda.prune(model, token_batch(width=24), flops=0.6, progress=False)


def test_text_data_with_a_tokenizer_without_pad_token():
    from tests.pruning.conftest import make_sentences, word_level_tokenizer

    tok = word_level_tokenizer()
    vocab = tok.get_vocab()
    assert tok.pad_token is None
    model = tiny_decoder("llama", vocab_size=len(vocab))
    res = kcm_cuda.prune(
        model, make_sentences(120), flops=0.7, tokenizer=tok, progress=False, structure="fixed"
    )
    assert tok.pad_token is None, "the caller's tokenizer was changed"
    assert res.report["flops"]["ratio"] <= 0.7 + 1e-9
    # every sentence is drawn (samples > 120), each with all its tokens and no filler
    texts = make_sentences(120)
    assert res.report["data"]["tokens"] == sum(len(tok(t)["input_ids"]) for t in texts)


def test_decoder_flops_model():
    model = tiny_decoder("llama")
    res = kcm_cuda.prune(model, token_batch(), flops=0.8, progress=False)
    f = res.report["flops"]
    s = res.report["data"]["mean_tokens"]
    d, n, layers, d_h, h, h_kv = 64, 176, 3, 16, 4, 2
    attn = s * d * (2 * h * d_h + 2 * h_kv * d_h) + s * s * h * d_h  # causal: half the s² terms
    assert f["per_neuron"] == pytest.approx(3 * s * d)  # gate, up, down
    assert f["before"] == pytest.approx(layers * (attn + 3 * s * d * n))
    assert f["lm_head"] == pytest.approx(s * d * 128)


@pytest.mark.parametrize("build", [lambda: tiny_decoder("qwen2"), lambda: tiny_bert("base")])
def test_blockwise_statistics_equal_a_full_forward(build):
    """The block-by-block pass gives each layer's Σa and Σa² of one whole-model forward."""
    model = build()
    adapter = get_adapter(model)
    data = token_batch(vocab_size=128)
    sample = prepare_sample(data, None, causal=adapter.causal)
    stats = collect_activation_stats(
        model, adapter, sample, batch_size=16, device=torch.device("cpu"), progress=False
    )
    seen: dict[int, list] = {}
    hooks = []
    current = {}
    for i, block in enumerate(adapter.layers(model)):

        def hook(_m, args, i=i):
            a = args[0].reshape(-1, args[0].shape[-1])[current["mask"].reshape(-1).bool()]
            seen.setdefault(i, []).append((a.double() ** 2).sum(dim=0))

        hooks.append(adapter.w2(block).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in sample.batches(16, "cpu"):
                current["mask"] = batch["attention_mask"]
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    for i, sq in enumerate(stats.sq_sums):
        assert torch.allclose(sq, torch.stack(seen[i]), rtol=1e-5, atol=1e-6)


def _offloaded_llama(tmp_path):
    """A tiny LLaMA saved and loaded back with accelerate's device_map: CPU + disk offload
    (the blocks on disk have their weights on the meta device behind hooks), and the same
    weights loaded plainly."""
    pytest.importorskip("accelerate")
    import transformers

    src = tiny_decoder("llama")
    src.save_pretrained(tmp_path / "src")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    sharded = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "src", device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert sharded.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "src")
    return sharded, plain


@pytest.mark.parametrize(
    "options",
    [dict(method="magnitude", scale=False), dict(method="kcm", backend="torch", heads=False)],
)
def test_weight_scores_of_an_offloaded_model(tmp_path, options):
    sharded, plain = _offloaded_llama(tmp_path)
    a = kcm_cuda.prune(sharded, token_batch(), flops=0.6, progress=False, r2_cache=False, **options)
    b = kcm_cuda.prune(plain, token_batch(), flops=0.6, progress=False, r2_cache=False, **options)
    assert all(torch.equal(a.masks[i], b.masks[i]) for i in a.masks)


def test_heads_on_an_offloaded_model_is_a_clear_error(tmp_path):
    sharded, _ = _offloaded_llama(tmp_path)
    with pytest.raises(ValueError, match="heads=True is not supported for a model with offloaded"):
        kcm_cuda.prune(sharded, token_batch(), flops=0.6, progress=False, heads=True)


def test_model_spread_over_devices_with_disk_offload(tmp_path):
    """A model loaded with accelerate's device_map (here: CPU + disk offload) prunes as it
    is, gives the pruned model of the same weights loaded plainly, and is left working."""
    sharded, plain = _offloaded_llama(tmp_path)
    ids = token_batch(2, 10)["input_ids"]
    with torch.no_grad():
        dense = sharded(input_ids=ids).logits
    data = token_batch()
    a = kcm_cuda.prune(sharded, data, flops=0.6, progress=False)  # heads="auto": FFN only here
    b = kcm_cuda.prune(plain, data, flops=0.6, progress=False, heads=False)
    assert a.head_masks is None and a.report["options"]["heads"] is False
    assert all(torch.equal(a.masks[i], b.masks[i]) for i in a.masks)
    with torch.no_grad():
        assert (a.model(input_ids=ids).logits - b.model(input_ids=ids).logits).abs().max() < 1e-5
        # the caller's model: still offloaded, still the same function
        assert sharded.model.layers[1].mlp.down_proj.weight.device.type == "meta"
        assert (sharded(input_ids=ids).logits - dense).abs().max() == 0
    assert not any("_hf_hook" in m.__dict__ for m in a.model.modules())
    a.save(tmp_path / "pruned")
    assert kcm_cuda.load_pruned(tmp_path / "pruned") is not None


def _tree_digest(path) -> dict:
    import hashlib

    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--device-map", "auto", "--dtype", "float32"],
        ["--heads", "--gqa-heads", "groups", "--device-map", "auto", "--dtype", "float32"],
    ],
)
def test_kcm_prune_cli_on_a_llama_checkpoint(llama_dir, tmp_path, extra, capsys):
    pytest.importorskip("accelerate")
    from kcm_cuda.cli import main
    from tests.pruning.conftest import make_sentences

    data = tmp_path / "calib.txt"
    data.write_text("\n".join(make_sentences(200)), encoding="utf-8")
    before = _tree_digest(llama_dir)
    out = tmp_path / "pruned"
    rc = main(
        [
            str(llama_dir),
            "--data",
            str(data),
            "--flops",
            "0.7",
            "--output",
            str(out),
            "--quiet",
            *extra,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert _tree_digest(llama_dir) == before, "the input checkpoint was modified"
    pruned = kcm_cuda.load_pruned(out)
    assert sum(b.mlp.gate_proj.out_features for b in pruned.model.layers) < 3 * 176
    import json

    report = json.loads((out / "kcm_report.json").read_text())
    assert report["architecture"] == "LLaMA" and report["flops"]["ratio"] <= 0.7 + 1e-9
    if "--heads" in extra:
        heads = report["heads"]
        assert heads["gqa_heads"] == "groups"
        assert heads["heads_kept_per_layer"] == [2 * kv for kv in heads["kv_heads_kept_per_layer"]]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(["the movie was good"], return_tensors="pt")["input_ids"]
    assert pruned.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
