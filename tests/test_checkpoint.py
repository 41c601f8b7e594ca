from __future__ import annotations

import json
import os
import pickle
import random
import time
from pathlib import Path

import pytest
import torch

from poetgen.checkpoint.torch_io import (
    CHECKPOINT_VERSION,
    FORMAT_VERSION,
    find_checkpoint,
    load_checkpoint,
    load_model,
    restore_rng,
    save_checkpoint,
)
from poetgen.errors import CheckpointError
from poetgen.model.rnn import CharRNN, ModelConfig
from poetgen.data.vocab import Vocab

torch.set_num_threads(1)

VOCAB = Vocab(["<eot>", "<unk>", *"床前明月光疑是地上霜"])


def make_model(cell: str = "lstm", **kw) -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(ModelConfig(vocab_size=len(VOCAB), cell=cell, layers=2, hidden=8, embed=kw.pop("embed", 4), **kw))


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_minimal_round_trip_gives_identical_outputs(tmp_path, cell):
    m = make_model(cell).eval()
    path = save_checkpoint(tmp_path / "m.ckpt", m, VOCAB)
    loaded, ckpt = load_model(path)
    assert not loaded.training
    assert ckpt.vocab == VOCAB and ckpt.model_config == m.config
    assert ckpt.format_version == CHECKPOINT_VERSION and ckpt.poetgen_version
    idx = torch.randint(0, len(VOCAB), (2, 7))
    torch.testing.assert_close(loaded(idx)[0], m(idx)[0], rtol=0, atol=0)


def test_tied_weights_round_trip_stay_tied(tmp_path):
    m = make_model("gru", embed=8, tie_weights=True)
    loaded, _ = load_model(save_checkpoint(tmp_path / "t.ckpt", m, VOCAB))
    assert loaded.head.weight is loaded.embedding.weight
    torch.testing.assert_close(loaded.head.weight, m.head.weight)


def test_full_state_round_trip(tmp_path):
    m = make_model("lstm", dropout=0.1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95))
    for _ in range(2):
        logits, _ = m(torch.randint(0, len(VOCAB), (2, 5)))
        logits.sum().backward()
        opt.step()
    torch.manual_seed(123)
    random.seed(5)
    hidden = m.init_hidden(2)
    save_checkpoint(
        tmp_path / "full.ckpt", m, VOCAB,
        train_config={"lr": 3e-3, "cell": "lstm"},
        train_state={"step": 2, "best_val_loss": float("inf"), "position": [0, 2]},
        optimizer=opt, dataset_meta={"fingerprint": "abc", "name": "泰"},
        extra_tensors={"hidden.0": hidden[0] + 1, "hidden.1": hidden[1]},
    )
    expected_torch, expected_py = torch.rand(3), random.random()

    ckpt = load_checkpoint(tmp_path / "full.ckpt")
    assert ckpt.train_config == {"lr": 3e-3, "cell": "lstm"}
    assert ckpt.train_state["step"] == 2 and ckpt.train_state["best_val_loss"] == float("inf")
    assert ckpt.dataset_meta == {"fingerprint": "abc", "name": "泰"}
    torch.testing.assert_close(ckpt.tensors["hidden.0"], torch.ones(2, 2, 8))
    restore_rng(ckpt)
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_py

    m2 = make_model("lstm", dropout=0.1)
    m2.load_state_dict(ckpt.model_state)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1.0)
    opt2.load_state_dict(ckpt.optimizer_state)
    assert opt2.param_groups[0]["lr"] == 3e-3 and opt2.param_groups[0]["betas"] == (0.9, 0.95)
    for p, p2 in zip(m.parameters(), m2.parameters()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], opt2.state[p2][k])


def test_checkpoint_is_plain_safetensors(tmp_path):
    from safetensors import safe_open

    path = save_checkpoint(tmp_path / "m.ckpt", make_model(), VOCAB)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "poetgen-checkpoint"
    assert json.loads(meta["data"])["vocab"]["symbols"] == VOCAB.symbols
    assert "model/embedding.weight" in keys and "rng/torch" in keys


