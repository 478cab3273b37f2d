"""A newcomer's first hour: the fine-tune is a standard Hugging Face classifier that
kcm-prune prunes into a usable classifier; progress and truthful convergence; a cut-short
fine-tune is never cached; labelled methods get the train split; the report says what ran; the
cpu grid is sized up front; nothing measured → exit status 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kcm_cuda.evaluation import datasets as D
from kcm_cuda.evaluation import finetune as F
from kcm_cuda.evaluation import grid as G
from kcm_cuda.evaluation import scoring as S
from kcm_cuda.evaluation.cli import (
    CPU_GRID_BUDGETS,
    CPU_GRID_METHODS,
    build_parser,
    config_from_args,
    main,
    plan_cpu_grid,
)
from kcm_cuda.evaluation.finetune import FinetuneSettings
from kcm_cuda.evaluation.grid import GridConfig
from kcm_cuda.evaluation.report import format_markdown, write_report
from kcm_cuda.evaluation.runner import run_grid


def _cfg(tiny_model_dir, tmp_path, **kw):
    base = dict(
        model=str(tiny_model_dir),
        budgets=(0.9,),
        methods=("random",),
        scales=(False,),
        seeds=1,
        samples=20,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        finetune=FinetuneSettings(mode="head"),
    )
    base.update(kw)
    return GridConfig(**base)


def test_cached_finetune_is_a_standard_classifier_that_kcm_prune_prunes(
    tiny_model_dir, tiny_tsv, tmp_path, capsys
):
    """The README steps: prune the fine-tuned model with kcm-prune, load it, classify."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kcm_cuda.cli import main as prune_main
    from kcm_cuda.pruning import load_pruned

    task = D.task_from_file(tiny_tsv)
    report = run_grid(
        _cfg(tiny_model_dir, tmp_path, finetune=FinetuneSettings(mode="full", epochs=2)),
        task=task,
        log=lambda *_: None,
    )
    cdir = report["finetune"]["cache_path"]
    model = AutoModelForSequenceClassification.from_pretrained(cdir).eval()
    tok = AutoTokenizer.from_pretrained(cdir)
    assert len(tok) > 5  # the real vocabulary, not a placeholder
    # the standard loader reproduces the evaluation's dense accuracy exactly
    enc = tok([e.text for e in task.test], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).numpy()
    acc = float(np.mean(pred == np.array([e.label for e in task.test])))
    assert acc == pytest.approx(report["dense"]["accuracy"], abs=1e-9)

    unlabeled = tmp_path / "u.txt"
    unlabeled.write_text("\n".join(t for t in task.pool) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    argv = [cdir, "--data", str(unlabeled), "--flops", "0.9", "--output", str(out), "--quiet"]
    assert prune_main([*argv, "--samples", "40", "--max-length", "32"]) == 0
    pruned = load_pruned(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = pruned(**tok2(["the film was really great ."], return_tensors="pt")).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    rep = json.loads((out / "kcm_report.json").read_text())
    assert rep["flops"]["ratio"] <= 0.9
    capsys.readouterr()


def test_finetune_progress_has_steps_loss_and_eta(tiny_model_dir, tiny_tsv, tmp_path, monkeypatch):
    monkeypatch.setattr(F, "PROGRESS_EVERY_S", 0.0)
    lines: list[str] = []
    task = D.task_from_file(tiny_tsv)
    run_grid(
        _cfg(tiny_model_dir, tmp_path, finetune=FinetuneSettings(mode="full", epochs=2)),
        task=task,
        log=lines.append,
    )
    steps = [x for x in lines if " step " in x]
    assert steps and all("loss" in x and "ETA" in x for x in steps)
    assert any(x.strip().startswith("epoch 2/2 step") for x in steps)
    assert any("pruning ..." in x for x in lines)  # a long prune step announces itself


def test_cut_short_finetune_is_not_cached(tiny_model_dir, tiny_tsv, tmp_path):
    task = D.task_from_file(tiny_tsv)
    lines: list[str] = []
    cfg = _cfg(
        tiny_model_dir,
        tmp_path,
        finetune=FinetuneSettings(mode="full", epochs=3, time_budget_s=1e-9),
    )
    r1 = run_grid(cfg, task=task, log=lines.append)
    ft = r1["finetune"]
    assert ft["stopped_by_time_budget"] and "cache_path" not in ft
    assert not (tmp_path / "cache" / "finetuned" / ft["key"]).exists()
    text = "\n".join(lines)
    assert "NOT cached" in text and "did not converge" not in text
    assert ft["converged"] is None and "1 of 3 epoch(s) run, cut short" in ft["convergence"]
    assert "cut short by the time budget: not cached" in format_markdown(r1)
    r2 = run_grid(cfg, task=task, log=lambda *_: None)
    assert r2["finetune"]["cached"] is False  # trained again, not reused


@pytest.mark.parametrize(
    ("losses", "best", "cut", "converged", "says"),
    [
        ([0.6], 1, False, None, "convergence unknown"),
        ([0.6, 0.5], 2, False, False, "still falling"),
        ([0.6, 0.595], 2, False, True, "< 2%"),
        ([0.6, 0.5, 0.55], 2, False, True, "stopped improving after epoch 2"),
        ([0.6], 1, True, None, "cut short by the time budget"),
    ],
)
def test_convergence_message_says_what_happened(losses, best, cut, converged, says):
    curve = [{"dev_loss": x} for x in losses]
    got, why = F._convergence(curve, best, 3, cut)
    assert got is converged and says in why and f"{len(losses)} of 3 epoch(s) run" in why


def test_labelled_method_gets_the_train_split_and_is_marked(
    tiny_model_dir, tiny_tsv, tmp_path, monkeypatch
):
    from kcm_cuda.pruning import prune

    task = D.task_from_file(tiny_tsv)
    train = [e.text for e in task.train]
    train_labels = [e.label for e in task.train]
    pool, test = set(task.pool), {e.text for e in task.test}
    calls = []

    def fake(model, data, flops, *, method, labels=None, **kw):
        calls.append((method, data, labels))
        res = prune(model, data, flops, method="random", **kw)
        res.report["uses_labels"] = labels is not None
        return res

    monkeypatch.setattr(G, "_registry", lambda: None)  # the fallback set {"kwon"}
    monkeypatch.setattr(G, "known_methods", lambda: ("kcm", "random", "kwon"))
    cfg = _cfg(tiny_model_dir, tmp_path, methods=("kwon", "random"), seeds=2)
    report = run_grid(cfg, task=task, prune_fn=fake, log=lambda *_: None)
    kwon = [c for c in calls if c[0] == "kwon"]
    rand = [c for c in calls if c[0] == "random"]
    assert len(kwon) == 2 and len(rand) == 2
    for _, data, labels in kwon:
        assert data == train and labels == train_labels
        assert not set(data) & test and not set(data) & pool
    for _, data, labels in rand:
        assert labels is None and set(data) <= pool
    rows = {r["method"]: r for r in report["summary"]}
    assert rows["kwon"]["uses_labels"] and not rows["random"]["uses_labels"]
    assert report["ran"]["uses_labels"] == ["kwon"]
    md = format_markdown(write_report(report, tmp_path / "out") and report)
    assert "`kwon` (uses labels)" in md and "methods that use labels: kwon" in md


def test_report_shows_the_reconstruction_that_ran_and_what_ran(tiny_model_dir, tiny_tsv, tmp_path):
    from kcm_cuda.pruning import prune

    def fake(model, data, flops, **kw):
        res = prune(model, data, flops, **kw)
        if kw.get("scale"):
            res.report["reconstruct"] = "ridge"
        return res

    task = D.task_from_file(tiny_tsv)
    cfg = _cfg(tiny_model_dir, tmp_path, methods=("random", "d2"), scales=(False, True), seeds=2)
    report = run_grid(cfg, task=task, prune_fn=fake, log=lambda *_: None)
    assert report["ran"]["reconstructions"] == ["none", "ridge"]
    assert report["ran"]["seeds_per_cell"] == [2] and report["ran"]["runs"] == 8
    md = format_markdown(report)
    assert "reconstruction that ran: none, ridge" in md and "| reconstruction |" in md
    assert "| `d2` | ridge |" in md and "2 seed(s) per cell" in md and "Scale ['off']" not in md
    # a run cut by the time limit: the header gives what ran against the plan
    short = run_grid(
        _cfg(tiny_model_dir, tmp_path, seeds=3, time_limit_s=1e-9), task=task, log=lambda *_: None
    )
    assert "no run finished (planned 3 seed(s))" in format_markdown(short)


def _row(method, mean, correct, budget=0.7, uses_labels=False):
    return {
        "budget": budget,
        "method": method,
        "base_method": method,
        "scale": False,
        "seed": 0,
        "uses_labels": uses_labels,
        "metrics": {"accuracy": mean},
        "prune_seconds": 1.0,
        "mask_digest": method,
        "_correct": np.array(correct, dtype=bool),
    }


def test_paired_difference_against_the_best_label_free_peer():
    n = 200
    rng = np.random.default_rng(0)
    truth = {m: rng.random(n) < p for m, p in [("random", 0.6), ("d2", 0.8), ("kcm", 0.9)]}
    truth["kwon"] = rng.random(n) < 0.95
    runs = [_row(m, float(c.mean()), c, uses_labels=m == "kwon") for m, c in truth.items()]
    rows = S.summarise(runs, {"accuracy": 0.9}, ["accuracy"], default="kcm")
    by = {r["method"]: r for r in rows}
    # peers: label-free and not the default (kcm) → random, d2; the best is d2 (kwon excluded)
    assert all(r["best_peer"] == "d2" for r in rows)
    assert "best label-free peer" not in by["d2"].get("paired_accuracy_diff", {})
    for m in ("kcm", "random", "kwon"):
        d = by[m]["paired_accuracy_diff"]["best label-free peer"]
        diff = truth[m].astype(float) - truth["d2"].astype(float)
        assert d["diff"] == pytest.approx(diff.mean())
        assert d["stderr"] == pytest.approx(diff.std(ddof=1) / np.sqrt(n))
        assert d["peer"] == "d2"


def test_cpu_grid_is_sized_up_front():
    seeds, plan = plan_cpu_grid(CPU_GRID_BUDGETS, CPU_GRID_METHODS, (False,))
    assert 1 <= seeds <= 3 and f"x {seeds} seed(s)" in plan and "all of them run" in plan
    many = tuple(f"kcm:merge=m{i}" for i in range(12))
    s_many, _ = plan_cpu_grid(CPU_GRID_BUDGETS, many + CPU_GRID_METHODS, (False,))
    s_one, _ = plan_cpu_grid((0.7,), ("random",), (False,))
    assert s_many <= seeds <= s_one == 3
    assert s_many >= 1  # never zero: a plan always runs something
    args = build_parser().parse_args(["--profile", "cpu", "--device", "cpu"])
    cfg = config_from_args(args)
    assert cfg.seeds == seeds and cfg.plan == plan and cfg.time_limit_s is None
    assert cfg.budgets == CPU_GRID_BUDGETS and tuple(cfg.methods) == CPU_GRID_METHODS
    assert cfg.finetune.time_budget_s is None
    args = build_parser().parse_args(["--profile", "cpu", "--device", "cpu", "--seeds", "5"])
    assert config_from_args(args).seeds == 5 and config_from_args(args).plan is None


def test_nothing_measured_exits_non_zero(tiny_model_dir, tiny_tsv, tmp_path, capsys):
    argv = [
        "--data", str(tiny_tsv), "--model", str(tiny_model_dir), "--budgets", "0.9",
        "--methods", "random", "--seeds", "2", "--samples", "20", "--finetune", "head",
        "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out"),
        "--device", "cpu",
    ]  # fmt: skip
    assert main([*argv, "--time-limit", "1e-9"]) == 1
    err = capsys.readouterr().err
    assert "no pruned model was measured" in err and "time limit" in err
    assert (tmp_path / "out" / "report.md").is_file()
    assert main(argv) == 0


def test_best_peer_excludes_only_the_default_configuration():
    """With default flap + ridge, FLAP as published (flap + bias) is a peer, not the default."""
    n = 200
    rng = np.random.default_rng(1)
    truth = {
        "flap:reconstruct=ridge": rng.random(n) < 0.9,
        "flap:reconstruct=bias": rng.random(n) < 0.85,
        "random": rng.random(n) < 0.6,
    }
    runs = []
    for m, c in truth.items():
        row = _row(m, float(c.mean()), c)
        row["base_method"] = m.split(":")[0]
        if ":" in m:
            row["options"] = {"reconstruct": m.split("=")[1]}
            row["reconstruct"] = m.split("=")[1]
        runs.append(row)
    rows = S.summarise(runs, {"accuracy": 0.9}, ["accuracy"], default="flap")
    by = {r["method"]: r for r in rows}
    assert G.default_reconstruction("flap") == "ridge"
    assert all(r["best_peer"] == "flap:reconstruct=bias" for r in rows)
    d = by["flap:reconstruct=ridge"]["paired_accuracy_diff"]["best label-free peer"]
    diff = truth["flap:reconstruct=ridge"].astype(float) - truth["flap:reconstruct=bias"]
    assert d["diff"] == pytest.approx(diff.mean())
