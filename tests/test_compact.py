"""Compact model files (poetgen.checkpoint.compact) and shipped models (poetgen.checkpoint.shipped): export, both
readers, the hash check, names, the fallback, package data, and fine-tuning from a shipped model."""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, make_dataset
from poetgen.checkpoint import compact, format as fmt
from poetgen.checkpoint.compact import export_model, quantize_rows
from poetgen.checkpoint.format import default_checkpoint, find_checkpoint, read_model
from poetgen.checkpoint.shipped import ENV_SHIPPED, file_sha256, list_shipped, write_card
from poetgen.checkpoint.torch_io import load_checkpoint, load_model, save_checkpoint
from poetgen.data.dataset import load_dataset
from poetgen.data.vocab import Vocab
from poetgen.errors import CheckpointError
from poetgen.model.rnn import CharRNN, ModelConfig
from poetgen.model.runtime import Runtime
from poetgen.training.config import TrainConfig
from poetgen.training.loop import TrainCallbacks, train
from poetgen.training.runs import setup_run

torch.set_num_threads(1)

POEM = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
OTHER = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
# LSTM 2x64 with an adaptive head (the shipped model's kind, in small): its gate matrices are big enough to be
# stored as int8, the rest fp16.
TINY = dict(cell="lstm", layers=2, hidden=64, embed=32, head="adaptive", cutoffs=(8, 16), dropout=0.0, batch_size=4,
            seq_len=32, lr=2e-2, warmup_steps=5, eval_every=1000, sample_every=0, log_every=1)
CARD = {"summary": "a tiny test model", "validation": {"nats_per_char": 0.26}}


