"""The input model is sacred: an output that is an input, contains one or lies inside one is
refused before anything is loaded or written, whatever --overwrite / overwrite= says."""

from __future__ import annotations

import os

import pytest
from reliability_helpers import PRUNE_ARGS, one_line_error, tree_hash

from kcm_cuda.cli import main
from kcm_cuda.pruning.safety import UnsafeOutputError


def _cli(capsys, model, data, output, *extra):
    rc = main([str(model), "--data", str(data), "--output", str(output), *PRUNE_ARGS, *extra])
    return rc, one_line_error(capsys.readouterr().err) if rc else ""


@pytest.mark.parametrize(
    "output,match",
    [
        (lambda m: m, "is the input model directory"),
        (lambda m: m / "pruned", "lies inside the input model directory"),
        (lambda m: m / "sub" / "deeper", "lies inside the input model directory"),
        (lambda m: m.parent, "contains the input model directory"),
        (lambda m: m / ".." / m.name, "is the input model directory"),
    ],
    ids=["same", "inside", "inside-missing-parents", "contains", "dotdot"],
)
def test_cli_refuses_output_at_the_input(capsys, model_dir, data_file, output, match):
    before = tree_hash(model_dir.parent)
    for extra in ((), ("--overwrite",)):
        rc, err = _cli(capsys, model_dir, data_file, output(model_dir), *extra)
        assert rc == 2
        assert match in err and str(model_dir) in err
    assert tree_hash(model_dir.parent) == before  # nothing written, not even a lock file
    assert not (model_dir / "pruned").exists() and not (model_dir / "sub").exists()


def test_cli_refuses_links_and_relative_spellings(tmp_path, capsys, model_dir, data_file):
    link = tmp_path / "link-to-model"
    link.symlink_to(model_dir, target_is_directory=True)
    rc, err = _cli(capsys, model_dir, data_file, link, "--overwrite")
    assert rc == 2 and "is the input model directory" in err
    # the model given through the link, the output as the real path (and relative)
    cwd = os.getcwd()
    os.chdir(model_dir.parent)
    try:
        rc, err = _cli(capsys, link, data_file, model_dir.name, "--overwrite")
        assert rc == 2 and "is the input model directory" in err
        rc, err = _cli(capsys, f"./{model_dir.name}", data_file, f"{model_dir.name}/out")
        assert rc == 2 and "lies inside" in err
    finally:
        os.chdir(cwd)
    assert link.is_symlink()


def test_cli_refuses_the_data_file_and_tokenizer(tmp_path, capsys, model_dir, data_file):
    rc, err = _cli(capsys, model_dir, data_file, data_file, "--overwrite")
    assert rc == 2 and "is the data file" in err
    rc, err = _cli(capsys, model_dir, data_file, data_file.parent, "--overwrite")
    assert rc == 2 and "contains the data file" in err
    rc, err = _cli(
        capsys, model_dir, data_file, tmp_path / "o", "--tokenizer", str(tmp_path), "--overwrite"
    )
    assert rc == 2 and "lies inside the tokenizer directory" in err


def test_save_refuses_the_directory_the_model_was_loaded_from(tmp_path, copy_model, data_file):
    import transformers

    from kcm_cuda.pruning import prune
    from kcm_cuda.pruning.saving import save_pruned

    src = copy_model("src")
    before = tree_hash(src)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # loaded by a relative name: the check still finds it after a chdir
        model = transformers.BertForSequenceClassification.from_pretrained("src")
        tok = transformers.AutoTokenizer.from_pretrained("src")
        res = prune(
            model,
            data_file.read_text().splitlines(),
            0.8,
            tokenizer=tok,
            samples=64,
            max_length=32,
            progress=False,
        )
    finally:
        os.chdir(cwd)
    for target in (src, src / "pruned", tmp_path):
        with pytest.raises(UnsafeOutputError, match="input model directory"):
            res.save(target, overwrite=True)
        with pytest.raises(UnsafeOutputError, match="input model directory"):
            save_pruned(res.model, target, overwrite=True)
    assert tree_hash(src) == before and not (src / "pruned").exists()
    assert res.save(tmp_path / "elsewhere").is_dir()  # any other place is fine


def test_eval_refuses_an_output_inside_the_model(capsys, model_dir, tmp_path):
    from kcm_cuda.evaluation.cli import main as eval_main

    tsv = tmp_path / "t.tsv"
    tsv.write_text("id\tsentence\tlabel\n1\ta good film\t1\n")
    argv = ["--model", str(model_dir), "--data", str(tsv), "--output", str(model_dir)]
    rc = eval_main([*argv, "--cache-dir", str(tmp_path / "cache")])
    assert rc == 2
    err = one_line_error(capsys.readouterr().err, "kcm-eval")
    assert "is the input model directory" in err
