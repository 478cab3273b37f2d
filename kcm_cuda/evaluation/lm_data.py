"""Text for the language-model evaluation: lines, a deterministic split, a local tokenizer.

One document per line. The shipped text is the four VADER ground-truth files (the same
sdist of ``vaderSentiment==3.3.2`` that the sentiment tasks use, see datasets.py): ~23.7k
snippets of movie reviews, Amazon reviews, NYT editorials and tweets. Any local UTF-8 text
file works too (``lines_from_file``).

Split by ``sha256(normalised line) % 100``: < 85 train (the small LM is trained on it),
85..89 calibration (the pruner's unlabeled data), >= 90 held-out test (perplexity). The key is
the normalised text itself, so equal lines always land in the same split (no test line is
ever seen by the trainer or the pruner); repeated lines are kept once.

The tokenizer needs no download: a byte-level BPE trained with the ``tokenizers`` library on
the train lines (deterministic: same lines, same vocabulary), wrapped as a transformers fast
tokenizer with ``<s>`` / ``</s>`` / ``<pad>``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kcm_cuda.evaluation.datasets import (
    VADER_FILES,
    VADER_PACKAGE,
    _decode,
    _normalise_text,
    fetch_vader_file,
    hash_bucket,
    parse_vader,
)

__all__ = [
    "LM_SPLIT",
    "LMText",
    "encode_stream",
    "lines_from_file",
    "load_lm_text",
    "split_lines",
    "train_tokenizer",
    "vader_lines",
]

LM_SPLIT = (85, 5)  # percent: train, calibration; the rest (10 %) is the held-out test
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


@dataclass
class LMText:
    """Lines of text split three ways. ``train`` trains the small LM, ``calibration`` is the
    pruner's unlabeled data, ``test`` is held out for perplexity."""

    name: str
    train: list[str]
    calibration: list[str]
    test: list[str]
    source: str = ""
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("calibration", "test"):
            if not getattr(self, split):
                raise ValueError(f"text {self.name!r}: the {split} split is empty")

    def sizes(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "calibration": len(self.calibration),
            "test": len(self.test),
        }

    def fingerprint(self, splits: Sequence[str] = ("train", "calibration", "test")) -> str:
        h = hashlib.sha256(self.name.encode())
        for s in splits:
            for line in getattr(self, s):
                h.update(b"\x1e" + line.encode("utf-8"))
            h.update(b"\x1d")
        return h.hexdigest()[:16]


def split_lines(
    name: str,
    lines: Sequence[str],
    *,
    fractions: tuple[int, int] = LM_SPLIT,
    source: str = "",
) -> LMText:
    """Deterministic hash split of ``lines`` (blank lines dropped, whitespace collapsed,
    duplicates after normalisation kept once, in first-seen order)."""
    tr, ca = fractions
    if not (tr >= 0 and ca > 0 and tr + ca < 100):
        raise ValueError(f"fractions must be percentages summing below 100, got {fractions}")
    train, calib, test = [], [], []
    seen: set[str] = set()
    n_dup = 0
    for raw in lines:
        line = " ".join(raw.split())
        if not line:
            continue
        key = _normalise_text(line)
        if key in seen:
            n_dup += 1
            continue
        seen.add(key)
        b = hash_bucket(key, salt="lm:")
        (train if b < tr else calib if b < tr + ca else test).append(line)
    return LMText(
        name=name,
        train=train,
        calibration=calib,
        test=test,
        source=source,
        notes={
            "split": f"sha256('lm:' + normalised line) % 100: <{tr} train, <{tr + ca} "
            "calibration, else held-out test",
            "duplicates_dropped": n_dup,
        },
    )


def vader_lines(cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The texts of the four VADER ground-truth files, in a fixed order."""
    out = []
    for file in sorted(set(VADER_FILES.values())):
        out += [t for _, _, t in parse_vader(fetch_vader_file(cache_dir, file=file))]
    return out


def lines_from_file(path: str | os.PathLike) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    return _decode(p.read_bytes()).splitlines()


def load_lm_text(name: str, cache_dir: str | os.PathLike | None = None) -> LMText:
    """``vader`` (the shipped text) or a path to a local text file, split by ``split_lines``."""
    if name == "vader":
        files = ", ".join(sorted(set(VADER_FILES.values())))
        return split_lines(
            "vader",
            vader_lines(cache_dir),
            source=f"{files} from the sdist of {VADER_PACKAGE} (Hutto & Gilbert 2014)",
        )
    p = Path(name).expanduser()
    text = split_lines(str(p), lines_from_file(p), source=f"local file {p.resolve()}")
    return text


# --- tokenizer ---------------------------------------------------------------------------------


def train_tokenizer(lines: Sequence[str], vocab_size: int = 4096, min_frequency: int = 2):
    """A byte-level BPE trained on ``lines``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not lines:
        raise ValueError("no lines to train a tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(lines), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=1_000_000,
    )


def encode_stream(tokenizer, lines: Sequence[str]) -> torch.Tensor:
    """One 1-D id stream: ``[bos]`` (when the tokenizer has one), then each line's tokens
    followed by ``eos`` (when it has one; a newline otherwise). Special tokens are not added
    per line: the same rule serves our small LM and a user's checkpoint."""
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    sep = [eos] if eos is not None else tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = [bos] if bos is not None else []
    enc = tokenizer(list(lines), add_special_tokens=False)["input_ids"]
    for e in enc:
        ids += e
        ids += sep
    return torch.tensor(ids, dtype=torch.long)
