"""export_onnx: a pruned encoder (per-layer widths and heads) in ONNX Runtime gives the pruned
model's outputs (<= 1e-4) at any batch size and length; clear errors otherwise."""

from __future__ import annotations

import pytest
import torch

import kcm_cuda
from tests.pruning.conftest import (
    tiny_bert,
    tiny_decoder,
    tiny_distilbert,
    tiny_roberta,
    token_batch,
)

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _pruned(build):
    return kcm_cuda.prune(
        build(),
        token_batch(96, 24),
        0.5,
        samples=64,
        progress=False,
        heads=True,
        structure="fixed",
    )


def _run(path, names, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {n: x[n].numpy() for n in names}
    return session.run(None, feed)


@pytest.mark.parametrize(
    ("build", "output"),
    [
        (tiny_bert, "logits"),
        (lambda: tiny_bert("qa"), "start_logits"),
        (lambda: tiny_bert("base"), "last_hidden_state"),
        (tiny_distilbert, "logits"),
        (tiny_roberta, "logits"),
    ],
)
def test_onnx_runtime_gives_the_pruned_models_outputs(build, output, tmp_path):
    r = _pruned(build)
    cfg = r.model.config
    assert len(set(cfg.kcm_intermediate_sizes)) >= 1
    path = kcm_cuda.export_onnx(r, tmp_path)
    assert path == tmp_path / "model.onnx" and path.stat().st_size > 0
    names = ["input_ids", "attention_mask"]
    if cfg.model_type == "bert":
        names.append("token_type_ids")
    for batch, length in ((1, 7), (5, 20)):
        x = token_batch(batch, length, seed=batch)
        x["token_type_ids"] = torch.zeros_like(x["input_ids"])
        outs = _run(path, names, x)
        with torch.no_grad():
            ref = r.model(**{n: x[n] for n in names}, return_dict=True)[output]
        assert outs[0].shape == tuple(ref.shape)
        assert float(abs(outs[0] - ref.numpy()).max()) <= 1e-4
    # the graph is at the pruned size: its weights hold the pruned model's parameters (plus a
    # few constants), fewer than the dense model's
    import math

    import onnx

    held = sum(math.prod(t.dims) for t in onnx.load(str(path)).graph.initializer)
    pruned = sum(p.numel() for p in r.model.parameters())
    dense = sum(p.numel() for p in build().parameters())
    assert pruned * 0.9 <= held <= pruned + 0.2 * (dense - pruned) < dense


def test_export_refuses_decoders_an_existing_file_and_non_models(tmp_path):
    r = kcm_cuda.prune(
        tiny_decoder("llama"),
        token_batch(96, 24),
        0.6,
        samples=64,
        progress=False,
        structure="fixed",
    )
    with pytest.raises(ValueError, match="layout='standard'"):
        kcm_cuda.export_onnx(r, tmp_path / "m.onnx")
    enc = _pruned(tiny_distilbert)
    (tmp_path / "m.onnx").write_text("mine")
    with pytest.raises(FileExistsError):
        kcm_cuda.export_onnx(enc, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_text() == "mine"
    with pytest.raises(TypeError, match="PruneResult or a torch model"):
        kcm_cuda.export_onnx("model", tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError):
        kcm_cuda.export_onnx(enc, tmp_path / "missing" / "x.onnx")


def test_save_with_onnx_writes_it_beside_the_checkpoint(tmp_path):
    r = _pruned(tiny_distilbert)
    out = r.save(tmp_path / "out", onnx=True)
    assert (out / "model.onnx").is_file() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_kcm_prune_export_onnx_on_a_decoder_fails_before_pruning(llama_dir, tmp_path, capsys):
    from kcm_cuda.cli import main

    data = tmp_path / "d.txt"
    data.write_text("a b c\n" * 50)
    argv = [
        str(llama_dir),
        "--data",
        str(data),
        "--flops",
        "0.7",
        "--output",
        str(tmp_path / "o"),
        "--export",
        "onnx",
        "--quiet",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--export onnx writes encoders" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
