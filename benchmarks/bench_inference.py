"""Inference of the dense and the pruned BERT-base encoder (the paper's Table 6): latency and
throughput at c = 0.6 and 0.7, batch 1 / 8 / 32 / 128, sequence length 128, fp32 and (GPU
only) fp16. The dense and the two pruned models are alternated round by round; "x base" in
the table is the speed-up over the dense model.

The pruned models come from kcm_cuda.prune ("[kcm]") on a GPU, or, where pruning would take
minutes (a CPU) or is not available yet, from a uniform per-layer keep ("[uniform]") with the
same FLOPs (ALGORITHM.md's MACs model): the latency of a physically pruned FFN depends on the
kept widths, not on which neurons were kept. --kcm-pruned-by chooses. A reduced (CPU) run
stops at batch 32. FLOPs: 2 x the encoder's MACs (embeddings and pooler excluded).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from benchmarks import harness
from benchmarks.peers import Peer

RATIOS = (0.6, 0.7)
FULL_BATCHES = (1, 8, 32, 128)
CPU_MAX_BATCH = 32
TINY_CONFIG = {
    "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 256, "max_position_embeddings": 64,
}


@dataclass(frozen=True)
class InferenceCase:
    batch: int
    seq: int
    dtype: str  # "fp32" | "fp16"
    tiny: bool = False

    @property
    def id(self) -> str:
        model = "bert-tiny" if self.tiny else "bert-base"
        return f"{model},b={self.batch},T={self.seq},{self.dtype}"


def make_cases(profile: harness.Profile, test_name: str) -> list[InferenceCase]:
    if profile.smoke:
        return [InferenceCase(b, 16, "fp32", tiny=True) for b in (1, 4)]
    batches = [b for b in FULL_BATCHES if not profile.reduced or b <= CPU_MAX_BATCH]
    dtypes = ["fp32", "fp16"] if profile.device == "cuda" else ["fp32"]
    return [InferenceCase(b, 128, dt) for dt in dtypes for b in batches]


def ffn_keep(config: Any, ratio: float, seq: int) -> int:
    """Neurons kept per layer for a uniform keep at ``ratio`` of the encoder's MACs."""
    d, n, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    attention = 4 * seq * d * d + 2 * seq * seq * d
    full = layers * (attention + 2 * seq * d * n)
    total = math.floor((ratio * full - layers * attention) / (2 * seq * d))
    if total < layers:
        raise ValueError(f"c={ratio} is below the attention floor of this model")
    return min(n, total // layers)


def uniform_pruned(model: torch.nn.Module, ratio: float, seq: int) -> torch.nn.Module:
    """A physically pruned copy keeping, in every layer, the same number of FFN neurons (the
    largest ||W1[i]||·||W2[:, i]||), sized to ``ratio`` of the FLOPs."""
    keep = ffn_keep(model.config, ratio, seq)
    pruned = copy.deepcopy(model)
    for layer in pruned.encoder.layer:
        w1, w2 = layer.intermediate.dense, layer.output.dense
        score = w1.weight.norm(dim=1) * w2.weight.norm(dim=0)
        idx = torch.topk(score, keep).indices.sort().values
        new1 = torch.nn.Linear(w1.in_features, keep, bias=w1.bias is not None)
        new2 = torch.nn.Linear(keep, w2.out_features, bias=w2.bias is not None)
        with torch.no_grad():
            new1.weight.copy_(w1.weight[idx])
            if w1.bias is not None:
                new1.bias.copy_(w1.bias[idx])
            new2.weight.copy_(w2.weight[:, idx])
            if w2.bias is not None:
                new2.bias.copy_(w2.bias)
        layer.intermediate.dense, layer.output.dense = new1, new2
    return pruned.eval()


def intermediate_sizes(model: torch.nn.Module) -> list[int]:
    return [int(layer.intermediate.dense.out_features) for layer in model.encoder.layer]


@pytest.fixture(scope="module")
def models(profile: harness.Profile, device: torch.device) -> dict[str, Any]:
    """{"dense": model, "pruned-c0.6[...]": model, ...} in fp32 on the device, and "_how"."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(**(TINY_CONFIG if profile.smoke else {}))
    dense = BertModel(config).eval()
    seq = 16 if profile.smoke else 128
    how = profile.pruned_by
    prune = None
    if how in ("auto", "kcm"):
        try:
            from kcm_cuda.pruning import prune
        except ImportError as exc:
            if how == "kcm":
                pytest.skip(f"--kcm-pruned-by kcm: kcm_cuda.pruning not available ({exc})")
        if how == "auto":
            how = "kcm" if (prune is not None and device.type == "cuda") else "uniform"
    out: dict[str, Any] = {"dense": dense.to(device), "_how": how}
    for ratio in RATIOS:
        if how == "kcm":
            # prune needs at least as many real tokens as the widest FFN layer has neurons.
            samples = 32 if profile.smoke else (512 if device.type == "cuda" else 64)
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(5, config.vocab_size, (samples, seq), generator=gen)
            data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            pruned = prune(dense, data, flops=ratio, samples=samples, max_length=seq, seed=0,
                           device=device, progress=False).model
        else:
            pruned = uniform_pruned(dense.cpu(), ratio, seq)
        out[f"pruned-c{ratio}[{how}]"] = pruned.eval().to(device)
    out["dense"] = dense.to(device)
    return out


_HALF: dict[int, torch.nn.Module] = {}


def test_inference(case: InferenceCase, models: dict[str, Any], device: torch.device,
                   bench) -> None:
    names = [k for k in models if not k.startswith("_")]
    dense = models["dense"]
    config = dense.config
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, config.vocab_size, (case.batch, case.seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    peers: list[Peer] = []
    for name in names:
        model = models[name]
        if case.dtype == "fp16":
            if id(model) not in _HALF:
                _HALF[id(model)] = copy.deepcopy(model).half()
            model = _HALF[id(model)]

        def run(model: torch.nn.Module = model) -> torch.Tensor:
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=mask).last_hidden_state

        sizes = intermediate_sizes(model)
        flops = harness.encoder_flops(case.batch, case.seq, config.hidden_size, sizes)
        peers.append(Peer(
            name, run, ours=name != "dense", flops=flops,
            precision="fp16" if case.dtype == "fp16" else "ieee",
            info={"intermediate_sizes": sizes, "pruned_by": None if name == "dense"
                  else models["_how"]},
        ))
    records = bench(
        op="inference", case=case.id,
        params={"batch": case.batch, "seq": case.seq, "hidden": config.hidden_size,
                "layers": config.num_hidden_layers},
        peers=peers, precision="fp16" if case.dtype == "fp16" else "ieee",
        dtype="float16" if case.dtype == "fp16" else "float32",
        primary=names[1] if len(names) > 1 else None, baseline="dense",
    )
    for r in records:
        assert r["status"] == "ok", f"{r['peer']}: {r['reason']}"
        seconds = r["median_ms"] / 1e3
        r["info"]["seq_per_s"] = case.batch / seconds
        r["info"]["tokens_per_s"] = case.batch * case.seq / seconds
        r["note"] = f"{case.batch / seconds:.1f} seq/s"