class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_payload_is_refused_without_running(tmp_path, how):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    payload = {"model": _Payload(marker)}
    if how == "pickle":
        evil.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, evil)
    for loader in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match="never loads pickles"):
            loader(evil)
    assert not marker.exists()
    # A protocol-0 pickle starts with plain text, not the pickle magic byte: still refused, still not run.
    evil.write_bytes(pickle.dumps(payload, protocol=0))
    with pytest.raises(CheckpointError, match="not a poetgen checkpoint"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_truncated_foreign_and_newer_files_are_refused(tmp_path):
    good = save_checkpoint(tmp_path / "good.ckpt", make_model(), VOCAB)
    blob = good.read_bytes()
    for cut in (len(blob) - 1, len(blob) // 2, 20, 5, 0):
        bad = tmp_path / f"cut{cut}.ckpt"
        bad.write_bytes(blob[:cut])
        with pytest.raises(CheckpointError, match="truncated|not a poetgen checkpoint"):
            load_checkpoint(bad)
    text = tmp_path / "notes.ckpt"
    text.write_text("床前明月光\n" * 10, encoding="utf-8")
    with pytest.raises(CheckpointError, match="not a poetgen checkpoint"):
        load_checkpoint(text)

    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a poetgen checkpoint"):
        load_checkpoint(other)

    from safetensors.torch import load as st_load, save as st_save
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
    meta["format_version"] = str(FORMAT_VERSION + 1)
    newer = tmp_path / "newer.ckpt"
    newer.write_bytes(st_save(st_load(blob), meta))
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(newer)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_atomic_write_leaves_previous_file_on_failure(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.ckpt", make_model(), VOCAB, train_state={"step": 1})
    import poetgen.checkpoint.torch_io as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*disk full; the previous last.ckpt is intact"):
        save_checkpoint(path, make_model(), VOCAB, train_state={"step": 2})
    assert load_checkpoint(path).train_state["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_find_checkpoint_rules(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(CheckpointError, match="not found"):
        find_checkpoint(runs)
    runs.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_checkpoint(runs)
    m = make_model()
    old = save_checkpoint(runs / "old" / "last.ckpt", m, VOCAB)
    os.utime(old, (time.time() - 100, time.time() - 100))
    new_last = save_checkpoint(runs / "new" / "last.ckpt", m, VOCAB)
    assert find_checkpoint(runs) == new_last
    new_best = save_checkpoint(runs / "new" / "best.ckpt", m, VOCAB)
    assert find_checkpoint(runs) == new_best
    assert find_checkpoint(runs / "old") == old
    assert find_checkpoint(old) == old
    only_steps = save_checkpoint(runs / "steps" / "step-00000020.ckpt", m, VOCAB)
    save_checkpoint(runs / "steps" / "step-00000010.ckpt", m, VOCAB)
    assert find_checkpoint(runs / "steps") == only_steps
    # load_model accepts a run directory as well
    assert load_model(runs / "new")[1].path == new_best


def test_model_saved_from_another_device_dtype_state_loads_on_cpu(tmp_path):
    """Stand-in for a GPU checkpoint: tensors are moved to CPU on save, and map_location is honoured on load."""
    m = make_model()
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "m.ckpt", m, VOCAB), map_location="cpu")
    assert all(t.device.type == "cpu" for t in ckpt.model_state.values())


def test_compiled_wrapper_saves_plain_names(tmp_path):
    m = make_model()

    class Wrapper(torch.nn.Module):  # what torch.compile returns: the model under _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    ckpt = load_checkpoint(save_checkpoint(tmp_path / "c.ckpt", Wrapper(m), VOCAB))
    assert set(ckpt.model_state) == set(m.state_dict())


def test_vocab_size_mismatch_refused(tmp_path):
    with pytest.raises(CheckpointError, match="vocabulary has"):
        save_checkpoint(tmp_path / "x.ckpt", make_model(), Vocab(["<eot>", "<unk>", "a"]))
