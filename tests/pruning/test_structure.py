"""The structure search (kcm_cuda.pruning.structure): candidates, the held-out criterion, the
one-shot proxy's refit, what options fix, and what the report says."""

from __future__ import annotations

import math

import pytest
import torch

from kcm_cuda.pruning import prune
from kcm_cuda.pruning.reconstruct import LinearRefit
from kcm_cuda.pruning.structure import (
    SEARCH_ALLOCATIONS,
    HeldoutCriterion,
    _OneShot,
    candidates,
    open_axes,
)
from tests.pruning.conftest import make_sentences, tiny_bert, tiny_decoder, token_batch


@pytest.fixture(scope="module")
def many_sentences():
    return make_sentences(200, seed=3)


def _heldout_kl(teacher, student, held) -> float:
    """Mean KL(teacher ‖ student) of the class distributions over the rows of ``held``."""
    kl, n = 0.0, 0
    with torch.no_grad():
        for batch in held.batches(32, "cpu"):
            t = torch.log_softmax(teacher(**batch).logits.double(), -1)
            s = torch.log_softmax(student(**batch).logits.double(), -1)
            kl += float((t.exp() * (t - s)).sum())
            n += t.shape[0]
    return kl / n


def _context(model, data, tokenizer, *, flops: float, samples: int, holdout: int, **kw):
    """The pruning context of ``model`` (with ``holdout`` held-out rows), on the CPU."""
    from kcm_cuda.pruning.adapters import get_adapter
    from kcm_cuda.pruning.context import build_context
    from kcm_cuda.pruning.options import PruneOptions

    opts = PruneOptions(flops=flops, samples=samples, progress=False, **kw)
    return build_context(
        model,
        get_adapter(model),
        data,
        opts,
        tokenizer=tokenizer,
        device="cpu",
        cache=None,
        holdout=holdout,
    )


# the held-out mode (search_folds=0: the search of before, on 48 rows held out), no tie rule
HELDOUT = {"search_rows": 48, "search_folds": 0, "search_tie_se": 0.0}


def _search(model, data, c, tokenizer=None, **kw):
    kw.setdefault("experimental", HELDOUT)
    return prune(model, data, c, tokenizer=tokenizer, progress=False, samples=96, **kw)


def test_default_searches_and_reports(bert, tokenizer, many_sentences):
    r = _search(bert, many_sentences, 0.6, tokenizer)
    s = r.report["structure"]
    assert s["criterion"] == "kl"
    assert s["heldout_rows"] == 48
    assert set(s["searched"]) == {"method", "allocation", "heads", "head_split"}
    # stage 1: heads off / on x 2 splits (flap, uniform); stage 2: 2 scores x 3 allocations
    # with stage 1's heads, one of which stage 1 already measured
    stages = [row["stage"] for row in s["candidates"]]
    assert stages == [1, 1, 1, 2, 2, 2, 2, 2]
    first = [row for row in s["candidates"] if row["stage"] == 1]
    best1 = min(first, key=lambda row: row["criterion"])["structure"]
    for row in s["candidates"]:
        if row["stage"] == 2:
            assert row["structure"]["heads"] == best1["heads"]
            assert row["structure"].get("head_split") == best1.get("head_split")
    live = [row for row in s["candidates"] if "skipped" not in row]
    assert all(math.isfinite(row["criterion"]) and row["criterion"] >= 0 for row in live)
    # the proxy's best is the finalist, built with both refits; the lower criterion is chosen
    finals = [row for row in live if "criterion_sequential_refit" in row]
    assert len(finals) == 1
    fin = finals[0]
    assert fin["criterion"] == min(row["criterion"] for row in live)
    assert fin["criterion_oneshot_refit"] == fin["criterion"]  # the proxy *is* that model
    mode = min(("oneshot", "sequential"), key=lambda m: fin[f"criterion_{m}_refit"])
    assert s["chosen"] == {**fin["structure"], "refit": mode}
    assert s["chosen_criterion"] == pytest.approx(fin[f"criterion_{mode}_refit"])
    # the report's options, flops and reconstruction are the chosen structure's
    assert r.report["method"] == s["chosen"]["method"]
    assert r.report["options"]["allocation"] == s["chosen"]["allocation"]
    assert r.report["options"]["heads"] is s["chosen"]["heads"]
    assert r.report["reconstruct_mode"] == mode
    assert r.report["flops"]["ratio"] <= 0.6 + 1e-9
    assert "structure" in r.report["timings_s"]
    assert s["runner_up"] is not None and s["runner_up"] != fin["structure"]


