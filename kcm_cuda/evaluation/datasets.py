"""Tasks of the accuracy evaluation: loading, deterministic splits, provenance.

The embedded default task is the VADER movie-review snippets (Hutto & Gilbert, ICWSM 2014):
10,605 sentences, each with a mean human rating in [-4, 4]. They ship inside the sdist of the
PyPI package ``vaderSentiment==3.3.2`` (additional_resources/hutto_ICWSM_2014.tar.gz); we fetch
that sdist with pip (the ordinary PyPI client), check its SHA-256, extract the one file we need
and cache it. Two tasks come from it:

    vader-movie         binary sentiment, label = rating > 0 (49.4 % positive)
    vader-movie-rating  regression on the rating (Pearson / Spearman, like STS-B)

The same sdist ships three more ground-truth files of the same format, each a binary task
(label = rating > 0, same hash split):

    vader-amazon        3,708 Amazon review snippets (57.4 % positive)
    vader-nyt           5,190 New York Times editorial snippets (42.5 % positive)
    vader-tweets        4,200 tweets (69.0 % positive)

Split: by ``sha256(id) % 100`` -- < 60 train (labelled, fine-tuning), 60..79 unlabeled pool
(the pruner's data: texts only, labels dropped), >= 80 test (2,131 sentences). Any pool or
train sentence whose normalised text also occurs in the test split is dropped, so the pruner
never sees a test sentence. A dev split (for fine-tuning convergence) is carved out of train by
a second hash.

Also: generic GLUE-style TSV / JSONL / CSV loaders for local files (hash-split the same way, or
given explicit train/test files), and, when the ``datasets`` package and a network are
available, GLUE and SQuAD v1.1 loaders.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "TASKS",
    "Example",
    "TaskData",
    "default_cache_dir",
    "fetch_vader_file",
    "get_task",
    "hash_bucket",
    "load_glue",
    "load_squad",
    "load_table",
    "parse_vader",
    "split_examples",
    "task_from_file",
    "task_from_files",
]

Text = str | tuple[str, str]

VADER_PACKAGE = "vaderSentiment==3.3.2"
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
VADER_INNER_TAR = "additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_MOVIE_FILE = "movieReviewSnippets_GroundTruth.txt"
# task name -> ground-truth file inside hutto_ICWSM_2014.tar.gz (all: id<TAB>rating<TAB>text)
VADER_FILES = {
    "vader-movie": VADER_MOVIE_FILE,
    "vader-movie-rating": VADER_MOVIE_FILE,
    "vader-amazon": "amazonReviewSnippets_GroundTruth.txt",
    "vader-nyt": "nytEditorialSnippets_GroundTruth.txt",
    "vader-tweets": "tweets_GroundTruth.txt",
}
VADER_SOURCES = {
    "vader-movie": "movie-review snippets",
    "vader-movie-rating": "movie-review snippets",
    "vader-amazon": "Amazon review snippets",
    "vader-nyt": "New York Times editorial snippets",
    "vader-tweets": "tweets",
}
VADER_TASKS = tuple(VADER_FILES)

SPLIT_TRAIN = 60  # percent
SPLIT_POOL = 20
DEV_MODULUS = 10  # one train example in 10 (by a second hash) is held out as dev


@dataclass(frozen=True)
class Example:
    id: str
    text: Text
    label: float | int


@dataclass
class TaskData:
    """A task ready for the evaluation. ``pool`` carries texts only: never labels."""

    name: str
    kind: str  # "classification" | "regression"
    num_labels: int  # 1 for regression
    train: list[Example]
    dev: list[Example]
    pool: list[Text]
    test: list[Example]
    source: str = ""
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "regression"):
            raise ValueError(f"kind must be 'classification' or 'regression', got {self.kind!r}")
        for split in ("train", "pool", "test"):
            if len(getattr(self, split)) == 0:
                raise ValueError(f"task {self.name!r}: the {split} split is empty")
        if self.kind == "classification":
            labels = {int(e.label) for e in self.train + self.test}
            if min(labels) < 0 or max(labels) >= self.num_labels:
                raise ValueError(
                    f"task {self.name!r}: labels must lie in [0, {self.num_labels}), "
                    f"got {sorted(labels)[:10]}"
                )
            if len({int(e.label) for e in self.train}) < 2:
                raise ValueError(f"task {self.name!r}: the train split has a single class")

    @property
    def is_pair(self) -> bool:
        return isinstance(self.test[0].text, tuple)

    def sizes(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "dev": len(self.dev),
            "pool": len(self.pool),
            "test": len(self.test),
        }

    def fingerprint(self) -> str:
        """Hash of the labelled splits (ids, texts, labels): keys the fine-tune cache."""
        h = hashlib.sha256()
        h.update(f"{self.name}|{self.kind}|{self.num_labels}".encode())
        for split in (self.train, self.dev):
            for e in split:
                h.update(f"\x1e{e.id}\x1f{e.text}\x1f{e.label}".encode())
            h.update(b"\x1d")
        return h.hexdigest()[:16]


# --- splitting ----------------------------------------------------------------------------


def hash_bucket(key: str, modulus: int = 100, salt: str = "") -> int:
    """Deterministic bucket of ``key`` in [0, modulus): ``sha256(salt + key) % modulus``."""
    digest = hashlib.sha256((salt + key).encode("utf-8")).hexdigest()
    return int(digest, 16) % modulus


def _normalise_text(t: Text) -> str:
    parts = t if isinstance(t, tuple) else (t,)
    return "\x1f".join(" ".join(p.casefold().split()) for p in parts)


def split_examples(
    name: str,
    examples: Sequence[Example],
    *,
    kind: str,
    num_labels: int,
    fractions: tuple[int, int] = (SPLIT_TRAIN, SPLIT_POOL),
    source: str = "",
) -> TaskData:
    """Hash split: bucket < train → train (dev carved out by a second hash), < train+pool →
    unlabeled pool (labels dropped), rest → test. Train/pool texts equal to a test text are
    dropped (the pruner must never see a test sentence)."""
    tr, po = fractions
    if not (tr > 0 and po > 0 and tr + po < 100):
        raise ValueError(
            f"fractions must be positive percentages summing below 100, got {fractions}"
        )
    if not examples:
        raise ValueError(f"task {name!r}: no examples")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"task {name!r}: example ids are not unique")
    train, pool, test = [], [], []
    for e in examples:
        b = hash_bucket(e.id)
        (train if b < tr else pool if b < tr + po else test).append(e)
    test_texts = {_normalise_text(e.text) for e in test}
    n_train, n_pool = len(train), len(pool)
    train = [e for e in train if _normalise_text(e.text) not in test_texts]
    pool = [e for e in pool if _normalise_text(e.text) not in test_texts]
    dev = [e for e in train if hash_bucket(e.id, DEV_MODULUS, salt="dev:") == 0]
    train = [e for e in train if hash_bucket(e.id, DEV_MODULUS, salt="dev:") != 0]
    return TaskData(
        name=name,
        kind=kind,
        num_labels=num_labels,
        train=train,
        dev=dev,
        pool=[e.text for e in pool],
        test=test,
        source=source,
        notes={
            "split": f"sha256(id) % 100: <{tr} train, <{tr + po} unlabeled pool, else test; "
            f"dev = train examples with sha256('dev:'+id) % {DEV_MODULUS} == 0",
            "dropped_as_duplicates_of_test": {
                "train": n_train - len(train) - len(dev),
                "pool": n_pool - len(pool),
            },
        },
    )


# --- cache directory ---------------------------------------------------------------------------


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else $KCM_CUDA_CACHE, else ~/.cache/kcm_cuda."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("KCM_CUDA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kcm_cuda"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --- VADER -------------------------------------------------------------------------------------


def _extract_vader_files(sdist: Path, names: Sequence[str]) -> dict[str, bytes]:
    """The contents of the ground-truth files ``names`` inside the sdist's nested tarball."""
    with tarfile.open(sdist, "r:gz") as outer:
        inner_member = next(
            (m for m in outer.getmembers() if m.name.endswith(VADER_INNER_TAR)), None
        )
        if inner_member is None:
            raise RuntimeError(f"{sdist} does not contain {VADER_INNER_TAR}")
        inner_bytes = outer.extractfile(inner_member).read()  # type: ignore[union-attr]
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        members = inner.getmembers()
        for name in names:
            member = next((m for m in members if m.name.endswith("/" + name)), None)
            if member is None:
                raise RuntimeError(f"{VADER_INNER_TAR} does not contain {name}")
            out[name] = inner.extractfile(member).read()  # type: ignore[union-attr]
    return out


