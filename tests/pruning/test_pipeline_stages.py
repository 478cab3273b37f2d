"""The staged pipeline: options in one place, the method registry, the context, Selection."""

from __future__ import annotations

import pytest
import torch

from kcm_cuda.pruning import prune
from kcm_cuda.pruning.adapters import get_adapter
from kcm_cuda.pruning.context import build_context
from kcm_cuda.pruning.methods import METHODS, Method, Selection
from kcm_cuda.pruning.options import DEFAULT_RECONSTRUCTION, PruneOptions


def test_options_are_checked_in_one_place():
    o = PruneOptions(flops=0.5, method="d2", samples=10)
    assert o.flops == 0.5 and o.reconstruction() == DEFAULT_RECONSTRUCTION
    assert PruneOptions(scale=False).reconstruction() == "none"
    assert PruneOptions(scale=False, reconstruct="scale").reconstruction() == "scale"
    assert PruneOptions(reconstruct="none").reconstruction() == "none"
    with pytest.raises(ValueError, match="reconstruct must be one of"):
        PruneOptions(reconstruct="exact")
    with pytest.raises(ValueError, match="reconstruct_mode"):
        PruneOptions(experimental={"reconstruct_mode": "both"})
    assert PruneOptions(heads=True).heads is True
    with pytest.raises(ValueError, match="head_split"):
        PruneOptions(heads=True, experimental={"head_split": "none"})
    with pytest.raises(TypeError, match="heads"):
        PruneOptions(heads="yes")
    with pytest.raises(TypeError, match="labels"):
        PruneOptions(labels="positive")
    with pytest.raises(ValueError, match="flops"):
        PruneOptions(flops=1.5)
    report = PruneOptions(labels=[0, 1, 1]).as_report()
    assert report["labels"] == 3 and "method" not in report


def test_unknown_option_is_one_clear_error(bert, tokenizer, sentences):
    with pytest.raises(TypeError, match="unknown option.*scale_lamda"):
        prune(bert, sentences, 0.7, tokenizer=tokenizer, scale_lamda=0.1)


def test_registry_lists_every_method_with_its_interface():
    assert set(METHODS) >= {"kcm", "r2", "d2", "magnitude", "random"}
    for name, m in METHODS.items():
        assert isinstance(m, Method) and m.name == name
        assert isinstance(m.needs_activations, bool) and isinstance(m.needs_labels, bool)


def test_context_is_lazy_and_memoised(bert, tokenizer, sentences):
    o = PruneOptions(flops=0.7, method="d2", samples=64, progress=False, heads=False)
    ctx = build_context(
        bert, get_adapter(bert), sentences, o, tokenizer=tokenizer, device=None, cache=None
    )
    assert "activations" not in ctx.timings and ctx.backend_name is None
    assert ctx.fm.total_from_count(ctx.k_total) <= 0.7 * ctx.fm.total() * (1 + 1e-12)
    stats = ctx.activation_stats()
    assert ctx.activation_stats() is stats and "activations" in ctx.timings
    assert ctx.d2() is ctx.d2()
    assert len(ctx.d2().scores) == 3


class _KeepFirst(Method):
    """A plug-in method: keeps the first neurons of each layer, with given scales."""

    name = "keep_first"

    def select(self, ctx):
        masks, scales = [], []
        per_layer = ctx.k_total // len(ctx.sizes)
        for n in ctx.sizes:
            m = torch.zeros(n, dtype=torch.bool)
            m[:per_layer] = True
            masks.append(m)
            scales.append(torch.full((per_layer,), 2.0))
        return Selection(masks=masks, scales=scales, info={"per_layer": per_layer})


def test_a_registered_method_plugs_in(bert, tokenizer, sentences, monkeypatch):
    monkeypatch.setitem(METHODS, "keep_first", _KeepFirst())
    r = prune(
        bert,
        sentences,
        0.7,
        method="keep_first",
        scale=False,
        tokenizer=tokenizer,
        progress=False,
        samples=64,
    )
    k = r.report["selection"]["per_layer"]
    assert r.report["kept_per_layer"] == [k, k, k] and r.report["reconstruct"] == "none"
    assert all(torch.equal(s, torch.full((k,), 2.0)) for s in r.scales.values())
    w2 = r.model.bert.encoder.layer[0].output.dense.weight
    w2_orig = bert.bert.encoder.layer[0].output.dense.weight[:, :k]
    assert torch.allclose(w2, 2.0 * w2_orig)
    # with a reconstruction, the reconstruction's factors replace the selection's
    r = prune(
        bert, sentences, 0.7, method="keep_first", tokenizer=tokenizer, progress=False, samples=64
    )
    assert r.report["reconstruct"] == DEFAULT_RECONSTRUCTION and "reconstruct_notes" in r.report


