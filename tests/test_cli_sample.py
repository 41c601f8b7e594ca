"""`poetgen sample` end to end through the CLI, with a tiny untrained checkpoint (the masks give the form)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from poetgen.checkpoint.torch_io import save_checkpoint
from poetgen.cli.app import app
from poetgen.model.rnn import CharRNN, ModelConfig
from poetgen.data.normalize import convert_script
from poetgen.poetry.forms import check_constrained, poem_layout
from poetgen.data.vocab import Vocab

TEXT = (
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
    "黄河远上白云间，一片孤城万仞山。羌笛何须怨杨柳，春风不度玉门关。春夏秋冬"
)
runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _save(path: Path, text: str) -> Path:
    torch.manual_seed(0)
    vocab = Vocab.from_counts(Counter(text))
    model = CharRNN(ModelConfig(len(vocab), cell="lstm", layers=1, hidden=16, embed=8))
    return save_checkpoint(path, model, vocab, rng=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("ck") / "checkpoints" / "run1" / "best.ckpt", TEXT)


@pytest.fixture(scope="module")
def trad_ckpt(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("tck") / "trad.ckpt", convert_script(TEXT, "traditional"))


def run(*args, input=None):
    return runner.invoke(app, ["sample", *map(str, args)], input=input)


def test_help_has_example_and_states_the_rhyme_approximation():
    r = run("--help")
    assert r.exit_code == 0
    text = re.sub(r"\s+", " ", r.stdout)
    assert "Example:" in text and "poetgen sample" in text
    assert "pypinyin" in text and "中华新韵" in text


def test_form_output_is_poems_separated_by_blank_lines(ckpt):
    r = run("-c", ckpt, "--form", "wujue", "-n", 3, "--seed", 1)
    assert r.exit_code == 0, r.output
    poems = r.stdout.rstrip("\n").split("\n\n")
    assert len(poems) == 3
    for poem in poems:
        lines = poem.split("\n")
        assert len(lines) == 2 and all(re.fullmatch(r"\w{5}，\w{5}。", line) for line in lines)
        assert check_constrained(poem.replace("\n", ""), 4, 5) == []
    assert f"Checkpoint: {ckpt}" in r.stderr


def test_default_checkpoint_is_found_and_named(ckpt, monkeypatch):
    monkeypatch.chdir(ckpt.parent.parent.parent)  # holds ./checkpoints/run1/best.ckpt
    r = run("--length", 10, "--seed", 0)
    assert r.exit_code == 0, r.output
    assert "Checkpoint: checkpoints/run1/best.ckpt" in r.stderr.replace("\\", "/")


def test_no_checkpoint_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POETGEN_SHIPPED_DIR", str(tmp_path / "none"))  # no shipped model to fall back to either
    r = run("--length", 5)
    assert r.exit_code == 1 and r.stderr.startswith("Error:") and "Traceback" not in r.output


def test_unknown_prime_character_is_a_clean_error(ckpt):
    r = run("-c", ckpt, "--prime", "明月龘", "--seed", 0)
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "Error: the prime has character(s) not in the model's vocabulary: '龘'"
    )
    assert "Traceback" not in r.output and r.stdout == ""


def test_bad_form_lists_valid_forms(ckpt):
    r = run("-c", ckpt, "--form", "haiku")
    assert r.exit_code == 1 and "Error: unknown form 'haiku'" in r.stderr and "qilv" in r.stderr


def test_json_lines_parse(ckpt):
    r = run("-c", ckpt, "--form", "七绝", "-n", 4, "--seed", 7, "--json", "--top-k", 1000, "-q")
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(records) == 4 and r.stderr == ""
    for rec in records:
        assert set(rec) >= {"prime", "text", "settings", "seed", "mean_logprob"}
        assert rec["seed"] == 7 and rec["prime"] == "" and rec["mean_logprob"] < 0
        assert re.fullmatch(poem_layout(4, 7), rec["text"])
        assert rec["settings"]["form"] == "七绝" and rec["settings"]["top_k"] == len(set(TEXT)) + 2
        assert rec["settings"]["checkpoint"] == str(ckpt)


def test_same_seed_same_output_through_the_cli(ckpt):
    a = run("-c", ckpt, "-n", 3, "--seed", 42, "--length", 30, "-t", 1.0)
    b = run("-c", ckpt, "-n", 3, "--seed", 42, "--length", 30, "-t", 1.0)
    c = run("-c", ckpt, "-n", 3, "--seed", 43, "--length", 30, "-t", 1.0)
    assert a.exit_code == 0 and a.stdout == b.stdout != c.stdout


def test_no_seed_reports_the_seed_used(ckpt):
    r = run("-c", ckpt, "--length", 20)
    seed = int(re.search(r"Seed: (\d+)", r.stderr).group(1))
    assert run("-c", ckpt, "--length", 20, "--seed", seed).stdout == r.stdout


def test_prime_from_stdin_and_primes_file(ckpt, tmp_path):
    r = run("-c", ckpt, "--prime", "-", "--length", 5, "--seed", 0, input="白日\n")
    assert r.exit_code == 0 and r.stdout.startswith("白日")
    f = tmp_path / "primes.txt"
    f.write_text("白日\n\n黄河远上\n", encoding="utf-8")
    r = run("-c", ckpt, "--primes-file", f, "-n", 2, "--length", 5, "--json", "--seed", 0)
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["prime"] for line in r.stdout.splitlines()] == ["白日", "白日", "黄河远上", "黄河远上"]


def test_output_file(ckpt, tmp_path):
    out = tmp_path / "poems.txt"
    r = run("-c", ckpt, "--acrostic", "春夏秋冬", "--line-length", 5, "-n", 2, "--seed", 3, "-o", out)
    assert r.exit_code == 0 and r.stdout == ""
    poems = out.read_text(encoding="utf-8").rstrip("\n").split("\n\n")
    assert len(poems) == 2
    for poem in poems:
        assert check_constrained(poem.replace("\n", ""), 4, 5, acrostic="春夏秋冬") == []
    assert "Wrote 2 sample(s)" in r.stderr


def test_stream_prints_the_same_sample(ckpt):
    plain = run("-c", ckpt, "--form", "五绝", "--seed", 5, "--prime", "白日")
    streamed = run("-c", ckpt, "--form", "五绝", "--seed", 5, "--prime", "白日", "--stream")
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout == plain.stdout and streamed.stdout.count("\n") == 2


def test_rhyme_through_the_cli(ckpt):
    r = run("-c", ckpt, "--form", "五绝", "--rhyme", "-n", 20, "--seed", 2, "--json")
    assert r.exit_code == 0, r.output
    for line in r.stdout.splitlines():
        assert check_constrained(json.loads(line)["text"], 4, 5, rhyme=True) == []


def test_tones_and_rhyme_through_the_cli(ckpt):
    from poetgen.poetry.prosody import check_prosody

    r = run("-c", ckpt, "--form", "五绝", "--tones", "--rhyme", "-n", 20, "--seed", 2, "--json", "-t", 1.5)
    assert r.exit_code == 0, r.output
    for line in r.stdout.splitlines():
        record = json.loads(line)
        check = check_prosody(record["text"], "pingshui", "五绝")
        assert check.regulated, (record["text"], check.problems)
        assert record["settings"]["rhyme_book"] == "pingshui" and record["settings"]["tones"] is True
    r = run("-c", ckpt, "--form", "五绝", "--tones", "--pattern", "仄起首句入韵", "--rhyme", "--rhyme-group", "阳",
            "-n", 5, "--seed", 2, "--json")
    assert r.exit_code == 0, r.output
    for line in r.stdout.splitlines():
        check = check_prosody(json.loads(line)["text"], "pingshui", "五绝")
        assert check.regulated and check.rhyme.group.label == "下平七阳"
    x = run("-c", ckpt, "--form", "五绝", "--rhyme", "--rhyme-book", "xinyun", "-n", 10, "--seed", 2, "--json")
    assert x.exit_code == 0, x.output
    for line in x.stdout.splitlines():
        assert check_constrained(json.loads(line)["text"], 4, 5, rhyme=True, book="xinyun") == []


def test_prosody_flag_errors(ckpt):
    r = run("-c", ckpt, "--form", "五绝", "--tones", "--pattern", "平起")
    assert r.exit_code == 1 and "valid patterns: 仄起首句不入韵, 仄起首句入韵, 平起首句不入韵, 平起首句入韵" in r.output
    r = run("-c", ckpt, "--form", "五绝", "--rhyme", "--rhyme-group", "卍")
    assert r.exit_code == 1 and "level groups: 东 冬 江 支" in " ".join(r.output.split())
    r = run("-c", ckpt, "--form", "五绝", "--rhyme", "--rhyme-book", "guangyun")
    assert r.exit_code == 1 and "pingshui, xinyun" in r.output
    r = run("-c", ckpt, "--tones")
    assert r.exit_code == 1 and "--tones needs --form" in r.output
    r = run("-c", ckpt, "--form", "五绝", "--tones", "--prime", "明月", "--pattern", "平起首句入韵")
    assert r.exit_code == 1 and "'月' (仄) at line 1, character 2 breaks the tone pattern" in r.output


def test_prime_script_conversion(trad_ckpt):
    r = run("-c", trad_ckpt, "--prime", "举头", "--length", 5, "--seed", 0)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("舉頭")
    assert "Note: converted the prime to traditional characters" in r.stderr and "举头 -> 舉頭" in r.stderr
    s = run("-c", trad_ckpt, "--prime", "举头", "--length", 5, "--seed", 0, "--output-script", "simplified")
    assert s.stdout.startswith("举头") and s.stdout == convert_script(r.stdout, "simplified")


def test_usage_errors(ckpt, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("白\n", encoding="utf-8")
    assert run("-c", ckpt, "--prime", "白", "--primes-file", f).exit_code == 2
    assert run("-c", ckpt, "--stream", "-n", 2).exit_code == 2
    assert run("-c", ckpt, "--output-script", "cyrillic").exit_code == 2
    assert run("-c", ckpt, "--threads", 0).exit_code == 2
    r = run("-c", ckpt, "--rhyme")
    assert r.exit_code == 1 and "--rhyme needs --form or --acrostic" in r.stderr


def test_unavailable_device_is_a_clean_error(ckpt):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r = run("-c", str(ckpt), "--device", "cuda", "--seed", "1")
    assert r.exit_code == 1 and "\nError: device cuda" in r.stderr and "CUDA is not available" in r.stderr
    r = run("-c", str(ckpt), "--device", "banana")
    assert r.exit_code == 1 and "unknown device" in r.stderr


def test_prime_that_is_not_text_is_a_clean_error(ckpt):
    # A command-line argument in no encoding arrives with lone surrogates (surrogateescape).
    r = run("-c", str(ckpt), "--prime", "床\udced", "--seed", "1")
    assert r.exit_code == 1 and "\nError: text that is not valid Unicode" in r.stderr and "Traceback" not in r.output


def test_the_shipped_model_samples_without_modules_start_up_does_not_need():
    """A new user's first command, `poetgen sample -c tang --prime 床前 -n 4` (start-up under a second, issue 17):
    poems, exit 0, and none of the modules that would slow it down loaded: torch (seconds), rich (the CLI's
    progress bars), OpenCC and pypinyin (script conversion and modern readings: not needed for a prime the model
    knows, without --rhyme-book xinyun)."""
    import os
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from poetgen.cli.app import main\n"
        "sys.argv = ['poetgen', 'sample', '-c', 'tang', '--prime', '床前', '-n', '4', '--seed', '1', '-q']\n"
        "code = None\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "heavy = [m for m in ('torch', 'rich', 'opencc', 'pypinyin') if m in sys.modules]\n"
        "print('EXIT', code, 'LOADED', heavy, file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "POETGEN_SHIPPED_DIR"} | {"PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                       encoding="utf-8")
    assert r.stderr == "EXIT 0 LOADED []\n", r.stderr
    poems = r.stdout.rstrip("\n").split("\n\n")
    assert len(poems) == 4 and all(p.startswith("床前") and len(p) > 5 for p in poems), r.stdout