def _extract_vader_movie(sdist: Path) -> bytes:
    return _extract_vader_files(sdist, [VADER_MOVIE_FILE])[VADER_MOVIE_FILE]


def fetch_vader_file(
    cache_dir: str | os.PathLike | None = None,
    *,
    quiet: bool = True,
    file: str = VADER_MOVIE_FILE,
) -> Path:
    """Path of the cached VADER ground-truth ``file`` (default: the movie snippets); fetched
    once with ``pip download --no-deps --no-binary :all: vaderSentiment==3.3.2`` when absent
    (every ground-truth file of the sdist is cached then)."""
    if file not in set(VADER_FILES.values()):
        raise ValueError(f"not a VADER ground-truth file: {file!r}")
    target = default_cache_dir(cache_dir) / "data" / "vader" / file
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="kcm_vader_") as tmp:
        sdist = Path(tmp) / VADER_SDIST
        local = os.environ.get("KCM_CUDA_VADER_SDIST")  # offline: a copy of the sdist
        if local:
            sdist = Path(local)
        else:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--disable-pip-version-check",
                "-d",
                tmp,
                VADER_PACKAGE,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not sdist.is_file():
                raise RuntimeError(
                    f"could not fetch {VADER_PACKAGE} from PyPI (pip exit {proc.returncode}):\n"
                    f"{proc.stderr.strip()[-2000:]}\n"
                    f"Offline? Put {VADER_SDIST} somewhere and set KCM_CUDA_VADER_SDIST to it, "
                    f"or copy {file} to {target}."
                )
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != VADER_SDIST_SHA256:
            raise RuntimeError(
                f"{sdist} has SHA-256 {digest}, expected {VADER_SDIST_SHA256}: refusing to use it"
            )
        names = sorted(set(VADER_FILES.values()))
        for name, data in _extract_vader_files(sdist, names).items():
            dest = target.parent / name
            if not dest.is_file():
                _atomic_write_bytes(dest, data)
    if not quiet:
        print(f"cached {file} at {target}", file=sys.stderr)
    return target


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse_vader(path: str | os.PathLike) -> list[tuple[str, float, str]]:
    """Rows (id, rating, text) of a VADER ground-truth file: ``id<TAB>rating<TAB>text`` per
    line (UTF-8, Latin-1 accepted; CRLF accepted)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"VADER file not found: {p}")
    rows = []
    for lineno, line in enumerate(_decode(p.read_bytes()).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(
                f"{p}:{lineno}: expected 3 tab-separated fields (id, rating, text), "
                f"got {len(parts)}"
            )
        sid, rating, text = (x.strip() for x in parts)
        try:
            r = float(rating)
        except ValueError:
            raise ValueError(f"{p}:{lineno}: rating {rating!r} is not a number") from None
        if not text:
            raise ValueError(f"{p}:{lineno}: empty text")
        rows.append((sid, r, text))
    if not rows:
        raise ValueError(f"{p}: no rows")
    return rows


def load_vader_task(
    name: str = "vader-movie",
    cache_dir: str | os.PathLike | None = None,
    *,
    path: str | os.PathLike | None = None,
) -> TaskData:
    """``vader-movie`` / ``vader-amazon`` / ``vader-nyt`` / ``vader-tweets`` (binary,
    label = rating > 0) or ``vader-movie-rating`` (regression on the rating). ``path``: a
    local ground-truth file to use instead of the cached one."""
    if name not in VADER_FILES:
        raise ValueError(f"not a VADER task: {name!r}; known: {list(VADER_TASKS)}")
    file_name = VADER_FILES[name]
    file = Path(path) if path is not None else fetch_vader_file(cache_dir, file=file_name)
    rows = parse_vader(file)
    if name == "vader-movie-rating":
        examples = [Example(i, t, r) for i, r, t in rows]
        kind, num_labels = "regression", 1
    else:
        examples = [Example(i, t, int(r > 0)) for i, r, t in rows]
        kind, num_labels = "classification", 2
    return split_examples(
        name,
        examples,
        kind=kind,
        num_labels=num_labels,
        source=(
            f"{file_name} ({VADER_SOURCES[name]}) from the sdist of {VADER_PACKAGE} "
            "(Hutto & Gilbert 2014)"
        ),
    )


# --- generic local files -----------------------------------------------------------------------


def _read_records(path: Path) -> tuple[list[dict], list[str]]:
    """Records and column names of a .tsv / .csv (header row) or .jsonl / .json file."""
    suffix = path.suffix.lower()
    text = _decode(path.read_bytes())
    if suffix in (".jsonl", ".json"):
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object")
            records.append(rec)
        columns = sorted({k for r in records for k in r})
        return records, columns
    if suffix in (".tsv", ".csv", ".txt"):
        delimiter = "," if suffix == ".csv" else "\t"
        # GLUE TSVs are unquoted (QUOTE_NONE); CSVs use standard quoting
        quoting = csv.QUOTE_MINIMAL if suffix == ".csv" else csv.QUOTE_NONE
        from kcm_cuda.pruning.data import read_csv_rows

        reader, records = read_csv_rows(text, delimiter, str(path), quoting)
        columns = list(reader.fieldnames or [])
        return records, columns
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .tsv, .csv or .jsonl)")


def load_table(
    path: str | os.PathLike,
    *,
    text_column: str = "sentence",
    text_pair_column: str | None = None,
    label_column: str = "label",
    id_column: str | None = None,
    kind: str = "classification",
    label_names: Sequence[str] | None = None,
) -> list[Example]:
    """Examples of a GLUE-style TSV (header row), CSV or JSONL file.

    Classification labels may be integers or strings (strings are mapped through
    ``label_names`` or, if not given, to their sorted order). Without ``id_column`` the id is
    the sha256 of the text(s), so the split is stable under row reordering."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    if kind not in ("classification", "regression"):
        raise ValueError(f"kind must be 'classification' or 'regression', got {kind!r}")
    records, columns = _read_records(p)
    if not records:
        raise ValueError(f"{p}: no rows")
    needed = [c for c in (text_column, text_pair_column, label_column, id_column) if c]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"{p}: missing column(s) {missing}; the file has columns {columns}")
    raw_labels = [r.get(label_column) for r in records]
    mapping: dict[str, int] | None = None
    if kind == "classification":
        if label_names is not None:
            mapping = {str(n): i for i, n in enumerate(label_names)}
        elif not all(_is_int(x) for x in raw_labels):
            mapping = {n: i for i, n in enumerate(sorted({str(x) for x in raw_labels}))}
    examples: list[Example] = []
    for row, rec in enumerate(records, start=1):
        text = rec.get(text_column)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{p}: row {row}: empty or missing {text_column!r}")
        full: Text = text.strip()
        if text_pair_column:
            pair = rec.get(text_pair_column)
            if not isinstance(pair, str) or not pair.strip():
                raise ValueError(f"{p}: row {row}: empty or missing {text_pair_column!r}")
            full = (text.strip(), pair.strip())
        lab = rec.get(label_column)
        if lab is None or (isinstance(lab, str) and not lab.strip()):
            raise ValueError(f"{p}: row {row}: missing label in column {label_column!r}")
        try:
            if kind == "regression":
                label: float | int = float(lab)
            elif mapping is not None:
                label = mapping[str(lab)]
            else:
                label = int(lab)
        except (KeyError, ValueError):
            raise ValueError(f"{p}: row {row}: bad label {lab!r}") from None
        if id_column:
            sid = str(rec[id_column])
        else:
            sid = hashlib.sha256(str(full).encode("utf-8")).hexdigest()[:20]
        examples.append(Example(sid, full, label))
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        # duplicate texts without an id column: disambiguate deterministically
        seen: dict[str, int] = {}
        fixed = []
        for e in examples:
            k = seen.get(e.id, 0)
            seen[e.id] = k + 1
            fixed.append(Example(f"{e.id}#{k}" if k else e.id, e.text, e.label))
        examples = fixed
    return examples


