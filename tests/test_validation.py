"""Bad input to the public ops gives a clear TypeError/ValueError naming the argument."""

import math

import pytest
import torch

import kcm_cuda

X = torch.randn(5, 3)
X_NAN = X.clone().index_fill_(0, torch.tensor([1]), math.nan)
X_INF = X.clone().index_fill_(0, torch.tensor([1]), math.inf)
K = kcm_cuda.rbf_kernel(X, backend="torch")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"x": X_NAN}, ValueError, "x contains NaN"),
        ({"x": X_INF}, ValueError, "x contains NaN"),
        ({"x": X, "y": torch.full((2, 3), math.nan)}, ValueError, "y contains NaN"),
        ({"x": X, "sigma": 0.0}, ValueError, "sigma"),
        ({"x": X, "sigma": -1.0}, ValueError, "sigma"),
        ({"x": X, "sigma": math.nan}, ValueError, "sigma"),
        ({"x": X, "sigma": "1"}, TypeError, "sigma"),
        ({"x": torch.randn(5)}, ValueError, "x must be 2-D"),
        ({"x": torch.randn(2, 5, 3)}, ValueError, "x must be 2-D"),
        ({"x": X, "y": torch.randn(4, 2)}, ValueError, "same number of features"),
        ({"x": torch.empty(0, 3)}, ValueError, "x must not be empty"),
        ({"x": torch.empty(4, 0)}, ValueError, "x must not be empty"),
        ({"x": X.long()}, TypeError, "x must have dtype"),
        ({"x": X.numpy()}, TypeError, "x must be a torch.Tensor"),
        ({"x": X, "precision": "fp64"}, ValueError, "precision"),
        ({"x": X, "backend": "opencl"}, ValueError, "backend must be"),
    ],
)
def test_rbf_kernel_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        kcm_cuda.rbf_kernel(**kwargs)


C0 = torch.full((5, 5), 0.2)


@pytest.mark.parametrize(
    "K_, C_, error, match",
    [
        (torch.rand(5, 4), torch.rand(5, 4), ValueError, "K must be square"),
        (-K, C0, ValueError, "K must be non-negative"),
        (K, -C0, ValueError, "C must be non-negative"),
        (K, torch.rand(4, 4), ValueError, "C must have the shape of K"),
        (K, torch.rand(1, 5, 5), ValueError, "C must have the shape of K"),
        (torch.rand(5), C0, ValueError, "K must be"),
        (K.long(), C0, TypeError, "K must be a floating-point"),
        (K, C0.clone().fill_(math.nan), ValueError, "C contains NaN"),
        (torch.empty(0, 0), torch.empty(0, 0), ValueError, "K must not be empty"),
        ([[1.0]], C0, TypeError, "K must be a torch.Tensor"),
    ],
)
def test_convex_update_rejects(K_, C_, error, match):
    with pytest.raises(error, match=match):
        kcm_cuda.convex_update(K_, C_)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"alpha": 0.0}, ValueError, "alpha"),
        ({"alpha": -0.1}, ValueError, "alpha"),
        ({"alpha": math.nan}, ValueError, "alpha"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"max_iter": 2.5}, TypeError, "max_iter"),
        ({"precision": "double"}, ValueError, "precision"),
        ({"backend": "nope"}, ValueError, "backend"),
    ],
)
def test_kcm_coefficients_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        kcm_cuda.kcm_coefficients(K, **kwargs)


def test_unavailable_backend_is_named():
    # This CPU machine has no CUDA: asking for the compiled backend says why it cannot run.
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        kcm_cuda.rbf_kernel(X, backend="cuda")
    assert "cuda" not in kcm_cuda.available_backends()


def test_rbf_kernel_accepts_float64_points():
    """float64 points run on the torch backend in float64: float32 K within a
    float32 rounding of the float64 reference, for K(x) and K(x, y)."""
    from kcm_cuda import reference

    x = X.double() * 3.0
    y = torch.randn(4, 3, dtype=torch.float64)
    for yy in (None, y):
        K = kcm_cuda.rbf_kernel(x, yy, sigma=0.7)
        assert K.dtype == torch.float32
        ref = reference.rbf_kernel(x, yy, 0.7)
        assert float((K.double() - ref).abs().max()) <= 6e-8
    K = kcm_cuda.rbf_kernel(x, sigma=0.7)
    assert torch.equal(K, K.T) and bool((K.diagonal() == 1).all())


def test_update_validation_is_one_fused_pass_per_tensor(monkeypatch):
    """convex_update's value checks (finite, >= 0) read K and C once each (aminmax) with one
    host sync in all, not four passes with a sync each; the messages stay specific."""
    from kcm_cuda import validation

    calls = {"aminmax": 0, "tolist": 0, "isfinite": 0}
    real_aminmax, real_isfinite = torch.aminmax, torch.isfinite
    real_tolist = torch.Tensor.tolist

    def aminmax(t, *a, **k):
        calls["aminmax"] += 1
        return real_aminmax(t, *a, **k)

    def isfinite(t):
        calls["isfinite"] += 1
        return real_isfinite(t)

    def tolist(self):
        calls["tolist"] += 1
        return real_tolist(self)

    monkeypatch.setattr(validation.torch, "aminmax", aminmax)
    monkeypatch.setattr(validation.torch, "isfinite", isfinite)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    validation.check_update_args(K, C0, "ieee")
    assert calls == {"aminmax": 2, "tolist": 1, "isfinite": 0}


@pytest.mark.parametrize(
    "bad, match",
    [
        (math.inf, "C contains NaN or Inf"),
        (-math.inf, "C contains NaN or Inf"),
        (math.nan, "C contains NaN or Inf"),
        (-1e-30, "C must be non-negative"),
    ],
)
def test_fused_update_check_messages(bad, match):
    C = C0.clone()
    C[2, 3] = bad
    with pytest.raises(ValueError, match=match):
        kcm_cuda.convex_update(K, C)
    Kb = K.clone()
    Kb[1, 1] = bad
    with pytest.raises(ValueError, match=match.replace("C ", "K ")):
        kcm_cuda.convex_update(Kb, C0)


def test_precision_auto_resolves_to_ieee_on_the_cpu():
    assert kcm_cuda.kernels.default_precision("cpu") == "ieee"
    K_auto = kcm_cuda.rbf_kernel(X, precision="auto")
    assert torch.equal(K_auto, kcm_cuda.rbf_kernel(X, precision="ieee"))
    C_auto, it = kcm_cuda.kcm_coefficients(K, precision="auto")
    C_ieee, it_ieee = kcm_cuda.kcm_coefficients(K, precision="ieee")
    assert it == it_ieee and torch.equal(C_auto, C_ieee)