def test_oneshot_student_matches_the_masked_refit(bert, tokenizer, many_sentences):
    """The one-shot model equals the teacher with the same masks and the independent
    LinearRefit solution written in (the physical model computes what the refit says)."""
    from kcm_cuda.pruning.adapters import get_adapter
    from kcm_cuda.pruning.structure import (
        Structure,
        candidate_context,
        candidate_selection,
        oneshot_student,
    )

    ctx = _context(bert, many_sentences, tokenizer, flops=0.6, samples=96, holdout=0)
    opts = ctx.options
    cctx = candidate_context(ctx, Structure("wanda_sp", "global", False))
    sel = candidate_selection(cctx)
    student, recon = oneshot_student(cctx, sel)
    assert recon.mode == "oneshot" and not any(recon.fallback)
    assert all(e1 <= e0 for e0, e1 in zip(recon.error_before, recon.error_after, strict=True))
    ad = get_adapter(bert)
    for layer, block in enumerate(ad.layers(student)):
        keep = sel.masks[layer]
        assert ad.w2(block).weight.shape[1] == int(keep.sum())
    # layer 1, independently: the teacher's activations on the sample, its own outputs as target
    from kcm_cuda.pruning.activations import real_tokens

    tb = ad.layers(bert)[1]
    W2, b2 = ad.w2(tb).weight.detach().double(), ad.w2(tb).bias.detach().double()
    got, cur = [], {}
    h = ad.w2(tb).register_forward_pre_hook(
        lambda _m, a: got.append(real_tokens(a[0], cur["mask"]).double())
    )
    try:
        with torch.no_grad():
            for batch in ctx.sample.batches(32, "cpu"):
                cur["mask"] = batch["attention_mask"]
                bert(**batch)
    finally:
        h.remove()
    a = torch.cat(got)
    keep = sel.masks[1]
    ref = LinearRefit(int(keep.sum()), W2.shape[0], torch.device("cpu"), fit_bias=True)
    ref.add(a[:, keep], a @ W2.t())
    W_ref, db_ref, _ = ref.ridge(W2[:, keep], opts.ridge_lambda)
    sw = ad.w2(ad.layers(student)[1])
    # (the pass accumulates its Grams from float32 products: agreement to ~1e-4)
    assert torch.allclose(sw.weight.double(), W_ref.double(), rtol=1e-3, atol=5e-4)
    assert torch.allclose(sw.bias.double() - b2, db_ref.double(), rtol=1e-3, atol=5e-4)


def test_the_chosen_model_has_the_criterion_reported(bert, tokenizer, many_sentences):
    """The returned model's held-out KL, recomputed from its own logits, is the chosen value."""
    r = _search(bert, many_sentences, 0.6, tokenizer)
    from kcm_cuda.pruning.data import prepare_sample

    drawn = prepare_sample(many_sentences, tokenizer, samples=96 + 48, seed=0)
    held = drawn.part(96, 144)
    kl = _heldout_kl(bert, r.model, held)
    assert kl == pytest.approx(r.report["structure"]["chosen_criterion"], rel=1e-4, abs=1e-7)


def test_the_proxy_value_is_the_one_shot_models_criterion(
    bert, tokenizer, many_sentences, monkeypatch
):
    """The proxy's number is the held-out KL of the physically built one-shot model (its
    logits, recomputed here from the model itself)."""
    from kcm_cuda.pruning import structure
    from kcm_cuda.pruning.data import prepare_sample

    built = {}
    monkeypatch.setattr(
        structure, "FINALIST_HOOK", lambda st, mode, m, v: built.setdefault(mode, (m, v))
    )
    r = _search(bert, many_sentences, 0.6, tokenizer)
    model, value = built["oneshot"]
    fin = next(x for x in r.report["structure"]["candidates"] if "criterion_oneshot_refit" in x)
    assert value == fin["criterion"]
    held = prepare_sample(many_sentences, tokenizer, samples=96 + 48, seed=0).part(96, 144)
    assert _heldout_kl(bert, model, held) == pytest.approx(value, rel=1e-4, abs=1e-7)


