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
        ({"x": X.double()}, TypeError, "x must have dtype"),
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
