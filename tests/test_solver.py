"""The solver loop and the convex update on the torch backend against the float64 reference,
and properties that must hold for any input (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kcm_cuda
from kcm_cuda import reference


def _kernel(n: int, d: int, seed: int, spread: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return reference.rbf_kernel(torch.randn(n, d, generator=g) * spread).float()


def test_iteration_count_and_coefficients_match_reference():
    for n, d, seed in [(1, 1, 0), (7, 3, 1), (64, 16, 2), (130, 8, 3)]:
        K = _kernel(n, d, seed, spread=0.5)
        C, n_iter = kcm_cuda.kcm_coefficients(K, backend="torch")
        C_ref, n_iter_ref = reference.kcm_coefficients(K)
        assert n_iter == n_iter_ref, (n, d)
        torch.testing.assert_close(C.double(), C_ref, rtol=1e-4, atol=1e-6)


def test_batched_equals_looped_with_layers_stopping_at_different_steps():
    # Different spreads converge after different numbers of updates.
    K = torch.stack([_kernel(40, 6, s, spread) for s, spread in enumerate((0.2, 0.6, 1.5))])
    C, n_iter = kcm_cuda.kcm_coefficients(K, backend="torch")
    assert n_iter.dtype == torch.long and n_iter.shape == (3,)
    assert len(set(n_iter.tolist())) > 1, "the test needs layers that stop at different steps"
    for layer in range(3):
        C_l, it_l = kcm_cuda.kcm_coefficients(K[layer], backend="torch")
        assert int(n_iter[layer]) == it_l
        torch.testing.assert_close(C[layer], C_l, rtol=0, atol=0)


def test_max_iter_caps_the_updates():
    K = _kernel(30, 4, 5, spread=0.3)
    _, n_iter = kcm_cuda.kcm_coefficients(K, alpha=1e-12, max_iter=3, backend="torch")
    assert n_iter == 3


def test_convex_update_single_and_stack_shapes():
    K = _kernel(12, 3, 7)
    C = torch.rand(12, 12)
    C_new, delta, mass = kcm_cuda.convex_update(K, C, backend="torch")
    assert C_new.shape == (12, 12) and delta.dim() == 0 and mass.dim() == 0
    stack = kcm_cuda.convex_update(K.expand(2, 12, 12), C.expand(2, 12, 12), backend="torch")
    assert stack[0].shape == (2, 12, 12) and stack[1].shape == (2,)
    torch.testing.assert_close(stack[0][1], C_new)
    C_ref, delta_ref, mass_ref = reference.convex_update(K, C)
    torch.testing.assert_close(C_new.double(), C_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(delta.double(), delta_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mass.double(), mass_ref, rtol=1e-5, atol=0)


points = st.integers(1, 24).flatmap(
    lambda n: st.integers(1, 6).flatmap(
        lambda d: st.lists(
            st.floats(-4, 4, allow_nan=False, width=32), min_size=n * d, max_size=n * d
        ).map(lambda v: torch.tensor(v, dtype=torch.float32).reshape(n, d))
    )
)


@settings(max_examples=40, deadline=None)
@given(x=points, sigma=st.floats(0.1, 5.0))
def test_self_kernel_properties(x, sigma):
    K = kcm_cuda.rbf_kernel(x, sigma=sigma, backend="torch")
    assert K.dtype == torch.float32 and K.shape == (x.shape[0], x.shape[0])
    assert torch.equal(K, K.T)
    assert torch.equal(K.diagonal(), torch.ones(x.shape[0]))
    assert bool((K >= 0).all()) and bool((K <= 1).all())
    # Away from underflow the kernel is strictly positive.
    sq = torch.cdist(x.double(), x.double()) ** 2 / (2 * sigma**2)
    assert bool((K[sq < 80] > 0).all())


@settings(max_examples=40, deadline=None)
@given(x=points, seed=st.integers(0, 2**16))
def test_update_keeps_coefficients_non_negative(x, seed):
    K = kcm_cuda.rbf_kernel(x, backend="torch")
    C = torch.rand(K.shape, generator=torch.Generator().manual_seed(seed))
    C_new, delta, mass = kcm_cuda.convex_update(K, C, backend="torch")
    assert bool((C_new >= 0).all()) and bool(torch.isfinite(C_new).all())
    assert float(delta) >= 0 and float(mass) > 0


def test_running_layers_are_gathered_only_when_the_set_changes():
    """Once some layers converge the solver works on a compact copy of the running layers,
    made when the set shrinks, never once per iteration."""
    from kcm_cuda.kernels.solver import solve_stack
    from kcm_cuda.kernels.torch_backend import convex_update

    K = torch.stack([_kernel(30, 5, s, spread) for s, spread in enumerate((0.2, 0.5, 1.5, 3.0))])
    seen: list[torch.Tensor] = []  # kept alive: no storage (data_ptr) can be reused

    def update(k, c):
        seen.append(k)
        return convex_update(k, c, "ieee")

    C, n_iter = solve_stack(K, update, 0.01, 100)
    changes = len(set(n_iter.tolist()))
    assert changes >= 3, "the test needs layers stopping at several different steps"
    distinct_K = len({k.data_ptr() for k in seen})
    assert distinct_K <= changes  # the full stack, then one gather per change of the set
    assert len(seen) == int(n_iter.max())
    for layer in range(K.shape[0]):
        C_ref, it_ref = reference.kcm_coefficients(K[layer])
        assert int(n_iter[layer]) == it_ref
        torch.testing.assert_close(C[layer].double(), C_ref, rtol=1e-4, atol=1e-6)
