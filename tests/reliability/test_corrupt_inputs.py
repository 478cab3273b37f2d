"""Corrupt, truncated and missing model files: one line that names the file and what is wrong,
exit status 2, for kcm-prune, kcm-eval and load_pruned; no traceback, nothing written, the
(broken) input left exactly as it was."""

from __future__ import annotations

import json
import shutil

import pytest
from reliability_helpers import PRUNE_ARGS, one_line_error, tree_hash

from kcm_cuda.cli import main
from kcm_cuda.evaluation.cli import main as eval_main
from kcm_cuda.loading import ModelFileError, check_model_files
from kcm_cuda.pruning import load_pruned

SAFE = "model.safetensors"


def _truncate(f, keep):
    data = f.read_bytes()
    f.write_bytes(data[: keep(len(data))])


def _header_len(f) -> int:
    return int.from_bytes(f.read_bytes()[:8], "little")


def _shard(d):
    """Split the weights into an index + one shard, then delete the shard."""
    f = d / SAFE
    (d / "model-00001-of-00001.safetensors").write_bytes(f.read_bytes())
    f.unlink()
    (d / "model.safetensors.index.json").write_text(
        json.dumps(
            {"weight_map": {"x": "model-00001-of-00001.safetensors", "y": "gone.safetensors"}}
        )
    )


def _bad_offsets(d):
    f = d / SAFE
    raw = f.read_bytes()
    n = _header_len(f)
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10**6
    new = json.dumps(header).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    f.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


# name -> (how the copy of the model is broken, the file the message names, what it says)
CASES = {
    "truncated-half": (lambda d: _truncate(d / SAFE, lambda n: n // 2), SAFE, "is truncated"),
    "truncated-in-header": (lambda d: _truncate(d / SAFE, lambda n: 200), SAFE, "truncated"),
    "empty-weights": (lambda d: (d / SAFE).write_bytes(b""), SAFE, "too short for a header"),
    "garbage-weights": (
        lambda d: (d / SAFE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"),
        SAFE,
        "header does not parse",
    ),
    "offsets-past-end": (_bad_offsets, SAFE, "is truncated"),
    "no-weights": (lambda d: (d / SAFE).unlink(), "model", "has no weights file"),
    "index-missing-shard": (_shard, "gone.safetensors", "not found"),
    "config-not-json": (
        lambda d: (d / "config.json").write_text('{"model_type": "bert",'),
        "config.json",
        "does not parse as JSON",
    ),
    "config-empty": (lambda d: (d / "config.json").write_text(""), "config.json", "is empty"),
    "config-a-list": (
        lambda d: (d / "config.json").write_text("[1, 2]"),
        "config.json",
        "is not a JSON object",
    ),
    "config-binary": (
        lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00garbage"),
        "config.json",
        "not UTF-8",
    ),
}


@pytest.fixture(params=sorted(CASES))
def broken(request, copy_model):
    how, names, says = CASES[request.param]
    d = copy_model("broken")
    how(d)
    return d, names, says, tree_hash(d)


def test_kcm_prune(tmp_path, capsys, broken, data_file):
    d, names, says, before = broken
    out = tmp_path / "out"
    rc = main([str(d), "--data", str(data_file), "--output", str(out), *PRUNE_ARGS])
    err = one_line_error(capsys.readouterr().err)
    assert rc == 2 and names in err and says in err, err
    assert not out.exists() and tree_hash(d) == before


def test_kcm_eval(tmp_path, capsys, broken):
    d, names, says, before = broken
    tsv = tmp_path / "t.tsv"
    tsv.write_text(
        "id\tsentence\tlabel\n" + "".join(f"{i}\tfilm {i}\t{i % 2}\n" for i in range(40))
    )
    argv = ["--model", str(d), "--data", str(tsv), "--output", str(tmp_path / "rep")]
    rc = eval_main([*argv, "--cache-dir", str(tmp_path / "cache")])
    err = one_line_error(capsys.readouterr().err, "kcm-eval")
    assert rc == 2 and names in err and says in err, err
    assert tree_hash(d) == before


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_pruned(case, tmp_path, pruned_dir):
    how, names, says = CASES[case]
    p = tmp_path / "model"
    shutil.copytree(pruned_dir, p)
    how(p)
    before = tree_hash(p)
    with pytest.raises(ValueError) as info:
        load_pruned(p)
    msg = str(info.value)
    assert "\n" not in msg and says in msg and names in msg, msg
    assert tree_hash(p) == before


def test_a_whole_model_passes_the_checks(model_dir, pruned_dir):
    check_model_files(model_dir)
    check_model_files(pruned_dir)


def test_torch_bin_checks(tmp_path):
    import torch

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1000)}, d / "pytorch_model.bin")
    check_model_files(d)
    _truncate(d / "pytorch_model.bin", lambda n: n - 100)
    with pytest.raises(ModelFileError, match="pytorch_model.bin is truncated or corrupt"):
        check_model_files(d)
    (d / "pytorch_model.bin").write_bytes(b"hello")
    with pytest.raises(ModelFileError, match="not a PyTorch checkpoint"):
        check_model_files(d)


def test_load_error_past_the_checks_is_one_line(tmp_path, capsys, copy_model, data_file):
    """A file that passes the header checks but that the loader still rejects (a tensor of the
    wrong shape): still one line."""
    from safetensors.torch import load_file, save_file

    d = copy_model()
    state = load_file(str(d / SAFE))
    key = "bert.encoder.layer.0.intermediate.dense.weight"
    state[key] = state[key][:10].clone()
    save_file(state, str(d / SAFE), metadata={"format": "pt"})
    out = tmp_path / "out"
    rc = main([str(d), "--data", str(data_file), "--output", str(out), *PRUNE_ARGS])
    captured = capsys.readouterr().err
    if rc == 0:  # transformers re-initialised the tensor: at least it must not be silent
        pytest.fail(f"a mis-shaped tensor was accepted silently: {captured}")
    err = one_line_error(captured)
    assert rc == 2 and "cannot load model weights" in err, err
    assert not out.exists()


def test_kcm_prune_refuses_weights_that_lack_a_pruned_layer(
    tmp_path, capsys, copy_model, data_file
):
    """A weights file from which one pruned layer's tensor is missing: transformers would fill it
    with random values (and say so only in a load report); kcm-prune says which tensor is absent."""
    from safetensors.torch import load_file, save_file

    d = copy_model("partial")
    tensors = load_file(d / SAFE)
    lost = next(k for k in tensors if ".intermediate.dense.weight" in k)
    del tensors[lost]
    save_file(tensors, d / SAFE, metadata={"format": "pt"})
    before = tree_hash(d)
    out = tmp_path / "out"
    rc = main([str(d), "--data", str(data_file), "--output", str(out), *PRUNE_ARGS])
    err = one_line_error(capsys.readouterr().err)
    assert rc == 2 and "intermediate.dense.weight" in err and "random values" in err, err
    assert not out.exists() and tree_hash(d) == before