def test_given_options_fix_their_part(bert, tokenizer, many_sentences):
    r = _search(bert, many_sentences, 0.6, tokenizer, method="wanda_sp", heads=False)
    s = r.report["structure"]
    assert set(s["searched"]) == {"allocation"}
    assert s["fixed"]["method"] == "wanda_sp" and s["fixed"]["heads"] is False
    allocs = [row["structure"]["allocation"] for row in s["candidates"]]
    assert sorted(allocs) == sorted(SEARCH_ALLOCATIONS)
    assert all(row["structure"]["method"] == "wanda_sp" for row in s["candidates"])
    assert r.report["method"] == "wanda_sp"
    assert r.head_masks is None


def test_nothing_open_means_no_search(bert, tokenizer, many_sentences):
    r = _search(
        bert, many_sentences, 0.6, tokenizer, method="flap", allocation="uniform", heads=False
    )
    s = r.report["structure"]
    assert s["candidates"] == [] and s["chosen"] is None
    assert "given" in s["not_searched"]


def test_fixed_structure_is_the_old_rules(bert, tokenizer, many_sentences):
    fixed = _search(bert, many_sentences, 0.6, tokenizer, structure="fixed")
    explicit = _search(
        bert, many_sentences, 0.6, tokenizer, method="flap", allocation="uniform", heads=True
    )
    assert fixed.report["structure"]["not_searched"] == "structure='fixed'"
    for i in fixed.masks:
        assert torch.equal(fixed.masks[i], explicit.masks[i])
        assert torch.equal(fixed.head_masks[i], explicit.head_masks[i])


def test_no_search_without_the_ridge_refit(bert, tokenizer, many_sentences):
    r = _search(bert, many_sentences, 0.6, tokenizer, reconstruct="bias")
    assert "ridge" in r.report["structure"]["not_searched"]


def test_too_few_rows_fall_back_to_the_fixed_rules(bert, tokenizer):
    few = make_sentences(30, seed=5)
    r = prune(bert, few, 0.7, tokenizer=tokenizer, progress=False, samples=96, experimental=HELDOUT)
    s = r.report["structure"]
    assert s["chosen"] is None and "too few" in s["not_searched"]
    # cross-fitting needs at least 2 rows per fold (and 8 in all)
    r = prune(bert, few[:7], 0.7, tokenizer=tokenizer, progress=False, samples=96)
    s = r.report["structure"]
    assert s["chosen"] is None and "cross-fit" in s["not_searched"]


def test_heldout_rows_are_not_calibration_rows(bert, tokenizer, many_sentences):
    from kcm_cuda.pruning.context import split_heldout
    from kcm_cuda.pruning.data import prepare_sample

    drawn = prepare_sample(many_sentences, tokenizer, samples=96 + 48, seed=2)
    calib, held = split_heldout(drawn, 96, 48)
    alone = prepare_sample(many_sentences, tokenizer, samples=96, seed=2)
    assert torch.equal(calib.rows, alone.rows)  # the same sample as without a search
    assert not set(held.rows.tolist()) & set(calib.rows.tolist())
    assert held.n_sequences == 48
    # short data: a quarter is split off the end; too short: nothing held out
    small = prepare_sample(many_sentences[:60], tokenizer, samples=96 + 48, seed=2)
    c2, h2 = split_heldout(small, 96, 48)
    assert (c2.n_sequences, h2.n_sequences) == (45, 15)
    tiny = prepare_sample(many_sentences[:20], tokenizer, samples=96 + 48, seed=2)
    assert split_heldout(tiny, 96, 48)[1] is None


