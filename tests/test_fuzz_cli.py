"""Bad input everywhere: hypothesis feeds `poetgen prepare` random text, bytes and odd files, and `poetgen sample`
random argument values. The tool never shows a traceback: it exits 0, 1 (`Error: ...` on stderr) or 2 (usage),
and never modifies its input files.

CliRunner runs the commands in this process (catch_exceptions=True): an exception that escapes the CLI is left
in result.exception instead of being raised, so it is asserted to be nothing but SystemExit.
`pytest --hypothesis-show-statistics tests/test_fuzz_cli.py` reports how many inputs each property saw.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
import unittest
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from poetgen.checkpoint.torch_io import save_checkpoint
from poetgen.cli.app import app
from poetgen.model.rnn import CharRNN, ModelConfig
from poetgen.data.vocab import EOT_ID, Vocab

pytestmark = pytest.mark.slow  # a minute or more on 2 cores; CI runs it, `pytest -m "not slow"` leaves it out

torch.set_num_threads(1)
runner = CliRunner()
# CI: the same inputs on every run (a failure can be replayed). POETGEN_FUZZ_SCALE=20 tries 20 times as many,
# freshly drawn each run (benchmarks/RESULTS.md reports such a run).
SCALE = float(os.environ.get("POETGEN_FUZZ_SCALE", "1"))
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                derandomize=SCALE == 1, database=None)


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


def fuzz(n: int):
    """`@settings(FUZZ, max_examples=examples(n))` for a @given property, and after its run a check that it really saw
    at least half that many inputs. Without it a property that ran (almost) nothing would pass: a strategy that
    filters everything out, a search space that turned out tiny, a Hypothesis profile without the generate phase
    (Hypothesis then skips the test)."""

    def decorate(prop):
        prop = settings(FUZZ, max_examples=examples(n))(prop)
        inner = prop.hypothesis.inner_test
        calls = 0

        @functools.wraps(inner)
        def counting(*args, **kwargs):
            nonlocal calls
            calls += 1
            return inner(*args, **kwargs)

        prop.hypothesis.inner_test = counting  # Hypothesis's documented hook for wrapping the inner test

        @functools.wraps(prop)
        def run(*args, **kwargs):
            nonlocal calls
            calls = 0
            try:
                prop(*args, **kwargs)
            except unittest.SkipTest:  # "told to run no examples": here that is the failure below, not a skip
                pass
            wanted = max(1, examples(n) // 2)
            assert calls >= wanted, f"{prop.__name__} ran {calls} inputs, fewer than half of {examples(n)}"

        return run

    return decorate


def test_fuzz_fails_a_property_that_ran_too_few_inputs(monkeypatch):
    """The check in fuzz() can fail: two inputs where forty were asked for, and none at all."""

    @fuzz(40)
    @given(x=st.booleans())
    def two_inputs(x):
        pass

    with pytest.raises(AssertionError, match="two_inputs ran 2 inputs"):
        two_inputs()
    monkeypatch.setitem(globals(), "FUZZ", settings(FUZZ, phases=[Phase.explicit]))  # no generate phase

    @fuzz(40)
    @given(x=st.integers())
    def no_inputs(x):
        pass

    with pytest.raises(AssertionError, match="no_inputs ran 0 inputs"):
        no_inputs()


TEXT = ("床前明月光，疑是地上霜。举头望明月，低头思故乡。白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
        "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。")


def clean_exit(r, what) -> None:
    """Exit 0, 1 with `Error: ` first on stderr, or 2 (usage); never an escaped exception, never a traceback."""
    assert r.exception is None or isinstance(r.exception, SystemExit), (what, repr(r.exception), r.output)
    assert r.exit_code in (0, 1, 2), (what, r.exit_code, r.output)
    if r.exit_code == 1:
        assert r.stderr.startswith("Error: "), (what, r.stderr)
    assert "Traceback" not in r.output, (what, r.output)


def digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` -> its sha256 (symlinks by their target, without following them)."""
    out = {}
    for p in sorted([path] if not path.is_dir() or path.is_symlink() else path.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "->" + os.readlink(p)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def prepare(sources: list[Path | str], *options: str, input: bytes | None = None):
    out = Path(tempfile.mkdtemp(prefix="fuzz-out-")) / "ds"
    return runner.invoke(app, ["prepare", *map(str, sources), "-o", str(out), "-q", *options], input=input), out


def check_prepare(sources: list[Path], *options: str, input: bytes | None = None):
    before = {s: digest(s) for s in sources}
    r, out = prepare(sources, *options, input=input)
    clean_exit(r, (sources, options))
    assert {s: digest(s) for s in sources} == before, "an input file was modified"
    if r.exit_code == 0:  # a dataset that loads
        from poetgen.data.dataset import load_dataset

        ds = load_dataset(out)
        assert len(ds.train) > 0 and int(ds.train.max()) < len(ds.vocab)
    return r


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _file(scratch: Path, name: str, data: bytes) -> Path:
    d = Path(tempfile.mkdtemp(dir=scratch))
    p = d / name
    p.write_bytes(data)
    return p


# --- prepare: random content ------------------------------------------------------------------------------------

PREPARE_OPTIONS = st.lists(st.sampled_from([
    ("--format", "text"), ("--format", "json"), ("--format", "jsonl"), ("--doc-sep", "blank"), ("--doc-sep", "line"),
    ("--encoding", "gb18030"), ("--encoding", "big5"), ("--encoding", "utf-16"), ("--encoding", "latin-1"),
    ("--encoding", "no-such-codec"), ("--script", "simplified"), ("--script", "traditional"), ("--punct", "keep"),
    ("--strip-notes",), ("--split", "tail"), ("--split", "random"), ("--val-fraction", "0"),
    ("--val-fraction", "0.5"), ("--val-fraction", "1"), ("--val-fraction", "-0.1"), ("--val-fraction", "nan"),
    ("--min-count", "0"), ("--min-count", "3"), ("--min-length", "-5"), ("--max-length", "0"),
    ("--text-field", "text"), ("--text-field", "nope"), ("--form", "五绝"), ("--form", "sonnet"),
    ("--keep-duplicates",), ("--glob", "*.md"),
]), max_size=3).map(lambda xs: [a for x in xs for a in x])


@fuzz(100)
@given(text=st.text(max_size=300), ext=st.sampled_from([".txt", ".json", ".jsonl", ""]), options=PREPARE_OPTIONS)
def test_prepare_random_unicode(scratch, text, ext, options):
    data = text.encode("utf-8", "surrogatepass")  # lone surrogates become the bytes a broken encoder writes
    check_prepare([_file(scratch, "corpus" + ext, data)], *options)


@fuzz(80)
@given(data=st.binary(max_size=600), ext=st.sampled_from([".txt", ".json", ".jsonl"]), options=PREPARE_OPTIONS)
def test_prepare_random_bytes(scratch, data, ext, options):
    check_prepare([_file(scratch, "corpus" + ext, data)], *options)


@fuzz(40)
@given(data=st.binary(max_size=400) | st.text(max_size=200).map(str.encode), options=PREPARE_OPTIONS)
def test_prepare_random_stdin(data, options):
    r, _ = prepare(["-"], *options, input=data)
    clean_exit(r, ("stdin", options))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["paragraphs", "text", "title", "author", "content", "body", "x"]), inner, max_size=4),
    max_leaves=10,
)


