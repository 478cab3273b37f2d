"""Unlabeled data → a tokenized, seeded sample of sequences.

Accepted ``data``:
  * ``list[str]`` — single texts;
  * ``list[tuple[str, str]]`` — text pairs (e.g. question/context, premise/hypothesis);
  * a path (``str`` or ``os.PathLike``) to a UTF-8 file: ``.txt`` (one text per line, blank lines
    skipped), ``.jsonl`` (one JSON object per line), ``.csv`` / ``.tsv`` (header row); for the last
    two, ``text_column`` (and ``text_pair_column`` for pairs) name the fields, or common names
    are detected (``sentence1``/``sentence2``, ``question``/``context``, ``text``, ``sentence``…);
  * a pre-tokenized dict ``{"input_ids": (N, T), "attention_mask": (N, T)}`` (tensors or lists;
    ``token_type_ids`` optional).
The sample is ``samples`` sequences drawn without replacement with ``seed`` (all when fewer).

``labels`` (only for methods that use labels, e.g. ``kwon``): one label per item of ``data``
(a list, tuple, 1-D array or tensor; integers for classification, floats for regression),
aligned with a list ``data`` or with the rows of a pre-tokenized dict; the drawn rows keep
their labels (``TokenizedSample.labels``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

PAIR_COLUMNS = (
    ("sentence1", "sentence2"),
    ("question", "context"),
    ("question", "passage"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
)
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "question")

Texts = list[str] | list[tuple[str, str]]


@dataclass
class TokenizedSample:
    """The unlabeled sample: padded token ids and masks, (N, T) each."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # the drawn rows of the data (indices, in sample order)
    labels: torch.Tensor | None = None  # (N,), the drawn rows' labels, when labels were given

    @property
    def n_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    @property
    def mean_tokens(self) -> float:
        """Mean number of real tokens per sequence (the ``s`` of the FLOPs model)."""
        return self.n_tokens / max(self.n_sequences, 1)

    def subset(self, n: int) -> TokenizedSample:
        tt = self.token_type_ids[:n] if self.token_type_ids is not None else None
        rows = self.rows[:n] if self.rows is not None else None
        y = self.labels[:n] if self.labels is not None else None
        return TokenizedSample(self.input_ids[:n], self.attention_mask[:n], tt, rows, y)

    def part(self, start: int, stop: int) -> TokenizedSample:
        """Sequences ``start`` … ``stop`` − 1 (in sample order) as a sample of their own."""
        sl = slice(start, stop)
        tt = self.token_type_ids[sl] if self.token_type_ids is not None else None
        rows = self.rows[sl] if self.rows is not None else None
        y = self.labels[sl] if self.labels is not None else None
        return TokenizedSample(self.input_ids[sl], self.attention_mask[sl], tt, rows, y)

    def batch_rows(self, batch_size: int) -> list[torch.Tensor]:
        """The sequences of each batch: ``batch_size`` at a time in order of decreasing length
        (stable), so that a batch pads to the length of sequences like its own (on the
        default sample about half the padded positions of batching in sample order; every
        statistic drawn from the batches is a sum over tokens, which the order leaves alone;
        the longest batch comes first, so a memory limit shows at once)."""
        lengths = self.attention_mask.sum(dim=1)
        order = torch.sort(lengths, descending=True, stable=True).indices
        return list(order.split(batch_size))

    def label_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The labels of :meth:`batches`' batches, in the same order."""
        if self.labels is None:
            raise ValueError("this sample has no labels")
        for rows in self.batch_rows(batch_size):
            yield self.labels[rows]

    def batches(self, batch_size: int, device: torch.device | str) -> Iterator[dict]:
        """Model inputs, ``batch_size`` sequences each (:meth:`batch_rows`), trailing
        all-padding columns trimmed."""
        for rows in self.batch_rows(batch_size):
            mask = self.attention_mask[rows]
            width = int(mask.sum(dim=0).nonzero().max()) + 1 if mask.any() else 1
            batch = {
                "input_ids": self.input_ids[rows, :width].to(device),
                "attention_mask": mask[:, :width].to(device),
            }
            if self.token_type_ids is not None:
                batch["token_type_ids"] = self.token_type_ids[rows, :width].to(device)
            yield batch

    def n_batches(self, batch_size: int) -> int:
        return -(-self.n_sequences // batch_size)

    def right_aligned(self) -> TokenizedSample:
        """The same sequences with their padding moved to the right (a causal LM's real
        tokens then never see a padding token, and positions start at 0 without
        position_ids). Refuses masks with padding between real tokens."""
        mask = self.attention_mask.bool()
        n = mask.sum(dim=1)
        first = torch.where(mask.any(dim=1), mask.float().argmax(dim=1), torch.zeros_like(n))
        width = mask.shape[1]
        pos = torch.arange(width).unsqueeze(0)
        contiguous = mask == ((pos >= first.unsqueeze(1)) & (pos < (first + n).unsqueeze(1)))
        if not bool(contiguous.all()):
            row = int((~contiguous.all(dim=1)).nonzero()[0])
            raise ValueError(
                f"attention_mask row {row} has padding between real tokens: a causal LM's "
                "sample must be padded on one side only"
            )
        if not bool(first.any()):
            return self
        src = (pos + first.unsqueeze(1)).clamp_max(width - 1)
        keep = pos < n.unsqueeze(1)

        def shift(t: torch.Tensor) -> torch.Tensor:
            return torch.where(keep, t.gather(1, src), torch.zeros_like(t))

        ids = torch.where(keep, self.input_ids.gather(1, src), self.input_ids[:, :1].clone())
        tt = shift(self.token_type_ids) if self.token_type_ids is not None else None
        return TokenizedSample(ids, keep.long(), tt, self.rows, self.labels)

    def check_context(self, limit: int | None) -> None:
        """ValueError when a sequence has more real tokens than the model's context."""
        if limit is None:
            return
        longest = int(self.attention_mask.sum(dim=1).max()) if self.n_sequences else 0
        if longest > limit:
            raise ValueError(
                f"the sample has sequences of {longest} tokens but the model's context is "
                f"{limit} tokens (max_position_embeddings): truncate the data to at most "
                f"{limit} tokens (max_length=)"
            )


# -- reading ------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    if not path.exists():
        raise ValueError(f"data file not found: {path}")
    if path.is_dir():
        raise ValueError(f"data must be a file, got a directory: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"data file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"data file {path} is not UTF-8 text (undecodable byte at offset {exc.start})"
        ) from None
    if "\x00" in text:
        raise ValueError(f"data file {path} looks binary (contains NUL bytes), expected text")
    return text


def _pick_columns(
    keys: Sequence[str], text_column: str | None, pair_column: str | None, where: str
) -> tuple[str, str | None]:
    if text_column is not None:
        if text_column not in keys:
            raise ValueError(f"text_column {text_column!r} not found in {where}; has {list(keys)}")
        if pair_column is not None and pair_column not in keys:
            raise ValueError(
                f"text_pair_column {pair_column!r} not found in {where}; has {list(keys)}"
            )
        return text_column, pair_column
    for a, b in PAIR_COLUMNS:
        if a in keys and b in keys:
            return a, b
    for a in TEXT_COLUMNS:
        if a in keys:
            return a, None
    if len(keys) == 1:
        return keys[0], None
    raise ValueError(
        f"cannot tell which field of {where} holds the text (has {list(keys)}); "
        "pass text_column= (and text_pair_column= for pairs)"
    )


def _rows_to_texts(
    rows: list[dict], text_column: str | None, pair_column: str | None, where: str
) -> Texts:
    if not rows:
        return []
    a, b = _pick_columns(list(rows[0].keys()), text_column, pair_column, where)
    out: list = []
    for row in rows:
        x = row.get(a)
        if x is None or str(x).strip() == "":
            continue
        if b is None:
            out.append(str(x))
        else:
            y = row.get(b)
            out.append((str(x), "" if y is None else str(y)))
    return out


def read_csv_rows(text: str, delimiter: str, what: str, quoting: int = csv.QUOTE_MINIMAL):
    """(reader, rows) of a CSV / TSV already in memory: a field may be as long as the file (the
    csv module's default limit of 131,072 characters guards memory the text already takes); a
    malformed file is a one-line ValueError naming it."""
    if csv.field_size_limit() < len(text) + 1:
        csv.field_size_limit(len(text) + 1)
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter, quoting=quoting)
    try:
        return reader, [dict(r) for r in reader]
    except csv.Error as exc:
        raise ValueError(
            f"{what}: not a readable CSV/TSV (line {reader.line_num}: {exc})"
        ) from None