def test_one_shot_refit_is_the_ridge_on_the_teachers_activations():
    """The proxy's sub-solve from the full Gram equals LinearRefit fed with the kept columns
    and the teacher's own outputs as target."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 20, generator=gen, dtype=torch.float64).abs()
    W = torch.randn(8, 20, generator=gen, dtype=torch.float64)
    keep = torch.zeros(20, dtype=torch.bool)
    keep[[0, 3, 4, 7, 11, 12, 19]] = True
    one = _OneShot(a.t() @ a, a.sum(0), a.shape[0], W, True, torch.device("cpu"))
    Wn, db = one.fit(keep, 0.01)[:2]
    ref = LinearRefit(int(keep.sum()), 8, torch.device("cpu"), fit_bias=True)
    ref.add(a[:, keep], a @ W.t())
    W2, db2, fb = ref.ridge(W[:, keep], 0.01)
    assert not fb
    assert torch.allclose(Wn.double(), W2.double(), atol=1e-5)
    assert torch.allclose(db.double(), db2.double(), atol=1e-5)


def test_criterion_of_the_teacher(tokenizer, many_sentences):
    """KL of the teacher against itself is 0; a causal LM's criterion is the NLL that
    transformers computes with labels = the inputs."""
    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    ctx = _context(model, many_sentences, tokenizer, flops=0.7, samples=96, holdout=40)
    crit = HeldoutCriterion(ctx)
    assert crit.values([crit.teacher_stream()]) == [pytest.approx(0.0, abs=1e-12)]
    assert crit.kind == "kl"

    lm = tiny_decoder("llama")
    data = token_batch(n=80, width=20)
    ctx = _context(lm, data, None, flops=0.7, samples=40, holdout=40)
    crit = HeldoutCriterion(ctx)
    value = crit.values([crit.teacher_stream()])[0]
    assert crit.kind == "nll"
    nll, n = 0.0, 0
    with torch.no_grad():
        for batch in ctx.heldout.batches(8, "cpu"):
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            out = lm(**batch, labels=labels)
            k = int((labels[:, 1:] != -100).sum())
            nll += float(out.loss) * k
            n += k
    assert value == pytest.approx(nll / n, rel=1e-4)


def test_decoder_search_uses_nll(tokenizer):
    lm = tiny_decoder("qwen2")
    data = token_batch(n=120, width=20)
    r = prune(lm, data, 0.6, progress=False, samples=64, experimental={"search_rows": 40})
    s = r.report["structure"]
    assert s["criterion"] == "nll"
    assert s["chosen"] is not None
    assert all(math.isfinite(row["criterion"]) for row in s["candidates"] if "skipped" not in row)


def test_base_model_uses_the_hidden_state_error(builders, tokenizer, many_sentences):
    model = builders["distilbert"]("base", vocab_size=tokenizer.vocab_size)
    r = _search(model, many_sentences, 0.6, tokenizer, method="flap", heads=False)
    assert r.report["structure"]["criterion"] == "hidden_error"


def test_below_the_attention_floor_only_heads_candidates_run(bert, tokenizer, many_sentences):
    r = _search(bert, many_sentences, 0.3, tokenizer, method="flap", allocation="uniform")
    s = r.report["structure"]
    ffn_only = [row for row in s["candidates"] if not row["structure"]["heads"]]
    assert ffn_only and all("skipped" in row for row in ffn_only)
    assert s["chosen"]["heads"] is True


def test_open_axes():
    from kcm_cuda.pruning.options import PruneOptions

    model = tiny_bert()
    from kcm_cuda.pruning.adapters import get_adapter

    ad = get_adapter(model)
    assert open_axes(PruneOptions(flops=0.6, structure="fixed"), ad, model) == {}
    axes = open_axes(PruneOptions(flops=0.6), ad, model)
    assert len(candidates(axes)) == 18
    axes = open_axes(
        PruneOptions(flops=0.6, heads=True, experimental={"head_split": "zscore"}), ad, model
    )
    assert axes["head_split"] == ("zscore",) and axes["heads"] == (True,)
    assert open_axes(PruneOptions(flops=0.6, method="kwon", labels=[0]), ad, model) == {}


def test_a_model_whose_grams_do_not_fit_runs_the_fixed_rules(
    bert, tokenizer, many_sentences, monkeypatch
):
    """Never an out-of-memory crash in the default: when the Grams would not fit, the fixed
    rules run, with a warning and the reason in the report."""
    from kcm_cuda.pruning import structure

    monkeypatch.setattr(structure, "available_memory", lambda device=None: 1000)
    with pytest.warns(UserWarning, match="structure search skipped"):
        r = _search(bert, many_sentences, 0.6, tokenizer)
    s = r.report["structure"]
    assert s["chosen"] is None and "GiB" in s["not_searched"]
    assert "search_folds" in s["not_searched"]
    fixed = _search(bert, many_sentences, 0.6, tokenizer, structure="fixed")
    for i in r.masks:
        assert torch.equal(r.masks[i], fixed.masks[i])
    from kcm_cuda.pruning.adapters import get_adapter

    # one layer's statistics: 4 fold Grams, their total, a fold-out copy, the refit's copy
    assert structure.layer_bytes(get_adapter(bert), bert, False, 4) == 8 * 7 * 96 * 96
    assert structure.layer_bytes(get_adapter(bert), bert, True, 4) == 8 * 7 * (96 * 96 + 32 * 32)


def test_decoder_without_lm_head_uses_the_hidden_state_error():
    import transformers

    lm = tiny_decoder("llama")
    base = transformers.LlamaModel(lm.config).eval()
    base.load_state_dict(lm.model.state_dict())
    r = prune(
        base,
        token_batch(n=120, width=20),
        0.6,
        progress=False,
        samples=64,
        experimental={"search_rows": 40},
    )
    assert r.report["structure"]["criterion"] == "hidden_error"


def test_heldout_rows_are_capped_in_tokens():
    from kcm_cuda.pruning.context import HELDOUT_TOKENS, MIN_HELDOUT, split_heldout
    from kcm_cuda.pruning.data import prepare_sample

    drawn = prepare_sample(token_batch(n=900, width=24), None, samples=100 + 700, seed=0)
    calib, held = split_heldout(drawn, 100, 700)
    assert calib.n_sequences == 100
    assert held.n_tokens <= HELDOUT_TOKENS < held.n_tokens + 24  # as many rows as fit
    assert not set(held.rows.tolist()) & set(calib.rows.tolist())
    long = prepare_sample(token_batch(n=60, width=2000, vocab_size=50), None, samples=60, seed=0)
    assert split_heldout(long, 40, 20)[1].n_sequences == MIN_HELDOUT  # never fewer rows


def test_a_given_oneshot_mode_is_the_only_refit(bert, tokenizer, many_sentences):
    r = _search(
        bert,
        many_sentences,
        0.6,
        tokenizer,
        experimental={**HELDOUT, "reconstruct_mode": "oneshot"},
    )
    s = r.report["structure"]
    assert s["chosen"]["refit"] == "oneshot" and r.report["reconstruct_mode"] == "oneshot"
    assert not any("criterion_sequential_refit" in row for row in s["candidates"])


def test_one_shot_refit_of_a_whole_layer_is_the_layer_itself():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    W = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    one = _OneShot(a.t() @ a, a.sum(0), 50, W, True, torch.device("cpu"))
    Wn, db, fell_back, e0, e1, yy = one.fit(torch.ones(6, dtype=torch.bool), 0.01)
    assert torch.equal(Wn, W) and not db.any() and not fell_back
    assert e0 == e1 and abs(e0) <= 1e-6 * yy  # zero, up to the quadratic form's rounding


# -- the cross-fitted search (the default) ---------------------------------------------------------
def test_cross_fitted_search_fits_and_judges_every_row(bert, tokenizer, many_sentences):
    r = prune(bert, many_sentences, 0.6, tokenizer=tokenizer, progress=False, samples=96)
    s = r.report["structure"]
    assert s["folds"] == 4 and s["chosen"] is not None
    # no row is held out: the model is fitted on all 96 rows, and the choice judged on them
    assert r.report["data"]["sequences"] == 96 == s["fitted_rows"]
    assert 4 <= s["judged_rows"] <= 96 and s["judged_tokens"] > 0
    assert s["chosen"]["refit"] == "sequential"  # the winner refit on every row
    live = [row for row in s["candidates"] if "skipped" not in row]
    assert all(math.isfinite(row["criterion"]) and row["criterion"] >= 0 for row in live)
    assert all("se_vs_chosen" in row for row in live if row["structure"] != {
        k: v for k, v in s["chosen"].items() if k != "refit"
    } and "same_masks_as" not in row)
    assert s["tie_rule"]["se_units"] == 1.0
    # the tie rule never keeps a candidate more than one SE behind the lowest criterion
    lowest = min(row["criterion"] for row in live)
    for tie in s["tie_rule"]["applied"]:
        assert tie["difference"] <= tie["se"] + 1e-12
    assert s["chosen_criterion"] <= lowest + max(
        [t["difference"] for t in s["tie_rule"]["applied"]] + [0.0]
    ) + 1e-12


def _concat(parts):
    from kcm_cuda.pruning.data import TokenizedSample

    width = max(p.input_ids.shape[1] for p in parts)

    def pad(t):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    tt = None
    if parts[0].token_type_ids is not None:
        tt = torch.cat([pad(p.token_type_ids) for p in parts])
    return TokenizedSample(
        torch.cat([pad(p.input_ids) for p in parts]),
        torch.cat([pad(p.attention_mask) for p in parts]),
        tt,
    )


def test_cross_fitted_criterion_is_each_fold_judged_by_a_model_fitted_without_it(
    bert, tokenizer, many_sentences
):
    """The proxy's cross-fitted value equals, recomputed independently, the KL of each fold's
    judged rows under the one-shot model fitted on the other folds' rows only."""
    from dataclasses import replace

    from kcm_cuda.pruning.structure import (
        Structure,
        candidate_context,
        candidate_selection,
        fold_bounds,
        judged_rows,
        oneshot_student,
        proxy_criteria,
    )

    ctx = _context(bert, many_sentences, tokenizer, flops=0.6, samples=96, holdout=0)
    cctx = candidate_context(ctx, Structure("flap", "uniform", True, "per_mac"))
    sel = candidate_selection(cctx)
    judged = judged_rows(ctx.sample, 4, tokens=600)
    crit = HeldoutCriterion(ctx, judged, n_folds=4)
    value = proxy_criteria(ctx, crit, [sel])[0]
    bounds = fold_bounds(96, 4)
    kl, n = 0.0, 0
    for part in judged:
        f = part.fold
        rest = [ctx.sample.part(bounds[g], bounds[g + 1]) for g in range(4) if g != f]
        model_f, _ = oneshot_student(replace(cctx, sample=_concat(rest)), sel)
        k = part.sample.n_sequences
        kl += _heldout_kl(bert, model_f, part.sample) * k
        n += k
    assert n == crit.rows < 96  # the token cap judged a part of each fold
    assert value == pytest.approx(kl / n, rel=1e-4, abs=1e-8)


