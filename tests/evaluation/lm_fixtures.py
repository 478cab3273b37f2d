"""Tiny texts, tokenizers and random LLaMA models for the LM-evaluation tests (no download)."""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

SUBJECTS = ["the cat", "a dog", "my friend", "the film", "this phone", "our team", "the bird"]
VERBS = ["likes", "sees", "hates", "wants", "finds", "loves", "needs"]
OBJECTS = ["the ball", "a song", "some food", "the game", "that book", "the sun", "a box"]
ENDINGS = ["today", "again", "at night", "very much", "in the park", "", "now"]


def make_lines(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(ENDINGS)]
        s = " ".join(words)
        out.append(f"{s.strip()} {i} .")
    return out


def write_text(path, n: int = 400, seed: int = 0):
    path.write_text("\n".join(make_lines(n, seed)) + "\n", encoding="utf-8")
    return path


def tiny_settings(**kw):
    from kcm_cuda.evaluation.lm_train import LMSettings

    base = dict(
        vocab_size=300,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        context=32,
        steps=2,
        batch_size=4,
        warmup_steps=1,
        eval_blocks=4,
    )
    base.update(kw)
    return LMSettings(**base)


def tiny_llama(vocab: int = 64, seed: int = 0, positions: int = 64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=positions,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def fake_prune(model, data, flops=0.6, *, method="flap", reconstruct=None, seed=0, **kw):
    """A stand-in for kcm_cuda.prune with its interface: a copy of the model whose MLP
    output is damped by the budget (a different amount per method)."""
    import torch

    assert set(data) >= {"input_ids", "attention_mask"}
    assert data["input_ids"].ndim == 2
    m = copy.deepcopy(model)
    damp = flops if reconstruct == "ridge" else flops * 0.9
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.down_proj.weight.mul_(damp)
    return SimpleNamespace(model=m, report={"flops": {"ratio": flops}, "timings_s": {}})