class Losses(TrainCallbacks):
    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_step(self, info):
        self.losses[info["step"]] = info["loss"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model that has learned two poems (250 steps, a few seconds): (dataset, its last.ckpt)."""
    root = tmp_path_factory.mktemp("trained")
    ds = load_dataset(make_dataset(root / "tiny", [POEM if i % 2 == 0 else OTHER for i in range(40)], [POEM, OTHER]))
    train(TrainConfig(max_steps=250, **TINY), ds, root / "run")
    return ds, root / "run" / "last.ckpt"


@pytest.fixture
def shipped(tmp_path, monkeypatch, trained):
    """A shipped directory holding the tiny model as `tang`, and POETGEN_SHIPPED_DIR pointing at it."""
    d = tmp_path / "shipped"
    export_model(trained[1], d / "tang.safetensors", card=CARD)
    write_card(d / "tang.safetensors", CARD)
    monkeypatch.setenv(ENV_SHIPPED, str(d))
    return d


# --- export and reading ---------------------------------------------------------------------------------------


def test_quantize_rows_is_within_half_a_step_per_row():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 50)).astype(np.float32) * np.array([1e-3, 0.1, 1, 10, 100, 0], dtype=np.float32)[:, None]
    q, scale = quantize_rows(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (6,)
    assert scale[5] == 0 and not q[5].any()  # a zero row stays zero
    assert (np.abs(q[:5]).max(axis=1) == 127).all()  # each row's largest weight uses the whole range
    err = np.abs(q * scale[:, None] - w)
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()


def test_int8_export_is_small_and_scores_like_the_fp32_model(trained, tmp_path):
    ds, ckpt = trained
    rep = export_model(ckpt, tmp_path / "m.safetensors", quantize="int8", card=CARD, text=ds.train)
    assert {k: v for k, v in rep.tensors.items() if k.startswith("rnn.weight")} == dict.fromkeys(
        ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1"], "int8")
    assert {v for k, v in rep.tensors.items() if "bias" in k} == {"fp32"}
    assert rep.bytes == (tmp_path / "m.safetensors").stat().st_size < 0.4 * 4 * rep.parameters
    c = rep.comparison
    assert c is not None and c.symbols >= 900
    assert c.ce_reference < 0.5  # the model has learned the text: the comparison is between two sharp models
    assert abs(rep.ce_change) < 0.002 and c.kl < 1e-4 and c.max_abs_target_diff < 0.1
    assert c.max_abs_logprob_diff < 0.5  # over the whole vocabulary, the least likely symbols included

    fp16 = export_model(ckpt, tmp_path / "h.safetensors", quantize="fp16", text=ds.train)
    assert set(fp16.tensors.values()) == {"fp16", "fp32"}
    assert rep.bytes < fp16.bytes < 0.6 * 4 * rep.parameters
    assert abs(fp16.ce_change) < 5e-4 and fp16.comparison.kl < 1e-5


def test_both_readers_dequantize_to_float32_and_agree(trained, tmp_path):
    ds, ckpt = trained
    rep = export_model(ckpt, tmp_path / "m.safetensors", quantize="int8")
    ref, mf = read_model(ckpt).weights, read_model(rep.path)
    tc = load_checkpoint(rep.path)
    for name, kind in rep.tensors.items():
        w = mf.weights[name]
        assert w.dtype == np.float32 and w.shape == ref[name].shape
        if kind == "int8":  # within half a quantization step of the fp32 weight, row by row
            step = np.abs(ref[name]).max(axis=1) / 127
            assert (np.abs(w - ref[name]) <= step[:, None] / 2 * (1 + 1e-5)).all() and not np.array_equal(w, ref[name])
        elif kind == "fp16":
            np.testing.assert_allclose(w, ref[name], rtol=1e-3, atol=1e-6)
        else:
            np.testing.assert_array_equal(w, ref[name])
        assert tc.model_state[name].dtype == torch.float32
        np.testing.assert_array_equal(tc.model_state[name].numpy(), w)  # numpy and torch dequantize alike

    # The numpy runtime (sample on the CPU) and the torch model (eval, GPU) give the same scores from the file.
    model, _ = load_model(rep.path)
    ids = np.asarray(ds.train[:40], dtype=np.int64)
    with torch.no_grad():
        scores_torch = model(torch.from_numpy(ids)[None])[0][0, -1].numpy()
    scores_numpy = Runtime(mf.model_config, mf.weights).feed(ids[None], fresh=True)[0]
    np.testing.assert_allclose(scores_numpy, scores_torch, atol=1e-4)
    fp32_model, _ = load_model(ckpt)
    with torch.no_grad():
        scores_fp32 = fp32_model(torch.from_numpy(ids)[None])[0][0, -1].numpy()
    assert 0 < np.abs(scores_torch - scores_fp32).max() < 0.5


def test_read_model_can_keep_int8_rows_for_the_runtime(trained, tmp_path):
    """keep_int8 (what `poetgen sample` reads with): the int8 matrices as stored, everything else as read_model gives
    it; the Runtime made from them is the one made from the float32 weights, bit for bit."""
    from poetgen.model.runtime import Int8Rows

    ds, ckpt = trained
    rep = export_model(ckpt, tmp_path / "m.safetensors", quantize="int8")
    dense, kept = read_model(rep.path), read_model(rep.path, keep_int8=True)
    assert kept.model_config == dense.model_config and kept.vocab == dense.vocab and kept.data == dense.data
    assert "int8" in rep.tensors.values() and kept.weights.keys() == dense.weights.keys()
    for name, kind in rep.tensors.items():
        w = kept.weights[name]
        if kind == "int8":
            assert isinstance(w, Int8Rows) and w.q.dtype == np.int8 and w.shape == dense.weights[name].shape
            np.testing.assert_array_equal(w.q.astype(np.float32) * w.scale[:, None], dense.weights[name])
        else:
            assert w.dtype == np.float32
            np.testing.assert_array_equal(w, dense.weights[name])
    a, b = Runtime(dense.model_config, dense.weights), Runtime(kept.model_config, kept.weights)
    ids = [0, *ds.train[:12]]
    assert a.prefix([ids]).tobytes() == b.prefix([ids]).tobytes()
    assert a.step(np.array([ids[1]])).tobytes() == b.step(np.array([ids[1]])).tobytes()


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    import hashlib

    for blob in (b"", b"x", bytes(range(256)) * 40_000):
        path = tmp_path / "f.bin"
        path.write_bytes(blob)
        assert file_sha256(path) == hashlib.sha256(blob).hexdigest() == file_sha256(path, blob)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        file_sha256(tmp_path / "absent.bin")


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    vocab = Vocab(["<eot>", "<unk>", *"床前明月光疑是地上霜"])
    torch.manual_seed(0)
    m = CharRNN(ModelConfig(vocab_size=len(vocab), cell="gru", layers=1, hidden=64, embed=64, tie_weights=True))
    rep = export_model(save_checkpoint(tmp_path / "t.ckpt", m, vocab), tmp_path / "t.safetensors")
    assert "head.weight" not in rep.tensors and rep.tensors["embedding.weight"] == "fp16"
    loaded, _ = load_model(rep.path)
    assert loaded.head.weight is loaded.embedding.weight
    mf = read_model(rep.path)
    assert mf.weights["head.weight"] is mf.weights["embedding.weight"]


def test_the_file_holds_the_model_only_and_an_older_poetgen_refuses_it(trained, tmp_path, monkeypatch):
    from safetensors import safe_open

    path = export_model(trained[1], tmp_path / "m.safetensors", card=CARD).path
    with safe_open(str(path), framework="numpy") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith(("model/", "scale/")) for k in keys)
    assert meta["format_version"] == str(fmt.MODEL_VERSION) == "2"
    data = json.loads(meta["data"])
    assert data["card"] == CARD and data["compact"]["quantize"] == "int8" and "optimizer" not in data
    assert data["compact"]["source"]["sha256"] == file_sha256(trained[1])
    assert data["compact"]["source"]["train_state"]["step"] == 250
    ckpt = load_checkpoint(path)
    assert ckpt.format_version == 2 and ckpt.optimizer_state is None and ckpt.rng_state is None
    assert ckpt.train_state == {} and ckpt.tensors == {} and ckpt.vocab == trained[0].vocab
    assert read_model(path).data["card"] == CARD

    monkeypatch.setattr(fmt, "FORMAT_VERSION", 1)  # a poetgen from before compact files
    for reader in (read_model, load_checkpoint):
        with pytest.raises(CheckpointError, match="newer than this poetgen reads.*upgrade poetgen"):
            reader(path)


def test_damaged_quantization_is_refused_by_both_readers(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load, save

    path = export_model(trained[1], tmp_path / "m.safetensors").path
    tensors = load(path.read_bytes())
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    name = "rnn.weight_hh_l0"
    scale = tensors[f"scale/{name}"]
    cases = {
        "no scale": ({k: v for k, v in tensors.items() if k != f"scale/{name}"},
                     f"int8 weights {name} without their scale"),
        "short scale": ({**tensors, f"scale/{name}": scale[:-1]}, f"the scale of {name} is not 256 float32 numbers"),
        "stray scale": ({**tensors, "scale/rnn.bias_ih_l0": np.ones(256, np.float32)},
                        "it has a scale for rnn.bias_ih_l0, which is no int8 matrix"),
    }
    for case, (ts, message) in cases.items():
        bad = tmp_path / f"{case}.safetensors"
        bad.write_bytes(save(ts, meta))
        for reader in (read_model, load_checkpoint):
            with pytest.raises(CheckpointError, match=f"is damaged: {message}"):
                reader(bad)


def test_export_refusals(trained, tmp_path):
    with pytest.raises(CheckpointError, match="quantize must be one of int8, fp16"):
        export_model(trained[1], tmp_path / "m.safetensors", quantize="int4")
    with pytest.raises(CheckpointError, match="card must be plain JSON"):
        export_model(trained[1], tmp_path / "m.safetensors", card={"when": object()})
    copy = shutil.copy(trained[1], tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match="is the checkpoint being exported"):
        export_model(copy, copy)
    assert not (tmp_path / "m.safetensors").exists()


# --- shipped models: hash, names, fallback, package data, fine-tuning ----------------------------------------


def test_a_flipped_byte_is_refused_with_how_to_fix_it(shipped, tmp_path):
    path = shipped / "tang.safetensors"
    read_model("tang")
    load_checkpoint("tang")
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0x01  # one bit of a weight: the file still parses, and would sample from a damaged model
    path.write_bytes(bytes(blob))
    for reader in (read_model, load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=r"tang.safetensors is damaged: its SHA-256 is .* not the .* its "
                                                  r"model card tang.json records; reinstall poetgen"):
            reader("tang")
    # The card is what catches it: the same bytes without a card load.
    alone = Path(shutil.copy(path, tmp_path / "alone.safetensors"))
    assert read_model(alone).model_config == read_model(alone).model_config
    card = json.loads((shipped / "tang.json").read_text())
    (tmp_path / "alone.json").write_text(json.dumps({**card, "name": "alone", "file": "alone.safetensors"}))
    with pytest.raises(CheckpointError, match="alone.safetensors is damaged: .*; copy or export the model again"):
        read_model(alone)


def test_cards_list_and_names_resolve(shipped, tmp_path, monkeypatch):
    (shipped / "notes.json").write_text('{"hello": 1}')  # not a card
    (shipped / "gone.json").write_text(json.dumps({"format": "poetgen-model-card", "name": "gone",
                                                   "file": "gone.safetensors"}))  # its file is missing
    models = list_shipped()
    assert [m.name for m in models] == ["tang"]
    card = models[0].card
    assert card["sha256"] == file_sha256(shipped / "tang.safetensors") and card["file"] == "tang.safetensors"
    assert card["bytes"] == (shipped / "tang.safetensors").stat().st_size and card["summary"] == CARD["summary"]

    monkeypatch.chdir(tmp_path)
    assert find_checkpoint("tang") == shipped / "tang.safetensors"
    with pytest.raises(CheckpointError, match=r"^checkpoint not found: gone \(nor a shipped model: tang\)$"):
        find_checkpoint("gone")
    with pytest.raises(CheckpointError, match=r"^checkpoint not found: runs/tang$"):
        find_checkpoint("runs/tang")  # a path, not a name
    (tmp_path / "tang").mkdir()  # an existing path wins over the shipped name
    with pytest.raises(CheckpointError, match="no checkpoint in tang"):
        find_checkpoint("tang")


def test_default_checkpoint_falls_back_to_the_shipped_model(shipped, trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, note = default_checkpoint()
    assert path == shipped / "tang.safetensors"
    assert note.startswith("Using the shipped model tang (a tiny test model): there is no run in checkpoints.")
    (tmp_path / "checkpoints").mkdir()
    assert default_checkpoint()[0] == path  # an empty runs directory
    run = tmp_path / "checkpoints" / "mine"
    run.mkdir()
    shutil.copy(trained[1], run / "best.ckpt")
    assert default_checkpoint() == (Path("checkpoints") / "mine" / "best.ckpt", None)

    monkeypatch.setenv(ENV_SHIPPED, str(tmp_path / "empty"))
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="^no run in checkpoints and no shipped model: train one"):
        default_checkpoint()


def test_package_data_carries_shipped_models_into_the_wheel(trained, tmp_path):
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["poetgen"]
    for name in ("shipped/tang.safetensors", "shipped/tang.json"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name

    # Build a wheel from a copy of the sources with a model in shipped/, install it by unpacking, and read the
    # model through the installed package.
    src = tmp_path / "src"
    shutil.copytree(REPO / "poetgen", src / "poetgen", ignore=shutil.ignore_patterns("__pycache__", "*.safetensors",
                                                                                      "*.json"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    export_model(trained[1], src / "poetgen" / "shipped" / "tang.safetensors", card=CARD)
    write_card(src / "poetgen" / "shipped" / "tang.safetensors", CARD)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=240)
    wheel = next((tmp_path / "dist").glob("poetgen-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    assert {"poetgen/shipped/tang.safetensors", "poetgen/shipped/tang.json"} <= set(names)
    code = ("import poetgen, json; from poetgen.checkpoint.format import read_model, find_checkpoint; "
            "m = read_model('tang'); print(json.dumps([poetgen.__file__, str(m.path), m.model_config.hidden]))")
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    package, model, hidden = json.loads(out.stdout)
    assert package.startswith(str(tmp_path / "site"))
    assert model == str(tmp_path / "site" / "poetgen" / "shipped" / "tang.safetensors")
    assert hidden == TINY["hidden"]


def test_fine_tune_from_the_shipped_model(shipped, trained, tmp_path):
    ds, _ = trained
    flags = {k: v for k, v in TINY.items() if k not in ("cell", "layers", "hidden", "embed", "head", "cutoffs")}
    setup = setup_run(str(ds.path), init_from="tang", overrides={**flags, "max_steps": 3, "warmup_steps": 0},
                      runs_dir=tmp_path / "runs", name="ft")
    assert setup.init_from.path == shipped / "tang.safetensors" and setup.init_from.optimizer_state is None
    assert (setup.config.hidden, setup.config.head) == (64, "adaptive")  # the shipped model's architecture
    rec = Losses()
    result = train(setup.config, setup.dataset, setup.run_dir, init_from=setup.init_from, callbacks=rec)
    assert result.status == "completed" and result.step == 3
    assert rec.losses[1] < 1.0  # starts from the trained weights (a fresh model starts near ln 40 = 3.7)
    tuned = load_checkpoint(tmp_path / "runs" / "ft" / "last.ckpt")
    assert tuned.model_config == read_model("tang").model_config and tuned.train_state["step"] == 3


def test_sample_and_eval_fall_back_to_the_shipped_model_and_say_so(shipped, trained, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from poetgen.cli.app import app

    runner = CliRunner()
    monkeypatch.chdir(tmp_path)  # no ./checkpoints
    r = runner.invoke(app, ["sample", "--form", "五绝", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert r.stderr.startswith("Using the shipped model tang (a tiny test model)") and "-c" in r.stderr
    assert len(r.stdout.strip().splitlines()) == 2  # one 五绝, a couplet per line
    named = runner.invoke(app, ["sample", "-c", "tang", "--form", "五绝", "--seed", "1"])
    assert named.exit_code == 0 and named.stdout == r.stdout
    assert named.stderr.startswith(f"Checkpoint: {shipped / 'tang.safetensors'}")
    # eval with nothing named scores the shipped model; its dataset is not on this machine unless --data is given
    r = runner.invoke(app, ["eval", "--data", str(trained[0].path), "--json"])
    assert r.exit_code == 0, r.output
    assert r.stderr.startswith("Using the shipped model tang")
    assert json.loads(r.stdout)["models"][0]["checkpoint"] == str(shipped / "tang.safetensors")



def test_models_command_lists_and_shows_cards_and_refuses_a_damaged_file(shipped):
    from typer.testing import CliRunner

    from poetgen.cli.app import app

    runner = CliRunner()
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0 and r.stdout.startswith("tang: a tiny test model (")
    r = runner.invoke(app, ["models", "tang", "--json"])
    card = json.loads(r.stdout)
    assert r.exit_code == 0 and card["name"] == "tang" and card["verified"] is True
    assert card["sha256"] == file_sha256(shipped / "tang.safetensors")
    r = runner.invoke(app, ["models", "tang"])
    assert r.exit_code == 0 and f"sha256: {card['sha256']}" in r.stdout.splitlines()
    r = runner.invoke(app, ["models", "song"])
    assert r.exit_code == 1 and r.stderr == "Error: no shipped model named 'song' (shipped: tang)\n"
    blob = bytearray((shipped / "tang.safetensors").read_bytes())
    blob[-1] ^= 1
    (shipped / "tang.safetensors").write_bytes(bytes(blob))
    r = runner.invoke(app, ["models", "tang"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "damaged" in r.stderr
    r = runner.invoke(app, ["models", "--json"])  # the list still shows it, as not verified, with the reason
    listed = json.loads(r.stdout)[0]
    assert r.exit_code == 0 and listed["verified"] is False and "damaged" in listed["problem"]
