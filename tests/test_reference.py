"""The float64 reference against independent NumPy arithmetic and known closed forms."""

import math

import numpy as np
import torch

from kcm_cuda import reference


def test_rbf_matches_numpy_loops():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    sigma = 0.7
    expected = np.array(
        [[math.exp(-np.sum((a - b) ** 2) / (2 * sigma**2)) for b in y] for a in x]
    )
    got = reference.rbf_kernel(torch.from_numpy(x), torch.from_numpy(y), sigma).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=0)


def test_rbf_self_kernel_is_symmetric_with_unit_diagonal():
    x = torch.randn(9, 4)
    K = reference.rbf_kernel(x)
    assert torch.equal(K, K.T)
    assert torch.equal(K.diagonal(), torch.ones(9, dtype=torch.float64))


def test_update_of_identity_kernel_is_a_fixed_point_at_identity():
    # K = I: every point is its own vertex, C = I solves the problem exactly.
    K = torch.eye(6, dtype=torch.float64)
    C_new, delta, mass = reference.convex_update(K, torch.eye(6, dtype=torch.float64))
    assert torch.equal(C_new, torch.eye(6, dtype=torch.float64))
    assert float(delta) == 0.0 and float(mass) == 6.0


def test_update_matches_formula_elementwise():
    rng = np.random.default_rng(1)
    K = reference.rbf_kernel(torch.from_numpy(rng.normal(size=(6, 2)))).numpy()
    C = rng.uniform(0.01, 1.0, size=(6, 6))
    KC = K @ C
    expected = C * np.sqrt(K / KC)
    C_new, delta, mass = reference.convex_update(torch.from_numpy(K), torch.from_numpy(C))
    np.testing.assert_allclose(C_new.numpy(), expected, rtol=1e-13)
    assert math.isclose(float(delta), np.abs(expected - C).sum(), rel_tol=1e-12)
    assert math.isclose(float(mass), np.abs(C).sum(), rel_tol=1e-12)


def test_solver_separates_duplicates_from_a_lone_point():
    # Two identical points share their weight; a far-away point keeps all of its own.
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [6.0, 6.0]])
    C, n_iter = reference.kcm_coefficients(reference.rbf_kernel(x), alpha=1e-6, max_iter=500)
    assert 1 <= n_iter <= 500
    assert C[2, 2] > 0.99
    assert C[0, 0] < 0.75 and C[1, 1] < 0.75


def test_solver_stack_is_the_loop_over_layers():
    K = torch.stack([reference.rbf_kernel(torch.randn(8, 3)) for _ in range(3)])
    C, n_iter = reference.kcm_coefficients(K)
    for layer in range(3):
        C_l, it_l = reference.kcm_coefficients(K[layer])
        assert torch.equal(C[layer], C_l) and int(n_iter[layer]) == it_l