def test_judged_rows_fill_the_budget_fold_by_fold():
    from kcm_cuda.pruning.data import prepare_sample
    from kcm_cuda.pruning.structure import fold_bounds, judged_rows

    sample = prepare_sample(token_batch(n=100, width=24), None, samples=100, seed=0)
    # short rows: the budget spreads over the folds in order (the last one in part)
    parts = judged_rows(sample, 4, tokens=1500)
    assert [p.fold for p in parts] == [0, 1, 2, 3]
    assert [p.sample.n_sequences for p in parts[:3]] == [25, 25, 25]
    assert sum(p.sample.n_tokens for p in parts) <= 1500 and parts[3].sample.n_sequences < 25
    # a budget one fold fills: that fold alone (one fold-out refit per candidate and layer)
    parts = judged_rows(sample, 4, tokens=400)
    assert [p.fold for p in parts] == [0] and 0 < parts[0].sample.n_tokens <= 400
    assert fold_bounds(100, 4) == [0, 25, 50, 75, 100]
    assert fold_bounds(7, 3) == [0, 3, 5, 7]


def test_error_curves_from_the_streamed_pass_equal_the_held_grams(bert, tokenizer, many_sentences):
    """allocation='error' from curves computed layer by layer (no Gram kept) gives the masks
    that every layer's kept Gram gives."""
    from kcm_cuda.pruning.activations import collect_activation_stats

    streamed = prune(
        bert, many_sentences, 0.6, tokenizer=tokenizer, progress=False, samples=96,
        method="flap", allocation="error", heads=False,
    )
    from kcm_cuda.pruning import allocation as alloc

    ctx = _context(
        bert, many_sentences, tokenizer, flops=0.6, samples=96, holdout=0,
        method="flap", allocation="error", heads=False,
    )
    keep, curves, centered = ctx.gram_plan()
    assert not keep and curves == ("flap",) and centered
    stats = ctx.activation_stats()
    assert stats.grams is None and stats.from_grams is not None
    held = collect_activation_stats(
        ctx.teacher, ctx.adapter, ctx.sample, batch_size=32, device=torch.device("cpu"),
        progress=False, grams=True,
    )
    from kcm_cuda.pruning.methods.flap import flap_scores

    scores = flap_scores(held, ctx.w2_norms)
    w2 = [ctx.adapter.w2(b).weight for b in ctx.adapter.layers(ctx.teacher)]
    from kcm_cuda.pruning.activations import token_means

    n = held.n_tokens
    counts, ref_curves = alloc.error_allocation(
        scores, held.grams, token_means(held), n, w2, [e / n for e in held.input_sq],
        ctx.k_total, ctx.keep_min, centered=True,
    )
    key = alloc.curve_key("flap", True)
    for layer, ref in enumerate(ref_curves):
        torch.testing.assert_close(stats.from_grams[layer][key], ref, rtol=1e-9, atol=1e-12)
    masks = alloc.masks_from_counts(scores, counts)
    for layer, m in enumerate(masks):
        assert torch.equal(streamed.masks[layer], m)


