"""One convex update C_new = where(KC > 0, C·sqrt(K / KC), 0), KC = K @ C, with delta and mass
(the solver's inner step, ~all of KCM's arithmetic; ALGORITHM.md: "the kernel that matters").

Peers, alternated round by round:
  kcm[cuda|triton|torch]   the backend module's convex_update on a (1, n, n) stack, as the
                           solver calls it (no argument checks)
  kcm-api[<auto>]          the public kcm_cuda.convex_update(K, C) (with its argument checks)
  torch-eager              the same update written out in torch (matmul, where, sqrt, sums)
  torch-compile            torch.compile of torch-eager (full runs only; skipped if unusable)
  torch-mm                 the bare K @ C of the same shape: the ceiling of any fused update
FLOPs: 2·n^3 + 6·n^2 (product + element-wise work) for every peer but torch-mm (2·n^3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks import harness
from benchmarks.peers import Peer, Skipped, auto_backend, our_backends, try_compile

FULL_SIZES = [1536, 3072, 11008]
CPU_MAX_N = 3072  # an 11008 update is ~2.7 TFLOP: tens of seconds per call on a small CPU
SMOKE_SIZES = [48, 160]


@dataclass(frozen=True)
class UpdateCase:
    n: int
    precision: str

    @property
    def id(self) -> str:
        return f"n={self.n},{self.precision}"


def make_cases(profile: harness.Profile, test_name: str) -> list[UpdateCase]:
    if profile.smoke:
        return [UpdateCase(n, "ieee") for n in SMOKE_SIZES]
    sizes = [n for n in FULL_SIZES if not profile.reduced or n <= CPU_MAX_N]
    precisions = ["ieee", "tf32x3", "tf32"] if profile.device == "cuda" else ["ieee"]
    return [UpdateCase(n, p) for p in precisions for n in sizes]


def update_eager(K: torch.Tensor, C: torch.Tensor):
    KC = K @ C
    positive = KC > 0
    C_new = torch.where(positive, C * torch.sqrt(K / torch.where(positive, KC, 1.0)), 0.0)
    return C_new, (C_new - C).abs().sum(), C.abs().sum()


def make_inputs(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel matrix of random points and a positive C near the solver's start (1/n)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=gen) / 8.0
    sq = (x * x).sum(1)
    K = torch.exp(-0.5 * (sq[:, None] + sq[None, :] - 2.0 * x @ x.t()).clamp_min(0.0))
    K.diagonal().fill_(1.0)
    C = (1.0 + 0.1 * torch.rand(n, n, generator=gen)) / n
    return K.to(device).contiguous(), C.to(device).contiguous()


_compiled: dict[str, object] = {}


def test_convex_update(case: UpdateCase, profile: harness.Profile, device: torch.device,
                       bench) -> None:
    import kcm_cuda
    from kcm_cuda import dispatch

    K, C = make_inputs(case.n, device)
    K3, C3 = K.unsqueeze(0), C.unsqueeze(0)
    flops = harness.update_flops(case.n)
    peers: list[Peer | Skipped] = []
    backends, skipped = our_backends(device, case.n)
    for name in backends:
        module = dispatch.backend_module(name)
        peers.append(Peer(
            f"kcm[{name}]",
            lambda module=module: module.convex_update(K3, C3, case.precision),
            ours=True, flops=flops,
        ))
    peers.extend(skipped)
    auto = auto_backend(device)
    peers.append(Peer(
        f"kcm-api[{auto}]",
        lambda: kcm_cuda.convex_update(K, C, precision=case.precision),
        ours=True, flops=flops, note="public op, with argument checks",
    ))
    peers.append(Peer("torch-eager", lambda: update_eager(K, C), flops=flops))
    if not profile.compile or profile.smoke:
        peers.append(Skipped("torch-compile", "not in smoke runs / --kcm-no-compile"))
    else:
        if "fn" not in _compiled:
            _compiled["fn"], _compiled["why"] = try_compile(update_eager)
        fn = _compiled["fn"]
        if fn is None:
            peers.append(Skipped("torch-compile", str(_compiled["why"])))
        else:
            peers.append(Peer("torch-compile", lambda: fn(K, C), flops=flops,
                              note="torch.compile(torch-eager)"))
    peers.append(Peer("torch-mm", lambda: K @ C, flops=2.0 * case.n**3, same_op=False,
                      note="bare K @ C: ceiling"))
    records = bench(
        op="convex_update", case=case.id, params={"n": case.n, "layers": 1},
        peers=peers, precision=case.precision, primary=f"kcm[{auto}]", baseline="torch-eager",
    )
    for r in records:
        assert not (r["ours"] and r["status"] == "error"), f"{r['peer']}: {r['reason']}"