def _is_int(x: object) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return True
    if isinstance(x, str):
        try:
            int(x)
            return True
        except ValueError:
            return False
    return False


def _num_labels(kind: str, examples: Sequence[Example]) -> int:
    return 1 if kind == "regression" else max(int(e.label) for e in examples) + 1


def task_from_file(
    path: str | os.PathLike, *, name: str | None = None, kind: str = "classification", **columns
) -> TaskData:
    """One labelled file, hash-split 60 / 20 / 20 like VADER."""
    examples = load_table(path, kind=kind, **columns)
    return split_examples(
        name or Path(path).stem,
        examples,
        kind=kind,
        num_labels=_num_labels(kind, examples),
        source=str(path),
    )


def task_from_files(
    train: str | os.PathLike,
    test: str | os.PathLike,
    *,
    pool: str | os.PathLike | None = None,
    name: str | None = None,
    kind: str = "classification",
    **columns,
) -> TaskData:
    """Explicit files (GLUE style: train + dev-as-test). The unlabeled pool is ``pool`` (its
    label column is ignored if present; a plain one-text-per-line file works too) or, if not
    given, the texts of train (labels dropped). Texts equal to a test text are removed."""
    tr = load_table(train, kind=kind, **columns)
    te = load_table(test, kind=kind, **columns)
    if pool is None:
        pool_texts: list[Text] = [e.text for e in tr]
    else:
        pp = Path(pool)
        if pp.suffix.lower() in (".tsv", ".csv", ".jsonl", ".json"):
            cols = {k: v for k, v in columns.items() if k in ("text_column", "text_pair_column")}
            recs, cnames = _read_records(pp)
            tc = cols.get("text_column", "sentence")
            pc = cols.get("text_pair_column")
            missing = [c for c in (tc, pc) if c and c not in cnames]
            if missing:
                raise ValueError(f"{pp}: missing column(s) {missing}; the file has {cnames}")
            pool_texts = [(r[tc], r[pc]) if pc else r[tc] for r in recs]
        else:
            pool_texts = [ln.strip() for ln in _decode(pp.read_bytes()).splitlines() if ln.strip()]
    test_texts = {_normalise_text(e.text) for e in te}
    pool_texts = [t for t in pool_texts if _normalise_text(t) not in test_texts]
    dev = [e for e in tr if hash_bucket(e.id, DEV_MODULUS, salt="dev:") == 0]
    train_ex = [e for e in tr if hash_bucket(e.id, DEV_MODULUS, salt="dev:") != 0]
    return TaskData(
        name=name or Path(train).stem,
        kind=kind,
        num_labels=_num_labels(kind, tr + te),
        train=train_ex,
        dev=dev,
        pool=pool_texts,
        test=te,
        source=f"train={train} test={test} pool={pool or '(train texts)'}",
    )