def test_labels_are_drawn_with_the_sample(bert, tokenizer, sentences):
    labels = list(range(len(sentences)))
    o = PruneOptions(flops=0.7, samples=50, seed=3, labels=labels, progress=False)
    ctx = build_context(
        bert, get_adapter(bert), sentences, o, tokenizer=tokenizer, device=None, cache=None
    )
    enc = tokenizer(
        [sentences[i] for i in ctx.labels.tolist()],
        padding=True,
        truncation=True,
        max_length=128,
        return_tensors="pt",
    )
    assert torch.equal(enc["input_ids"], ctx.sample.input_ids)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        o = PruneOptions(flops=0.7, samples=50, labels=[0, 1, 0], progress=False)
        build_context(
            bert, get_adapter(bert), sentences, o, tokenizer=tokenizer, device=None, cache=None
        )


def test_kcm_paper_is_mean_rank_with_scale(bert, tokenizer, sentences):
    kw = dict(tokenizer=tokenizer, progress=False, samples=96)
    paper = prune(bert, sentences, 0.7, method="kcm_paper", **kw)
    assert paper.report["method"] == "kcm_paper" and paper.report["reconstruct"] == "scale"
    ref = prune(
        bert, sentences, 0.7, method="kcm", experimental={"merge": "mean_rank"}, scale=False, **kw
    )
    for i in ref.masks:
        assert torch.equal(paper.masks[i], ref.masks[i])
    off = prune(bert, sentences, 0.7, method="kcm_paper", scale=False, **kw)
    assert off.report["reconstruct"] == "none"


def test_precision_auto_resolves_per_device(bert, tokenizer, sentences):
    """The R2 default precision is "auto": ieee on the CPU (tf32 only on sm_80+ GPUs)."""
    from kcm_cuda.pruning.options import PruneOptions

    assert PruneOptions().precision == "auto"
    r = prune(
        bert,
        sentences,
        0.7,
        method="kcm",
        tokenizer=tokenizer,
        progress=False,
        samples=32,
        scale=False,
    )
    assert r.report["options"]["precision"] == "ieee"


def test_options_are_few_and_the_variants_live_in_experimental():
    import dataclasses

    from kcm_cuda.pruning.options import EXPERIMENTAL_NAMES, ExperimentalOptions

    assert len(dataclasses.fields(PruneOptions)) <= 25
    assert not EXPERIMENTAL_NAMES & {f.name for f in dataclasses.fields(PruneOptions)}
    o = PruneOptions(experimental={"merge": "weighted", "sigma": "median"})
    assert isinstance(o.experimental, ExperimentalOptions)
    assert o.experimental.merge == "weighted" and o.experimental.sigma == "median"
    assert o.experimental.changed() == {"merge": "weighted", "sigma": "median"}
    rep = o.as_report()
    assert rep["experimental"]["merge"] == "weighted" and "merge" not in rep
    with pytest.raises(TypeError, match="unknown experimental option"):
        PruneOptions(experimental={"merj": "weighted"})
    with pytest.raises(TypeError, match="experimental must be a dict"):
        PruneOptions(experimental="weighted")


def test_flat_experimental_options_still_work_with_a_warning_naming_the_new_place(
    bert, tokenizer, sentences
):
    kw = dict(tokenizer=tokenizer, progress=False, samples=48, method="kcm", scale=False)
    new = prune(bert, sentences, 0.7, experimental={"merge": "mean_rank"}, **kw)
    with pytest.warns(FutureWarning, match=r"experimental=\{'merge'"):
        old = prune(bert, sentences, 0.7, merge="mean_rank", **kw)
    assert old.report["options"] == new.report["options"]
    for i in new.masks:
        assert torch.equal(old.masks[i], new.masks[i])
    with pytest.raises(TypeError, match="unknown option.*in experimental="):
        prune(bert, sentences, 0.7, merj="mean_rank", **kw)


def test_a_report_saved_before_the_move_reads_in_the_new_layout(tmp_path):
    import json

    from kcm_cuda.pruning import load_report
    from kcm_cuda.pruning.options import report_options

    old = {"reconstruct": "ridge", "merge": "weighted", "sigma": 1.0, "samples": 64}
    (tmp_path / "kcm_report.json").write_text(json.dumps({"options": old, "flops": {}}))
    new = load_report(tmp_path)["options"]
    assert new["experimental"] == {"merge": "weighted", "sigma": 1.0}
    assert new["samples"] == 64 and "merge" not in new
    assert report_options(new) == new
    (tmp_path / "kcm_report.json").write_text("{")
    with pytest.raises(ValueError, match="does not parse"):
        load_report(tmp_path)
    with pytest.raises(ValueError, match="holds no kcm_cuda report"):
        load_report(tmp_path / "nothing")
