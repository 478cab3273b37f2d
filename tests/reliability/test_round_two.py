"""Round two of the faults found by hand (each test failed on the code before its fix): a
one-line error naming the input, or a correct result; nothing written outside the output."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import PRUNE_ARGS, REPO, child_env, one_line_error, pc

import kcm_cuda
from kcm_cuda.cli import main


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, (one_line_error(err) if rc else err)


# 1 -- the lock file never follows a link planted at its name --------------------------------
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_planted_lock_link_is_refused_and_its_target_untouched(
    tmp_path, capsys, model_dir, data_file, kind
):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out_parent = tmp_path / "shared"
    out_parent.mkdir()
    lock = out_parent / ".out.kcm-lock"
    (os.symlink if kind == "symlink" else os.link)(victim, lock)
    rc, err = _cli(
        capsys, model_dir, "--data", data_file, "--output", out_parent / "out", *PRUNE_ARGS
    )
    assert rc == 2 and "lock file" in err
    assert victim.read_text() == "precious\n"
    assert not (out_parent / "out").exists()


# 2 -- a padding id past the embedding table --------------------------------------------------
def test_a_pad_token_outside_the_vocabulary_is_one_line(tmp_path, capsys, data_file, tokenizer):
    model = pc.tiny_bert("seqcls", vocab_size=tokenizer.vocab_size)
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.add_special_tokens({"pad_token": "[MYPAD]"})  # id == vocab_size: not in the model
    d = tmp_path / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    rc, err = _cli(capsys, d, "--data", data_file, "--output", tmp_path / "out", *PRUNE_ARGS)
    assert rc == 2 and "padding token" in err and "embedding table" in err
    with pytest.raises(ValueError, match="outside the model's embedding table"):
        kcm_cuda.prune(
            model,
            data_file.read_text().splitlines(),
            0.8,
            tokenizer=tok,
            samples=32,
            max_length=16,
            progress=False,
        )


# 3 -- RoBERTa's positions start after its padding index --------------------------------------
def test_roberta_max_length_beyond_its_positions_is_truncated_to_them(tokenizer, data_file):
    model = pc.tiny_roberta(vocab_size=tokenizer.vocab_size)  # 70 positions, pad 0: 68 tokens
    texts = [" ".join(["word"] * 200)] * 80  # longer than the model can read
    r = kcm_cuda.prune(
        model,
        texts,
        0.8,
        tokenizer=tokenizer,
        samples=64,
        max_length=128,
        progress=False,
        structure="fixed",
    )
    assert r.report["flops"]["ratio"] <= 0.8 + 1e-9
    ids = torch.full((8, 70), 5)
    with pytest.raises(ValueError, match="context"):
        kcm_cuda.prune(
            model,
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            0.8,
            samples=8,
            progress=False,
        )


# 4 -- a CSV field longer than the csv module's default limit ---------------------------------
def test_a_csv_with_a_huge_field_is_read(tmp_path):
    from kcm_cuda.pruning.data import read_texts

    f = tmp_path / "d.csv"
    big = "word " * 40_000  # 200,000 characters
    f.write_text(f'text\n"{big}"\nshort one\n', encoding="utf-8")
    texts = read_texts(f)
    assert len(texts) == 2 and len(texts[0]) >= 199_000


# 5 -- load_pruned of a damaged output --------------------------------------------------------
def test_load_pruned_refuses_non_finite_weights(tmp_path, pruned_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "copy"
    shutil.copytree(pruned_dir, d)
    state = load_file(str(d / "model.safetensors"))
    name = next(k for k in state if k.endswith("intermediate.dense.weight"))
    state[name][0, 0] = float("nan")
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name.split('.', 1)[1]}.*non-finite"):
        kcm_cuda.load_pruned(d)


# 6 -- activations that overflow in float16 ---------------------------------------------------
def test_non_finite_activations_stop_the_run_with_what_to_do():
    model = pc.tiny_decoder("llama")  # decoders are read in place, in their own dtype
    with torch.no_grad():  # finite float16 weights whose products overflow it
        model.model.layers[0].post_attention_layernorm.weight.mul_(1e3)
        model.model.layers[0].mlp.up_proj.weight.mul_(1e3)
    model = model.to(torch.float16)
    with pytest.raises(ValueError, match="not finite.*float16.*bfloat16"):
        kcm_cuda.prune(model, pc.token_batch(), 0.8, progress=False)


# 7 -- the report is strict JSON --------------------------------------------------------------
def test_the_saved_report_is_strict_json(tmp_path):
    model = pc.tiny_decoder("llama")
    r = kcm_cuda.prune(model, pc.token_batch(), 0.6, progress=False)
    r.report["some_ratio"] = float("nan")  # what a layer with nothing to refit reports
    out = r.save(tmp_path / "out")
    text = (out / "kcm_report.json").read_text()

    def refuse(x):
        raise ValueError(f"bare {x} in the report")

    report = json.loads(text, parse_constant=refuse)
    assert report["some_ratio"] is None


# 8 -- signals: one line, nothing left behind -------------------------------------------------
SIGTERM_CHILD = """
import sys, time, transformers
from pathlib import Path
sync = Path(sys.argv[1])
real = transformers.PreTrainedModel.save_pretrained
def slow(self, *a, **k):
    real(self, *a, **k)
    sync.touch()
    time.sleep(60)
