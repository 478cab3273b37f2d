"""RBF kernel matrix K = exp(-|x_i - x_j|^2 / 2σ^2) of n points in d dims (R2's first step).

Peers, all in this process and alternated round by round:
  kcm[cuda|triton|torch]   kcm_cuda.rbf_kernel(x, None, backend=...) (symmetric case, as R2)
  torch-eager              norms + x @ x^T + clamp + exp, written out in torch
  torch-cdist              torch.cdist(x, x) ** 2, then exp
  torch-compile            torch.compile of torch-eager (full runs only; skipped if unusable)
  torch-mm                 the bare x @ x^T of the same shape: the ceiling of any RBF kernel
  sklearn                  sklearn.metrics.pairwise.rbf_kernel (CPU; numpy float32 input)
  keops                    pykeops kernel sum (GPU, when installed; never materialises K, so a
                           related op, not the same)
FLOPs: 2·n·n·d for every peer (norms and exp not counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks import harness
from benchmarks.peers import Peer, Skipped, auto_backend, our_backends, try_compile

SIGMA = 1.0
FULL_SHAPES = [(1536, 384), (3072, 768), (11008, 4096)]
CPU_MAX_N = 3072  # a reduced (CPU) full run stops here: 11008 x 4096 takes minutes per call
SMOKE_SHAPES = [(64, 32), (192, 48)]


@dataclass(frozen=True)
class RbfCase:
    n: int
    d: int
    precision: str

    @property
    def id(self) -> str:
        return f"n={self.n},d={self.d},{self.precision}"


def make_cases(profile: harness.Profile, test_name: str) -> list[RbfCase]:
    if profile.smoke:
        return [RbfCase(n, d, "ieee") for n, d in SMOKE_SHAPES]
    shapes = [s for s in FULL_SHAPES if not profile.reduced or s[0] <= CPU_MAX_N]
    precisions = ["ieee", "tf32x3", "tf32"] if profile.device == "cuda" else ["ieee"]
    return [RbfCase(n, d, p) for p in precisions for n, d in shapes]


def rbf_eager(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    x_sq = (x * x).sum(1)
    y_sq = (y * y).sum(1)
    sq = (x_sq[:, None] + y_sq[None, :] - 2.0 * (x @ y.t())).clamp_min(0.0)
    return torch.exp(sq * (-0.5 / (sigma * sigma)))


def rbf_cdist(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.exp(torch.cdist(x, y) ** 2 * (-0.5 / (sigma * sigma)))


_compiled: dict[str, object] = {}


def _compiled_eager():
    if "fn" not in _compiled:
        _compiled["fn"], _compiled["why"] = try_compile(rbf_eager)
    return _compiled["fn"], _compiled["why"]


def _keops_peer(x: torch.Tensor, sigma: float, flops: float) -> Peer | Skipped:
    try:
        from pykeops.torch import LazyTensor
    except Exception as exc:  # noqa: BLE001 (ImportError, or a broken build)
        return Skipped("keops", f"pykeops not usable: {type(exc).__name__}")

    def run() -> torch.Tensor:
        xi = LazyTensor(x[:, None, :])
        xj = LazyTensor(x[None, :, :])
        d2 = ((xi - xj) ** 2).sum(-1)
        return (d2 * (-0.5 / (sigma * sigma))).exp().sum(dim=1)

    return Peer("keops", run, flops=flops, same_op=False,
                note="kernel row sums, K never materialised")


def test_rbf(case: RbfCase, profile: harness.Profile, device: torch.device, bench) -> None:
    import kcm_cuda

    gen = torch.Generator().manual_seed(0)
    # W2 columns of a BERT-like init (std 0.02) would make every K_ij ~ 1; points with unit
    # expected norm keep the exp in its interesting range. The values do not change the work.
    x = (torch.randn(case.n, case.d, generator=gen) / case.d**0.5).to(device)
    flops = harness.rbf_flops(case.n, case.n, case.d)
    peers: list[Peer | Skipped] = []
    backends, skipped = our_backends(device, case.n)
    for name in backends:
        peers.append(Peer(
            f"kcm[{name}]",
            lambda name=name: kcm_cuda.rbf_kernel(x, None, SIGMA, precision=case.precision,
                                                  backend=name),
            ours=True, flops=flops,
        ))
    peers.extend(skipped)
    peers.append(Peer("torch-eager", lambda: rbf_eager(x, x, SIGMA), flops=flops))
    peers.append(Peer("torch-cdist", lambda: rbf_cdist(x, x, SIGMA), flops=flops))
    if not profile.compile or profile.smoke:
        peers.append(Skipped("torch-compile", "not in smoke runs / --kcm-no-compile"))
    else:
        fn, why = _compiled_eager()
        if fn is None:
            peers.append(Skipped("torch-compile", str(why)))
        else:
            peers.append(Peer("torch-compile", lambda: fn(x, x, SIGMA), flops=flops,
                              note="torch.compile(torch-eager)"))
    peers.append(Peer("torch-mm", lambda: x @ x.t(), flops=flops, same_op=False,
                      note="bare x @ x^T: ceiling"))
    baseline = "torch-eager"
    if device.type == "cpu":
        from sklearn.metrics.pairwise import rbf_kernel as sk_rbf

        xn = x.numpy()
        gamma = 0.5 / (SIGMA * SIGMA)
        peers.append(Peer("sklearn", lambda: sk_rbf(xn, gamma=gamma), flops=flops,
                          note="float32 in, float64 distances"))
        baseline = "sklearn"
    else:
        peers.append(_keops_peer(x, SIGMA, flops))
    primary = next((p.name for p in peers if isinstance(p, Peer) and p.ours
                    and p.name == f"kcm[{auto_backend(device)}]"), None)
    records = bench(
        op="rbf", case=case.id, params={"n": case.n, "m": case.n, "d": case.d, "sigma": SIGMA},
        peers=peers, precision=case.precision, primary=primary, baseline=baseline,
    )
    # What a benchmark run can check without asserting a timing: our ops ran (a failing peer
    # is recorded with its error and does not fail the run).
    for r in records:
        assert not (r["ours"] and r["status"] == "error"), f"{r['peer']}: {r['reason']}"
