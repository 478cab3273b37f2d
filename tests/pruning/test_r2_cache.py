"""R2's data-driven bandwidth and R2 scores cached on disk."""

from __future__ import annotations

import warnings

import pytest
import torch

from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.r2 import diag_coefficients, median_sigma, r2_scores, resolve_sigmas
from kcm_cuda.pruning.r2_cache import (
    cached_r2_scores,
    r2_cache_dir_from_env,
    r2_key,
    resolve_r2_cache,
)

CPU = torch.device("cpu")


def test_median_sigma_by_hand():
    # 4 points on a line at 0, 1, 2, 4: distances 1 1 2 2 3 4 → median 2
    p = torch.tensor([[0.0], [1.0], [2.0], [4.0]])
    assert median_sigma(p) == pytest.approx(2.0)
    # scale equivariant
    assert median_sigma(p * 3) == pytest.approx(6.0)
    # subsampling keeps the first and last points and caps the work
    big = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    assert median_sigma(big, max_points=50) == pytest.approx(median_sigma(big), rel=0.25)
    with pytest.raises(ValueError, match="at least 2 points"):
        median_sigma(torch.ones(1, 3))
    with pytest.raises(ValueError, match="pass a positive number"):
        median_sigma(torch.ones(5, 3))
    with pytest.raises(ValueError, match="one of"):
        resolve_sigmas([p], "mean")
    assert resolve_sigmas([p, p * 2], "median") == pytest.approx([2.0, 4.0])
    assert resolve_sigmas([p, p], 0.5) == [0.5, 0.5]


def test_median_sigma_equals_passing_it_explicitly():
    g = torch.Generator().manual_seed(1)
    sets = [torch.randn(12, 5, generator=g) * s for s in (0.1, 2.0)]
    kw = dict(alpha=0.01, max_iter=50, precision="ieee", backend="torch", device=CPU)
    med, _ = diag_coefficients(sets, sigma="median", **kw)
    explicit, _ = diag_coefficients(sets, sigma=[median_sigma(p) for p in sets], **kw)
    one, _ = diag_coefficients(sets, sigma=1.0, **kw)
    for a, b in zip(med, explicit, strict=True):
        torch.testing.assert_close(a, b)
    # the bandwidth matters: with σ = 1 the 0.1-scaled layer's kernel is nearly all ones
    assert not torch.allclose(med[0], one[0])
    with pytest.raises(ValueError, match="1 sigmas for 2 point sets"):
        diag_coefficients(sets, sigma=[1.0], **kw)


def test_resolve_r2_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KCM_CUDA_CACHE", str(tmp_path))
    assert r2_cache_dir_from_env() == tmp_path / "r2"
    monkeypatch.delenv("KCM_CUDA_CACHE")
    assert str(r2_cache_dir_from_env()).endswith(".cache/kcm_cuda/r2")
    # the suite's conftest points the default at a per-test temp dir
    assert resolve_r2_cache(True) == tmp_path.parent / tmp_path.name / "r2_cache"
    assert resolve_r2_cache(False) is None
    assert resolve_r2_cache(tmp_path / "x") == tmp_path / "x"
    with pytest.raises(TypeError, match="r2_cache must be True, False or a directory"):
        resolve_r2_cache(3)
    with pytest.raises(ValueError, match="got ''"):
        resolve_r2_cache("")


def test_key_depends_on_points_and_options():
    p = [torch.ones(4, 2), torch.zeros(3, 2)]
    k = r2_key(p, {"sigma": 1.0})
    assert k == r2_key([x.clone() for x in p], {"sigma": 1.0})
    assert k != r2_key(p, {"sigma": 2.0})
    assert k != r2_key([p[0] * 2, p[1]], {"sigma": 1.0})


def _run(model, directory, counter, **kw):
    adapter = get_adapter(model)
    opts = dict(points="output", sigma=1.0, alpha=0.01, max_iter=30, precision="ieee")
    opts.update(kw)

    def compute():
        counter.append(1)
        return r2_scores(
            model,
            adapter,
            points=opts["points"],
            sigma=opts["sigma"],
            alpha=opts["alpha"],
            max_iter=opts["max_iter"],
            precision=opts["precision"],
            backend="torch",
            device=CPU,
        )

    return cached_r2_scores(model, adapter, directory, compute, backend_name="torch", **opts)


def test_disk_cache_hit_miss_corruption(bert, tmp_path):
    calls: list[int] = []
    d = tmp_path / "r2"
    s1, it1, hit1 = _run(bert, d, calls)
    assert not hit1 and len(calls) == 1
    files = list(d.glob("*.pt"))
    assert len(files) == 1 and not list(d.glob(".*tmp"))  # no temp file left behind
    s2, it2, hit2 = _run(bert, d, calls)
    assert hit2 and len(calls) == 1 and it2 == it1
    for a, b in zip(s1, s2, strict=True):
        assert torch.equal(a.double(), b)
    # other options → another entry
    _run(bert, d, calls, max_iter=31)
    assert len(calls) == 2 and len(list(d.glob("*.pt"))) == 2
    # changed weights → miss
    w = get_adapter(bert).w2(get_adapter(bert).layers(bert)[0]).weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(1.5)
    _run(bert, d, calls)
    assert len(calls) == 3
    with torch.no_grad():
        w.copy_(saved)
    # a corrupted entry: warned about, recomputed, rewritten
    files[0].write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unusable"):
        s3, _, hit3 = _run(bert, d, calls)
    assert not hit3 and len(calls) == 4
    for a, b in zip(s1, s3, strict=True):
        torch.testing.assert_close(a.double(), b.double())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _run(bert, d, calls)[2]  # the rewritten entry is valid again
    # an inconsistent entry (wrong shapes) is refused too
    entry = torch.load(files[0], weights_only=True)
    entry["scores"] = [s[:-1] for s in entry["scores"]]
    torch.save(entry, files[0])
    with pytest.warns(UserWarning, match="wrong shape"):
        assert not _run(bert, d, calls)[2]
    # off: always computes, writes nothing
    n_before = len(calls)
    _run(bert, None, calls)
    _run(bert, None, calls)
    assert len(calls) == n_before + 2


def test_unwritable_cache_dir_only_warns(bert, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the directory should be
    calls: list[int] = []
    with pytest.warns(UserWarning, match="could not write the R2 cache"):
        scores, _, hit = _run(bert, blocker / "r2", calls)
    assert not hit and len(scores) == 3 and len(calls) == 1
