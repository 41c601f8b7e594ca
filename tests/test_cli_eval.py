"""`poetgen eval` end to end with tiny checkpoints: JSON figures equal the library's, tables, poems, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import make_dataset
from poetgen.checkpoint.torch_io import load_model, save_checkpoint
from poetgen.cli.app import app
from poetgen.data.dataset import load_dataset
from poetgen.evaluation.scoring import cross_entropy
from poetgen.model.rnn import CharRNN, ModelConfig

runner = CliRunner()
POEMS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    ds_path = make_dataset(root / "ds", POEMS * 3, [POEMS[1], POEMS[0]])
    ds = load_dataset(ds_path)
    meta = dict(ds.meta, path=str(ds_path.resolve()))
    paths = []
    for i, cell in enumerate(("lstm", "gru")):
        torch.manual_seed(i)
        model = CharRNN(ModelConfig(len(ds.vocab), cell=cell, layers=1, hidden=12, embed=6))
        paths.append(save_checkpoint(root / f"run{i}" / "best.ckpt", model, ds.vocab, dataset_meta=meta, rng=False))
    gone = save_checkpoint(root / "gone.ckpt", model, ds.vocab, dataset_meta={"path": str(root / "deleted")},
                           rng=False)
    return {"root": root, "ds": ds, "ckpts": paths, "gone": gone}


def run(*args):
    return runner.invoke(app, ["eval", *map(str, args)])


def test_json_figures_are_the_library_figures_over_the_whole_val_split(setup):
    r = run(setup["ckpts"][0], "--json", "--streams", "3", "--warmup", "7")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["poems"] == [] and len(out["models"]) == 1
    m = out["models"][0]
    val = setup["ds"].val
    assert m["symbols"] == len(val) == 50 and m["documents"] == 2 and m["characters"] == 48 and m["unknown"] == 0
    model, _ = load_model(setup["ckpts"][0])
    ref = cross_entropy(model, val, streams=3, warmup=7)
    assert m["cold"]["nats_per_char"] == pytest.approx(ref.cold.nats, abs=1e-9)
    assert m["warm"]["nats_per_char"] == pytest.approx(ref.warm.nats, abs=1e-9)
    assert m["cold"]["bits_per_char"] == pytest.approx(m["cold"]["nats_per_char"] / math.log(2), rel=1e-12)
    assert m["cold"]["perplexity"] == pytest.approx(math.exp(m["cold"]["nats_per_char"]), rel=1e-12)
    assert (m["streams"], m["warmup"]) == (3, 7) and "val split of" in m["data"]


def test_several_checkpoints_give_one_table(setup):
    r = run(*setup["ckpts"], "--json")
    assert r.exit_code == 0, r.output
    models = json.loads(r.stdout)["models"]
    assert [m["checkpoint"] for m in models] == [str(p) for p in setup["ckpts"]]
    assert models[0]["cold"]["nats_per_char"] != models[1]["cold"]["nats_per_char"]
    # a run directory works as well as the file
    r = run(setup["ckpts"][0].parent, "--json", "--warmup", "0")
    m = json.loads(r.stdout)["models"][0]
    assert m["checkpoint"] == str(setup["ckpts"][0]) and m["warm"] is None


def test_plain_output_labels_cold_and_warm(setup):
    r = run(setup["ckpts"][0], "--split", "train")
    assert r.exit_code == 0, r.output
    assert f"scored: {len(setup['ds'].train):,} symbols" in r.stdout
    assert "cold (all-zero state at each stream start):" in r.stdout
    assert "warm (state primed on up to 1,000 preceding characters):" in r.stdout
    assert "nats/char" in r.stdout and "bits/char" in r.stdout and "perplexity" in r.stdout


def test_data_source_with_unknown_characters(setup, tmp_path: Path):
    f = tmp_path / "other.txt"
    f.write_text("床前明月光，雪满山。\n", encoding="utf-8")  # 雪 满 and the line break unknown; 山 known
    r = run(setup["ckpts"][0], "--data", f, "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["models"][0]
    # one document (the file, as prepare reads it, line break included) + its end-of-text symbol
    assert m["symbols"] == 12 and m["documents"] == 1 and m["unknown"] == 3
    assert m["unknown_chars"] == ["雪", "满", "\n"]
    assert any("<unk>" in n for n in m["notes"])
    r = run(setup["ckpts"][0], "--data", f)
    assert "3 symbol(s) not in the model's vocabulary were scored as <unk>: '雪', '满', U+000A" in r.stderr
    # a dataset directory as --data scores its split
    r = run(setup["ckpts"][0], "--data", setup["ds"].path, "--json")
    assert json.loads(r.stdout)["models"][0]["symbols"] == 50


def test_errors(setup, tmp_path: Path, monkeypatch):
    r = run(tmp_path / "missing.ckpt")
    assert r.exit_code == 1 and r.stderr.startswith("Error: checkpoint not found")
    r = run(setup["gone"])
    assert r.exit_code == 1 and "Error:" in r.stderr and "is gone" in r.stderr and "--data" in r.stderr
    r = run(setup["ckpts"][0], "--data", tmp_path / "nothing.txt")
    assert r.exit_code == 1 and r.stderr.startswith("Error: no such file or directory")
    monkeypatch.setenv("POETGEN_SHIPPED_DIR", str(tmp_path / "no-shipped-models"))  # and no run in ./checkpoints
    r = run()
    assert r.exit_code == 1 and r.stderr.startswith("Error: no run in checkpoints and no shipped model"), r.stderr
    assert run(setup["ckpts"][0], "--split", "test").exit_code == 2
    assert run("--poems", tmp_path / "p.jsonl", "--samples", "2").exit_code == 2
    assert run("--poems", tmp_path / "p.jsonl", "--data", tmp_path).exit_code == 2
    assert run(setup["ckpts"][0], "--no-loss").exit_code == 2
    r = run("--poems", tmp_path / "p.jsonl")
    assert r.exit_code == 1 and "Error: poems file not found" in r.stderr


def test_generated_samples_in_form_and_saved(setup, tmp_path: Path):
    saved = tmp_path / "s.jsonl"
    r = run(setup["ckpts"][0], "--no-loss", "--samples", "6", "--form", "五绝", "--seed", "3", "--json",
            "--save-samples", saved)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["models"] == [] and len(out["poems"]) == 1
    p = out["poems"][0]
    assert p["poems"] == 6 and p["format_rate"] == 1.0 and p["forms"] == {"五绝": 6} and p["regular"] == 6
    assert p["copy_line_rate"] is not None and p["copy_lines_checked"] == 24
    assert "平水韵" in out["tone_note"]
    lines = saved.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["form"] == "五绝"
    # the same seed gives the same poems; re-measuring the saved file gives the same figures
    again = run(setup["ckpts"][0], "--no-loss", "--samples", "6", "--form", "五绝", "--seed", "3", "--json")
    assert json.loads(again.stdout)["poems"][0]["distinct_1"] == p["distinct_1"]
    r = run(setup["ckpts"][0], "--no-loss", "--poems", saved, "--json")
    q = json.loads(r.stdout)["poems"][0]
    assert {k: q[k] for k in ("format_rate", "rhyme_rate", "tone_246", "copy_line_rate", "distinct_2")} == {
        k: p[k] for k in ("format_rate", "rhyme_rate", "tone_246", "copy_line_rate", "distinct_2")}


def test_poems_file_without_a_checkpoint(tmp_path: Path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in POEMS + ["不成诗"]),
                 encoding="utf-8")
    r = run("--poems", f)
    assert r.exit_code == 0, r.output
    assert "format compliance: 66.7%" in r.stdout and "rhyme rate: 100.0%" in r.stdout
    assert f"source: {f}" in r.stdout and "poems: 3 (五绝 2, none 1)" in r.stdout
    assert "copied lines: - (no training text to compare with)" in r.stdout
    assert "note: tones and rhymes by the 平水韵" in r.stdout and "regulated (律绝 / 律诗): 50.0%" in r.stdout
    assert "三平尾: 0.0%" in r.stdout  # 一层楼: 一 is 入声
    out = json.loads(run("--poems", f, "--json").stdout)
    assert out["poems"][0]["poems"] == 3 and out["poems"][0]["copy_line_rate"] is None
    assert out["poems"][0]["book"] == "pingshui" and "平水韵" in out["tone_note"]
    x = run("--poems", f, "--rhyme-book", "xinyun")
    assert x.exit_code == 0 and "modern-Mandarin approximation" in x.stdout and "三平尾: 50.0%" in x.stdout


def test_bundled_poems_are_the_reference_beside_samples(setup):
    from helpers import REPO

    bundled = REPO / "data" / "poems.jsonl"
    r = run(setup["ckpts"][0], "--no-loss", "--samples", 20, "--form", "五绝", "--tones", "--rhyme", "--seed", 1,
            "--poems", bundled, "--json")
    assert r.exit_code == 0, r.output
    generated, reference = json.loads(r.stdout)["poems"]
    assert generated["regulated_rate"] == 1.0 and generated["rhyme_rate"] == 1.0 and generated["tone_246"] == 1.0
    assert reference["source"] == str(bundled) and reference["regular"] > 300
    assert 0.5 < reference["regulated_rate"] < 0.9 and reference["rhyme_rate"] > 0.8  # real poems are not all 律
    plain = run(setup["ckpts"][0], "--no-loss", "--samples", 5, "--form", "五绝", "--seed", 1, "--poems", bundled)
    assert plain.exit_code == 0 and plain.stdout.count("source: ") == 2 and "粘对 violations: " in plain.stdout
    assert run(setup["ckpts"][0], "--no-loss", "--samples", 5, "--tones").exit_code == 2  # needs --form


def test_help_says_tones_are_an_approximation():
    r = run("--help")
    text = " ".join(r.stdout.split())
    assert r.exit_code == 0 and "Example:" in text and "modern-Mandarin approximation" in text


def test_every_position_is_counted(setup):
    r = run(setup["ckpts"][1], "--json", "--streams", "50", "--warmup", "1000")
    m = json.loads(r.stdout)["models"][0]
    model, _ = load_model(setup["ckpts"][1])
    single = cross_entropy(model, np.asarray(setup["ds"].val), streams=1, warmup=0).cold.nats
    assert m["streams"] == 50 and m["warm"]["nats_per_char"] == pytest.approx(single, abs=1e-6)