def read_tsv_rows(text: str, what: str):
    """(reader, rows) of a TSV: read without quoting first (a TSV's cells are split by tabs
    alone, and a text may start with a quote character), unless that leaves a row with
    more or fewer cells than the header — then with CSV quoting (a quoted cell holding a tab
    or a line break)."""
    reader, rows = read_csv_rows(text, "\t", what, quoting=csv.QUOTE_NONE)
    whole = all(None not in r and all(v is not None for v in r.values()) for r in rows)
    if whole:
        return reader, rows
    return read_csv_rows(text, "\t", what)


def read_texts(
    path: str | os.PathLike, text_column: str | None = None, text_pair_column: str | None = None
) -> Texts:
    """Texts (or pairs) from a .txt / .jsonl / .json / .csv / .tsv file."""
    p = Path(path)
    text = _read_text(p)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"data file {p}: line {lineno} is not JSON ({exc.msg})") from None
            if isinstance(obj, str):
                obj = {"text": obj}
            if not isinstance(obj, dict):
                raise ValueError(f"data file {p}: line {lineno} is not a JSON object")
            rows.append(obj)
        texts = _rows_to_texts(rows, text_column, text_pair_column, f"data file {p}")
    elif suffix == ".tsv":
        reader, rows = read_tsv_rows(text, f"data file {p}")
        if reader.fieldnames is None:
            rows = []
        texts = _rows_to_texts(rows, text_column, text_pair_column, f"data file {p}")
    elif suffix == ".csv":
        reader, rows = read_csv_rows(text, ",", f"data file {p}")
        if reader.fieldnames is None:
            rows = []
        texts = _rows_to_texts(rows, text_column, text_pair_column, f"data file {p}")
    else:
        texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"data file {p} contains no text")
    return texts


