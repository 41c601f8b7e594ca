"""Foreign files offered as checkpoints: every command refuses them with `Error: ...` / exit 1, and none runs code.

Each bad file is put where a run's last.ckpt would be, then handed to `sample -c`, `eval`, `train --resume` and
`train --init-from`. A pickle payload would create a marker file if anything unpickled it. The same four
commands accept the genuine checkpoint the bad files are made from, so a refusal is never just a broken setup.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import make_dataset
from poetgen.checkpoint.torch_io import FORMAT_VERSION, load_checkpoint
from poetgen.cli.app import app

torch.set_num_threads(1)
runner = CliRunner()

TINY = ["--layers", "1", "--hidden", "16", "--embed", "8", "--batch-size", "2", "--seq-len", "16", "--warmup", "1",
        "--sample-every", "0", "--threads", "1", "--eval-every", "2", "--quiet"]
POEMS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"]


class Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _split(blob: bytes) -> tuple[dict, bytes]:
    """A safetensors file -> (its JSON header, the tensor bytes after it)."""
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, ensure_ascii=False).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _with_data(blob: bytes, change) -> bytes:
    """The checkpoint with its metadata JSON changed by ``change(data) -> data``."""
    header, body = _split(blob)
    data = json.loads(header["__metadata__"]["data"])
    header["__metadata__"]["data"] = json.dumps(change(data), ensure_ascii=False)
    return _join(header, body)


def _with_meta(blob: bytes, **meta) -> bytes:
    header, body = _split(blob)
    header["__metadata__"].update(meta)
    return _join(header, body)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("foreign")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        ds = make_dataset(root / "ds", POEMS * 20, POEMS)
        r = runner.invoke(app, ["train", str(ds), *TINY, "--max-steps", "2", "--name", "good"])
        assert r.exit_code == 0, r.output
    finally:
        os.chdir(cwd)
    good = root / "checkpoints" / "good" / "last.ckpt"
    return {"root": root, "ds": ds, "good": good, "blob": good.read_bytes()}


def foreign_files(blob: bytes, marker: Path) -> dict[str, bytes]:
    """name -> bytes of a file that is not an acceptable poetgen checkpoint."""
    files: dict[str, bytes] = {}
    payload = {"model": Payload(marker), "step": 1}
    for proto in (0, 2, 4, 5):
        files[f"pickle-protocol-{proto}"] = pickle.dumps(payload, protocol=proto)
    buf = io.BytesIO()
    torch.save(payload, buf)
    files["torch.save-zip"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save(payload, buf, _use_new_zipfile_serialization=False)
    files["torch.save-legacy"] = buf.getvalue()
    n = struct.unpack("<Q", blob[:8])[0]
    cuts = sorted({0, 1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, (8 + n + len(blob)) // 2, len(blob) - 1})
    for cut in cuts:
        files[f"truncated-at-{cut}"] = blob[:cut]
    files["text"] = "床前明月光，疑是地上霜。\n".encode() * 50
    files["empty"] = b""
    files["random-bytes"] = random.Random(7).randbytes(4096)
    files["nul-bytes"] = bytes(4096)
    files["json"] = json.dumps({"format": "poetgen-checkpoint", "format_version": 1}).encode()

    from safetensors.torch import save as st_save

    files["safetensors-foreign-metadata"] = st_save({"w": torch.zeros(3)}, {"format": "pt", "framework": "other"})
    files["safetensors-no-metadata"] = st_save({"w": torch.zeros(3)})
    files["newer-format"] = _with_meta(blob, format_version=str(FORMAT_VERSION + 1))
    files["format-version-not-a-number"] = _with_meta(blob, format_version="one")
    files["trailing-bytes"] = blob + b"\0" * 16
    header, body = _split(blob)
    files["header-is-a-list"] = _join([1, 2, 3], body)  # type: ignore[arg-type]
    files["huge-header-length"] = struct.pack("<Q", 2**40) + blob[8:]
    files["pickle-after-header"] = _join(header, pickle.dumps(payload))
    files["missing-vocab"] = _with_data(blob, lambda d: {k: v for k, v in d.items() if k != "vocab"})
    files["missing-model-config"] = _with_data(blob, lambda d: {k: v for k, v in d.items() if k != "model_config"})
    files["data-not-json"] = _with_meta(blob, data="{not json")
    files["vocab-size-mismatch"] = _with_data(blob, lambda d: {**d, "model_config": {**d["model_config"],
                                                                                      "vocab_size": 3}})
    files["wrong-hidden-size"] = _with_data(blob, lambda d: {**d, "model_config": {**d["model_config"], "hidden": 17}})
    files["unknown-cell"] = _with_data(blob, lambda d: {**d, "model_config": {**d["model_config"], "cell": "pickle"}})
    return files


def _place(root: Path, name: str, data: bytes) -> Path:
    run = root / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(data)
    return run / "last.ckpt"


def _commands(ckpt: Path, ds: Path, n: int) -> dict[str, list[str]]:
    return {
        "sample": ["sample", "-c", str(ckpt), "--seed", "1", "-l", "5", "-q"],
        "eval": ["eval", str(ckpt), "-q"],
        "train --resume": ["train", "--resume", str(ckpt.parent), "--max-steps", "4", "--quiet"],
        "train --init-from": ["train", str(ds), "--init-from", str(ckpt), "--max-steps", "1", "--quiet",
                              "--batch-size", "2", "--seq-len", "16",
                              "--name", f"ft{n}", "--runs-dir", str(ckpt.parent.parent.parent / "ft")],
    }


def test_the_genuine_checkpoint_is_accepted_by_every_command(env):
    """The control: refusals below are about the files, not about the commands or the setup."""
    ckpt = _place(env["root"], "genuine", env["blob"])
    for what, args in _commands(ckpt, env["ds"], 0).items():
        r = runner.invoke(app, args)
        assert r.exit_code == 0, (what, r.output)
    assert load_checkpoint(ckpt.parent).train_state["step"] == 4  # resumed from 2 to 4


def test_every_foreign_file_is_refused_by_every_command_and_runs_no_code(env):
    root = env["root"]
    marker = root / "marker-code-ran"
    files = foreign_files(env["blob"], marker)
    assert len(files) >= 30
    refusals = 0
    for i, (name, data) in enumerate(files.items(), start=1):
        ckpt = _place(root, name, data)
        for what, args in _commands(ckpt, env["ds"], i).items():
            r = runner.invoke(app, args)
            assert r.exit_code == 1, (name, what, r.output, r.exception)
            assert r.stderr.startswith("Error: "), (name, what, r.stderr)
            assert "Traceback" not in r.output, (name, what)
            assert str(ckpt.parent.parent.name) in r.stderr or "checkpoint" in r.stderr, (name, what, r.stderr)
            refusals += 1
        assert ckpt.read_bytes() == data, name  # the refused file is left as it was
        assert not marker.exists(), f"{name}: code from the file ran"
        assert not (root / "ft" / f"ft{i}").exists(), f"{name}: a run was started"
    assert refusals == 4 * len(files)


@pytest.mark.parametrize("name, expected", [
    ("pickle-protocol-4", "never loads pickles"),
    ("torch.save-zip", "PyTorch (torch.save) archive"),
    ("truncated-at-100", "truncated"),
    ("text", "not a poetgen checkpoint"),
    ("safetensors-foreign-metadata", "safetensors file but not a poetgen checkpoint"),
    ("newer-format", "newer than this poetgen reads"),
])
def test_refusals_say_what_the_file_is(env, name, expected):
    files = foreign_files(env["blob"], env["root"] / "marker")
    files["truncated-at-100"] = env["blob"][:100]
    ckpt = _place(env["root"], name, files[name])
    r = runner.invoke(app, ["sample", "-c", str(ckpt), "-q"])
    assert r.exit_code == 1 and expected in r.stderr, r.stderr


# --- damaged metadata: every value a stranger could put in the header --------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from poetgen.checkpoint.torch_io import load_model  # noqa: E402
from poetgen.errors import CheckpointError  # noqa: E402

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
_DELETE = object()


def _paths(obj, prefix=()):
    """Every place in a JSON value (list items only the first three: the vocabulary is long)."""
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj[:3]) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _replaced(obj, path, value):
    if not path:
        return value
    obj = json.loads(json.dumps(obj))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


@pytest.fixture(scope="module")
def anatomy(env):
    header, body = _split(env["blob"])
    data = json.loads(header["__metadata__"]["data"])
    header_paths = [p for p in _paths(header) if p and p[:2] != ("__metadata__", "data")]
    return {"header": header, "body": body, "data": data, "header_paths": header_paths,
            "data_paths": [p for p in _paths(data) if p]}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_damaged_metadata_is_refused_cleanly_or_loads(env, anatomy, draw):
    """Replace or delete one value anywhere in the header or in its JSON data: load_model either gives a model
    whose weights match its config, or raises CheckpointError. Never another exception, a hang, or a huge
    allocation (a config asking for 2**62 hidden units or layers is refused before any model is built)."""
    in_data = draw.draw(st.booleans())
    paths = anatomy["data_paths"] if in_data else anatomy["header_paths"]
    path = draw.draw(st.sampled_from(paths))
    value = draw.draw(st.one_of(st.just(_DELETE), JSON_VALUES,
                                st.sampled_from([2**62, 10**6, -1, 0, 1.5, "lstm", [], {}])))
    header = anatomy["header"]
    if in_data:
        header = _replaced(header, ("__metadata__", "data"), json.dumps(_replaced(anatomy["data"], path, value)))
    else:
        header = _replaced(header, path, value)
    bad = env["root"] / "damaged" / "last.ckpt"
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(_join(header, anatomy["body"]))
    try:
        model, ckpt = load_model(bad)
    except CheckpointError:
        return
    assert model.config == ckpt.model_config and model.num_parameters() == sum(
        t.numel() for k, t in ckpt.model_state.items() if k != "head.weight" or not model.config.tie_weights)


def test_a_config_asking_for_an_enormous_model_is_refused_before_building_it(env, tmp_path):
    for change in ({"layers": 2**40}, {"hidden": 2**40}, {"embed": 2**40}, {"vocab_size": 2**40}):
        bad = tmp_path / "huge.ckpt"
        bad.write_bytes(_with_data(env["blob"], lambda d: {**d, "model_config": {**d["model_config"], **change}}))
        r = runner.invoke(app, ["sample", "-c", str(bad), "-q"])
        assert r.exit_code == 1 and r.stderr.startswith("Error: "), (change, r.output, r.exception)


def test_a_tiny_file_claiming_a_billion_layers_is_refused_without_listing_them(tmp_path, monkeypatch):
    """Its one recurrent tensor is named for the last of 10**9 layers: the shapes of 4 * 10**9 tensors must not be
    listed (that would take hours and gigabytes) before the file is refused."""
    import numpy as np
    from safetensors.numpy import save

    from poetgen.checkpoint import format as checkpoint_file
    from poetgen.generation.engines import load_runtime
    from poetgen.data.vocab import Vocab

    vocab, layers = Vocab(["<eot>", "<unk>", "a", "b"]), 10**9
    data = {"model_config": {"vocab_size": 4, "cell": "rnn", "layers": layers, "hidden": 2, "embed": 2},
            "vocab": vocab.to_dict()}
    bad = tmp_path / "layers.ckpt"
    bad.write_bytes(save({"model/embedding.weight": np.zeros((4, 2), np.float32),
                          f"model/rnn.weight_hh_l{layers - 1}": np.zeros((2, 2), np.float32)},
                         metadata={"format": "poetgen-checkpoint", "format_version": "1", "data": json.dumps(data)}))

    def never(config):
        raise AssertionError(f"expected_shapes listed {config.layers} layers")

    monkeypatch.setattr(checkpoint_file, "expected_shapes", never)
    for load in (load_checkpoint, load_runtime):
        with pytest.raises(CheckpointError, match="weights do not match the model config"):
            load(bad)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("layers, tie", [(1, False), (3, False), (2, True)])
def test_expected_shapes_are_those_of_the_real_model(cell, layers, tie):
    """The checkpoint check lists the shapes without building a model; they must be the model's own."""
    from poetgen.checkpoint.torch_io import expected_shapes
    from poetgen.model.rnn import CharRNN, ModelConfig

    config = ModelConfig(11, cell=cell, layers=layers, hidden=6, embed=6 if tie else 4, tie_weights=tie)
    assert expected_shapes(config) == {k: tuple(v.shape) for k, v in CharRNN(config).state_dict().items()}


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("cutoffs, div", [((), 4.0), ((3,), 2.0), ((2, 5, 9), 1.5), ((1, 10), 100.0)])
def test_expected_shapes_of_the_adaptive_head_are_those_of_the_real_model(cell, cutoffs, div):
    from poetgen.checkpoint.torch_io import expected_shapes
    from poetgen.model.rnn import CharRNN, ModelConfig

    config = ModelConfig(11, cell=cell, layers=2, hidden=6, embed=4, head="adaptive", cutoffs=cutoffs, div_value=div)
    assert expected_shapes(config) == {k: tuple(v.shape) for k, v in CharRNN(config).state_dict().items()}


@pytest.mark.parametrize("change", [
    {"train_state": {"step": "2"}}, {"train_state": {"elapsed": None}}, {"train_state": {"best_val_loss": "low"}},
    {"train_state": {"tokens_seen": []}}, {"train_state": {"evals": True}},
    {"optimizer": {"param_groups": []}}, {"optimizer": {"param_groups": [{"params": [99]}]}},
    {"dataset_meta": {"fingerprint": 5}}, {"dataset_meta": {"path": ["ds"]}},
])
def test_a_damaged_training_state_is_refused_by_resume(env, change):
    """Values only `train --resume` reads: refused before the first step, not a TypeError mid-run."""
    def changed(d):
        for key, values in change.items():
            d = {**d, key: {**d[key], **values}}
        return d

    ckpt = _place(env["root"], "damaged-state", _with_data(env["blob"], changed))
    r = runner.invoke(app, ["train", "--resume", str(ckpt.parent), str(env["ds"]), "--max-steps", "4", "--quiet"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "damaged" in r.stderr, (r.output, r.exception)
    assert load_checkpoint(env["good"]).train_state["step"] == 2  # (the source run is untouched)
