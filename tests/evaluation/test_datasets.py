import io
import json
import tarfile

import pytest

from kcm_cuda.evaluation import datasets as D


def _vader_lines(n: int = 300) -> list[str]:
    lines = []
    for i in range(1, n + 1):
        rating = ((i * 37) % 81) / 10.0 - 4.0  # spread over [-4, 4]
        lines.append(
            f"{i}\t{rating}\tsentence number {i} with caf\u00e9 {'good' if rating > 0 else 'bad'}"
        )
    return lines


@pytest.fixture()
def vader_file(tmp_path):
    p = tmp_path / "movieReviewSnippets_GroundTruth.txt"
    # Latin-1 bytes and CRLF line ends, like a Windows-era corpus
    p.write_bytes("\r\n".join(_vader_lines()).encode("latin-1"))
    return p


def test_parse_vader_latin1_crlf(vader_file):
    rows = D.parse_vader(vader_file)
    assert len(rows) == 300
    assert rows[0][0] == "1" and isinstance(rows[0][1], float)
    assert "caf\u00e9" in rows[0][2] and not rows[0][2].endswith("\r")


def test_parse_vader_bad_line(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("1\t2.0\tfine\n2\tnot-a-number\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected 3"):
        D.parse_vader(p)
    p.write_text("1\tx\tfine\n")
    with pytest.raises(ValueError, match="not a number"):
        D.parse_vader(p)


def test_vader_task_split_is_deterministic_and_disjoint(vader_file):
    t1 = D.load_vader_task("vader-movie", path=vader_file)
    t2 = D.load_vader_task("vader-movie", path=vader_file)
    assert [e.id for e in t1.test] == [e.id for e in t2.test]
    assert t1.pool == t2.pool
    n = sum(t1.sizes().values())
    assert n == 300
    test_ids = {e.id for e in t1.test}
    assert not test_ids & {e.id for e in t1.train + t1.dev}
    test_texts = {e.text for e in t1.test}
    assert not test_texts & set(t1.pool)
    # the pool carries texts only, never labels
    assert all(isinstance(x, str) for x in t1.pool)
    # the split follows sha256(id) % 100
    for e in t1.test:
        assert D.hash_bucket(e.id) >= 80
    # binary label = rating > 0
    rows = {i: r for i, r, _ in D.parse_vader(vader_file)}
    assert all(e.label == int(rows[e.id] > 0) for e in t1.test)
    reg = D.load_vader_task("vader-movie-rating", path=vader_file)
    assert reg.kind == "regression" and reg.num_labels == 1
    assert all(e.label == rows[e.id] for e in reg.test)


def test_duplicate_of_a_test_sentence_never_reaches_the_pool():
    # many copies of one text under different ids: whichever lands in test, no copy may be
    # left in the pool or train
    examples = [D.Example(str(i), "the same sentence", i % 2) for i in range(60)]
    examples += [D.Example(f"u{i}", f"unique {i}", i % 2) for i in range(200)]
    task = D.split_examples("dup", examples, kind="classification", num_labels=2)
    assert any(e.text == "the same sentence" for e in task.test)
    assert "the same sentence" not in task.pool
    assert all(e.text != "the same sentence" for e in task.train + task.dev)
    assert task.notes["dropped_as_duplicates_of_test"]["pool"] > 0


def test_load_table_tsv_jsonl_csv(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text('sentence\tlabel\nit is "good"\t1\nit is bad\t0\n')
    ex = D.load_table(tsv)
    assert [e.label for e in ex] == [1, 0]
    assert ex[0].text == 'it is "good"'  # GLUE TSVs are unquoted
    js = tmp_path / "a.jsonl"
    js.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"q": "a?", "c": "ctx a", "y": "yes", "id": 7},
                {"q": "b?", "c": "ctx b", "y": "no", "id": 8},
            ]
        )
    )
    ex = D.load_table(
        js,
        text_column="q",
        text_pair_column="c",
        label_column="y",
        id_column="id",
        label_names=["no", "yes"],
    )
    assert ex[0] == D.Example("7", ("a?", "ctx a"), 1)
    csvf = tmp_path / "a.csv"
    csvf.write_text('text,score\n"hello, world",0.5\nbye,-1\n')
    ex = D.load_table(csvf, text_column="text", label_column="score", kind="regression")
    assert ex[0].text == "hello, world" and ex[1].label == -1.0