@fuzz(80)
@given(records=st.lists(JSON_VALUES, max_size=5), as_lines=st.booleans(), cut=st.integers(0, 40),
       options=PREPARE_OPTIONS)
def test_prepare_random_json_and_jsonl(scratch, records, as_lines, cut, options):
    """Records of any JSON shape; in JSONL some lines cut short (a crash of whatever wrote them)."""
    if as_lines:
        lines = [json.dumps(r, ensure_ascii=False) for r in records]
        if lines and cut:
            lines[cut % len(lines)] = lines[cut % len(lines)][: max(1, len(lines[cut % len(lines)]) - cut)]
        path = _file(scratch, "poems.jsonl", "\n".join(lines).encode())
    else:
        path = _file(scratch, "poems.json", json.dumps(records, ensure_ascii=False).encode())
    check_prepare([path], *options)


# --- prepare: odd files -----------------------------------------------------------------------------------------


def odd_sources(root: Path) -> dict[str, Path]:
    """Named files and directories no corpus should be, each in its own directory."""
    cases: dict[str, Path] = {}

    def put(name: str, filename: str, data: bytes) -> None:
        (root / name).mkdir()
        (root / name / filename).write_bytes(data)
        cases[name] = root / name / filename

    poem = TEXT.encode()
    put("empty", "a.txt", b"")
    put("only-whitespace", "a.txt", " \n\t\r\n\u3000\n".encode())
    put("nul-filled", "a.txt", bytes(10000))
    put("nul-in-text", "a.txt", poem + b"\0" + poem)
    put("one-giant-line", "a.txt", poem * 20000)  # 2.3 MB without a line break
    put("lone-surrogates", "a.txt", poem + b"\xed\xa0\x80\xed\xbf\xbf" + poem)
    put("mixed-encodings", "a.txt", poem + b"\n" + TEXT.encode("gb18030") + b"\n" + TEXT.encode("big5", "ignore"))
    put("utf16-no-bom", "a.txt", TEXT.encode("utf-16-le"))
    put("bom-only", "a.txt", b"\xef\xbb\xbf")
    put("bare-cr", "a.txt", poem.replace("。".encode(), "。\r".encode()))
    put("json-number", "a.json", b"42")
    put("json-string", "a.json", json.dumps(TEXT).encode())
    put("json-null", "a.json", b"null")
    put("json-nested-deep", "a.json", b"[" * 5000 + b"]" * 5000)
    put("json-truncated", "a.json", json.dumps([{"paragraphs": [TEXT]}] * 3).encode()[:-7])
    put("json-paragraphs-not-list", "a.json", json.dumps([{"paragraphs": 5}]).encode())
    put("jsonl-broken-lines", "a.jsonl",
        b'{"text": "\xe5\xba\x8a\xe5\x89\x8d"}\n{"text": \n[1,2]\n{"paragraphs": ["a"]}\n')
    put("jsonl-nested-deep", "a.jsonl", b"[" * 5000 + b"]" * 5000 + b"\n")
    put("jsonl-blank-lines", "a.jsonl", b"\n\n\n")
    put("jsonl-huge-int", "a.jsonl", b'{"text": 1' + b"0" * 5000 + b"}\n")
    put("json-huge-int", "a.json", b'[{"text": 1' + b"0" * 5000 + b"}]")
    put("binary-png", "a.txt", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    deep = root / "deep-directories"
    d = deep
    for i in range(60):
        d = d / f"d{i}"
    d.mkdir(parents=True)
    (d / "poem.txt").write_bytes(poem)
    cases["deep-directories"] = deep
    (root / "no-matching-files").mkdir()
    (root / "no-matching-files" / "a.md").write_bytes(poem)
    cases["no-matching-files"] = root / "no-matching-files"
    loops = root / "symlink-loops"
    loops.mkdir()
    (loops / "poem.txt").write_bytes(poem)
    try:
        os.symlink("b.txt", loops / "a.txt")  # a -> b -> a
        os.symlink("a.txt", loops / "b.txt")
        os.symlink(".", loops / "self")  # a directory that contains itself
        os.symlink(loops, loops / "again")  # and one that names it absolutely
        os.symlink("self.txt", root / "self.txt")
        cases["symlink-loop-file"] = root / "self.txt"
    except OSError:  # no symlinks on this file system
        pass
    cases["symlink-loops"] = loops
    os.mkfifo(root / "fifo.txt") if hasattr(os, "mkfifo") else None
    if (root / "fifo.txt").exists():
        cases["fifo"] = root / "fifo.txt"
    cases["a-directory-as-json"] = root / "deep-directories"
    return cases


def test_prepare_odd_files(tmp_path):
    cases = odd_sources(tmp_path)
    outcomes = {}
    for name, path in cases.items():
        for options in ([], ["--doc-sep", "line"], ["--format", "jsonl"]):
            r = check_prepare([path], *options)
            outcomes[(name, *options)] = r.exit_code
    # The inputs that hold a poem make a dataset; those that hold nothing usable are refused.
    assert outcomes[("deep-directories",)] == 0 and outcomes[("one-giant-line",)] == 0
    assert outcomes[("mixed-encodings",)] in (0, 1) and outcomes[("lone-surrogates",)] in (0, 1)
    for name in ("empty", "nul-filled", "json-number", "json-null", "no-matching-files", "jsonl-broken-lines"):
        assert outcomes[(name,)] == 1, name


# --- sample: random arguments against one tiny checkpoint --------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny model that strongly predicts end-of-text, so even a huge --length ends in a few steps."""
    torch.manual_seed(0)
    vocab = Vocab.from_counts(Counter(TEXT))
    model = CharRNN(ModelConfig(len(vocab), cell="gru", layers=1, hidden=8, embed=4))
    with torch.no_grad():
        model.head.bias[EOT_ID] = 4.0
    return save_checkpoint(tmp_path_factory.mktemp("sample") / "run" / "best.ckpt", model, vocab, rng=False)


def _num(x) -> str:
    return repr(x) if not isinstance(x, float) or math.isfinite(x) else str(x)


SAMPLE_ARGS = st.fixed_dictionaries({}, optional={
    "--temperature": st.floats() | st.sampled_from([0.0, -1.0, 1e-30, 1e30]),
    "--top-k": st.integers(-5, 100) | st.sampled_from([0, 2**31, 2**63, 10**30]),
    "--top-p": st.floats() | st.sampled_from([0.0, 1.0, 1.5, -0.5, 1e-12]),
    "--repetition-penalty": st.floats() | st.sampled_from([0.0, 1.0, 1e-30, 1e30]),
    "--length": st.integers(-3, 60) | st.sampled_from([0, 10**6, 2**31, 2**63, 10**30]),
    "--num-samples": st.integers(-2, 6) | st.sampled_from([0, 10**9, 2**63]),
    "--seed": st.integers(-(2**65), 2**65) | st.sampled_from([-(2**63) - 1, -(2**63), 2**63, 2**64 - 1, 2**64]),
    "--form": st.sampled_from(["五绝", "七律", "wujue", "7lv", "sonnet", ""]) | st.text(max_size=4),
    "--acrostic": st.sampled_from(["春夏秋冬", "明月", "床", "𠀀"]) | st.text(max_size=6),
    "--line-length": st.integers(-1, 9),
    "--style": st.text(max_size=10) | st.sampled_from(["床前明月光"]),
    "--prime": st.text(max_size=12) | st.sampled_from(["床前", "牀前", "-", ""]),
    "--output-script": st.sampled_from(["simplified", "traditional", "klingon"]),
    "--rhyme": st.just(None), "--stream": st.just(None), "--json": st.just(None),
    "--threads": st.integers(-1, 3),
    "--device": st.sampled_from(["cpu", "auto", "cuda:7", "tpu", ""]),
})


@fuzz(300)
@given(args=SAMPLE_ARGS, stdin=st.text(max_size=10))
def test_sample_random_arguments(ckpt, args, stdin):
    argv = ["sample", "-c", str(ckpt), "-q"]
    for flag, value in args.items():
        argv += [flag] if value is None else [flag, _num(value)]
    before = digest(ckpt)
    r = runner.invoke(app, argv, input=stdin)
    clean_exit(r, argv)
    assert digest(ckpt) == before


@fuzz(50)
@given(lines=st.lists(st.text(max_size=8), max_size=4), raw=st.binary(max_size=40), use_raw=st.booleans())
def test_sample_random_primes_file(ckpt, scratch, lines, raw, use_raw):
    data = raw if use_raw else "\n".join(lines).encode("utf-8", "surrogatepass")
    primes = _file(scratch, "primes.txt", data)
    r = runner.invoke(app, ["sample", "-c", str(ckpt), "-q", "--primes-file", str(primes), "-l", "5", "--seed", "1"])
    clean_exit(r, data)
    assert primes.read_bytes() == data


# --- train: random flag values (a dry run: the configuration and the plan, no steps) ------------------------------

TRAIN_FLAGS = st.fixed_dictionaries({}, optional={
    "--cell": st.sampled_from(["rnn", "lstm", "gru", "transformer", ""]),
    "--layers": st.integers(-2, 4) | st.just(2**64),
    "--hidden": st.integers(-2, 64) | st.just(2**40),
    "--embed": st.integers(-2, 64),
    "--dropout": st.floats() | st.sampled_from([1.0, -0.1]),
    "--batch-size": st.integers(-2, 64) | st.just(2**62),
    "--seq-len": st.integers(-2, 64) | st.just(2**62),
    "--lr": st.floats(),
    "--min-lr-ratio": st.floats(),
    "--warmup": st.integers(-5, 10),
    "--weight-decay": st.floats(),
    "--grad-clip": st.floats(),
    "--max-steps": st.integers(-5, 10**12),
    "--max-epochs": st.integers(-5, 10**12),
    "--max-time": st.sampled_from(["0", "-1", "1h", "nan", "inf", "90s", "1e400", "soon", "1h30m", ""]),
    "--eval-every": st.integers(-2, 10),
    "--patience": st.integers(-2, 10),
    "--save-every": st.integers(-2, 10),
    "--keep": st.integers(-2, 10),
    "--seed": st.integers(-(2**65), 2**65) | st.sampled_from([-(2**63) - 1, 2**64 - 1, 2**64]),
    "--precision": st.sampled_from(["fp32", "bf16", "auto", "fp8"]),
    "--device": st.sampled_from(["cpu", "auto", "cuda:3", "tpu", ""]),
    "--threads": st.integers(-2, 4),
    "--tie-weights": st.just(None),
    "--preset": st.sampled_from(["tiny", "small", "huge"]),
})


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    from helpers import make_dataset

    return make_dataset(tmp_path_factory.mktemp("train") / "ds", [TEXT] * 20, [TEXT])


@fuzz(120)
@given(flags=TRAIN_FLAGS)
def test_train_random_flag_values(train_data, flags):
    argv = ["train", str(train_data), "--dry-run", "--json", "--quiet", "--runs-dir", str(train_data.parent / "runs")]
    for flag, value in flags.items():
        argv += [flag] if value is None else [flag, _num(value)]
    before = digest(train_data)
    r = runner.invoke(app, argv)
    clean_exit(r, argv)
    assert digest(train_data) == before and not (train_data.parent / "runs").exists()


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_a_seed_torch_cannot_take_is_an_error_not_a_crash(train_data, ckpt, seed):
    """Found by this file at POETGEN_FUZZ_SCALE=20: torch.manual_seed raised ValueError (overflow)."""
    r = runner.invoke(app, ["train", str(train_data), "--max-steps", "1", "--seed", str(seed), "--quiet",
                            "--runs-dir", str(train_data.parent / "seed-runs")])
    assert r.exit_code == 1 and r.stderr.startswith("Error: seed must be"), (r.output, r.exception)
    r = runner.invoke(app, ["sample", "-c", str(ckpt), "--seed", str(seed), "-q"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: seed must be"), (r.output, r.exception)
