"""kcm-eval's accuracy grid on a fixed subset of test rows, with two adjustments for a shared
2-core CPU (the reconstruction and allocation studies of docs/RESULTS.md ran with it).

    python benchmarks/accuracy_grid.py --test-rows N <kcm-eval arguments>

1. ``--test-rows N``: score on a fixed subset of N test rows (the rows whose
   sha256(SUBSET_SALT + id) is smallest; the same rows for every run, so the comparisons stay
   paired; the fine-tune is unchanged: its cache key covers train/dev only).
2. Runs whose pruned weights differ only in W2 / b2 (bias and ridge reconstructions keep the
   masks and have no per-neuron scales) must not be taken for an earlier run with the same
   masks: the runner's "identical model" digest is extended with every layer's W2 and b2.
   The method list is taken from the pruning registry (flap, wanda_sp, ...).
Everything else is kcm-eval's own code (kcm_cuda.evaluation.cli / runner / report).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time

import torch


def _patch_runner() -> None:
    from kcm_cuda.evaluation import runner
    from kcm_cuda.pruning.adapters import get_adapter
    from kcm_cuda.pruning.methods import METHODS

    if hasattr(runner, "BASE_METHODS") and not callable(runner.BASE_METHODS):
        runner.BASE_METHODS = tuple(METHODS)
    original = runner._masks_digest

    def digest(result) -> str:
        h = hashlib.blake2b(original(result).encode(), digest_size=16)
        adapter = get_adapter(result.model)
        for block in adapter.layers(result.model):
            w2 = adapter.w2(block)
            for t in (w2.weight, w2.bias):
                if t is not None:
                    h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    runner._masks_digest = digest


# The salt of the test-row subset: the committed studies' rows; another salt, other rows.
SUBSET_SALT = "issue8"  # the committed studies' test subsets were drawn with it: keep


def subset_test_rows(task, n: int):
    """``task`` scored on N of its test rows: those whose sha256(SUBSET_SALT + id) is smallest."""
    if n <= 0 or n >= len(task.test):
        return task
    key = lambda e: hashlib.sha256(f"{SUBSET_SALT}{e.id}".encode()).hexdigest()  # noqa: E731
    test = sorted(task.test, key=key)[:n]
    notes = dict(task.notes)
    notes["test_subset"] = (
        f"{n} of {len(task.test)} test rows (smallest sha256({SUBSET_SALT!r}+id))"
    )
    return dataclasses.replace(task, test=test, notes=notes)


def main(argv: list[str]) -> int:
    n = 0
    if "--test-rows" in argv:
        i = argv.index("--test-rows")
        n = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from kcm_cuda.evaluation.cli import build_parser, config_from_args
    from kcm_cuda.evaluation.datasets import default_cache_dir, get_task
    from kcm_cuda.evaluation.report import format_markdown, write_report
    from kcm_cuda.evaluation.runner import run_grid

    _patch_runner()
    # On a CPU shared by many processes, OpenMP workers spin-wait: one thread is faster.
    torch.set_num_threads(int(os.environ.get("KCM_GRID_THREADS", "1")))
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    config.validate()
    task = subset_test_rows(get_task(config.task, default_cache_dir(config.cache_dir)), n)
    t0 = time.perf_counter()
    print(
        f"accuracy grid: {task.name}, test rows {len(task.test)}, torch threads "
        f"{torch.get_num_threads()}",
        flush=True,
    )
    report = run_grid(config, task=task, log=lambda m: print(m, flush=True))
    paths = write_report(report, config.output)
    md = format_markdown(report)
    tables = md.split("\n## ", 1)
    if len(tables) > 1:
        print("\n## " + tables[1].split("![")[0].rstrip())
    print(f"\ndone in {time.perf_counter() - t0:.0f}s; report: {paths['md']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