# --- online loaders (Hugging Face `datasets`) ----------------------------------------------------

GLUE_TASKS = {
    # name: (text column, pair column or None, kind, num_labels, test split)
    "sst2": ("sentence", None, "classification", 2, "validation"),
    "cola": ("sentence", None, "classification", 2, "validation"),
    "mrpc": ("sentence1", "sentence2", "classification", 2, "validation"),
    "qqp": ("question1", "question2", "classification", 2, "validation"),
    "stsb": ("sentence1", "sentence2", "regression", 1, "validation"),
    "mnli": ("premise", "hypothesis", "classification", 3, "validation_matched"),
    "qnli": ("question", "sentence", "classification", 2, "validation"),
    "rte": ("sentence1", "sentence2", "classification", 2, "validation"),
}


def _require_datasets():
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "GLUE / SQuAD tasks need the `datasets` package and a network "
            "(pip install datasets); the embedded default task (vader-movie) needs neither"
        ) from None
    import datasets

    return datasets


def load_glue(name: str, *, pool_size: int = 4096) -> TaskData:
    """GLUE task ``name`` via ``datasets``: train → fine-tuning (+ dev carved out), a hash-chosen
    sample of train texts → unlabeled pool, the GLUE validation split → test."""
    if name not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; known: {sorted(GLUE_TASKS)}")
    text_col, pair_col, kind, num_labels, test_split = GLUE_TASKS[name]
    ds = _require_datasets().load_dataset("nyu-mll/glue", name)

    def convert(split) -> list[Example]:
        out = []
        for rec in split:
            t: Text = rec[text_col] if pair_col is None else (rec[text_col], rec[pair_col])
            lab = float(rec["label"]) if kind == "regression" else int(rec["label"])
            out.append(Example(str(rec["idx"]), t, lab))
        return out

    train = convert(ds["train"])
    test = convert(ds[test_split])
    test_texts = {_normalise_text(e.text) for e in test}
    ranked = sorted(train, key=lambda e: hash_bucket(e.id, 2**61, salt="pool:"))
    pool = [e.text for e in ranked if _normalise_text(e.text) not in test_texts][:pool_size]
    dev = [e for e in train if hash_bucket(e.id, DEV_MODULUS, salt="dev:") == 0]
    train = [e for e in train if hash_bucket(e.id, DEV_MODULUS, salt="dev:") != 0]
    return TaskData(
        name=f"glue/{name}",
        kind=kind,
        num_labels=num_labels,
        train=train,
        dev=dev,
        pool=pool,
        test=test,
        source=f"datasets nyu-mll/glue {name} (test = {test_split})",
    )


