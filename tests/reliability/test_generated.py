"""Generated bad and unusual inputs for every entry point (hypothesis), against one contract:
a correct result, or a one-line error of the kinds a user is promised (ValueError / TypeError /
FileExistsError / FileNotFoundError / the CLI's exit 2 with one line) that names what was
wrong; the inputs byte-identical; nothing written outside the output; no partial output.

CI runs a fixed, derandomized budget (about a minute); ``KCM_FUZZ_EXAMPLES=N`` multiplies every
test's budget by N for a longer hunt (``KCM_FUZZ_EXAMPLES=20 pytest tests/reliability -k
generated``). Entry points: data files (read_texts: .txt / .jsonl / .csv / .tsv, encodings,
quoting, huge fields, empty rows, odd columns), pre-tokenized dicts (prepare_sample and
prune(): shapes, dtypes, values), tokenizers and configs (padding / special tokens, positions,
vocabulary) through prune(), saved outputs (load_pruned of a damaged config), and the command
line (kcm-prune: paths and option values)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from reliability_helpers import pc, tree_hash

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kcm_cuda  # noqa: E402
from kcm_cuda.pruning.data import prepare_sample, read_texts  # noqa: E402

SCALE = max(1, int(os.environ.get("KCM_FUZZ_EXAMPLES", "1") or 1))
PROMISED = (ValueError, TypeError, FileExistsError, FileNotFoundError)


def budget(n: int):
    return settings(
        max_examples=n * SCALE,
        derandomize=SCALE == 1,  # CI: the same examples every run
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )


TALLY: dict[str, dict[str, int]] = {}  # entry point -> {"result": n, "error": n}


def count(entry: str, outcome: str) -> None:
    TALLY.setdefault(entry, {}).setdefault(outcome, 0)
    TALLY[entry][outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def _write_tally():
    """KCM_FUZZ_TALLY=FILE: what was tried per entry point (correct results, promised errors)."""
    yield
    path = os.environ.get("KCM_FUZZ_TALLY")
    if path:
        Path(path).write_text(json.dumps(TALLY, indent=1, sort_keys=True))


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert isinstance(exc, PROMISED), f"{type(exc).__name__}: {msg}"
    assert msg and "\n" not in msg.strip(), f"not one line: {msg!r}"
    return msg


# -- data files ---------------------------------------------------------------------------------
TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=40,
)
FIELD = st.one_of(TEXT, st.sampled_from(['"', '""', ",", "\t", "\n", "\r\n", "a,b", '"q"x']))


@st.composite
def data_files(draw):
    fmt = draw(st.sampled_from([".txt", ".jsonl", ".csv", ".tsv"]))
    n = draw(st.integers(0, 6))
    cols = draw(
        st.lists(
            st.sampled_from(["text", "sentence", "label", "a", "b", ""]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    rows = [[draw(FIELD) for _ in cols] for _ in range(n)]
    if draw(st.booleans()) and rows:
        rows[0][0] = "x" * draw(st.sampled_from([10, 140_000]))  # a huge field
    if fmt == ".txt":
        body = "\n".join(r[0] for r in rows)
    elif fmt == ".jsonl":
        lines = [json.dumps(dict(zip(cols, r, strict=True))) for r in rows]
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(["{", "[1, 2]", '"just a string"', "", "null"])))
        body = "\n".join(lines)
    else:
        sep = "," if fmt == ".csv" else "\t"
        quote = draw(st.booleans())

        def cell(x):
            return '"' + x.replace('"', '""') + '"' if quote else x

        body = "\n".join(sep.join(cell(x) for x in line) for line in [cols, *rows])
    enc = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    try:
        raw = body.encode(enc)
    except UnicodeEncodeError:
        raw = body.encode("utf-8")
    if draw(st.booleans()):
        raw += draw(st.sampled_from([b"\xff\xfe", b"\x00", b"\r", b""]))
    return fmt, raw


@budget(60)
@given(spec=data_files())
def test_generated_data_files(tmp_path_factory, spec):
    fmt, raw = spec
    d = tmp_path_factory.mktemp("data")
    f = d / f"data{fmt}"
    f.write_bytes(raw)
    try:
        texts = read_texts(f)
    except Exception as exc:  # noqa: BLE001 - the contract decides
        count("data files (read_texts)", "error")
        msg = one_line(exc)
        assert str(f) in msg or f.name in msg, msg
    else:
        count("data files (read_texts)", "result")
        assert texts and all(
            (isinstance(t, str) and t.strip()) or (isinstance(t, tuple) and len(t) == 2)
            for t in texts
        )
    assert f.read_bytes() == raw  # the input untouched
    assert [p.name for p in d.iterdir()] == [f.name]  # nothing else written


# -- pre-tokenized dicts ------------------------------------------------------------------------
@st.composite
def pretokenized(draw):
    kind = draw(st.sampled_from(["tensor", "list", "nested"]))
    plausible = draw(st.booleans())  # half the examples look like real batches
    rows = draw(st.integers(16, 40) if plausible else st.integers(0, 5))
    width = draw(st.integers(8, 24) if plausible else st.integers(0, 9))
    if plausible:
        dtype, (low, high), shape = torch.long, (3, 100), (rows, width)
    else:
        dtype = draw(st.sampled_from([torch.long, torch.int32, torch.float32, torch.bool]))
        low, high = draw(st.sampled_from([(0, 100), (-5, 10), (100, 10_000), (0, 2**40)]))
        shape = draw(st.sampled_from([(rows, width), (rows,), (rows, width, 2)]))
    ids = torch.randint(low, high, shape).to(dtype) if all(shape) else torch.zeros(shape)
    data = {"input_ids": ids if kind == "tensor" else ids.tolist()}
    mask_kind = draw(st.sampled_from(["none", "ones", "zeros", "short", "left"]))
    if mask_kind != "none" and len(shape) == 2:
        m = torch.ones(shape, dtype=torch.long)
        if mask_kind == "zeros":
            m.zero_()
        elif mask_kind == "short" and width:
            m = m[:, : width - 1]
        elif mask_kind == "left" and width > 1:
            m[:, 0] = 0
        data["attention_mask"] = m
    if draw(st.booleans()):
        data["token_type_ids"] = draw(st.sampled_from([None, [[0]], torch.zeros(1, 1)]))
    return data


@budget(60)
@given(data=pretokenized(), causal=st.booleans())
def test_generated_pretokenized_samples(data, causal):
    try:
        sample = prepare_sample(data, None, samples=4, causal=causal, context=8)
    except Exception as exc:  # noqa: BLE001
        count("pre-tokenized dicts (prepare_sample)", "error")
        one_line(exc)
    else:
        count("pre-tokenized dicts (prepare_sample)", "result")
        assert sample.input_ids.dim() == 2 and sample.input_ids.dtype == torch.long
        assert sample.attention_mask.shape == sample.input_ids.shape


_MODELS: dict = {}


def _model(family: str):
    if family not in _MODELS:
        _MODELS[family] = (
            pc.tiny_decoder("llama", layers=2) if family == "llama" else pc.tiny_bert(layers=2)
        )
    return _MODELS[family]


@budget(12)
@given(
    data=pretokenized(),
    family=st.sampled_from(["bert", "llama"]),
    flops=st.sampled_from([0.9, 0.6, 1.0]),
)
def test_generated_prune_calls(data, family, flops):
    model = _model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        r = kcm_cuda.prune(model, data, flops, samples=40, progress=False, structure="fixed")
    except Exception as exc:  # noqa: BLE001
        count("pre-tokenized dicts (prune)", "error")
        one_line(exc)
    else:
        count("pre-tokenized dicts (prune)", "result")
        assert r.report["flops"]["ratio"] <= flops + 1e-9
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model untouched


# -- tokenizers and configs --------------------------------------------------------------------
@budget(10)
@given(
    pad=st.sampled_from(["keep", "new-token", "eos", "none"]),
    positions=st.sampled_from([None, 8, 4]),
    max_length=st.sampled_from([4, 16, 200]),
    vocab_cut=st.sampled_from([0, 20]),
)
def test_generated_tokenizers_and_configs(tokenizer, pad, positions, max_length, vocab_cut):
    import transformers

    tok = transformers.BertTokenizerFast.from_pretrained(tokenizer.name_or_path)
    if pad == "new-token":
        tok.add_special_tokens({"pad_token": "[NEWPAD]"})
    elif pad == "eos":
        tok.pad_token = tok.sep_token
    vocab = tok.vocab_size - vocab_cut
    model = pc.tiny_bert(layers=2, vocab_size=vocab)
    if positions is not None:
        model.config.max_position_embeddings = positions  # a config that says less
    texts = pc.make_sentences(80, seed=3)
    try:
        r = kcm_cuda.prune(
            model,
            texts,
            0.8,
            tokenizer=tok,
            samples=48,
            max_length=max_length,
            progress=False,
            structure="fixed",
        )
    except Exception as exc:  # noqa: BLE001
        count("tokenizers and configs (prune)", "error")
        one_line(exc)
    else:
        count("tokenizers and configs (prune)", "result")
        assert r.report["flops"]["ratio"] <= 0.8 + 1e-9


# -- saved outputs --------------------------------------------------------------------------------
CONFIG_EDITS = st.sampled_from(
    [
        ("kcm_intermediate_sizes", [1]),
        ("kcm_intermediate_sizes", "wide"),
        ("kcm_intermediate_sizes", [10**9, 10**9, 10**9]),
        ("kcm_intermediate_sizes", [-1, 2, 3]),
        ("kcm_attention_heads", [0, 0, 0]),
        ("kcm_attention_heads", [True, 1, 1]),
        ("kcm_attention_heads", "x"),
        ("kcm_attention_heads", [99, 1, 1]),
        ("architectures", ["NoSuchModel"]),
        ("architectures", None),
        ("intermediate_size", 0),
        ("hidden_size", 7),
        ("num_attention_heads", 0),
        ("num_hidden_layers", 1),
        ("vocab_size", 3),
        ("model_type", "gpt2"),
    ]
)


@budget(25)
@given(edits=st.lists(CONFIG_EDITS, min_size=1, max_size=2))
def test_generated_damaged_outputs(tmp_path_factory, pruned_dir, edits):
    d = tmp_path_factory.mktemp("damaged") / "out"
    shutil.copytree(pruned_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    for key, value in edits:
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    load_damaged(d, "saved outputs (load_pruned)")


def load_damaged(d: Path, entry: str) -> None:
    """load_pruned of a damaged output ``d``: a model with finite outputs or one promised
    line; ``d`` unchanged."""
    before = tree_hash(d)
    try:
        model = kcm_cuda.load_pruned(d)
    except Exception as exc:  # noqa: BLE001
        count(entry, "error")
        one_line(exc)
    else:
        count(entry, "result")
        x = pc.token_batch(2, 8, vocab_size=int(model.config.vocab_size))
        with torch.no_grad():
            out = model(**{k: v for k, v in x.items() if k != "token_type_ids"})
        assert torch.isfinite(out[0]).all()
    assert tree_hash(d) == before


# -- the command line ---------------------------------------------------------------------------
def usually(good: str, *bad: str):
    """The good value in about two examples of three, else one of the bad ones."""
    return st.one_of(st.just(good), st.just(good), st.sampled_from(bad))


OPTION_VALUES = st.fixed_dictionaries(
    {
        "--flops": usually("0.8", "0", "1", "1.5", "-0.2", "nan", "inf", "abc", "0.05", "0.6"),
        "--samples": usually("64", "0", "-3", "1", "x", "100000"),
        "--max-length": usually("32", "1", "0", "100000", "2"),
        "--min-keep": usually("0.01", "-1", "5000", "0", "3"),
        "--batch-size": usually("16", "0", "1"),
    }
)
OUTPUTS = st.sampled_from(
    ["out", "a/b/out", "spaced name", "ünï", "out/", "file", "file/x", "link", "."]
)


@budget(14)
@given(options=OPTION_VALUES, output=OUTPUTS, overwrite=st.booleans())
def test_generated_cli_calls(
    tmp_path_factory, model_dir, data_file, capsys, monkeypatch, options, output, overwrite
):
    from kcm_cuda.cli import main

    work = tmp_path_factory.mktemp("cli")
    (work / "file").write_text("mine")
    (work / "elsewhere").mkdir()
    os.symlink(work / "elsewhere", work / "link")
    monkeypatch.chdir(work)
    before_model, before_data = tree_hash(model_dir), tree_hash(data_file)
    listing = {p.name for p in work.iterdir()}
    argv = [str(model_dir), "--data", str(data_file), "--output", output, "--quiet"]
    for k, v in options.items():
        argv += [k, v]
    if overwrite:
        argv.append("--overwrite")
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage error: exit 2 with its usage lines
        rc = exc.code
        count("command line (kcm-prune)", "usage error")
        assert rc == 2
        capsys.readouterr()
        return
    err = capsys.readouterr().err
    target = (work / output).resolve() if output != "link" else work / "elsewhere"
    count("command line (kcm-prune)", "result" if rc == 0 else "error")
    if rc == 0:
        assert (target / "config.json").is_file()
        kcm_cuda.load_pruned(target)
    else:
        assert rc == 2, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("kcm-prune: error: "), err
        assert "Traceback" not in err
        if output not in ("file", "link", "."):
            assert not target.exists() or not any(target.iterdir()), "a partial output"
    assert tree_hash(model_dir) == before_model and tree_hash(data_file) == before_data
    new = {p.name for p in work.iterdir()} - listing
    top = Path(output).parts[0] if output not in (".",) else None
    assert new <= ({top} if rc == 0 and top else set()), f"written outside the output: {new}"
    assert (work / "file").read_text() == "mine"


# -- prune() options -------------------------------------------------------------------------------
PRUNE_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "method": st.sampled_from(["flap", "wanda_sp", "d2", "random", "nope", None, 3]),
        "heads": st.sampled_from([True, False, "auto", "yes", 1]),
        "allocation": st.sampled_from(["uniform", "global", "error", "auto", "x"]),
        "layout": st.sampled_from(["per_layer", "standard", "stock", None]),
        "structure": st.sampled_from(["search", "fixed", "maybe"]),
        "reconstruct": st.sampled_from(["ridge", "bias", "scale", "none", "lasso"]),
        "samples": st.sampled_from([48, 0, -1, 2.5, "64"]),
        "max_length": st.sampled_from([16, 1, 2, 10**6]),
        "min_keep": st.sampled_from([0.01, 0, 1, 10**6, -0.5, float("nan")]),
        "seed": st.sampled_from([0, -1, 2**70]),
        "ridge_lambda": st.sampled_from([0.01, 0.0, -1.0, float("inf")]),
        "min_heads": st.sampled_from([1, 0, 4, 100]),
        "experimental": st.sampled_from(
            [None, {}, {"gqa_heads": "groups"}, {"refit_bias": "yes"}, {"bogus": 1}, []]
        ),
        "unknown_option": st.just(1),
    },
)


@budget(40)
@given(
    options=PRUNE_OPTIONS,
    flops=st.sampled_from([0.8, 0.5, 0.0, 1.2, "0.7", float("nan")]),
    family=st.sampled_from(["bert", "llama"]),
)
def test_generated_prune_options(options, flops, family):
    model = _model(family)
    data = pc.token_batch(48, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        r = kcm_cuda.prune(model, data, flops, progress=False, **options)
    except Exception as exc:  # noqa: BLE001
        count("prune() options", "error")
        one_line(exc)
    else:
        count("prune() options", "result")
        assert r.report["flops"]["ratio"] <= float(flops) + 1e-9
        x = pc.token_batch(2, 8, seed=9)
        with torch.no_grad():
            assert torch.isfinite(r.model(**x)[0]).all()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- round three: the paths added since (damaged configs field by field, the standard layout,
# -- ONNX export, the structure search on models with odd outputs) -------------------------------
ODD_VALUES = st.sampled_from(
    [float("nan"), float("inf"), -1, 0, 10**12, "7", True, [1], {"a": 1}, 1.5, None]
)


@budget(30)
@given(data=st.data(), value=ODD_VALUES)
def test_generated_damaged_config_fields(tmp_path_factory, pruned_dir, data, value):
    """Any field of a saved output's config.json swapped for an odd value (NaN, inf, negative,
    zero, huge, a string, a bool, a list, a dict, a float, removed): load_pruned gives a model
    with finite outputs or one promised line, before building anything absurd."""
    d = tmp_path_factory.mktemp("fields") / "out"
    shutil.copytree(pruned_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    key = data.draw(st.sampled_from(sorted(cfg)))
    if value is None:
        cfg.pop(key)
    else:
        cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    load_damaged(d, "config fields (load_pruned)")


@budget(8)
@given(
    family=st.sampled_from(["llama", "mistral", "qwen2"]),
    shape=st.sampled_from([(8, 2), (4, 2), (6, 3), (4, 4)]),
    flops=st.sampled_from([0.8, 0.7, 0.6, 0.5]),
    heads=st.sampled_from(["auto", True, False]),
    gqa=st.sampled_from(["per_group", "groups"]),
)
def test_generated_standard_layout(tmp_path_factory, family, shape, flops, heads, gqa):
    """layout='standard' on every decoder family, head shape, budget and head option: a
    checkpoint plain transformers loads at its pruned size with the pruned model's logits,
    or one promised line before the prune — never a failure after it."""
    import transformers

    n_q, n_kv = shape
    model = pc.tiny_decoder(family, heads=n_q, kv_heads=n_kv, hidden=48 if n_q == 6 else 64)
    try:
        r = kcm_cuda.prune(
            model, pc.token_batch(64, 16), flops, layout="standard", heads=heads,
            experimental={"gqa_heads": gqa}, progress=False, samples=64,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        count("prune(layout='standard')", "error")
        one_line(exc)
        return
    count("prune(layout='standard')", "result")
    out = r.save(tmp_path_factory.mktemp("std") / "m")
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in back.parameters()) == sum(
        p.numel() for p in r.model.parameters()
    )
    x = pc.token_batch(2, 8, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(back(**x).logits, r.model(**x).logits, rtol=1e-5, atol=1e-5)


ONNX_TARGETS = st.sampled_from(["file", "dir", "dir/", "missing/", "", "source", "exists"])


@budget(6)
@given(
    target=ONNX_TARGETS,
    opset=st.sampled_from([18, 18, 17, 99, "x"]),
    atol=st.sampled_from([None, 1e-4, 0.0, -1.0, float("nan")]),
    overwrite=st.booleans(),
)
def test_generated_onnx_exports(tmp_path_factory, onnx_encoder, target, opset, atol, overwrite):
    """export_onnx with odd arguments and targets: a file ONNX Runtime ran (checked inside),
    or one promised line; the input model's directory is never written."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from kcm_cuda import export_onnx

    model, src = onnx_encoder
    base = tmp_path_factory.mktemp("onnx")
    (base / "dir").mkdir()
    (base / "exists.onnx").write_bytes(b"old")
    path = {
        "file": base / "m.onnx",
        "dir": base / "dir",
        "dir/": str(base / "dir") + "/",
        "missing/": str(base / "missing") + "/",
        "": "",
        "source": src,
        "exists": base / "exists.onnx",
    }[target]
    before = tree_hash(src)
    try:
        f = export_onnx(model, path, opset=opset, atol=atol, overwrite=overwrite)
    except Exception as exc:  # noqa: BLE001
        count("export_onnx", "error")
        one_line(exc)
    else:
        count("export_onnx", "result")
        assert f.is_file() and f.stat().st_size > 0 and f.suffix == ".onnx"
    assert tree_hash(src) == before
    assert not (base / "missing").exists()
    assert not list(base.glob("**/.*.tmp"))


