"""layout="standard": every layer alike, an ordinary checkpoint that plain from_pretrained loads
(in a process that never imports kcm_cuda) at the pruned size with the same logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import kcm_cuda
from kcm_cuda.pruning.physical import HEADS_FIELD, KV_HEADS_FIELD, SIZES_FIELD
from tests.pruning.conftest import tiny_bert, tiny_decoder, tiny_distilbert, token_batch

# heads removed for sure: the proportional split keeps a fraction c of the heads
HEADS_ON = {"heads": True, "experimental": {"head_split": "proportional"}}

PLAIN_LOAD = """
import json, sys, torch, transformers
path, kind = sys.argv[1], sys.argv[2]
cls = getattr(transformers, kind)
model = cls.from_pretrained(path).eval()
x = torch.load(path + "/../inputs.pt")
with torch.no_grad():
    out = model(**x)[0]
torch.save(out, path + "/../plain_out.pt")
print(json.dumps({
    "params": sum(p.numel() for p in model.parameters()),
    "kcm_imported": any(m.startswith("kcm_cuda") for m in sys.modules),
}))
"""


def _plain_load(out_dir, kind: str, inputs: dict) -> tuple[dict, torch.Tensor]:
    torch.save(inputs, out_dir.parent / "inputs.pt")
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(out_dir), kind],
        capture_output=True,
        text=True,
        cwd=out_dir.parent,  # not the repository: kcm_cuda is not importable by accident
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return info, torch.load(out_dir.parent / "plain_out.pt")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("gqa", ["per_group", "groups"])
def test_standard_decoder_is_a_stock_checkpoint(family, gqa, tmp_path):
    model = tiny_decoder(family, layers=3, heads=8, kv_heads=2)
    opts = {**HEADS_ON, "experimental": {**HEADS_ON["experimental"], "gqa_heads": gqa}}
    r = kcm_cuda.prune(
        model, token_batch(96, 24), 0.6, layout="standard", samples=64, progress=False, **opts
    )
    cfg = r.model.config
    assert cfg.intermediate_size < 176 and cfg.num_attention_heads < 8
    assert cfg.head_dim == 8  # explicit: hidden / heads no longer gives it
    assert cfg.num_key_value_heads == (2 if gqa == "per_group" else cfg.num_attention_heads // 4)
    for name in (SIZES_FIELD, HEADS_FIELD, KV_HEADS_FIELD):
        assert not hasattr(cfg, name)
    blocks = r.model.model.layers
    assert len({b.mlp.down_proj.in_features for b in blocks}) == 1
    assert len({b.self_attn.q_proj.out_features for b in blocks}) == 1
    assert r.report["flops"]["ratio"] <= 0.6 + 1e-9
    out = tmp_path / "out"
    r.save(out)
    saved = json.loads((out / "config.json").read_text())
    assert not [k for k in saved if k.startswith("kcm_")], saved  # an ordinary checkpoint
    x = token_batch(4, 16, seed=3)
    info, plain = _plain_load(out, "AutoModelForCausalLM", x)
    assert not info["kcm_imported"]
    assert info["params"] == sum(p.numel() for p in r.model.parameters())
    with torch.no_grad():
        ref = r.model(**x).logits
    assert float((plain - ref).abs().max()) <= 1e-5


def test_standard_qwen2_refit_fits_the_weights_alone(tmp_path):
    model = tiny_decoder("qwen2", layers=3, heads=8, kv_heads=2)
    data = token_batch(96, 24)
    r = kcm_cuda.prune(
        model, data, 0.6, layout="standard", samples=64, progress=False, structure="fixed"
    )
    assert all(b.mlp.down_proj.bias is None for b in r.model.model.layers)
    assert not getattr(r.model.config, "kcm_mlp_bias", False)
    # the refit ran (weights, not plain pruning): the kept columns changed
    keep = r.masks[0]
    w_teacher = model.model.layers[0].mlp.down_proj.weight[:, keep]
    assert not torch.allclose(r.model.model.layers[0].mlp.down_proj.weight, w_teacher)
    # the per-layer default fits the weights alone on Qwen2 too: its output is a Qwen2
    p = kcm_cuda.prune(model, data, 0.6, samples=64, progress=False, structure="fixed")
    assert all(b.mlp.down_proj.bias is None for b in p.model.model.layers)
    # refit_bias=True gives down_proj a bias the class cannot hold (saved for load_pruned)
    w = kcm_cuda.prune(
        model,
        data,
        0.6,
        samples=64,
        progress=False,
        structure="fixed",
        experimental={"refit_bias": True},
    )
    assert all(b.mlp.down_proj.bias is not None for b in w.model.model.layers)
    assert w.model.config.kcm_mlp_bias is True


@pytest.mark.parametrize("build", [tiny_bert, tiny_distilbert])
def test_standard_encoder_keeps_whole_heads_and_loads_plainly(build, tmp_path):
    model = build()
    r = kcm_cuda.prune(
        model, token_batch(96, 24), 0.7, layout="standard", samples=64, progress=False
    )
    cfg = r.model.config
    sizes = {len(m.nonzero()) for m in r.masks.values()}
    assert len(sizes) == 1 and getattr(cfg, "intermediate_size", None) in (sizes | {None})
    assert r.head_masks is None
    assert (r.report["structure"]["chosen"] or {}).get("heads", False) is False
    out = tmp_path / "out"
    r.save(out)
    saved = json.loads((out / "config.json").read_text())
    assert not [k for k in saved if k.startswith("kcm_")], saved
    x = token_batch(3, 12, seed=5)
    kind = "AutoModelForSequenceClassification"
    info, plain = _plain_load(out, kind, x)
    assert info["params"] == sum(p.numel() for p in r.model.parameters())
    with torch.no_grad():
        ref = r.model(**x).logits
    assert float((plain - ref).abs().max()) <= 1e-5


def test_standard_search_stays_within_the_layout():
    model = tiny_decoder("llama", layers=3, heads=8, kv_heads=2)
    r = kcm_cuda.prune(
        model, token_batch(96, 24), 0.6, layout="standard", samples=64, progress=False
    )
    block = r.report["structure"]
    assert block["candidates"], block
    assert {c["structure"]["allocation"] for c in block["candidates"]} == {"uniform"}


@pytest.mark.parametrize(
    ("build", "options", "match"),
    [
        (tiny_bert, {"heads": True}, "heads whole"),
        (tiny_bert, {"allocation": "global"}, "same FFN width"),
        (tiny_bert, {"method": "obs"}, "score-based method"),
        (lambda: tiny_decoder("qwen2"), {"reconstruct": "bias"}, "cannot hold"),
        (lambda: tiny_decoder("mistral"), {"experimental": {"refit_bias": True}}, "no MLP bias"),
        (tiny_bert, {"layout": "stock"}, "layout must be one of"),
    ],
)
def test_standard_layout_refuses_what_it_cannot_express(build, options, match):
    opts = {"layout": "standard", **options}
    with pytest.raises(ValueError, match=match):
        kcm_cuda.prune(build(), token_batch(96, 24), 0.6, samples=64, progress=False, **opts)


def test_standard_encoder_below_the_attention_floor_says_why_heads_cannot_help():
    with pytest.raises(ValueError, match="keeps BERT's heads whole; layout='per_layer'"):
        kcm_cuda.prune(
            tiny_bert(), token_batch(96, 24), 0.3, layout="standard", samples=64, progress=False
        )