# -- sampling + tokenizing ----------------------------------------------------------------
def _draw(n_items: int, samples: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_items, generator=gen)
    return perm[: min(samples, n_items)]


def _as_long_2d(name: str, value: object) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"data[{name!r}] must be a non-empty 2-D (N, T) array")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"data[{name!r}] must hold integers, got {t.dtype}")
    return t.long().cpu()


def check_labels(labels: object, n_items: int) -> torch.Tensor:
    """``labels`` as a 1-D tensor of ``n_items`` entries: int64 (class indices >= 0) or
    float32 (regression targets). One clear error for anything else."""
    if isinstance(labels, (str, bytes, Mapping)) or not hasattr(labels, "__len__"):
        raise TypeError(
            "labels must be a sequence with one label per data item (list, tuple, 1-D array "
            f"or tensor), got {type(labels).__name__}"
        )
    if isinstance(labels, torch.Tensor):
        t = labels.detach().cpu()
    else:
        items = list(labels)  # type: ignore[call-overload]
        if not items:
            raise ValueError("labels is empty")
        if any(isinstance(x, (str, bytes)) for x in items):
            raise TypeError(
                "labels must be numbers (class indices or regression targets), not strings: "
                "map them to integers first"
            )
        if any(x is None for x in items):
            raise ValueError("labels contains None: every data item needs a label")
        try:
            t = torch.as_tensor(items)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                "labels must be a flat sequence of numbers (one per data item)"
            ) from None
    if t.dim() != 1:
        raise ValueError(
            f"labels must be 1-D (one label per data item), got shape {tuple(t.shape)}"
        )
    if t.numel() != n_items:
        raise ValueError(
            f"labels has {t.numel()} entries but data has {n_items} items: they must be aligned "
            "(one label per data item, same order)"
        )
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"labels must be integers or floats, got {t.dtype}")
    if t.dtype.is_floating_point:
        if not bool(torch.isfinite(t).all()):
            raise ValueError("labels contains NaN or infinite values")
        return t.float()
    if bool((t < 0).any()):
        raise ValueError(f"class labels must be >= 0, got {int(t.min())}")
    return t.long()


def _pretokenized(data: dict, samples: int, seed: int, labels: object = None) -> TokenizedSample:
    if "input_ids" not in data:
        raise ValueError("pre-tokenized data must have an 'input_ids' entry")
    ids = _as_long_2d("input_ids", data["input_ids"])
    mask = (
        _as_long_2d("attention_mask", data["attention_mask"])
        if data.get("attention_mask") is not None
        else torch.ones_like(ids)
    )
    if mask.shape != ids.shape:
        raise ValueError(
            f"data['attention_mask'] shape {tuple(mask.shape)} != input_ids {tuple(ids.shape)}"
        )
    odd = mask[(mask != 0) & (mask != 1)]
    if odd.numel():
        raise ValueError(
            f"data['attention_mask'] must hold 0 (padding) and 1 (token) only, found "
            f"{int(odd[0])}"
        )
    tt = None
    if data.get("token_type_ids") is not None:
        tt = _as_long_2d("token_type_ids", data["token_type_ids"])
        if tt.shape != ids.shape:
            raise ValueError("data['token_type_ids'] must have the shape of input_ids")
    if labels is None and data.get("labels") is not None:
        labels = data["labels"]
    y = check_labels(labels, ids.shape[0]) if labels is not None else None
    idx = _draw(ids.shape[0], samples, seed)
    return TokenizedSample(
        ids[idx],
        mask[idx],
        tt[idx] if tt is not None else None,
        idx,
        y[idx] if y is not None else None,
    )