def load_squad(split: str = "validation") -> list[dict]:
    """SQuAD v1.1 records {id, question, context, answers: [str], answer_starts: [int]} via
    ``datasets``; score predictions with :func:`kcm_cuda.evaluation.metrics.squad_metrics`."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    ds = _require_datasets().load_dataset("rajpurkar/squad", split=split)
    return [
        {
            "id": r["id"],
            "question": r["question"],
            "context": r["context"],
            "answers": list(r["answers"]["text"]),
            "answer_starts": list(r["answers"]["answer_start"]),
        }
        for r in ds
    ]


# --- registry ----------------------------------------------------------------------------------

TASKS = (*VADER_TASKS, *(f"glue/{n}" for n in GLUE_TASKS))


def get_task(name: str, cache_dir: str | os.PathLike | None = None) -> TaskData:
    """A task by name (see ``TASKS``), or ``file:PATH`` for a local labelled TSV/CSV/JSONL
    (columns ``sentence`` and ``label``; hash-split 60/20/20)."""
    if not isinstance(name, str):
        raise TypeError(f"task must be a string, got {type(name).__name__}")
    if name in VADER_FILES:
        return load_vader_task(name, cache_dir)
    if name.startswith("glue/"):
        return load_glue(name.split("/", 1)[1])
    if name.startswith("file:"):
        return task_from_file(name[5:])
    raise ValueError(f"unknown task {name!r}; known: {list(TASKS)} or file:PATH")