@pytest.fixture(scope="module")
def onnx_encoder(tmp_path_factory):
    """A dense tiny BERT loaded from a directory (so that directory is its source)."""
    import transformers

    src = tmp_path_factory.mktemp("src") / "bert"
    pc.tiny_bert().save_pretrained(src)
    return transformers.AutoModelForSequenceClassification.from_pretrained(src).eval(), src


@budget(6)
@given(
    kind=st.sampled_from(["constant", "overflow", "zero_head", "normal"]),
    flops=st.sampled_from([0.7, 0.5]),
)
def test_generated_search_on_odd_outputs(kind, flops):
    """The structure search on models whose outputs are constant, overflow to inf / NaN or
    are all zero: a model and a report that is strict JSON, or one promised line — never a
    choice made on NaN."""
    model = pc.tiny_bert()
    with torch.no_grad():
        if kind == "constant":
            model.classifier.weight.zero_()
        elif kind == "overflow":
            model.classifier.weight.fill_(3e38)
        elif kind == "zero_head":
            model.classifier.weight.zero_()
            model.classifier.bias.zero_()
    try:
        r = kcm_cuda.prune(model, pc.token_batch(96, 16), flops, progress=False, samples=96)
    except Exception as exc:  # noqa: BLE001
        count("structure search (odd outputs)", "error")
        one_line(exc)
        return
    count("structure search (odd outputs)", "result")
    s = r.report["structure"]
    json.dumps(s, allow_nan=False)  # strict JSON in memory
    if s.get("chosen"):
        assert s["chosen_criterion"] is not None