def _check_texts(data: list) -> Texts:
    if not data:
        raise ValueError("data is empty: pass unlabeled texts (list of str or of pairs)")
    if all(isinstance(x, str) for x in data):
        return data
    if all(
        isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(s, str) for s in x)
        for x in data
    ):
        return [tuple(x) for x in data]  # type: ignore[misc]
    raise TypeError("data as a list must hold only str, or only (str, str) pairs")


def prepare_sample(
    data: object,
    tokenizer: object | None,
    *,
    samples: int = 512,
    max_length: int = 128,
    seed: int = 0,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    labels: object = None,
    causal: bool = False,
    context: int | None = None,
) -> TokenizedSample:
    """Draw and tokenize the sample (see module docstring for ``data`` and ``labels``).
    ``causal``: a decoder-only LM's sample (padding moved to the right; a tokenizer without a
    padding token pads with its end-of-sequence token); ``context``: the model's longest
    sequence (longer pre-tokenized sequences are refused, texts are truncated to it)."""
    if isinstance(data, Mapping):  # dict or a tokenizer's BatchEncoding
        sample = _pretokenized(dict(data), samples, seed, labels)
        sample.check_context(context)
        return sample.right_aligned() if causal else sample
    sample = _tokenized(
        data,
        tokenizer,
        samples=samples,
        max_length=max_length if context is None else min(max_length, context),
        seed=seed,
        text_column=text_column,
        text_pair_column=text_pair_column,
        labels=labels,
        causal=causal,
    )
    return sample.right_aligned() if causal else sample


def _tokenized(
    data: object,
    tokenizer: object | None,
    *,
    samples: int,
    max_length: int,
    seed: int,
    text_column: str | None,
    text_pair_column: str | None,
    labels: object,
    causal: bool,
) -> TokenizedSample:
    if isinstance(data, (str, os.PathLike)):
        if labels is not None:
            raise ValueError(
                "labels= needs data as a list of texts (or pairs) or a pre-tokenized dict, "
                "aligned with the labels; a file path cannot be aligned (blank lines are skipped)"
            )
        texts = read_texts(data, text_column, text_pair_column)
    elif isinstance(data, (list, tuple)):
        texts = _check_texts(list(data))
    else:
        raise TypeError(
            "data must be a list of texts, a list of (text, text) pairs, a file path or a "
            f"pre-tokenized dict, got {type(data).__name__}"
        )
    if tokenizer is None:
        raise ValueError(
            "a tokenizer is needed for text data: pass tokenizer= (or pre-tokenized data)"
        )
    y = check_labels(labels, len(texts)) if labels is not None else None
    drawn = _draw(len(texts), samples, seed)
    idx = drawn.tolist()
    chosen = [texts[i] for i in idx]
    kwargs = dict(truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    if causal and getattr(tokenizer, "pad_token", "") is None:
        # LLaMA-style tokenizers have no padding token: tokenize unpadded and pad here (the
        # tokenizer itself is left as it is; the mask hides the filler)
        kwargs = dict(truncation=True, max_length=max_length)
        if isinstance(chosen[0], tuple):
            raise ValueError("text pairs are not supported for a causal LM: join them first")
        rows = [list(r) for r in tokenizer(chosen, **kwargs)["input_ids"]]  # type: ignore[operator]
        width = max(max((len(r) for r in rows), default=1), 1)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        att = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            att[i, : len(r)] = 1
        return TokenizedSample(ids, att, None, drawn, y[drawn] if y is not None else None)
    if isinstance(chosen[0], tuple):
        enc = tokenizer([a for a, _ in chosen], [b for _, b in chosen], **kwargs)  # type: ignore[operator]
    else:
        enc = tokenizer(chosen, **kwargs)  # type: ignore[operator]
    tt = enc.get("token_type_ids")
    return TokenizedSample(
        enc["input_ids"].long(),
        enc["attention_mask"].long(),
        tt.long() if tt is not None else None,
        drawn,
        y[drawn] if y is not None else None,
    )
