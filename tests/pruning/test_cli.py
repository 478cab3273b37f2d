"""kcm-prune end to end on a saved tiny model, and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from kcm_cuda.cli import main
from kcm_cuda.pruning import load_pruned


@pytest.fixture
def model_dir(tmp_path, builders, tokenizer):
    d = tmp_path / "model"
    builders["distilbert"]("seqcls", vocab_size=tokenizer.vocab_size).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def data_file(tmp_path, sentences):
    f = tmp_path / "unlabeled.txt"
    f.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return f


def test_cli_end_to_end(tmp_path, model_dir, data_file, capsys, sentences, tokenizer):
    out = tmp_path / "pruned"
    argv = [
        str(model_dir),
        "--data",
        str(data_file),
        "--flops",
        "0.7",
        "--output",
        str(out),
        "--samples",
        "128",
        "--max-length",
        "32",
        "--quiet",
    ]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "layer" in stdout and "saved to" in stdout
    # the structure search's choice and its runner-up, as the saved report has them
    report = json.loads((out / "kcm_report.json").read_text())
    chosen = report["structure"]["chosen"]
    line = next(x for x in stdout.splitlines() if x.startswith("structure: "))
    assert chosen["method"] in line and "4-fold cross-fitted kl" in line
    assert any(x.startswith("runner-up: ") for x in stdout.splitlines())
    model = load_pruned(out)
    assert report["flops"]["ratio"] <= 0.7
    assert report["source_model"] == str(model_dir)
    enc = tokenizer(sentences[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert logits.shape == (3, 2)
    # second run: output exists → one-line error, exit 2; --overwrite works
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert main([*argv, "--overwrite", "--method", "d2", "--no-scale"]) == 0
    assert "structure: fixed (reconstruct='none'" in capsys.readouterr().out
    assert main([*argv, "--overwrite", "--structure", "fixed"]) == 0
    assert "structure: fixed (structure='fixed')" in capsys.readouterr().out


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("kcm-prune: error: ")
    return last


@pytest.mark.parametrize(
    "flops,match,extra",
    [
        ("0", "flops", []),
        ("1.5", "flops", []),
        ("nan", "flops", []),
        ("0.1", "joint floor", []),  # heads are pruned at c <= 0.7 by default
        ("0.1", "attention floor", ["--no-heads"]),
    ],
)
def test_cli_bad_flops(tmp_path, model_dir, data_file, capsys, flops, match, extra):
    argv = [
        *extra,
        str(model_dir),
        "--data",
        str(data_file),
        "--flops",
        flops,
        "--output",
        str(tmp_path / "o"),
        "--quiet",
    ]
    assert main(argv) == 2
    assert match in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_cli_bad_inputs(tmp_path, model_dir, data_file, capsys, monkeypatch):
    out = str(tmp_path / "o")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert main([str(model_dir), "--data", str(empty), "--flops", "0.7", "--output", out]) == 2
    assert "no text" in _err(capsys)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    assert main([str(model_dir), "--data", str(binary), "--flops", "0.7", "--output", out]) == 2
    assert "UTF-8" in _err(capsys)
    assert (
        main([str(model_dir), "--data", str(tmp_path / "x.txt"), "--flops", "0.7", "--output", out])
        == 2
    )
    assert "not found" in _err(capsys)
    # missing local directory
    assert (
        main(
            [str(tmp_path / "nomodel"), "--data", str(data_file), "--flops", "0.7", "--output", out]
        )
        == 2
    )
    assert "not found" in _err(capsys)
    # hub name while offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (
        main(
            [
                "someone/not-a-cached-model-xyz",
                "--data",
                str(data_file),
                "--flops",
                "0.7",
                "--output",
                out,
            ]
        )
        == 2
    )
    assert "HF_HUB_OFFLINE" in _err(capsys)
    # a directory that is not a model, and one that cannot be read
    (tmp_path / "notamodel").mkdir()
    assert (
        main(
            [
                str(tmp_path / "notamodel"),
                "--data",
                str(data_file),
                "--flops",
                "0.7",
                "--output",
                out,
            ]
        )
        == 2
    )
    assert "config.json" in _err(capsys)
    import os

    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(model_dir) else real_access(p, mode)
    )
    assert main([str(model_dir), "--data", str(data_file), "--flops", "0.7", "--output", out]) == 2
    assert "not readable" in _err(capsys)


def test_cli_unsupported_architecture(tmp_path, data_file, capsys, tokenizer):
    import transformers

    d = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=tokenizer.vocab_size)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    tokenizer.save_pretrained(d)
    assert (
        main([str(d), "--data", str(data_file), "--flops", "0.7", "--output", str(tmp_path / "o")])
        == 2
    )
    assert "GPT2LMHeadModel" in _err(capsys)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for opt in (
        "--data",
        "--flops",
        "--output",
        "--method",
        "--samples",
        "--max-length",
        "--seed",
        "--backend",
        "--device",
        "--no-scale",
        "--overwrite",
    ):
        assert opt in out


def test_cli_help_names_all_architectures(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for arch in ("BERT", "DistilBERT", "RoBERTa"):
        assert arch in out
    assert "--verbose" in out


def _argv(model, data, out, *extra):
    return [str(model), "--data", str(data), "--flops", "0.7", "--output", str(out), *extra]


def test_cli_model_without_tokenizer_files_is_an_error(
    tmp_path, builders, tokenizer, tokenizer_dir, data_file, capsys
):
    d = tmp_path / "encoder"  # what save_pretrained of a bare model writes: no tokenizer
    builders["bert"]("seqcls", vocab_size=tokenizer.vocab_size).save_pretrained(d)
    out = tmp_path / "o"
    assert main(_argv(d, data_file, out, "--quiet")) == 2
    msg = _err(capsys)
    assert "no tokenizer files" in msg and "--tokenizer" in msg
    assert not out.exists()
    # with --tokenizer it works
    argv = _argv(d, data_file, out, "--quiet", "--tokenizer", str(tokenizer_dir))
    assert main([*argv, "--samples", "64", "--max-length", "32"]) == 0
    assert (out / "kcm_report.json").is_file()


def test_cli_degenerate_tokenizer_is_an_error(tmp_path, builders, data_file, capsys):
    from transformers import BertTokenizerFast

    d = tmp_path / "model"
    # special tokens only: what transformers builds for a folder without tokenizer files
    tok = BertTokenizerFast(
        vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])}
    )
    builders["bert"]("seqcls", vocab_size=64).save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "o"
    assert main(_argv(d, data_file, out, "--quiet")) == 2
    msg = _err(capsys)
    assert "unknown" in msg and "100%" in msg and "--tokenizer" in msg
    assert not out.exists()


def test_cli_tokenizer_ids_outside_model_vocabulary(
    tmp_path, builders, tokenizer, data_file, capsys
):
    d = tmp_path / "model"
    builders["bert"]("seqcls", vocab_size=8).save_pretrained(d)
    tokenizer.save_pretrained(d)
    assert main(_argv(d, data_file, tmp_path / "o", "--quiet")) == 2
    assert "outside the model's vocabulary" in _err(capsys)


def test_cli_hub_name_without_network_fails_fast(tmp_path, data_file, capsys, monkeypatch):
    import kcm_cuda.cli as cli

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probes = []
    monkeypatch.setattr(cli, "hub_reachable", lambda timeout=3.0: probes.append(1) or False)

    def no_download(*a, **k):
        assert k.get("local_files_only") is True, "a hub download was attempted"
        raise OSError("not cached")

    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_download)
    assert main(_argv("someone/no-such-model", data_file, tmp_path / "o")) == 2
    msg = _err(capsys)
    assert "did not answer" in msg and "no-such-model" in msg
    assert probes == [1]


@pytest.mark.parametrize("name", ["./nomodel", "a/b/c", "nomodel/", "~/nomodel", "model.bin"])
def test_cli_local_looking_paths_never_go_to_the_hub(
    tmp_path, data_file, capsys, monkeypatch, name
):
    import kcm_cuda.cli as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "hub_reachable", lambda timeout=3.0: pytest.fail("hub probed"))
    assert main(_argv(name, data_file, tmp_path / "o")) == 2
    assert "model directory not found" in _err(capsys)


def test_cli_reads_data_before_loading_the_model(tmp_path, model_dir, capsys, monkeypatch):
    import kcm_cuda.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("model loaded first"))
    monkeypatch.setattr(cli, "load_config", lambda *a, **k: pytest.fail("config loaded first"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    assert main(_argv(model_dir, bad, tmp_path / "o")) == 2
    assert "line 2 is not JSON" in _err(capsys)


def test_cli_quiet_load_reports_unless_verbose(tmp_path, builders, tokenizer, data_file, capsys):
    import logging

    import transformers

    # a base model saved, loaded as a classifier: transformers reports the missing head
    d = tmp_path / "model"
    m = builders["bert"]("seqcls", vocab_size=tokenizer.vocab_size)
    m.save_pretrained(d)
    tokenizer.save_pretrained(d)
    transformers.utils.logging.set_verbosity_warning()
    try:
        argv = _argv(d, data_file, tmp_path / "o", "--quiet", "--samples", "64")
        assert main(argv) == 0
        assert transformers.utils.logging.get_verbosity() == logging.ERROR
        transformers.utils.logging.set_verbosity_warning()
        assert main([*argv, "--overwrite", "--verbose"]) == 0
        assert transformers.utils.logging.get_verbosity() == logging.WARNING
    finally:
        transformers.utils.logging.set_verbosity_warning()
    capsys.readouterr()


def test_cli_new_options_are_checked_before_loading(
    tmp_path, model_dir, data_file, capsys, monkeypatch
):
    import kcm_cuda.cli as cli
    import kcm_cuda.evaluation.runner as runner

    monkeypatch.setattr(cli, "load_config", lambda *a, **k: pytest.fail("config loaded first"))
    out = tmp_path / "o"
    monkeypatch.setattr(runner, "needs_labels", lambda name: name == "random")
    assert main(_argv(model_dir, data_file, out, "--method", "random")) == 2
    assert "needs labels" in _err(capsys)
    assert not out.exists()


def test_cli_passes_reconstruct_and_heads_to_prune(
    tmp_path, model_dir, data_file, capsys, monkeypatch
):
    import kcm_cuda.pruning as pruning

    seen = {}
    real = pruning.prune

    def spy(model, data, flops, **kw):
        seen["reconstruct"] = kw.pop("reconstruct", None)
        seen["heads"] = kw.pop("heads", None)
        seen["experimental"] = kw.get("experimental")
        return real(model, data, flops, **kw)

    monkeypatch.setattr(pruning, "prune", spy)
    argv = _argv(model_dir, data_file, tmp_path / "o", "--quiet", "--samples", "64")
    argv += ["--scale-lambda", "0.5", "--d2-mode", "energy"]  # the experimental flags still work
    argv += ["--gqa-heads", "groups"]
    assert main([*argv, "--reconstruct", "bias", "--heads"]) == 0
    exp = seen.pop("experimental")
    assert seen == {"reconstruct": "bias", "heads": True}
    assert exp["scale_lambda"] == 0.5 and exp["d2_mode"] == "energy"
    assert exp["gqa_heads"] == "groups"
    capsys.readouterr()


def test_cli_defaults_are_prunes_defaults():
    """kcm-prune runs what prune() runs by default (method and reconstruction)."""
    from kcm_cuda.cli import _parser
    from kcm_cuda.pruning.options import PruneOptions

    args = _parser().parse_args(["model", "--data", "d.txt", "--flops", "0.6", "--output", "o"])
    assert args.method is None  # not given: prune()'s structure search (or its default) decides
    assert args.structure == PruneOptions().structure == "search"
    assert args.samples == PruneOptions().samples == 512  # the calibration-size study's choice
    assert args.allocation == "auto"  # → PruneOptions' own resolution
    from kcm_cuda.pruning.allocation import ALLOCATIONS

    (action,) = [a for a in _parser()._actions if a.dest == "allocation"]
    assert tuple(action.choices) == ("auto", *ALLOCATIONS)
    assert args.max_length == PruneOptions().max_length
    assert args.scale_samples == PruneOptions().scale_samples
    assert args.reconstruct is None and not args.no_scale  # → PruneOptions' default reconstruction
    assert "ridge" in _parser().format_help()
