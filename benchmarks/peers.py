"""The peers of a case (one implementation each) and how they are measured together: the
peers of one case are **alternated** (round r runs every peer once, in an order rotated by r),
so drift (clocks, other processes on a shared machine) hits every peer alike. Also the helpers
that pick kcm_cuda's own backends as peers."""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.timing import Timer, pinned_precision


@dataclass
class Peer:
    """One implementation of a case. ``fn`` runs it once on prepared inputs; ``flops`` is the
    useful work of one call (a callable is evaluated after the run, e.g. from iterations);
    ``info`` is a dict the callable may fill (iterations, report) that lands in the record."""

    name: str
    fn: Callable[[], object]
    ours: bool = False
    flops: float | Callable[[], float | None] | None = None
    precision: str | None = None  # the precision the peer effectively runs at
    same_op: bool = True  # False: a related, not identical, computation (e.g. a ceiling)
    note: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Skipped:
    """A peer that could not run here (not installed, unsupported), recorded with the reason."""

    name: str
    reason: str
    ours: bool = False


def _rotation(names: list[str], r: int) -> list[str]:
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def measure_peers(
    peers: list[Peer],
    timer: Timer,
    *,
    warmup: int,
    rounds: int | None,
    min_rounds: int,
    max_rounds: int,
    budget_s: float,
    benchmark: Any = None,
    primary: str | None = None,
    pin: str = "ieee",
    cpu_samples: dict[str, list[float]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, str], int]:
    """Alternate the peers round by round. Returns (samples in ms per peer, errors per peer,
    rounds). ``rounds=None`` picks rounds from ``budget_s`` and a warm-up estimate, clamped to
    [min_rounds, max_rounds]. With an enabled pytest-benchmark fixture and a ``primary`` peer,
    that peer's calls are driven by ``benchmark.pedantic`` (its table then shows the primary)
    while the other peers run in its untimed setup/teardown, still alternated. On a CPU,
    ``cpu_samples`` (when given) receives each timed call's process CPU time."""
    errors: dict[str, str] = {}
    estimate: dict[str, float] = {}

    def call(peer: Peer, flush: bool = True) -> float:
        with pinned_precision(pin):
            return timer.time_call(peer.fn, flush=flush)

    for peer in peers:
        try:
            t = math.nan  # no warm-up: no estimate (rounds then fixed or min_rounds)
            for _ in range(warmup):
                t = call(peer)
            estimate[peer.name] = t
        except Exception as exc:  # noqa: BLE001 (a failing peer is recorded, not fatal)
            errors[peer.name] = f"{type(exc).__name__}: {exc}"[:500]
    live = [p for p in peers if p.name not in errors]
    by_name = {p.name: p for p in live}
    names = [p.name for p in live]
    samples: dict[str, list[float]] = {name: [] for name in names}
    if not live:
        return samples, errors, 0
    if rounds is None:
        per_round_s = sum(estimate[n] for n in names) / 1e3
        if math.isnan(per_round_s):
            rounds = min_rounds
        else:
            rounds = int(budget_s / per_round_s) if per_round_s > 0 else max_rounds
            rounds = max(min_rounds, min(max_rounds, rounds))

    def keep(name: str, ms: float) -> None:
        samples[name].append(ms)
        if cpu_samples is not None and timer.last_cpu_ms is not None:
            cpu_samples.setdefault(name, []).append(timer.last_cpu_ms)

    def run_named(name: str) -> None:
        if name in errors:
            return
        try:
            keep(name, call(by_name[name]))
        except Exception as exc:  # noqa: BLE001
            errors[name] = f"{type(exc).__name__}: {exc}"[:500]

    use_fixture = (
        benchmark is not None
        and primary in by_name
        and not getattr(benchmark, "disabled", True)
    )
    gc.collect()
    if not use_fixture:
        for r in range(rounds):
            for name in _rotation(names, r):
                run_named(name)
    else:
        order = {"r": -1, "after": []}

        def setup() -> None:
            order["r"] += 1
            rotated = _rotation(names, order["r"])
            i = rotated.index(primary)
            for name in rotated[:i]:
                run_named(name)
            order["after"] = rotated[i + 1 :]
            # Flush here, untimed by pytest-benchmark on a CPU. On a GPU the flush kernel is
            # only queued (no sync), as in time_call: it hides the launch latency of the
            # primary from its CUDA events (pytest-benchmark's own wall time then includes it).
            timer.flush()

        def target() -> None:
            keep(primary, call(by_name[primary], flush=False))

        def teardown() -> None:
            for name in order["after"]:
                run_named(name)

        benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds, warmup_rounds=0)
    for name in list(samples):
        if name in errors:
            samples[name] = []
    return samples, errors, rounds


# ---------------------------------------------------------------------------------------------
# Helpers shared by the bench files
# ---------------------------------------------------------------------------------------------
TRITON_INTERPRETER_MAX_N = 256  # the Triton CPU interpreter is only usable at tiny sizes


def our_backends(device: torch.device, n: int) -> tuple[list[str], list[Skipped]]:
    """kcm_cuda's backends to measure on ``device`` at size ``n`` (the float64 "reference"
    is never measured), and the ones that are not, with the reason."""
    from kcm_cuda import dispatch

    usable = [b for b in dispatch.available_backends(device) if b != "reference"]
    chosen: list[str] = []
    skipped: list[Skipped] = []
    for name in ("cuda", "triton", "torch"):
        label = f"kcm[{name}]"
        if name not in usable:
            if name == "cuda" and device.type != "cuda":
                continue  # the compiled backend is for GPUs only: not worth a line on a CPU
            why = "not available here"
            if name == "triton" and device.type != "cuda":
                why += " (on CPU tensors it needs TRITON_INTERPRET=1)"
            skipped.append(Skipped(label, why, ours=True))
        elif name == "triton" and device.type != "cuda" and n > TRITON_INTERPRETER_MAX_N:
            why = f"Triton interpreter on CPU: measured at n <= {TRITON_INTERPRETER_MAX_N} only"
            skipped.append(Skipped(label, why, ours=True))
        else:
            chosen.append(name)
    return chosen, skipped


def auto_backend(device: torch.device) -> str:
    from kcm_cuda import dispatch

    return dispatch.resolve_backend("auto", device)


def try_compile(fn: Callable[..., Any]) -> tuple[Callable[..., Any] | None, str | None]:
    """torch.compile(fn) or (None, reason) when compile is unusable here. Compilation itself
    happens at the first call, i.e. in the warm-up, outside the timing."""
    compile_fn = getattr(torch, "compile", None)
    if compile_fn is None:
        return None, "torch.compile not available in this torch"
    try:
        return compile_fn(fn, dynamic=False), None
    except Exception as exc:  # noqa: BLE001
        return None, f"torch.compile failed: {type(exc).__name__}: {exc}"[:300]