def test_tie_rule_keeps_the_simpler_structure_within_one_se():
    from kcm_cuda.pruning.structure import Structure, pick

    axes = {
        "method": ("flap", "wanda_sp"),
        "allocation": ("uniform", "global", "error"),
        "heads": (False, True),
        "head_split": ("per_mac", "proportional"),
    }
    gen = torch.Generator().manual_seed(0)
    den = torch.ones(200, dtype=torch.float64)
    base = torch.rand(200, generator=gen, dtype=torch.float64)
    simple = Structure("flap", "uniform", False)
    fancy = Structure("wanda_sp", "error", True, "proportional")
    noise = 0.05 * torch.randn(200, generator=gen, dtype=torch.float64)
    rows = {simple: (base + 0.002 + noise, den), fancy: (base, den)}
    live = [(st, None, None, float(rows[st][0].mean())) for st in (simple, fancy)]
    chosen, info = pick(live, rows, axes, 1.0)
    assert chosen[0] == simple and info["kept"] == simple.as_dict()
    assert 0 < info["difference"] <= info["se"]
    # no tie rule: the lowest criterion
    assert pick(live, rows, axes, 0.0)[0][0] == fancy
    # a clear difference (many SEs): the lower criterion wins
    rows[simple] = (base + 0.05 + 0.001 * noise, den)
    live = [(st, None, None, float(rows[st][0].mean())) for st in (simple, fancy)]
    chosen, info = pick(live, rows, axes, 1.0)
    assert chosen[0] == fancy and info is None


def test_search_refuses_a_criterion_that_is_never_finite(tokenizer, many_sentences):
    """Logits that overflow (a finite but huge classifier) make every candidate's KL NaN:
    one clear error, never a model chosen on NaN."""
    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    with torch.no_grad():
        model.classifier.weight.fill_(3e38)
    with pytest.raises(ValueError, match="not finite for any candidate"):
        prune(model, many_sentences, 0.6, tokenizer=tokenizer, progress=False, samples=96)
