"""Sliding-window perplexity: each token scored once, equal to a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
from lm_fixtures import tiny_llama

from kcm_cuda.evaluation.perplexity import (
    paired_difference,
    sliding_window_nll,
    sliding_windows,
)


@pytest.mark.parametrize(
    "n,window,stride", [(2, 4, 2), (10, 4, 2), (11, 4, 3), (50, 8, 7), (64, 16, 1), (5, 16, 8)]
)
def test_windows_score_every_token_once(n, window, stride):
    spans = sliding_windows(n, window, stride)
    scored = []
    for b, e, first in spans:
        assert 0 <= b < first <= e <= n
        assert e - b <= window
        if n >= window:
            assert e - b == window  # the last window is moved back to full length
        scored += range(first, e)
    assert scored == list(range(1, n))


def test_window_arguments_checked():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 4)
    with pytest.raises(ValueError, match="window"):
        sliding_windows(10, 1, 1)
    with pytest.raises(ValueError, match="2 tokens"):
        sliding_windows(1, 4, 2)


def _direct_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of ids[1:] with the full prefix as context."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")


def test_full_window_equals_direct_computation():
    model = tiny_llama()
    ids = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(1))
    r = sliding_window_nll(model, ids, window=40, stride=20)
    with torch.no_grad():
        loss = float(model(input_ids=ids[None], labels=ids[None]).loss)
    assert r["windows"] == 1
    assert r["tokens"] == 39
    assert r["nll"] == pytest.approx(loss, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_sliding_counts_each_token_once_and_matches_a_manual_loop():
    model = tiny_llama()
    ids = torch.randint(0, 64, (45,), generator=torch.Generator().manual_seed(2))
    window, stride = 16, 6
    r = sliding_window_nll(model, ids, window=window, stride=stride, batch_size=3)
    assert r["tokens"] == ids.numel() - 1
    assert int(r["window_tokens"].sum()) == ids.numel() - 1
    # manual: each target scored by its window, context = that window's prefix
    total = 0.0
    for b, e, first in sliding_windows(ids.numel(), window, stride):
        nll = _direct_nll(model, ids[b:e])
        total += float(nll[first - b - 1 :].sum())
    assert r["nll"] == pytest.approx(total / (ids.numel() - 1), rel=1e-5)
    # batching does not change the value
    r1 = sliding_window_nll(model, ids, window=window, stride=stride, batch_size=1)
    assert r1["nll"] == pytest.approx(r["nll"], rel=1e-6)
    # a shorter context can only be a different number, never the same count
    full = float(_direct_nll(model, ids).mean())
    assert r["tokens"] == sliding_window_nll(model, ids, window=45, stride=44)["tokens"]
    assert sliding_window_nll(model, ids, window=45, stride=44)["nll"] == pytest.approx(
        full, rel=1e-5
    )


def test_model_mode_restored_and_paired_difference():
    model = tiny_llama().train()
    other = tiny_llama(seed=1)
    ids = torch.randint(0, 64, (30,), generator=torch.Generator().manual_seed(3))
    a = sliding_window_nll(model, ids, window=8, stride=4)
    assert model.training  # restored
    b = sliding_window_nll(other, ids, window=8, stride=4)
    same = paired_difference(a, a)
    assert same["delta_nll"] == 0.0 and same["ppl_ratio"] == 1.0
    d = paired_difference(b, a)
    assert d["delta_nll"] == pytest.approx(b["nll"] - a["nll"], abs=1e-9)
    assert d["ppl_ratio"] == pytest.approx(b["ppl"] / a["ppl"], rel=1e-9)
    assert d["se"] > 0 and d["windows"] == a["windows"]
    c = sliding_window_nll(model, ids, window=8, stride=7)
    with pytest.raises(ValueError, match="same windows"):
        paired_difference(a, c)
