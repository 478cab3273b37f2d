"""End to end: kcm_cuda.prune of a BERT-base-shaped model (BertConfig(), random weights) at
c = 0.6 on 2048 pre-tokenized sequences of length 128; total time and time per stage as the
prune report gives it.

Records: op "prune_e2e" (the whole call) and op "prune_stage" (one record per stage found in
``PruneResult.report``, peer = the stage's name), so that a comparison flags a slower stage.
A reduced (CPU) run uses 256 sequences. Caveat: with freshly initialised weights (std 0.02)
every R2 kernel is almost flat and its solver stops after ~1 update, so this measures the
pipeline around the solver more than the solver (bench_solver measures that on real-like K).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from benchmarks import harness, results_file
from benchmarks.peers import Peer, auto_backend

FLOPS_C = 0.6
TINY_CONFIG = {
    "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 256, "max_position_embeddings": 64,
}


@dataclass(frozen=True)
class E2ECase:
    name: str
    samples: int
    seq: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.name},N={self.samples},T={self.seq},c={FLOPS_C}"


def make_cases(profile: harness.Profile, test_name: str) -> list[E2ECase]:
    if profile.smoke:
        return [E2ECase("bert-tiny", 16, 16, TINY_CONFIG)]
    return [E2ECase("bert-base", 256 if profile.reduced else 2048, 128)]


_TIME_KEYS = ("timings_s", "timings", "stage_times", "stages_s", "times_s", "times",
              "time_s", "timings_ms", "times_ms")


def stage_times(report: Any) -> dict[str, float]:
    """Seconds per stage from a prune report. Looks for a flat {stage: seconds} dict under a
    usual key (timings_s, timings, stage_times, ...; *_ms in milliseconds); else collects, from
    the whole (nested) report, the numbers whose key says it is a time (…_s, …_sec, …_ms,
    'time' in the name)."""
    if not isinstance(report, dict):
        return {}
    for key in _TIME_KEYS:
        value = report.get(key)
        if isinstance(value, dict) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
        ):
            scale = 1e-3 if key.endswith("_ms") else 1.0
            return {str(k): float(v) * scale for k, v in value.items()}
    found: dict[str, float] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, name + ".")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                low = str(k).lower()
                if low.endswith("_ms"):
                    found[name] = float(v) / 1e3
                elif low.endswith(("_s", "_sec", "_secs", "_seconds")) or "time" in low:
                    found[name] = float(v)

    walk(report, "")
    return found


def make_model_and_data(case: E2ECase, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(**case.config)
    model = BertModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (case.samples, case.seq), generator=gen)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return model, data


def test_prune_e2e(case: E2ECase, profile: harness.Profile, device: torch.device, bench,
                   recorder: harness.Recorder) -> None:
    try:
        from kcm_cuda.pruning import prune
    except ImportError as exc:
        pytest.skip(f"kcm_cuda.pruning not available yet ({exc})")
    model, data = make_model_and_data(case)
    info: dict[str, Any] = {"stages_per_call": []}

    def run() -> None:
        result = prune(model, data, flops=FLOPS_C, samples=case.samples, max_length=case.seq,
                       seed=0, backend="auto", device=device, progress=False)
        info["report"] = result.report
        info["stages_per_call"].append(stage_times(result.report))
        return None

    heavy = device.type == "cpu" and not profile.smoke
    warmup = 0 if device.type == "cpu" else 1  # a GPU warm-up compiles / autotunes
    peer = Peer(f"kcm-prune[{auto_backend(device)}]", run, ours=True, info=info)
    (record,) = bench(
        op="prune_e2e", case=case.id,
        params={"samples": case.samples, "seq": case.seq, "flops": FLOPS_C,
                "config": case.config or "BertConfig()"},
        peers=[peer], primary=peer.name, warmup=warmup,
        rounds=1 if heavy else (3 if device.type == "cuda" else None),
        memory=device.type == "cuda",
    )
    assert record["status"] == "ok", record["reason"]
    timed = info["stages_per_call"][warmup: warmup + record["rounds"]]
    record["info"]["stages_s"] = timed[-1] if timed else {}
    record["info"].pop("stages_per_call", None)
    iters = (info.get("report") or {}).get("r2_iterations")
    if iters:
        record["note"] = f"r2 iters {iters}"
    stages = sorted({name for call in timed for name in call})
    for name in stages:
        samples = [call[name] * 1e3 for call in timed if name in call]
        recorder.records.append(results_file.blank_record(
            op="prune_stage", case=case.id, peer=name, ours=True, samples_ms=samples,
            params=record["params"], baseline=None, note="from PruneResult.report",
        ))
    if not stages:
        record["note"] = "the prune report has no recognisable per-stage times"