def test_load_table_bad_input(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text("text\tlabel\nhello\t1\n")
    with pytest.raises(
        ValueError, match=r"missing column\(s\) \['sentence'\].*\['text', 'label'\]"
    ):
        D.load_table(tsv)
    with pytest.raises(FileNotFoundError):
        D.load_table(tmp_path / "nope.tsv")
    bad = tmp_path / "a.xml"
    bad.write_text("<x/>")
    with pytest.raises(ValueError, match="unsupported file type"):
        D.load_table(bad)
    empty_label = tmp_path / "b.tsv"
    empty_label.write_text("sentence\tlabel\nhello\t\n")
    with pytest.raises(ValueError, match="missing label"):
        D.load_table(empty_label)
    nolines = tmp_path / "c.tsv"
    nolines.write_text("sentence\tlabel\n")
    with pytest.raises(ValueError, match="no rows"):
        D.load_table(nolines)


def test_empty_split_is_a_clear_error(tmp_path):
    tsv = tmp_path / "few.tsv"
    tsv.write_text("sentence\tlabel\nonly one\t1\n")
    with pytest.raises(ValueError, match="split is empty"):
        D.task_from_file(tsv)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        D.get_task("nope")
    with pytest.raises(ValueError, match="unknown GLUE task"):
        D.load_glue("nope")


def test_task_from_files_with_pool(tmp_path):
    tr = tmp_path / "train.tsv"
    te = tmp_path / "dev.tsv"
    pool = tmp_path / "pool.txt"
    tr.write_text("sentence\tlabel\n" + "".join(f"train {i}\t{i % 2}\n" for i in range(40)))
    te.write_text("sentence\tlabel\n" + "".join(f"test {i}\t{i % 2}\n" for i in range(10)))
    pool.write_text("unlabeled a\ntest 3\nunlabeled b\n")
    task = D.task_from_files(tr, te, pool=pool)
    assert task.pool == ["unlabeled a", "unlabeled b"]  # the test sentence was removed
    assert len(task.train) + len(task.dev) == 40 and len(task.test) == 10


def _fake_sdist(path, payload: bytes) -> None:
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        info = tarfile.TarInfo("hutto_ICWSM_2014/" + D.VADER_MOVIE_FILE)
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    with tarfile.open(path, "w:gz") as t:
        data = inner.getvalue()
        info = tarfile.TarInfo("vaderSentiment-3.3.2/" + D.VADER_INNER_TAR)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))


def test_fetch_uses_the_cache_without_network(tmp_path, monkeypatch, vader_file):
    target = tmp_path / "data" / "vader" / D.VADER_MOVIE_FILE
    target.parent.mkdir(parents=True)
    target.write_bytes(vader_file.read_bytes())

    def no_network(*a, **k):
        raise AssertionError("pip must not run when the file is cached")

    monkeypatch.setattr(D.subprocess, "run", no_network)
    assert D.fetch_vader_file(tmp_path) == target
    monkeypatch.setenv("KCM_CUDA_CACHE", str(tmp_path))
    assert D.default_cache_dir() == tmp_path
    assert len(D.get_task("vader-movie").test) > 0


def test_fetch_refuses_a_tampered_sdist(tmp_path, monkeypatch):
    sdist = tmp_path / "fake.tar.gz"
    _fake_sdist(sdist, b"1\t1.0\tx\n")
    monkeypatch.setenv("KCM_CUDA_VADER_SDIST", str(sdist))
    with pytest.raises(RuntimeError, match="SHA-256"):
        D.fetch_vader_file(tmp_path / "cache")
    assert not (tmp_path / "cache" / "data" / "vader" / D.VADER_MOVIE_FILE).exists()


