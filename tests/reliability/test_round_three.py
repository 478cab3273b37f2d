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


# -- export_onnx: arguments, targets, dtypes, files ----------------------------------------------
def _encoder():
    from tests.pruning.conftest import tiny_bert

    return prune(
        tiny_bert(), token_batch(96, 24), 0.6, samples=64, progress=False, heads=False,
        structure="fixed",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        ({"opset": "x"}, ValueError, "opset must be a whole number"),
        ({"opset": 99}, ValueError, "opset must be a whole number"),
        ({"opset": 12}, ValueError, "opset must be a whole number"),
        ({"atol": -1}, ValueError, "atol must be a finite number"),
        ({"atol": float("nan")}, ValueError, "atol must be a finite number"),
        ({"check": "yes"}, TypeError, "check must be True or False"),
    ],
)
def test_export_onnx_arguments_are_checked(tmp_path, kw, err, match):
    pytest.importorskip("onnxscript")
    from kcm_cuda import export_onnx

    with pytest.raises(err, match=match):
        export_onnx(_encoder(), tmp_path / "m.onnx", **kw)
    assert not list(tmp_path.iterdir())


def test_export_onnx_targets(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from kcm_cuda import export_onnx

    r = _encoder()
    with pytest.raises(ValueError, match="path is empty"):
        export_onnx(r, "")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(r, "newdir/")  # a directory meant, not a file named newdir
    assert not (tmp_path / "newdir").exists()
    # never into the directory the model was loaded from
    from tests.pruning.conftest import tiny_bert

    src = tmp_path / "src"
    tiny_bert().save_pretrained(src)
    import transformers

    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(src)
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(ValueError, match="loaded from"):
        export_onnx(loaded, src)
    with pytest.raises(ValueError, match="loaded from"):
        export_onnx(loaded, src / "model.onnx", overwrite=True)
    assert sorted(p.name for p in src.iterdir()) == before
    # a temporary file left by a killed export (a dead PID in its name) is cleaned up
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".model.onnx.999999999.abc.tmp"
    stale.write_bytes(b"")
    import os

    old = os.umask(0o022)
    try:
        f = export_onnx(r, out)
    finally:
        os.umask(old)
    assert f == out / "model.onnx" and not stale.exists()
    assert oct(f.stat().st_mode & 0o777) == oct(0o644)  # the umask's mode, not mkstemp's 0600


def test_export_onnx_refuses_bfloat16_and_multiple_choice_up_front(tmp_path):
    from transformers import BertConfig, BertForMultipleChoice

    from kcm_cuda import export_onnx

    r = _encoder()
    with pytest.raises(ValueError, match="bfloat16"):
        export_onnx(r.model.to(torch.bfloat16), tmp_path / "m.onnx")
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64)  # fmt: skip
    with pytest.raises(ValueError, match="ForMultipleChoice"):
        export_onnx(BertForMultipleChoice(cfg), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_export_onnx_of_a_float16_encoder_is_checked_at_its_own_tolerance(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from kcm_cuda import export_onnx

    r = _encoder()
    f = export_onnx(r.model.half(), tmp_path / "m.onnx")
    assert f.is_file()


def test_save_files_follow_the_umask_and_a_failed_save_leaves_no_parents(tmp_path, monkeypatch):
    import os

    r = _encoder()
    old = os.umask(0o022)
    try:
        out = r.save(tmp_path / "a" / "b" / "m")
    finally:
        os.umask(old)
    for f in out.iterdir():
        if f.is_file():
            assert f.stat().st_mode & 0o777 == 0o644, f.name
    from kcm_cuda.pruning import saving

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(saving.safety, "publish", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        r.save(tmp_path / "x" / "y" / "m")
    assert not (tmp_path / "x").exists()


def test_pretokenized_attention_mask_must_be_zeros_and_ones():
    data = token_batch(n=40, width=12)
    data["attention_mask"] = data["attention_mask"] * 2
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1 \\(token\\) only, found 2"):
        prune(tiny_decoder("llama"), data, 0.7, progress=False, samples=32)


def test_tsv_texts_starting_with_a_quote_are_rows_of_their_own(tmp_path):
    from kcm_cuda.pruning.data import read_texts

    f = tmp_path / "d.tsv"
    f.write_text("text\tlabel\n" + "".join(f'"quoted start {i}\t1\n' for i in range(40)))
    texts = read_texts(f)
    assert len(texts) == 40 and texts[0] == '"quoted start 0'
    # a properly quoted cell holding a tab still reads as one cell
    g = tmp_path / "q.tsv"
    g.write_text('text\tlabel\n"a\tb"\t1\nplain\t0\n')
    assert read_texts(g) == ["a\tb", "plain"]


def test_kcm_prune_bfloat16_export_onnx_fails_before_the_prune(tmp_path, capsys, model_dir,
                                                              data_file, monkeypatch):  # fmt: skip
    import kcm_cuda.pruning as pruning
    from kcm_cuda.cli import main

    called = []
    monkeypatch.setattr(pruning, "prune", lambda *a, **k: called.append(1))
    out = tmp_path / "out"
    rc = main([str(model_dir), "--data", str(data_file), "--flops", "0.7", "--output", str(out),
               "--dtype", "bfloat16", "--export", "onnx", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "bfloat16" in err and "\n" not in err
    assert not called and not out.exists()