transformers.PreTrainedModel.save_pretrained = slow
from kcm_cuda._entry import run
sys.exit(run("kcm_cuda.cli", "kcm-prune", sys.argv[2:]))
"""


def test_sigterm_during_the_save_leaves_nothing_and_says_one_line(tmp_path, model_dir, data_file):
    import subprocess

    sync, out = tmp_path / "saving", tmp_path / "out"
    argv = [str(model_dir), "--data", str(data_file), "--output", str(out), *PRUNE_ARGS]
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_CHILD, str(sync), *argv],
        env=child_env(),
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    t0 = time.monotonic()
    while not sync.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() - t0 < 240
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "kcm-prune: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] or not out.exists()
    assert not out.exists() and list(tmp_path.iterdir()) == [sync]  # no tmp dir, no lock


def test_sigint_while_importing_is_one_line(tmp_path, model_dir, data_file):
    import subprocess

    code = "import sys; from kcm_cuda._entry import run; sys.exit(run('kcm_cuda.cli', 'kcm-prune'))"
    argv = [str(model_dir), "--data", str(data_file), "--output", str(tmp_path / "o"), *PRUNE_ARGS]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv], env=child_env(), stderr=subprocess.PIPE, text=True
    )
    time.sleep(0.4)  # inside the imports of torch / transformers
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert "Traceback" not in err, err
    assert proc.returncode in (130, 0, 2) and (
        proc.returncode != 130 or "kcm-prune: interrupted" in err
    )
    assert not (tmp_path / "o").exists() or proc.returncode == 0


# 9 -- outputs follow the umask ---------------------------------------------------------------
def test_outputs_follow_the_umask(tmp_path, pruned_dir):
    model = kcm_cuda.load_pruned(pruned_dir)
    old = os.umask(0o022)
    try:
        out = kcm_cuda.pruning.saving.save_pruned(model, tmp_path / "team" / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


# 10 -- a bad output path fails before the prune ----------------------------------------------
@pytest.mark.parametrize("bad", ["parent-is-file", "too-long", "dot", "existing-file"])
def test_a_bad_output_fails_before_anything_is_loaded(
    tmp_path, capsys, monkeypatch, model_dir, data_file, bad
):
    import kcm_cuda.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")
    monkeypatch.chdir(tmp_path)
    output = {
        "parent-is-file": tmp_path / "file" / "out",
        "too-long": tmp_path / ("x" * 245),
        "dot": Path("."),
        "existing-file": tmp_path / "file",
    }[bad]
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, err = _cli(
        capsys, model_dir, "--data", data_file, "--output", output, "--overwrite", *PRUNE_ARGS
    )
    assert rc == 2, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "file").read_text() == "x"


def test_two_runs_on_a_new_output_parent_are_refused_at_once(
    tmp_path, capsys, monkeypatch, model_dir, data_file
):
    import threading

    import kcm_cuda.cli as cli

    out = tmp_path / "new" / "deeper" / "out"
    holding, done = threading.Event(), threading.Event()
    real_run = cli._run

    def first_run(args):  # the first kcm-prune: inside its lock, still pruning
        holding.set()
        done.wait(60)
        return real_run(args)

    monkeypatch.setattr(cli, "_run", first_run)
    argv = [str(model_dir), "--data", str(data_file), "--output", str(out), *PRUNE_ARGS]
    first = threading.Thread(target=main, args=(argv,))
    first.start()
    try:
        assert holding.wait(60)
        monkeypatch.setattr(cli, "_run", lambda args: pytest.fail("the second run pruned"))
        rc = main(argv)
        err = capsys.readouterr().err
    finally:
        monkeypatch.setattr(cli, "_run", real_run)
        done.set()
        first.join(120)
    assert rc == 2 and "being written" in one_line_error(err)
    assert (out / "config.json").is_file()  # the first one finished, whole


def test_a_failed_run_removes_the_parents_it_created(tmp_path, capsys, model_dir):
    bad_data = tmp_path / "d.txt"
    bad_data.write_text("\n")  # no text: fails after the output was prepared
    rc, _ = _cli(
        capsys, model_dir, "--data", bad_data, "--output", tmp_path / "a" / "b" / "o", *PRUNE_ARGS
    )
    assert rc == 2 and not (tmp_path / "a").exists()


# 11 -- kcm-eval refuses a broken local LM up front -------------------------------------------
def test_kcm_eval_refuses_a_non_finite_lm_before_evaluating(tmp_path, capsys, monkeypatch):
    from kcm_cuda.evaluation.cli import main as eval_main

    tok = pc.word_level_tokenizer(pad=True)
    model = pc.tiny_decoder("llama", vocab_size=len(tok))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("inf")
    d = tmp_path / "lm"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(pc.make_sentences(400, seed=2)) + "\n")
    rc = eval_main(
        [
            "--task",
            f"lm-{text}",
            "--model",
            str(d),
            "--output",
            str(tmp_path / "r"),
            "--seeds",
            "1",
            "--budgets",
            "0.8",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    line = one_line_error(err, prog="kcm-eval")
    assert "model.layers.1.mlp.up_proj.weight" in line and "non-finite" in line


# 12 -- flops=1 is a no-op --------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_flops_one_returns_the_model_unchanged(family):
    model = pc.tiny_decoder("llama") if family == "llama" else pc.tiny_bert()
    r = kcm_cuda.prune(model, pc.token_batch(), 1.0, progress=False)
    a, b = model.state_dict(), r.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert r.report["flops"]["ratio"] == pytest.approx(1.0)
