"""`prepare` end to end: every source type, each encoding, each bad input, determinism, split hygiene."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import shared_path
from poetgen.cli.app import app
from poetgen.data.dataset import load_dataset
from poetgen.errors import CorpusError, DatasetError
from poetgen.data.prepare import PrepareOptions, prepare, resolve_training_data

runner = CliRunner()

POEMS_SIMPLIFIED = [
    ("静夜思", "李白", ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]),
    ("登鹳雀楼", "王之涣", ["白日依山尽，黄河入海流。", "欲穷千里目，更上一层楼。"]),
    ("春晓", "孟浩然", ["春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。"]),
    ("相思", "王维", ["红豆生南国，春来发几枝。", "愿君多采撷，此物最相思。"]),
    ("早发白帝城", "李白", ["朝辞白帝彩云间，千里江陵一日还。", "两岸猿声啼不住，轻舟已过万重山。"]),
]
# Traditional text written for these tests (Big5 cannot encode most simplified characters).
TRADITIONAL = (
    "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。\n\n"
    "白日依山盡，黃河入海流。欲窮千里目，更上一層樓。\n\n"
    "國破山河在，城春草木深。感時花濺淚，恨別鳥驚心。烽火連三月，家書抵萬金。白頭搔更短，渾欲不勝簪。\n"
)


def cli(*args: str, input: str | bytes | None = None):
    return runner.invoke(app, list(args), input=input)


def docs_of(ids: np.ndarray, vocab) -> list[str]:
    """Split an id stream at end-of-text into document strings."""
    text = vocab.decode(ids, eot="\x00")
    parts = text.split("\x00")
    assert parts[-1] == "", "every stream ends with an end-of-text symbol"
    return parts[:-1]


def write_poetry_json(path: Path, poems, extra=()) -> Path:
    records = [{"author": a, "title": t, "paragraphs": p, "id": str(i)} for i, (t, a, p) in enumerate(poems)]
    records.extend(extra)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=4), encoding="utf-8")
    return path


# --- source types ---------------------------------------------------------------------------------------------------


def test_plain_text_one_document_per_file(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world\nsecond line\n", encoding="utf-8")
    r = prepare([str(src)], tmp_path / "out", PrepareOptions(val_fraction=0.0))
    ds = load_dataset(tmp_path / "out")
    assert docs_of(ds.train, ds.vocab) == ["hello world\nsecond line\n"]
    assert r.counts["documents"] == 1 and r.counts["characters"] == 24
    assert ds.train.dtype == np.uint16 and len(ds.val) == 0


@pytest.mark.parametrize("sep,expected", [("blank", ["one\ntwo", "three"]), ("line", ["one", "two", "three"])])
def test_plain_text_document_separators(tmp_path, sep, expected):
    src = tmp_path / "a.txt"
    src.write_text("one\ntwo\n\n\nthree\n", encoding="utf-8")
    prepare([str(src)], tmp_path / "out", PrepareOptions(doc_sep=sep, val_fraction=0.0))
    ds = load_dataset(tmp_path / "out")
    assert [d.strip() for d in docs_of(ds.train, ds.vocab)] == expected


def test_chinese_poetry_json_recognised_and_notes_stripped(tmp_path):
    poems = POEMS_SIMPLIFIED[:2] + [("春晓", "孟浩然", ["春眠不觉晓，处处闻啼鸟。", "夜来风雨声（一作「风声雨」），花落知多少。"])]
    src = write_poetry_json(tmp_path / "poems.json", poems)
    r = prepare([str(src)], tmp_path / "out", PrepareOptions(val_fraction=0.0))
    assert r.sources[0]["kind"] == "chinese-poetry"
    ds = load_dataset(tmp_path / "out")
    docs = docs_of(ds.train, ds.vocab)
    assert docs[2] == "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"
    assert len(docs) == 3


def test_json_and_jsonl_with_text_fields(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "alpha"}, {"text": "beta"}, "gamma"]), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        '{"title": "T1", "body": "x1"}\n\n{"title": "T2", "body": "x2"}\n', encoding="utf-8"
    )
    prepare([str(tmp_path / "a.json")], tmp_path / "o1", PrepareOptions(val_fraction=0.0))
    ds = load_dataset(tmp_path / "o1")
    assert docs_of(ds.train, ds.vocab) == ["alpha", "beta", "gamma"]
    prepare(
        [str(tmp_path / "b.jsonl")], tmp_path / "o2", PrepareOptions(val_fraction=0.0, text_fields=("title", "body"))
    )
    ds = load_dataset(tmp_path / "o2")
    assert docs_of(ds.train, ds.vocab) == ["T1\nx1", "T2\nx2"]
    with pytest.raises(CorpusError, match="no field 'missing'"):
        prepare([str(tmp_path / "b.jsonl")], tmp_path / "o3", PrepareOptions(text_fields=("missing",)))
    (tmp_path / "c.jsonl").write_text('{"title": "T1", "words": "x1"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="--text-field"):
        prepare([str(tmp_path / "c.jsonl")], tmp_path / "o4", PrepareOptions())


def test_jsonl_chinese_poetry_records(tmp_path):
    lines = [json.dumps({"title": t, "author": a, "paragraphs": p}, ensure_ascii=False) for t, a, p in POEMS_SIMPLIFIED]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = prepare([str(tmp_path / "p.jsonl")], tmp_path / "out", PrepareOptions(val_fraction=0.0))
    assert r.counts["documents"] == 5 and r.sources[0]["kind"].startswith("chinese-poetry")


def test_directory_recursive_with_glob(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("aaa", encoding="utf-8")
    (d / "sub" / "b.txt").write_text("bbb", encoding="utf-8")
    (d / "sub" / "c.md").write_text("ccc", encoding="utf-8")
    (d / ".hidden.txt").write_text("hhh", encoding="utf-8")
    r = prepare([str(d)], tmp_path / "o1", PrepareOptions(val_fraction=0.0))
    assert [Path(s["name"]).name for s in r.sources] == ["a.txt", "b.txt"]
    r = prepare([str(d)], tmp_path / "o2", PrepareOptions(val_fraction=0.0, globs=("*.md",)))
    assert [Path(s["name"]).name for s in r.sources] == ["c.md"]
    with pytest.raises(CorpusError, match="no files matching"):
        prepare([str(d)], tmp_path / "o3", PrepareOptions(globs=("*.csv",)))
    assert not (tmp_path / "o3").exists()


def test_stdin_source_through_cli(tmp_path):
    out = tmp_path / "out"
    r = cli("prepare", "-", "-o", str(out), "--json", "--val-fraction", "0", input="从标准输入读\n")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["sources"][0]["name"] == "<stdin>" and summary["counts"]["characters"] == 7
    # JSON on stdin is sniffed
    data = json.dumps([{"paragraphs": ["白日依山尽，黄河入海流。"], "title": "t", "author": "a"}], ensure_ascii=False)
    r = cli("prepare", "-", "-o", str(tmp_path / "o2"), "--json", input=data)
    assert r.exit_code == 0 and json.loads(r.stdout)["sources"][0]["kind"] == "chinese-poetry"


# --- encodings ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-8-sig", "gb18030", "big5", "utf-16", "utf-16-le"])
def test_encodings_are_detected(tmp_path, encoding):
    src = tmp_path / "poems.txt"
    src.write_bytes(TRADITIONAL.encode(encoding))
    r = prepare([str(src)], tmp_path / "out", PrepareOptions(doc_sep="blank", val_fraction=0.0))
    ds = load_dataset(tmp_path / "out")
    assert [d.strip() for d in docs_of(ds.train, ds.vocab)] == [p.strip() for p in TRADITIONAL.split("\n\n")]
    assert r.sources[0]["encoding"].replace("_", "-").lower().startswith(encoding.split("-sig")[0][:5])


def test_explicit_encoding_and_script_conversion(tmp_path):
    src = tmp_path / "poems.txt"
    src.write_bytes(TRADITIONAL.encode("big5"))
    prepare([str(src)], tmp_path / "out", PrepareOptions(encoding="big5", script="simplified", doc_sep="blank"))
    ds = load_dataset(tmp_path / "out")
    text = ds.vocab.decode(np.concatenate([ds.train, ds.val]))
    assert "举头望明月" in text and "舉" not in text
    assert ds.meta["script"] == "simplified"


def test_undecodable_bytes_name_file_line_and_offset(tmp_path):
    src = tmp_path / "bad.txt"
    good = "第一行\nsecond line\n".encode("utf-8")
    src.write_bytes(good + b"abc\xff\xfedef\n")
    with pytest.raises(CorpusError) as e:
        prepare([str(src)], tmp_path / "out", PrepareOptions(encoding="utf-8"))
    msg = str(e.value)
    assert "bad.txt" in msg and "line 3" in msg and f"byte offset {len(good) + 3}" in msg
    assert not (tmp_path / "out").exists()


def test_undetectable_bytes_without_encoding(tmp_path):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"plain ascii line\n" * 3 + b"\xff\xfe\xfd\xfc\xfb\x80\x81" * 2 + b"\n")
    r = cli("prepare", str(src), "-o", str(tmp_path / "out"))
    assert r.exit_code == 1 and "Error:" in r.stderr and "line 4" in r.stderr and "Traceback" not in r.output


# --- bad input ------------------------------------------------------------------------------------------------------


def _fails_cleanly(tmp_path, *args, input=None, match=""):
    out = tmp_path / "out"
    r = cli("prepare", *args, "-o", str(out), input=input)
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("Error: ") and match in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_missing_path(tmp_path):
    _fails_cleanly(tmp_path, str(tmp_path / "nope.txt"), match="no such file")


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    _fails_cleanly(tmp_path, str(tmp_path / "empty.txt"), match="empty")


def test_whitespace_only_file(tmp_path):
    (tmp_path / "ws.txt").write_text(" \n\n\t\n", encoding="utf-8")
    _fails_cleanly(tmp_path, str(tmp_path / "ws.txt"), match="empty")


def test_binary_file(tmp_path):
    (tmp_path / "junk.txt").write_bytes(bytes(range(256)) * 50)
    _fails_cleanly(tmp_path, str(tmp_path / "junk.txt"), match="binary")


def test_everything_filtered_away(tmp_path):
    src = write_poetry_json(tmp_path / "p.json", POEMS_SIMPLIFIED)
    _fails_cleanly(tmp_path, str(src), "--author", "杜甫", match="no documents left")
    _fails_cleanly(tmp_path, str(src), "--min-length", "500", match="outside the length limits")


def test_directory_without_matching_files(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.csv").write_text("a,b", encoding="utf-8")
    _fails_cleanly(tmp_path, str(d), match="no files matching")


def test_malformed_json(tmp_path):
    (tmp_path / "bad.json").write_text('[{"text": "a"},', encoding="utf-8")
    _fails_cleanly(tmp_path, str(tmp_path / "bad.json"), match="invalid JSON")


def test_existing_output_needs_force(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("some text", encoding="utf-8")
    out = tmp_path / "out"
    assert cli("prepare", str(src), "-o", str(out), "-q").exit_code == 0
    before = (out / "train.npy").read_bytes()
    src.write_text("other text!", encoding="utf-8")
    r = cli("prepare", str(src), "-o", str(out))
    assert r.exit_code == 1 and "--force" in r.stderr
    assert (out / "train.npy").read_bytes() == before
    assert cli("prepare", str(src), "-o", str(out), "--force", "-q").exit_code == 0
    assert (out / "train.npy").read_bytes() != before


def test_usage_error_exit_code_2(tmp_path):
    assert cli("prepare", "--no-such-flag").exit_code == 2


# --- filters, dedupe, split -----------------------------------------------------------------------------------------


def test_form_and_author_filters(tmp_path):
    src = write_poetry_json(tmp_path / "p.json", POEMS_SIMPLIFIED)
    r = prepare([str(src)], tmp_path / "o1", PrepareOptions(forms=("qijue",), val_fraction=0.0))
    assert r.counts["documents"] == 1 and r.counts["filtered_form"] == 4
    r = prepare([str(src)], tmp_path / "o2", PrepareOptions(forms=("五绝",), authors=("李白",), val_fraction=0.0))
    assert r.counts["documents"] == 1
    # a traditional author name matches simplified data
    src2 = write_poetry_json(tmp_path / "p2.json", [("相思", "王維", POEMS_SIMPLIFIED[3][2])])
    r = prepare([str(src2)], tmp_path / "o3", PrepareOptions(authors=("王维",), val_fraction=0.0))
    assert r.counts["documents"] == 1


def test_duplicates_removed_after_normalisation(tmp_path):
    trad = ("靜夜思", "李白", ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"])
    src = write_poetry_json(tmp_path / "p.json", POEMS_SIMPLIFIED + [POEMS_SIMPLIFIED[0], trad])
    r = prepare([str(src)], tmp_path / "o1", PrepareOptions(script="simplified", val_fraction=0.0))
    assert r.counts["documents_read"] == 7 and r.counts["duplicates"] == 2 and r.counts["documents"] == 5
    r = prepare([str(src)], tmp_path / "o2", PrepareOptions(val_fraction=0.0, dedupe=False))
    assert r.counts["documents"] == 7


def _many_docs(n: int, dup_every: int = 0) -> list[str]:
    rng = np.random.default_rng(0)
    chars = [chr(0x4E00 + i) for i in range(300)]
    docs = ["".join(rng.choice(chars, size=12)) for _ in range(n)]
    if dup_every:
        docs = [docs[0] if i % dup_every == 0 else d for i, d in enumerate(docs)]
    return docs


def test_random_split_has_no_overlap_and_keeps_identical_documents_together(tmp_path):
    docs = _many_docs(400, dup_every=7)
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(docs), encoding="utf-8")
    r = prepare(
        [str(src)], tmp_path / "out", PrepareOptions(doc_sep="line", dedupe=False, val_fraction=0.2, seed=3)
    )
    ds = load_dataset(tmp_path / "out")
    train, val = docs_of(ds.train, ds.vocab), docs_of(ds.val, ds.vocab)
    assert r.split == "random" and len(train) + len(val) == 400
    assert not set(train) & set(val)
    assert 60 <= len(val) <= 140  # about 20%: duplicates move as one group
    assert r.counts["val_tokens"] == len(ds.val) and r.counts["train_tokens"] == len(ds.train)


def test_seed_changes_split_and_same_seed_is_byte_identical(tmp_path):
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(_many_docs(200)), encoding="utf-8")
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare([str(src)], tmp_path / name / "ds", PrepareOptions(doc_sep="line", seed=seed))
    for f in ("train.npy", "val.npy", "vocab.json", "meta.json"):
        assert (tmp_path / "a" / "ds" / f).read_bytes() == (tmp_path / "b" / "ds" / f).read_bytes(), f
    assert (tmp_path / "a" / "ds" / "val.npy").read_bytes() != (tmp_path / "c" / "ds" / "val.npy").read_bytes()


def test_tail_split_is_the_exact_last_fraction(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("abcdefghij" * 100, encoding="utf-8")  # 1000 characters + 1 end-of-text
    r = prepare([str(src)], tmp_path / "out", PrepareOptions(split="tail", val_fraction=0.1))
    ds = load_dataset(tmp_path / "out")
    assert len(ds.val) == 100 and len(ds.train) == 901
    assert ds.vocab.decode(ds.train[:10]) == "abcdefghij"
    assert r.split == "tail"


def test_min_count_coverage_and_uint32_ids(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("aaaab", encoding="utf-8")
    r = prepare([str(src)], tmp_path / "o1", PrepareOptions(min_count=2, val_fraction=0.0))
    assert r.vocab_size == 3 and r.counts["unk_tokens"] == 1 and r.coverage == pytest.approx(0.8)
    # more than 65,536 distinct symbols -> uint32 ids
    big = "".join(chr(0x4E00 + i) for i in range(20000)) + "".join(chr(0x20000 + i) for i in range(50000))
    src.write_text(big, encoding="utf-8")
    prepare([str(src)], tmp_path / "o2", PrepareOptions(val_fraction=0.0))
    ds = load_dataset(tmp_path / "o2")
    assert ds.train.dtype == np.uint32 and len(ds.vocab) == 70002
    assert ds.vocab.decode(ds.train[:-1]) == big


def test_one_giant_line_streams(tmp_path):
    src = tmp_path / "giant.txt"
    line = ("0123456789" * 100_000) * 9  # 9 MB without a line break: cut and streamed
    src.write_text(line, encoding="utf-8")
    r = prepare([str(src)], tmp_path / "out", PrepareOptions(val_fraction=0.0))
    assert r.counts["characters"] == len(line)
    ds = load_dataset(tmp_path / "out")
    assert ds.vocab.decode(ds.train[-11:-1]) == "0123456789"


def test_resolve_training_data_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("POETGEN_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "c.txt"
    src.write_text("hello there\n" * 10, encoding="utf-8")
    first = resolve_training_data(str(src))
    assert load_dataset(first).meta["counts"]["characters"] == 120
    mtime = (first / "meta.json").stat().st_mtime_ns
    assert resolve_training_data(str(src)) == first and (first / "meta.json").stat().st_mtime_ns == mtime
    assert resolve_training_data(str(first)) == first
    src.write_text("changed\n", encoding="utf-8")
    assert resolve_training_data(str(src)) != first
    with pytest.raises(DatasetError):
        load_dataset(tmp_path / "nothing")


# --- the real corpora (skipped without ../shared) -------------------------------------------------------------------


@pytest.mark.slow  # prepares the whole 全唐诗
def test_full_tang_corpus_counts_match_the_files(tmp_path):
    tang = shared_path("tang")
    r = cli("prepare", str(tang), "--script", "simplified", "-o", str(tmp_path / "tang"), "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    c = s["counts"]
    files = sorted(tang.glob("poet.tang.*.json"))
    expected = sum(len(json.loads(f.read_text(encoding="utf-8"))) for f in files)
    assert len(s["sources"]) == len(files) == 53 and expected == 53017
    assert c["documents_read"] == expected
    assert c["empty"] == 1
    assert c["documents"] == expected - c["empty"] - c["duplicates"]
    assert c["train_documents"] + c["val_documents"] == c["documents"]
    assert c["val_documents"] == round(0.05 * c["documents"])
    ds = load_dataset(tmp_path / "tang")
    assert ds.meta["script"] == "simplified" and "舉" not in ds.vocab and "举" in ds.vocab
    assert len(ds.train) + len(ds.val) == c["characters"] + c["documents"]


def test_tiny_shakespeare_counts_match_the_file(tmp_path):
    src = shared_path("tinyshakespeare", "input.txt")
    r = cli("prepare", str(src), "-o", str(tmp_path / "ts"), "--json", "--split", "tail", "--val-fraction", "0.1")
    assert r.exit_code == 0, r.stderr
    c = json.loads(r.stdout)["counts"]
    text = src.read_text(encoding="utf-8")
    assert c["characters"] == len(text) == 1_115_394 and c["distinct_characters"] == 65
    ds = load_dataset(tmp_path / "ts")
    assert len(ds.val) == round(0.1 * (len(text) + 1))
    assert ds.vocab.decode(ds.val[:-1]) == text[len(ds.train):]


def test_lone_surrogate_in_json_is_a_clean_error(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "床前明月光\\ud83d疑是地上霜"}\n', encoding="utf-8")
    r = cli("prepare", str(tmp_path / "s.jsonl"), "-o", str(tmp_path / "out"))
    assert r.exit_code == 1 and "unpaired surrogate" in r.stderr and "line 1" in r.stderr
    assert not (tmp_path / "out").exists()


def test_damaged_dataset_ids_are_refused(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("abcabc", encoding="utf-8")
    prepare([str(src)], tmp_path / "ds", PrepareOptions(val_fraction=0.0))
    ids = np.load(tmp_path / "ds" / "train.npy")
    ids[2] = 60000
    np.save(tmp_path / "ds" / "train.npy", ids)
    with pytest.raises(DatasetError, match="damaged"):
        load_dataset(tmp_path / "ds")