def test_extract_from_nested_tarball(tmp_path):
    sdist = tmp_path / "s.tar.gz"
    _fake_sdist(sdist, b"1\t1.0\tx\n")
    assert D._extract_vader_movie(sdist) == b"1\t1.0\tx\n"


def _fake_sdist_all(path, payloads: dict) -> None:
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        for name, payload in payloads.items():
            info = tarfile.TarInfo("hutto_ICWSM_2014/" + name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    with tarfile.open(path, "w:gz") as t:
        data = inner.getvalue()
        info = tarfile.TarInfo("vaderSentiment-3.3.2/" + D.VADER_INNER_TAR)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("name", ["vader-amazon", "vader-nyt", "vader-tweets"])
def test_further_vader_tasks_are_binary_and_hash_split(tmp_path, name):
    # ids like the amazon / nyt files ("<doc>_<sentence>"), ratings with zeros (label 0)
    lines = [f"{i // 7 + 1}_{i % 7 + 1}\t{((i * 13) % 17 - 8) / 2}\ttext {i}" for i in range(400)]
    p = tmp_path / D.VADER_FILES[name]
    p.write_bytes("\r\n".join(lines).encode("latin-1"))
    task = D.load_vader_task(name, path=p)
    assert task.kind == "classification" and task.num_labels == 2
    assert sum(task.sizes().values()) == 400
    ratings = {ln.split("\t")[0]: float(ln.split("\t")[1]) for ln in lines}
    for e in task.train + task.dev + task.test:
        assert e.label == int(ratings[e.id] > 0)
    assert all(D.hash_bucket(e.id) >= 80 for e in task.test)
    assert all(D.hash_bucket(e.id) < 60 for e in task.train + task.dev)
    assert len(task.pool) > 0 and all(isinstance(x, str) for x in task.pool)
    assert D.VADER_FILES[name] in task.source


def test_further_vader_tasks_from_the_cache_and_registry(tmp_path, monkeypatch):
    for name in ("vader-amazon", "vader-nyt", "vader-tweets"):
        assert name in D.TASKS
        target = tmp_path / "data" / "vader" / D.VADER_FILES[name]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(f"{i}\t{(i % 5) - 2}\tsentence {i}\n" for i in range(200)))
    monkeypatch.setattr(D.subprocess, "run", lambda *a, **k: pytest.fail("no pip when cached"))
    monkeypatch.setenv("KCM_CUDA_CACHE", str(tmp_path))
    for name in ("vader-amazon", "vader-nyt", "vader-tweets"):
        t = D.get_task(name)
        assert t.name == name and len(t.test) > 0
    with pytest.raises(ValueError, match="unknown task"):
        D.get_task("vader-imdb")
    with pytest.raises(ValueError, match="not a VADER task"):
        D.load_vader_task("vader-imdb", path=tmp_path / "x.txt")
    with pytest.raises(ValueError, match="not a VADER ground-truth file"):
        D.fetch_vader_file(tmp_path, file="../../etc/passwd")


def test_fetch_caches_every_ground_truth_file(tmp_path, monkeypatch):
    files = sorted(set(D.VADER_FILES.values()))
    sdist = tmp_path / "s.tar.gz"
    _fake_sdist_all(sdist, {f: f"1\t1.0\t{f}\n".encode() for f in files})
    assert D._extract_vader_files(sdist, files)[files[0]] == f"1\t1.0\t{files[0]}\n".encode()
    with pytest.raises(RuntimeError, match="does not contain nope.txt"):
        D._extract_vader_files(sdist, ["nope.txt"])
    # skip the SHA-256 check for the fake sdist: only the extraction and caching are tested here
    monkeypatch.setattr(
        D, "VADER_SDIST_SHA256", __import__("hashlib").sha256(sdist.read_bytes()).hexdigest()
    )
    monkeypatch.setenv("KCM_CUDA_VADER_SDIST", str(sdist))
    got = D.fetch_vader_file(tmp_path / "cache", file=D.VADER_FILES["vader-nyt"])
    assert got.read_text() == f"1\t1.0\t{D.VADER_FILES['vader-nyt']}\n"
    for f in files:
        assert (tmp_path / "cache" / "data" / "vader" / f).is_file()
