"""Fine-tune the dense model once per (model, task, seed, settings) and cache it.

Modes
    full   every weight trained (AdamW, linear warm-up/decay, dev loss checked every epoch, best
           epoch kept, early stop when the dev loss stops improving). The default: on the
           2-core CPU, 2 epochs of all-MiniLM-L6-v2 on VADER take ~3 minutes when the machine is
           idle (progress with the loss and an ETA is logged inside every epoch).
    top:K  the top K encoder layers + head trained, the rest frozen (cheaper backward).
    head   encoder frozen; the head's last linear layer (on BERT's pooler output) fitted to
           convergence
           (L-BFGS for classification, closed-form ridge for regression), the L2 strength
           chosen on dev. One forward pass over train: the fast option for slow machines or
           big models. A convex fit at its optimum is converged and, for logistic regression,
           calibrated by construction (what shared/EVALUATION.md §1 asks of the dense model),
           but a frozen encoder is a weaker model.
    auto   full.

The classifier is the model's standard ``AutoModelForSequenceClassification`` (BERT: pooler on
[CLS] + linear head). Up to FINETUNE_VERSION 1 it was mean pooling + a linear head outside the
model, which no standard loader could rebuild; the accuracies of the two differ (README gives
the numbers measured with each).

The cache lives in <cache_dir>/finetuned/<key>/: a standard Hugging Face directory
(config.json, model.safetensors, the tokenizer files) that
``AutoModelForSequenceClassification.from_pretrained`` and ``kcm-prune`` load as it is, plus
kcm_finetune.json (settings, dev metrics, learning curve). The key hashes the model
fingerprint, the task's labelled splits, the mode, the seed and every hyper-parameter. A
fine-tune cut short by the time budget is never cached.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kcm_cuda.evaluation.datasets import TaskData, default_cache_dir
from kcm_cuda.evaluation.metrics import classification_metrics, regression_metrics
from kcm_cuda.evaluation.modeling import (
    Batches,
    SentenceClassifier,
    final_linear,
    head_features,
    load_classifier,
    model_fingerprint,
    predict,
    tokenize,
)

__all__ = ["FINETUNE_MODES", "FinetuneSettings", "finetune", "resolve_mode"]

FINETUNE_VERSION = 2  # bump when the training code changes what it produces (2: HF task head)
META_FILE = "kcm_finetune.json"
# progress inside an epoch: a line at the first step, then at most every PROGRESS_EVERY_S
PROGRESS_EVERY_S = 30.0
FINETUNE_MODES = ("auto", "full", "head", "top:K")


@dataclass(frozen=True)
class FinetuneSettings:
    mode: str = "auto"
    seed: int = 0
    epochs: int = 4
    lr: float = 5e-5
    batch_size: int = 32
    max_length: int = 128
    weight_decay: float = 0.01
    warmup: float = 0.1
    patience: int = 1
    head_l2_grid: tuple[float, ...] = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)
    # wall-clock guard (full / top modes): no epoch is started that would end past it. Not
    # part of the cache key; the epochs actually run are recorded in the cached meta.
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        resolve_mode(self.mode, "cpu")  # validates
        for name in ("epochs", "batch_size", "max_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def resolve_mode(mode: str, device: torch.device | str) -> str:
    if not isinstance(mode, str):
        raise TypeError(f"finetune mode must be a string, got {type(mode).__name__}")
    if mode == "auto":
        return "full"
    if mode in ("full", "head"):
        return mode
    if mode.startswith("top:"):
        try:
            k = int(mode[4:])
        except ValueError:
            k = 0
        if k >= 1:
            return mode
    raise ValueError(f"finetune mode must be one of {FINETUNE_MODES} (K >= 1), got {mode!r}")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _labels_tensor(task: TaskData, split) -> torch.Tensor:
    if task.kind == "regression":
        return torch.tensor([float(e.label) for e in split], dtype=torch.float32)
    return torch.tensor([int(e.label) for e in split], dtype=torch.long)


def _loss(task: TaskData, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task.kind == "regression":
        return nn.functional.mse_loss(logits.squeeze(-1), y.to(logits.dtype))
    return nn.functional.cross_entropy(logits, y)


def split_metrics(task: TaskData, logits: np.ndarray, split) -> dict[str, float]:
    """Metrics of ``logits`` on a labelled split (classification or regression)."""
    if task.kind == "regression":
        return regression_metrics([float(e.label) for e in split], logits[:, 0])
    return classification_metrics([int(e.label) for e in split], logits)


# --- head mode ---------------------------------------------------------------------------------


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float, init=None):
    """Multinomial logistic regression, mean cross-entropy + l2/2·||W||², by L-BFGS
    (warm-started from ``init`` = (w, b) when given)."""
    x = x.double()
    if init is None:
        w = torch.zeros(x.shape[1], num_labels, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    else:
        w = init[0].double().clone().requires_grad_(True)
        b = init[1].double().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=1000,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    grad = float(torch.cat([w.grad.flatten(), b.grad.flatten()]).abs().max())
    return w.detach().float(), b.detach().float(), grad


def _fit_ridge(x: torch.Tensor, y: torch.Tensor, l2: float):
    x = x.double()
    mu = x.mean(0)
    ym = y.double().mean()
    xc = x - mu
    a = xc.T @ xc / x.shape[0] + l2 * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(a, xc.T @ (y.double() - ym) / x.shape[0])
    b = ym - mu @ w
    return w[:, None].float(), b.reshape(1).float(), 0.0


def _train_head(task, clf: SentenceClassifier, train_b: Batches, dev_b: Batches, settings, device):
    t0 = time.perf_counter()
    ftr = head_features(clf, train_b, device)
    fdev = head_features(clf, dev_b, device)
    feature_s = time.perf_counter() - t0
    ytr = _labels_tensor(task, task.train)
    ydev = _labels_tensor(task, task.dev)
    best = None
    tried = []
    prev = None
    for l2 in sorted(settings.head_l2_grid, reverse=True):  # strong → weak, warm-started
        if task.kind == "regression":
            w, b, grad = _fit_ridge(ftr, ytr, l2)
        else:
            w, b, grad = _fit_logistic(ftr, ytr, task.num_labels, l2, init=prev)
            prev = (w, b)
        with torch.no_grad():
            dev_loss = float(_loss(task, fdev @ w + b, ydev))
            train_loss = float(_loss(task, ftr @ w + b, ytr))
        tried.append({"l2": l2, "train_loss": train_loss, "dev_loss": dev_loss, "grad_inf": grad})
        if best is None or dev_loss < best[0]:
            best = (dev_loss, l2, w, b, grad)
    assert best is not None
    _, l2, w, b, grad = best
    model = clf
    lin = final_linear(model.model)
    with torch.no_grad():
        lin.weight.copy_(w.T)
        lin.bias.copy_(b)
    info = {
        "head_l2": l2,
        "head_fits": tried,
        "feature_seconds": feature_s,
        "converged": bool(grad < 1e-4),
        "convergence": f"L-BFGS to |grad|_inf = {grad:.2e}"
        if task.kind != "regression"
        else "closed-form ridge",
    }
    return model, info


# --- full / top mode ---------------------------------------------------------------------------


def _train_batches(enc_ids, enc_tt, labels, batch_size, generator, pad_id):
    """Shuffled batches, bucketed by length within chunks of 50 batches (less padding)."""
    n = len(enc_ids)
    perm = torch.randperm(n, generator=generator).tolist()
    chunk = batch_size * 50
    batches = []
    for s in range(0, n, chunk):
        part = sorted(perm[s : s + chunk], key=lambda j: len(enc_ids[j]))
        for t in range(0, len(part), batch_size):
            batches.append(part[t : t + batch_size])
    order = torch.randperm(len(batches), generator=generator).tolist()
    for bi in order:
        idx = batches[bi]
        width = max(len(enc_ids[j]) for j in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        tt = torch.zeros(len(idx), width, dtype=torch.long)
        for r, j in enumerate(idx):
            m = len(enc_ids[j])
            ids[r, :m] = torch.tensor(enc_ids[j])
            mask[r, :m] = 1
            if enc_tt is not None:
                tt[r, :m] = torch.tensor(enc_tt[j])
        yield {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}, labels[idx]


def _encoder_layers(encoder: nn.Module):
    if hasattr(encoder, "base_model") and encoder.base_model is not encoder:
        encoder = encoder.base_model
    if hasattr(encoder, "encoder") and hasattr(encoder.encoder, "layer"):
        return encoder.encoder.layer
    if hasattr(encoder, "transformer") and hasattr(encoder.transformer, "layer"):
        return encoder.transformer.layer
    raise ValueError("cannot find the encoder layers (BERT / DistilBERT expected)")


def _train_gradient(task, clf, tokenizer, dev_b: Batches, settings, device, mode, log=print):
    _seed_all(settings.seed)
    model = copy.deepcopy(clf)
    if mode.startswith("top:"):
        k = int(mode[4:])
        layers = _encoder_layers(model.encoder)
        if k > len(layers):
            raise ValueError(f"finetune mode {mode}: the model has only {len(layers)} layers")
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[len(layers) - k :]:
            for p in layer.parameters():
                p.requires_grad_(True)
        pooler = getattr(model.encoder, "pooler", None)  # BERT's pooler belongs to the head
        if pooler is not None:
            for p in pooler.parameters():
                p.requires_grad_(True)
    model.to(device)
    texts = [e.text for e in task.train]
    if isinstance(texts[0], tuple):
        enc = tokenizer(
            [t[0] for t in texts],
            [t[1] for t in texts],
            truncation=True,
            max_length=settings.max_length,
        )
    else:
        enc = tokenizer(texts, truncation=True, max_length=settings.max_length)
    enc_ids = enc["input_ids"]
    enc_tt = enc.get("token_type_ids")
    ytr = _labels_tensor(task, task.train)
    ydev = _labels_tensor(task, task.dev)
    steps_per_epoch = math.ceil(len(texts) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warm = max(1, int(settings.warmup * total))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.lr,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    gen = torch.Generator().manual_seed(settings.seed)
    pad_id = tokenizer.pad_token_id or 0
    curve = []
    best_state, best_loss, best_epoch, bad = None, float("inf"), 0, 0
    stopped_by_time = False
    t_start = time.perf_counter()
    step = 0
    last_log = -float("inf")
    for epoch in range(1, settings.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        running, seen = 0.0, 0
        batches = _train_batches(enc_ids, enc_tt, ytr, settings.batch_size, gen, pad_id)
        for i, (batch, y) in enumerate(batches, 1):
            logits = model(**{k: v.to(device) for k, v in batch.items()})
            loss = _loss(task, logits, y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            running += loss.item() * len(y)
            seen += len(y)
            step += 1
            now = time.perf_counter()
            if step == 1 or i == steps_per_epoch or now - last_log >= PROGRESS_EVERY_S:
                last_log = now
                per_step = (now - t_start) / step
                log(
                    f"  epoch {epoch}/{settings.epochs} step {i}/{steps_per_epoch}: loss "
                    f"{loss.item():.4f} (epoch mean {running / seen:.4f}), {per_step:.2f}s/step, "
                    f"ETA epoch {_dur(per_step * (steps_per_epoch - i))}, "
                    f"all epochs {_dur(per_step * (total - step))}"
                )
        dev_logits = predict(model, dev_b, device)
        dev_loss = float(_loss(task, torch.from_numpy(dev_logits), ydev))
        point = {"epoch": epoch, "train_loss": running / seen, "dev_loss": dev_loss}
        point.update(split_metrics(task, dev_logits, task.dev))
        curve.append(point)
        log(f"  epoch {epoch}: " + _fmt(point))
        if dev_loss < best_loss - 1e-4:
            best_loss, best_epoch, bad = dev_loss, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad > settings.patience:
                break
        now = time.perf_counter()
        if (
            settings.time_budget_s is not None
            and epoch < settings.epochs
            and (now - t_start) + (now - t_epoch) > settings.time_budget_s
        ):
            stopped_by_time = True
            log(
                f"  stopping after epoch {epoch}: another epoch (~{now - t_epoch:.0f}s) would "
                f"pass the fine-tune time budget of {settings.time_budget_s:.0f}s"
            )
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.cpu().eval()
    converged, why = _convergence(curve, best_epoch, settings.epochs, stopped_by_time)
    info = {
        "curve": curve,
        "best_epoch": best_epoch,
        "converged": converged,
        "convergence": why,
        "epochs_run": len(curve),
        "epochs_planned": settings.epochs,
        "stopped_by_time_budget": stopped_by_time,
    }
    return model, info


def _dur(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f}s"


def _convergence(curve, best_epoch: int, planned: int, cut: bool) -> tuple[bool | None, str]:
    """(converged?, what happened) from the dev-loss curve. Converged: the dev loss stopped
    improving (best epoch before the last one run: early stop or overfitting), or the last
    epoch improved it by less than 2 %. One epoch alone says nothing (None)."""
    n = len(curve)
    ran = f"{n} of {planned} epoch(s) run" + (", cut short by the time budget" if cut else "")
    if n == 1:
        return None, f"{ran}; one epoch: convergence unknown (no second dev loss to compare)"
    last, prev = curve[-1]["dev_loss"], curve[-2]["dev_loss"]
    if best_epoch < n:
        return True, f"{ran}; dev loss stopped improving after epoch {best_epoch} (kept)"
    drop = (prev - last) / prev if prev > 0 else 0.0
    if drop < 0.02:
        return True, f"{ran}; last epoch improved the dev loss by {100 * drop:.1f}% (< 2%)"
    return False, f"{ran}; dev loss still falling ({100 * drop:.1f}% in the last epoch)"


# --- cache -------------------------------------------------------------------------------------


_HEAD_KEYS = ("max_length", "head_l2_grid")
_GRADIENT_KEYS = (
    "seed",
    "epochs",
    "lr",
    "batch_size",
    "max_length",
    "weight_decay",
    "warmup",
    "patience",
)


def _key_settings(settings: FinetuneSettings, mode: str) -> dict:
    """The settings that determine the fine-tuned weights in ``mode`` (head mode is
    deterministic: no seed)."""
    keys = _HEAD_KEYS if mode == "head" else _GRADIENT_KEYS
    d = asdict(settings)
    return {k: d[k] for k in keys}


def _cache_key(model_fp: str, task: TaskData, mode: str, settings: FinetuneSettings) -> str:
    payload = {
        "v": FINETUNE_VERSION,
        "model": model_fp,
        "task": task.fingerprint(),
        "mode": mode,
        "settings": _key_settings(settings, mode),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _save(dirpath: Path, model: SentenceClassifier, tokenizer, meta: dict) -> None:
    """A standard Hugging Face classifier directory (weights, config, tokenizer) + meta."""
    dirpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dirpath.parent, prefix=dirpath.name + ".tmp"))
    try:
        model.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=float))
        if dirpath.exists():
            shutil.rmtree(dirpath)
        os.replace(tmp, dirpath)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load(dirpath: Path, task: TaskData):
    meta = json.loads((dirpath / META_FILE).read_text())
    model, tokenizer = load_classifier(
        dirpath, task.num_labels, regression=task.kind == "regression"
    )
    return model, meta, tokenizer


def finetune(
    task: TaskData,
    model_path: Path | str,
    settings: FinetuneSettings | None = None,
    *,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    log=print,
):
    """(classifier on CPU, info dict, tokenizer). ``info['cached']`` says whether it was reused."""
    settings = settings or FinetuneSettings()
    mode = resolve_mode(settings.mode, device)
    fp = model_fingerprint(model_path)
    key = _cache_key(fp, task, mode, settings)
    cdir = default_cache_dir(cache_dir) / "finetuned" / key
    if use_cache and (cdir / META_FILE).is_file():
        try:
            model, meta, tokenizer = _load(cdir, task)
            meta["cached"] = True
            meta["cache_path"] = str(cdir)
            log(f"fine-tuned model reused from cache: {cdir}")
            return model, meta, tokenizer
        except Exception as e:  # a broken cache entry is rebuilt, not fatal
            log(f"cache entry {cdir} unusable ({e}); fine-tuning again")
    if len(task.dev) == 0:
        raise ValueError(f"task {task.name!r}: the dev split is empty (train too small)")
    _seed_all(settings.seed)  # the new head's initialisation
    clf, tokenizer = load_classifier(
        model_path, task.num_labels, regression=task.kind == "regression"
    )
    log(f"fine-tuning ({mode}) {task.name} on {len(task.train)} examples, device {device} ...")
    t0 = time.perf_counter()
    _seed_all(settings.seed)
    dev_b = tokenize(tokenizer, [e.text for e in task.dev], max_length=settings.max_length)
    clf.to(device)
    if mode == "head":
        train_b = tokenize(tokenizer, [e.text for e in task.train], max_length=settings.max_length)
        model, info = _train_head(task, clf, train_b, dev_b, settings, device)
    else:
        model, info = _train_gradient(task, clf, tokenizer, dev_b, settings, device, mode, log)
        clf.cpu()
    model.cpu().eval()
    dev_logits = predict(model, dev_b, "cpu")
    dev = split_metrics(task, dev_logits, task.dev)
    meta = {
        "mode": mode,
        "settings": asdict(settings),
        "model_fingerprint": fp,
        "task": task.name,
        "task_fingerprint": task.fingerprint(),
        "train_size": len(task.train),
        "dev_size": len(task.dev),
        "seconds": time.perf_counter() - t0,
        "device": str(device),
        "dev_metrics": dev,
        "key": key,
        **info,
    }
    if task.kind == "classification" and task.num_labels == 2:
        gap = abs(dev["positive_rate"] - dev["true_positive_rate_of_labels"])
        meta["calibrated"] = bool(gap <= 0.05)
        meta["calibration_gap"] = gap
        if gap > 0.05:
            log(
                f"WARNING: dev predicted-positive rate {dev['positive_rate']:.3f} vs true "
                f"{dev['true_positive_rate_of_labels']:.3f}: the dense model is biased"
            )
    if mode != "head":
        log(f"fine-tuning: {meta['convergence']}")
        if meta.get("converged") is False and not meta.get("stopped_by_time_budget"):
            log(
                "WARNING: fine-tuning did not converge (dev loss still falling): raise "
                f"--epochs (now {settings.epochs}; with make run: make run EVAL_ARGS=\"--epochs "
                f"{settings.epochs + 2}\"); the accuracies below are of this model"
            )
    if meta.get("stopped_by_time_budget"):
        log(
            f"WARNING: fine-tuning was cut short by the time budget after {meta['epochs_run']} "
            f"of {settings.epochs} epochs: this model is used for this run but NOT cached "
            "(raise --finetune-budget, or 0 for none)"
        )
    elif use_cache:
        _save(cdir, model, tokenizer, meta)
        meta["cache_path"] = str(cdir)
        log(f"fine-tuned classifier cached (a standard Hugging Face directory): {cdir}")
    meta["cached"] = False
    log(f"fine-tuned in {meta['seconds']:.1f}s; dev {_fmt(dev)}")
    return model, meta, tokenizer


def _fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in d.items() if isinstance(v, float))
