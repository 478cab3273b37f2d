"""R2 on constructed cases, and backend agreement."""

from __future__ import annotations

import pytest
import torch

from kcm_cuda.pruning import prune
from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.r2 import diag_coefficients, neuron_points, r2_scores

CPU = torch.device("cpu")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_redundant_neurons_rank_low(seed, backend):
    """Duplicated neurons and convex combinations of others get a smaller C_ii than every
    'vertex' neuron."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(8, 16, generator=g) * 0.2
    dup = V[:2].clone()
    mid = torch.stack([(V[2] + V[3]) / 2, (V[4] + V[5]) / 2, (V[0] + V[6] + V[7]) / 3])
    P = torch.cat([V, dup, mid])
    (s,), (iters,) = diag_coefficients(
        [P], sigma=1.0, alpha=0.01, max_iter=100, precision="ieee", backend=backend, device=CPU
    )
    redundant = [0, 1, 8, 9, 10, 11, 12]  # 0/8 and 1/9 are duplicate pairs
    vertices = [2, 3, 4, 5, 6, 7]
    assert s[redundant].max() < s[vertices].min()
    assert torch.allclose(s[0], s[8]) and torch.allclose(s[1], s[9])
    assert 1 < iters <= 100


def test_stacked_equals_separate():
    g = torch.Generator().manual_seed(5)
    sets = [torch.randn(20, 8, generator=g) * 0.3 for _ in range(3)]
    sets.append(torch.randn(12, 8, generator=g) * 0.3)  # a different width: its own stack
    kw = dict(sigma=1.0, alpha=0.01, max_iter=100, precision="ieee", backend="torch", device=CPU)
    together, it_t = diag_coefficients(sets, **kw)
    alone = [diag_coefficients([p], **kw) for p in sets]
    for (d, i), dt, itt in zip(alone, together, it_t, strict=True):
        assert torch.allclose(d[0], dt, atol=1e-6)
        assert i[0] == itt
    chunked, it_c = diag_coefficients(sets, max_bytes=1, **kw)  # one layer per stack
    assert it_c == it_t
    for a, b in zip(chunked, together, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_points_variants(bert):
    adapter = get_adapter(bert)
    block = adapter.layers(bert)[0]
    out = neuron_points(adapter, block, "output")
    inp = neuron_points(adapter, block, "input")
    assert out.shape == (96, 32) and inp.shape == (96, 33)
    assert torch.equal(out, block.output.dense.weight.t())
    with pytest.raises(ValueError, match="r2_points"):
        neuron_points(adapter, block, "bogus")
    scores, iters = r2_scores(bert, adapter, device=CPU, backend="torch")
    assert len(scores) == 3 and all(s.shape == (96,) for s in scores)
    assert all(i >= 1 for i in iters)


@pytest.mark.parametrize("method", ["kcm", "r2"])
def test_torch_and_reference_backends_same_masks(bert, tokenizer, sentences, method):
    kw = dict(method=method, scale=False, tokenizer=tokenizer, progress=False, samples=64)
    a = prune(bert, sentences, 0.7, backend="torch", **kw)
    b = prune(bert, sentences, 0.7, backend="reference", **kw)
    for i in a.masks:
        assert torch.equal(a.masks[i], b.masks[i])
    assert a.report["r2_iterations"] == b.report["r2_iterations"]
