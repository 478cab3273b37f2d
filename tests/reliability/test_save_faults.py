"""Faults during a save: SIGKILL at every step (no directory that looks finished is left at the
output, the old output intact with --overwrite, the next save cleans up), two writers of one
output at once (one wins whole, the other fails clearly), a full or read-only disk."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import PRUNE_ARGS, child_env, one_line_error, tree_hash

from kcm_cuda.cli import main
from kcm_cuda.pruning import load_pruned, safety
from kcm_cuda.pruning.saving import REPORT_NAME, save_pruned

HERE = Path(__file__).parent
# (point, overwrite): where the child SIGKILLs itself (save_faults_child.inject)
KILLS = [
    ("tmp_created", False),
    ("tmp_created", True),
    ("mid_weights", False),
    ("mid_weights", True),
    ("after_weights", True),
    ("before_publish", False),
    ("before_publish", True),
    ("after_swap", True),
    ("fallback_between_renames", True),
]


def _kill_id(point: str, overwrite: bool) -> str:
    return f"{point}-{'overwrite' if overwrite else 'fresh'}"


def _report(path: Path) -> dict:
    return json.loads((path / REPORT_NAME).read_text())


@pytest.fixture(scope="module")
def faults(tmp_path_factory, pruned_dir, model_dir, data_file):
    """Run every scenario in one child process (forked per scenario); returns
    (results by name, scenarios by name, hash of each old output)."""
    base = tmp_path_factory.mktemp("faults")
    scenarios, old_hash = [], {}
    for point, overwrite in KILLS:
        name = _kill_id(point, overwrite)
        d = base / name
        d.mkdir()
        target = d / "out"
        if overwrite:  # a previous output, to be replaced
            shutil.copytree(pruned_dir, target)
            (target / REPORT_NAME).write_text(json.dumps({"run": "old"}))
            old_hash[name] = tree_hash(target)
        scenarios.append(
            dict(
                name=name,
                target=str(target),
                overwrite=overwrite,
                point=point,
                report={"run": "new"},
            )
        )
    for who, point in (("A", "slow_writer"), ("B", "second_writer")):
        d = base / "two"
        d.mkdir(exist_ok=True)
        scenarios.append(
            dict(
                name=f"two-{who}",
                group="two",
                target=str(d / "out"),
                overwrite=True,
                point=point,
                report={"run": who},
                sync=str(base / "sync-two"),
            )
        )
    for who, point in (("A", "slow_cli"), ("B", "second_cli")):
        d = base / "cli"
        d.mkdir(exist_ok=True)
        scenarios.append(
            dict(
                name=f"cli-{who}",
                group="cli",
                target=str(d / "out"),
                overwrite=True,
                point=point,
                sync=str(base / "sync-cli"),
                model_dir=str(model_dir),
                data=str(data_file),
                args=[*PRUNE_ARGS, "--overwrite"],
                report=None,
            )
        )
    (base / "sync-two").mkdir()
    (base / "sync-cli").mkdir()
    for sc in scenarios:
        sc["source"] = str(pruned_dir)
        sc["error_file"] = str(base / f"{sc['name']}.err")
    spec = base / "scenarios.json"
    spec.write_text(json.dumps(scenarios))
    out = base / "results.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "save_faults_child.py"), str(spec), str(out)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), {s["name"]: s for s in scenarios}, old_hash


@pytest.fixture(scope="module")
def model_and_tok(pruned_dir):
    import transformers

    return load_pruned(pruned_dir), transformers.AutoTokenizer.from_pretrained(pruned_dir)


def _leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


@pytest.mark.parametrize("point,overwrite", KILLS, ids=[_kill_id(*k) for k in KILLS])
def test_sigkill_during_save(faults, model_and_tok, point, overwrite):
    results, scenarios, old_hash = faults
    name = _kill_id(point, overwrite)
    res, target = results[name], Path(scenarios[name]["target"])
    assert res["status"] == f"signal {signal.SIGKILL}", res
    if point == "after_swap":  # the new output is complete and in place
        assert _report(target) == {"run": "new"}
        load_pruned(target)
    elif point == "fallback_between_renames":  # the one window of the no-renameat2 path
        assert not target.exists()
        aside = [p for p in target.parent.glob(".out.old-*") if (p / "old").is_dir()]
        assert len(aside) == 1 and tree_hash(aside[0] / "old") == old_hash[name]
    elif overwrite:
        assert tree_hash(target) == old_hash[name]  # the old output, byte for byte
    else:
        assert not target.exists()  # no half-written directory at the output
    # what is left next to it is hidden and named as ours (a temp dir, the stale lock file)
    assert all(n.startswith(".out.") for n in _leftovers(target)), _leftovers(target)
    model, tok = model_and_tok
    if point == "fallback_between_renames":  # the next save first puts the old output back
        with pytest.raises(FileExistsError, match="already exists"):
            save_pruned(model, target, tokenizer=tok, report={"run": "again"})
        assert tree_hash(target) == old_hash[name]
    # the next save works (the dead writer's lock is gone with it) and cleans up
    save_pruned(model, target, tokenizer=tok, report={"run": "again"}, overwrite=True)
    assert _report(target) == {"run": "again"}
    assert _leftovers(target) == []
    load_pruned(target)


def test_two_writers_one_wins_whole(faults):
    results, scenarios, _ = faults
    a, b = results["two-A"], results["two-B"]
    assert a["status"] == "exit 0", a
    assert b["status"] == "exit 4", b
    assert "OutputBusyError" in b["error"] and f"another process (pid {a['pid']})" in b["error"]
    target = Path(scenarios["two-A"]["target"])
    assert _report(target) == {"run": "A"}
    load_pruned(target)
    assert _leftovers(target) == []


def test_two_kcm_prunes_one_wins_whole(faults):
    results, scenarios, _ = faults
    a, b = results["cli-A"], results["cli-B"]
    assert a["status"] == "exit 0", a
    assert b["status"] == "exit 2", b
    err = one_line_error(b["error"])
    assert f"is being written by another process (pid {a['pid']})" in err
    target = Path(scenarios["cli-A"]["target"])
    assert "flops" in _report(target)
    load_pruned(target)
    assert _leftovers(target) == []


def test_lock_is_reentrant_in_a_thread_and_exclusive_across_threads(tmp_path):
    import threading

    target = tmp_path / "out"
    errors = []
    with safety.output_lock(target), safety.output_lock(target):
        t = threading.Thread(target=lambda: _try_lock(target, errors))
        t.start()
        t.join()
    assert errors and "another thread" in errors[0]
    assert not safety.lock_path(target).exists()


def _try_lock(target, errors):
    try:
        with safety.output_lock(target):
            pass
    except safety.OutputBusyError as exc:
        errors.append(str(exc))


# -- a full disk --------------------------------------------------------------------------------
@pytest.fixture
def old_output(tmp_path, pruned_dir):
    target = tmp_path / "out"
    shutil.copytree(pruned_dir, target)
    return target, tree_hash(target)


def test_disk_full_file_too_large(model_and_tok, old_output):
    """A real write failure from the kernel: RLIMIT_FSIZE makes writes past 64 KiB fail with
    EFBIG, in the middle of model.safetensors."""
    model, tok = model_and_tok
    target, before = old_output
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(safety.SaveError) as info:
            save_pruned(model, target, tokenizer=tok, overwrite=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    msg = str(info.value)
    assert "File too large" in msg and f"{target} is unchanged" in msg and "\n" not in msg
    assert tree_hash(target) == before and _leftovers(target) == []


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_disk_full_no_space(monkeypatch, model_and_tok, old_output, kind):
    from safetensors import SafetensorError

    model, tok = model_and_tok
    target, before = old_output
    real = model.save_pretrained

    def full(tmp, **k):
        real(tmp, **k)  # half written, then the disk is full
        f = Path(tmp) / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
        if kind == "oserror":
            raise OSError(28, os.strerror(28))
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(model, "save_pretrained", full)
    with pytest.raises(safety.SaveError, match=f"No space left on device .{target} is unchanged"):
        save_pruned(model, target, tokenizer=tok, overwrite=True)
    assert tree_hash(target) == before and _leftovers(target) == []


def test_not_enough_free_space_is_caught_before_writing(monkeypatch, model_and_tok, tmp_path):
    model, tok = model_and_tok
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(safety.SaveError, match=r"not enough free space .*needs about .* MiB"):
        save_pruned(model, tmp_path / "out", tokenizer=tok)
    assert list(tmp_path.iterdir()) == []


# -- a read-only output -------------------------------------------------------------------------
@pytest.fixture
def readonly_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    # root ignores permission bits: make the directory immutable instead
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(d)]).returncode:
        pytest.skip("running as root without chattr +i: cannot make a read-only directory")
    yield d
    subprocess.run(["chattr", "-i", str(d)], check=True)


def test_read_only_output_api(model_and_tok, readonly_dir):
    model, tok = model_and_tok
    with pytest.raises(safety.SaveError) as info:
        save_pruned(model, readonly_dir / "out", tokenizer=tok)
    msg = str(info.value)
    assert f"cannot write the output in {readonly_dir}" in msg
    assert "Permission denied" in msg or "Operation not permitted" in msg
    assert list(readonly_dir.iterdir()) == []


def test_read_only_output_cli_fails_before_pruning(
    capsys, monkeypatch, model_dir, data_file, readonly_dir
):
    import kcm_cuda.pruning

    monkeypatch.setattr(kcm_cuda.pruning, "prune", lambda *a, **k: pytest.fail("pruned anyway"))
    out = readonly_dir / "out"
    rc = main([str(model_dir), "--data", str(data_file), "--output", str(out), *PRUNE_ARGS])
    err = one_line_error(capsys.readouterr().err)
    assert rc == 2 and f"cannot write the output in {readonly_dir}" in err
    assert list(readonly_dir.iterdir()) == []


def test_output_appearing_during_the_save_is_never_replaced(tmp_path, model_and_tok, monkeypatch):
    """Someone else (not kcm_cuda, so without the lock) creates the output while the save
    writes its temporary directory: without overwrite, theirs is kept."""
    model, tok = model_and_tok
    target = tmp_path / "out"
    real = model.save_pretrained

    def meanwhile(tmp, **k):
        real(tmp, **k)
        target.mkdir()
        (target / "theirs.txt").write_text("x")

    monkeypatch.setattr(model, "save_pretrained", meanwhile)
    with pytest.raises(FileExistsError, match="created by someone else"):
        save_pruned(model, target, tokenizer=tok)
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert _leftovers(target) == []
