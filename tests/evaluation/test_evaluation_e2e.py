"""A miniature of the whole evaluation: tiny random BERT, a few dozen sentences, every method,
Scale on and off, two seeds; checks the report's structure, seeds, the pool/test separation
and the fine-tune cache."""

import json

import pytest

from kcm_cuda.evaluation import datasets as D
from kcm_cuda.evaluation.cli import main
from kcm_cuda.evaluation.finetune import FinetuneSettings
from kcm_cuda.evaluation.grid import GridConfig, parse_method
from kcm_cuda.evaluation.report import write_report
from kcm_cuda.evaluation.runner import run_grid

METHODS = ["kcm", "d2", "r2", "magnitude", "random"]


def _args(tiny_model_dir, tiny_tsv, tmp_path, *extra):
    return [
        "--data",
        str(tiny_tsv),
        "--model",
        str(tiny_model_dir),
        "--budgets",
        "0.9,0.8",
        "--methods",
        *METHODS,
        "--scale",
        "both",
        "--seeds",
        "2",
        "--samples",
        "20",
        "--finetune",
        "head",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        *extra,
    ]


def test_cli_miniature_end_to_end(tiny_model_dir, tiny_tsv, tmp_path, capsys):
    assert main(_args(tiny_model_dir, tiny_tsv, tmp_path, "--save-predictions")) == 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    # structure
    for key in (
        "task",
        "model",
        "finetune",
        "dense",
        "config",
        "environment",
        "runs",
        "summary",
        "timings_s",
    ):
        assert key in report
    assert set(report["task"]["sizes"]) == {"train", "dev", "pool", "test"}
    assert report["environment"]["versions"]["torch"]
    assert report["finetune"]["mode"] == "head" and report["finetune"]["cached"] is False
    assert report["finetune"]["converged"] is True
    for k in ("accuracy", "roc_auc", "positive_rate"):
        assert 0.0 <= report["dense"][k] <= 1.0
    # every (budget, method, scale) cell ran once per seed
    runs = report["runs"]
    assert len(runs) == 2 * len(METHODS) * 2 * 2
    cells = {}
    for r in runs:
        cells.setdefault((r["budget"], r["method"], r["scale"]), []).append(r["seed"])
        assert r["flops_ratio"] <= r["budget"] + 1e-9
        assert set(r["metrics"]) >= {"accuracy", "roc_auc", "positive_rate"}
    assert len(cells) == 2 * len(METHODS) * 2
    assert all(sorted(s) == [0, 1] for s in cells.values())
    rows = report["summary"]
    assert len(rows) == len(cells)
    for row in rows:
        assert row["n_seeds"] == 2
        assert set(row["accuracy"]) >= {"mean", "std", "stderr", "n", "drop_vs_dense"}
        paired = row["paired_accuracy_diff"]
        if row["method"] == "random" and not row["scale"]:
            assert "random" not in paired
        else:
            assert set(paired["random"]) == {"diff", "stderr"}
        assert ("no Scale" in paired) == row["scale"]
    assert all("_correct" not in r for r in runs)  # internal arrays never reach the JSON
    # markdown: dense and random side by side, AUC beside accuracy, per-budget tables
    md = (out / "report.md").read_text()
    assert "**dense**" in md and "`random`" in md and "ROC-AUC" in md and "pos. rate" in md
    assert "## FLOPs budget c = 0.9" in md and "## FLOPs budget c = 0.8" in md
    assert (out / "accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # per-run test logits for later paired analyses
    import numpy as np

    preds = np.load(out / "predictions.npz")
    assert preds["dense"].shape == (report["task"]["sizes"]["test"], 2)
    assert len([k for k in preds.files if k.startswith("run_")]) == len(runs)
    from kcm_cuda.evaluation.analysis import compare

    paired = compare(out, "d2", n_boot=20)
    assert len(paired) == len(cells) - 2  # every cell but d2 (Scale off) at the two budgets
    for row in paired:
        assert {"accuracy_diff", "accuracy_stderr", "auc_diff", "auc_stderr"} <= set(row)
    printed = capsys.readouterr().out
    assert "report:" in printed and "report.md" in printed

    # second run: the fine-tuned model comes from the cache and scores the same
    args = _args(tiny_model_dir, tiny_tsv, tmp_path, "--seeds", "1", "--scale", "off")
    args[args.index("--methods") + 1 : args.index("--scale")] = ["random"]
    assert main(args) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["finetune"]["cached"] is True
    assert again["dense"] == report["dense"]
    assert len(again["runs"]) == 2
    assert main([*args, "--no-cache"]) == 0
    assert json.loads((out / "report.json").read_text())["finetune"]["cached"] is False


def test_pruner_sees_only_unlabeled_pool_texts(tiny_model_dir, tiny_tsv, tmp_path):
    from kcm_cuda.pruning import prune

    task = D.task_from_file(tiny_tsv)
    test_texts = {e.text for e in task.test}
    calls = []

    def spy(model, data, flops, **kw):
        calls.append((data, flops, kw["seed"], kw["method"]))
        return prune(model, data, flops, **kw)

    cfg = GridConfig(
        model=str(tiny_model_dir),
        budgets=(0.85,),
        methods=("kcm", "random"),
        scales=(False,),
        seeds=3,
        samples=20,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        finetune=FinetuneSettings(mode="head"),
    )
    report = run_grid(cfg, task=task, prune_fn=spy, log=lambda *_: None)
    assert len(calls) == 6
    assert sorted(c[2] for c in calls if c[3] == "kcm") == [0, 1, 2]
    for data, flops, _, _ in calls:
        assert isinstance(data, list) and all(isinstance(x, str) for x in data)
        assert not set(data) & test_texts
        assert flops == 0.85
    assert len(report["runs"]) == 6


def test_the_default_row_calls_prune_as_a_user_does(tiny_model_dir, tiny_tsv, tmp_path):
    """The grid's "default" row passes no method=, scale= or reconstruct=: prune() runs its
    own default (the structure search with the ridge refit), whatever --scale says."""
    from kcm_cuda.pruning import prune

    task = D.task_from_file(tiny_tsv)
    calls = []

    def spy(model, data, flops, **kw):
        calls.append(dict(kw))
        return prune(model, data, flops, **kw)

    cfg = GridConfig(
        model=str(tiny_model_dir),
        budgets=(0.85,),
        methods=("default", "flap:reconstruct=ridge,structure=fixed"),
        scales=(False,),
        seeds=1,
        samples=20,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        finetune=FinetuneSettings(mode="head"),
    )
    report = run_grid(cfg, task=task, prune_fn=spy, log=lambda *_: None)
    default = calls[0]
    assert default["method"] is None
    assert "scale" not in default and "reconstruct" not in default
    assert calls[1]["method"] == "flap" and calls[1]["structure"] == "fixed"
    runs = {r["method"]: r for r in report["runs"]}
    assert runs["default"]["reconstruct"] == "ridge"
    assert report["config"]["default_method"] == "default"


def test_full_finetune_mode_runs_and_is_cached_separately(tiny_model_dir, tiny_tsv, tmp_path):
    task = D.task_from_file(tiny_tsv)
    base = dict(
        model=str(tiny_model_dir),
        budgets=(0.9,),
        methods=("random",),
        scales=(False,),
        seeds=1,
        samples=20,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
    )
    r1 = run_grid(
        GridConfig(**base, finetune=FinetuneSettings(mode="full", epochs=1)),
        task=task,
        log=lambda *_: None,
    )
    assert r1["finetune"]["mode"] == "full" and len(r1["finetune"]["curve"]) == 1
    r2 = run_grid(
        GridConfig(**base, finetune=FinetuneSettings(mode="head")), task=task, log=lambda *_: None
    )
    assert r2["finetune"]["mode"] == "head" and r2["finetune"]["cached"] is False
    assert r1["finetune"]["key"] != r2["finetune"]["key"]
    r3 = run_grid(
        GridConfig(**base, finetune=FinetuneSettings(mode="full", epochs=1)),
        task=task,
        log=lambda *_: None,
    )
    assert r3["finetune"]["cached"] is True and r3["dense"] == r1["dense"]


def test_finetune_time_budget_stops_between_epochs(tiny_model_dir, tiny_tsv, tmp_path):
    task = D.task_from_file(tiny_tsv)
    cfg = GridConfig(
        model=str(tiny_model_dir),
        budgets=(0.9,),
        methods=("random",),
        scales=(False,),
        seeds=1,
        samples=20,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        finetune=FinetuneSettings(mode="full", epochs=3, time_budget_s=1e-9),
    )
    ft = run_grid(cfg, task=task, log=lambda *_: None)["finetune"]
    assert ft["stopped_by_time_budget"] is True
    assert ft["epochs_run"] == 1 and len(ft["curve"]) == 1


def test_time_limit_stops_cleanly(tiny_model_dir, tiny_tsv, tmp_path):
    task = D.task_from_file(tiny_tsv)
    cfg = GridConfig(
        model=str(tiny_model_dir),
        budgets=(0.9,),
        methods=("random",),
        scales=(False,),
        seeds=2,
        samples=20,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        time_limit_s=1e-9,
        finetune=FinetuneSettings(mode="head"),
    )
    report = run_grid(cfg, task=task, log=lambda *_: None)
    assert report["stopped_early"] and "time limit" in report["stopped_early"]
    paths = write_report(report, tmp_path / "out")
    assert "Stopped early" in paths["md"].read_text()


def test_a_budget_the_options_cannot_reach_is_skipped_not_fatal(
    tiny_model_dir, tiny_tsv, tmp_path
):
    """FFN-only pruning cannot go below the attention floor: that cell is reported as not
    run (once, not retried for every seed) and the rest of the grid is measured."""
    from kcm_cuda.pruning import prune

    task = D.task_from_file(tiny_tsv)
    calls = []

    def spy(model, data, flops, **kw):
        calls.append(flops)
        return prune(model, data, flops, **kw)

    cfg = GridConfig(
        model=str(tiny_model_dir),
        budgets=(0.9, 0.05),
        methods=("random",),
        scales=(False,),
        seeds=2,
        samples=20,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        finetune=FinetuneSettings(mode="head"),
    )
    report = run_grid(cfg, task=task, prune_fn=spy, log=lambda *_: None)
    assert sorted(calls) == [0.05, 0.9, 0.9]
    assert [r["budget"] for r in report["runs"]] == [0.9, 0.9]
    (nr,) = report["not_run"]
    assert nr["budget"] == 0.05 and nr["method"] == "random" and "attention floor" in nr["reason"]
    md = write_report(report, tmp_path / "out")["md"].read_text()
    assert "Not run" in md and "attention floor" in md


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budgets", "0.8,1.5"], "outside (0, 1]"),
        (["--budgets", "0"], "outside (0, 1]"),
        (["--budgets", "abc"], "not a number"),
    ],
)
def test_cli_rejects_bad_budgets(tiny_model_dir, tiny_tsv, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(_args(tiny_model_dir, tiny_tsv, tmp_path, *extra))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "kcm", "nope"], "unknown method 'nope'"),
        (["--methods", "kcm:merge"], "not key=value"),
        (["--finetune", "partial"], "finetune mode"),
        (["--seeds", "0"], "seeds must be"),
        (["--label-column", "stars"], "missing column(s) ['stars']"),
    ],
)
def test_cli_bad_input_is_a_clear_error(tiny_model_dir, tiny_tsv, tmp_path, capsys, extra, message):
    assert main(_args(tiny_model_dir, tiny_tsv, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("kcm-eval: error:") and message in err


def test_cli_unknown_task(tmp_path, capsys):
    assert main(["--task", "nope", "--cache-dir", str(tmp_path), "--device", "cpu"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_budget_below_attention_floor_is_reported(tiny_model_dir, tiny_tsv, tmp_path, capsys):
    assert main(_args(tiny_model_dir, tiny_tsv, tmp_path, "--budgets", "0.05")) == 1
    err = capsys.readouterr().err
    assert "no pruned model was measured" in err and "attention floor" in err


def test_parse_method_variants():
    m = parse_method("kcm:merge=weighted,r2_weight=0.25")
    assert m.name == "kcm" and dict(m.options) == {"merge": "weighted", "r2_weight": 0.25}
    assert m.label == "kcm:merge=weighted,r2_weight=0.25"
    with pytest.raises(ValueError):
        GridConfig(budgets=(1.2,)).validate()


def test_regression_task_reports_correlations(tiny_model_dir, tmp_path, sentences):
    p = tmp_path / "rated.tsv"
    rows = ["sentence\trating"] + [
        f"{t}\t{(2.0 if y else -2.0) + 0.1 * (int(i) % 7)}" for i, t, y in sentences(150)
    ]
    p.write_text("\n".join(rows) + "\n")
    args = [
        "--data",
        str(p),
        "--label-column",
        "rating",
        "--regression",
        "--model",
        str(tiny_model_dir),
        "--budgets",
        "0.9",
        "--methods",
        "random",
        "d2",
        "--scale",
        "off",
        "--seeds",
        "1",
        "--samples",
        "20",
        "--finetune",
        "head",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["task"]["kind"] == "regression"
    assert report["metrics"] == ["pearson", "spearman", "mse"]
    assert -1.0 <= report["dense"]["spearman"] <= 1.0
    assert "Spearman" in (tmp_path / "out" / "report.md").read_text()


def test_interrupted_grid_resumes_without_redoing_runs(tiny_model_dir, tiny_tsv, tmp_path):
    from kcm_cuda.pruning import prune

    task = D.task_from_file(tiny_tsv)
    calls = []

    def flaky(model, data, flops, **kw):
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        calls.append((flops, kw["method"], kw["seed"]))
        return prune(model, data, flops, **kw)

    base = dict(
        model=str(tiny_model_dir),
        budgets=(0.9, 0.8),
        methods=("random", "d2"),
        scales=(False,),
        seeds=2,
        samples=20,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        output=str(tmp_path / "out"),
        finetune=FinetuneSettings(mode="head"),
    )
    with pytest.raises(RuntimeError, match="interrupted"):
        run_grid(GridConfig(**base), task=task, prune_fn=flaky, log=lambda *_: None)
    partial = tmp_path / "out" / "runs.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 3

    more = []

    def counting(model, data, flops, **kw):
        more.append((flops, kw["method"], kw["seed"]))
        return prune(model, data, flops, **kw)

    report = run_grid(
        GridConfig(**base, resume=True), task=task, prune_fn=counting, log=lambda *_: None
    )
    assert len(more) == 8 - 3 and not set(more) & set(calls)
    assert len(report["runs"]) == 8
    assert sum(bool(r.get("resumed")) for r in report["runs"]) == 3
    assert not partial.exists()


def test_methods_help_names_every_registered_method():
    from kcm_cuda.evaluation.cli import build_parser
    from kcm_cuda.pruning.methods import METHODS

    text = " ".join(build_parser().format_help().split())
    for name in METHODS:
        assert f" {name} " in text or f" {name} (" in text, name
    assert "kwon uses labels" in text
