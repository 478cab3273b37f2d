"""Child process of test_save_faults.py: load a pruned model once, then fork one process per
scenario that saves it with a fault injected (SIGKILL at a chosen point of the save, or two
writers of the same output at once). Forking after the imports makes each scenario cost
milliseconds instead of a fresh interpreter's seconds. No hook lives in the product code: the
faults are monkeypatched here.

    python save_faults_child.py SCENARIOS.json RESULTS.json

Each scenario: {"name", "target", "overwrite", "point", "report"} (+ "model_dir", "data" for
the kcm-prune ones). Results: name -> {"status": "killed" | "exit N", "pid", "error"}.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

T0 = time.monotonic()
import torch  # noqa: E402

torch.set_num_threads(1)  # no OpenMP pool: forking stays safe

import transformers  # noqa: E402

from kcm_cuda.pruning import load_pruned, safety, saving  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def wait_for(path: Path, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout:
            os._exit(9)
        time.sleep(0.01)


def inject(point: str, model, tok, sync: Path) -> None:
    """Make the save die (or wait) at ``point``."""
    real_save = model.save_pretrained
    if point == "tmp_created":  # the temporary directory exists, nothing in it
        model.save_pretrained = lambda *a, **k: die()
    elif point == "mid_weights":  # half of model.safetensors written

        def half(tmp, **k):
            real_save(tmp, **k)
            f = Path(tmp) / "model.safetensors"
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
            die()

        model.save_pretrained = half
    elif point == "after_weights":  # weights written, tokenizer not yet
        tok.save_pretrained = lambda *a, **k: die()
    elif point == "before_publish":  # everything written, not yet renamed into place
        safety.publish = lambda *a, **k: die()
    elif point == "after_swap":  # the new output in place, the old one not yet deleted
        safety.shutil.rmtree = lambda *a, **k: die()
    elif point == "fallback_between_renames":  # no renameat2: old aside, new not yet in
        safety._renameat2 = lambda *a, **k: False
        real_replace = os.replace

        def replace_then_die(src, dst):
            real_replace(src, dst)
            die()

        safety.os.replace = replace_then_die
    elif point == "slow_writer":  # holds the lock until the other writer has tried

        def slow(tmp, **k):
            (sync / "A_in").touch()
            wait_for(sync / "B_done")
            real_save(tmp, **k)

        model.save_pretrained = slow
    elif point == "second_writer":
        wait_for(sync / "A_in")
    elif point != "none":
        raise SystemExit(f"unknown fault point {point}")


def run_save(sc: dict, model, tok) -> None:
    sync = Path(sc["sync"]) if "sync" in sc else Path(sc["target"]).parent
    inject(sc["point"], model, tok, sync)
    try:
        saving.save_pruned(
            model, sc["target"], tokenizer=tok, report=sc["report"], overwrite=sc["overwrite"]
        )
    except Exception as exc:  # noqa: BLE001 - reported to the test
        Path(sc["error_file"]).write_text(f"{type(exc).__name__}: {exc}")
        code = 4
    else:
        code = 0
    if sc["point"] == "second_writer":
        (sync / "B_done").touch()
    os._exit(code)


def run_cli(sc: dict) -> None:
    from kcm_cuda import cli

    sync = Path(sc["sync"])
    fd = os.open(sc["error_file"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    out = os.open(os.devnull, os.O_WRONLY)
    os.dup2(out, 1)
    if sc["point"] == "slow_cli":  # holds the output's lock while "pruning"
        from kcm_cuda import pruning

        real_prune = pruning.prune

        def slow_prune(*a, **k):
            (sync / "A_in").touch()
            wait_for(sync / "B_done")
            return real_prune(*a, **k)

        pruning.prune = slow_prune
    else:
        wait_for(sync / "A_in")
    argv = [sc["model_dir"], "--data", sc["data"], "--output", sc["target"], *sc["args"]]
    code = cli.main(argv)
    sys.stderr.flush()
    if sc["point"] != "slow_cli":
        (sync / "B_done").touch()
    os._exit(code)


def main() -> None:
    scenarios = json.loads(Path(sys.argv[1]).read_text())
    source = scenarios[0]["source"]
    model = load_pruned(source)
    tok = transformers.AutoTokenizer.from_pretrained(source)
    results: dict = {"_startup_s": time.monotonic() - T0}
    running: dict[int, dict] = {}
    for group in sorted({sc.get("group", sc["name"]) for sc in scenarios}):
        t_group = time.monotonic()
        for sc in [s for s in scenarios if s.get("group", s["name"]) == group]:
            pid = os.fork()
            if pid == 0:
                try:
                    if sc["point"].endswith("_cli"):
                        run_cli(sc)
                    else:
                        run_save(sc, model, tok)
                finally:
                    os._exit(8)
            running[pid] = sc
        while running:  # a group's processes run at the same time
            pid, status = os.wait()
            sc = running.pop(pid)
            if os.WIFSIGNALED(status):
                state = f"signal {os.WTERMSIG(status)}"
            else:
                state = f"exit {os.WEXITSTATUS(status)}"
            err = Path(sc["error_file"])
            results[sc["name"]] = {
                "status": state,
                "pid": pid,
                "error": err.read_text() if err.exists() else "",
                "wall_s": time.monotonic() - t_group,
            }
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
