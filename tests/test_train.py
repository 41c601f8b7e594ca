from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import make_dataset
from poetgen.checkpoint.torch_io import load_checkpoint, load_model
from poetgen.training.config import TrainConfig
from poetgen.data.dataset import load_dataset
from poetgen.errors import ConfigError, TrainingError
from poetgen.model.rnn import CharRNN, ModelConfig
from poetgen.training.runs import run_lock
from poetgen.model.devices import autocast_dtype, resolve_device
from poetgen.data.batches import stream_layout
from poetgen.generation.sample import SampleOptions, generate
from poetgen.training.loop import TrainCallbacks, estimate_memory, lr_at, make_plan, train

torch.set_num_threads(1)

# 1,000 training tokens -> 4 streams of 249 -> 7 windows of 32 per epoch.
SMALL = dict(layers=1, hidden=48, embed=16, dropout=0.0, batch_size=4, seq_len=32, lr=2e-2, warmup_steps=5,
             eval_every=1000, sample_every=0, log_every=1)


class Recorder(TrainCallbacks):
    def __init__(self, stop_at: int | None = None):
        self.losses: dict[int, float] = {}
        self.evals: list[dict] = []
        self.samples: list[str] = []
        self.stop = threading.Event()
        self.stop_at = stop_at

    def on_step(self, info):
        self.losses[info["step"]] = info["loss"]
        if info["step"] == self.stop_at:
            self.stop.set()

    def on_eval(self, info):
        self.evals.append(info)

    def on_sample(self, step, text):
        self.samples.append(text)


@pytest.fixture
def ds(tiny_dataset):
    return load_dataset(tiny_dataset)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_each_cell_overfits_a_tiny_corpus(ds, tmp_path, cell):
    rec = Recorder()
    result = train(TrainConfig(cell=cell, max_steps=210, **SMALL), ds, tmp_path / cell, callbacks=rec)
    assert result.status == "completed" and result.step == 210
    last_epoch = [rec.losses[s] for s in range(204, 211)]
    assert max(last_epoch) < 0.05, last_epoch  # started near ln(40) = 3.7
    assert rec.losses[1] > 3.0


@pytest.mark.parametrize("stop_at", [13, 14])  # mid-epoch (carried hidden state) and an epoch boundary
@pytest.mark.parametrize("awd", [{}, {"weight_drop": 0.3, "embed_dropout": 0.1}], ids=["dropout", "awd"])
def test_resume_repeats_an_unbroken_run_exactly(ds, tmp_path, stop_at, awd):
    """Also with the weight and embedding dropout masks, which draw from the same random state."""
    cfg = TrainConfig(cell="lstm", max_steps=30, **{**SMALL, "layers": 2, "dropout": 0.2, "eval_every": 10, **awd})
    full = Recorder()
    train(cfg, ds, tmp_path / "full", callbacks=full)

    first = Recorder(stop_at=stop_at)
    r1 = train(cfg, ds, tmp_path / "split", callbacks=first, stop=first.stop)
    assert r1.status == "interrupted" and r1.step == stop_at
    ckpt = load_checkpoint(tmp_path / "split" / "last.ckpt")
    assert ckpt.train_state["step"] == stop_at
    second = Recorder()
    r2 = train(cfg, ds, tmp_path / "split", resume=ckpt, callbacks=second)
    assert r2.status == "completed" and r2.step == 30

    resumed = {**first.losses, **second.losses}
    assert sorted(resumed) == list(range(1, 31))
    for step in range(1, 31):
        assert abs(resumed[step] - full.losses[step]) <= 1e-6, step
    assert [e["val_loss"] for e in first.evals + second.evals] == pytest.approx(
        [e["val_loss"] for e in full.evals], abs=1e-6)
    a = load_checkpoint(tmp_path / "full" / "last.ckpt").model_state
    b = load_checkpoint(tmp_path / "split" / "last.ckpt").model_state
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # metrics.jsonl of the resumed run: each step logged once
    steps = [r["step"] for r in map(json.loads, (tmp_path / "split" / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "train"]
    assert steps == list(range(1, 31))


def test_memory_estimate_counts_the_head_that_runs():
    cfg = TrainConfig(cell="lstm", layers=1, hidden=32, embed=8, batch_size=4, seq_len=10)
    full = ModelConfig(vocab_size=5000, cell="lstm", layers=1, hidden=32, embed=8, head="full")
    per_token_rest = 8 + 8 * 32  # embedding, then gates and states of the one layer
    assert estimate_memory(cfg, 1000, full) == 4 * (4 * 1000 + 40 * (per_token_rest + 3 * 5000))
    adaptive = ModelConfig(vocab_size=5000, cell="lstm", layers=1, hidden=32, embed=8, head="adaptive",
                           cutoffs=(100, 1000))
    # Every target in the shortlist: only the root's 100 + 2 scores per position.
    short = np.arange(100).repeat(10)
    assert estimate_memory(cfg, 1000, adaptive, short) == 4 * (4 * 1000 + 40 * (per_token_rest + 3 * 102))
    # Half the targets in the first tail (900 symbols, projection 32 // 4 = 8), none in the last.
    half = np.concatenate([np.zeros(500, np.int64), np.full(500, 150)])
    width = 102 + 0.5 * (900 + 8)
    assert estimate_memory(cfg, 1000, adaptive, half) == int(4 * (4 * 1000 + 40 * (per_token_rest + 3 * width)))
    # No tokens to count: every tail counted at every position (an upper bound).
    assert estimate_memory(cfg, 1000, adaptive, half) < estimate_memory(cfg, 1000, adaptive)


def test_plan_numbers_and_zero_batches(ds):
    cfg = TrainConfig(cell="gru", max_epochs=3, **SMALL)
    plan = make_plan(cfg, ds)
    assert (plan.train_tokens, plan.val_tokens) == (len(ds.train), len(ds.val)) == (1000, 50)
    assert plan.stream_len == 999 // 4 and plan.batches_per_epoch == 249 // 32 == 7
    assert plan.tokens_per_epoch == 7 * 4 * 32 and plan.total_steps == 21
    model = CharRNN(ModelConfig(vocab_size=len(ds.vocab), **cfg.model_dict()))
    assert plan.parameters == model.num_parameters()
    assert plan.estimated_memory_bytes > 16 * plan.parameters
    assert make_plan(TrainConfig(**{**SMALL, "max_steps": 5}), ds).total_steps == 5
    assert make_plan(TrainConfig(**{**SMALL, "max_time": 60.0}), ds).total_steps is None
    assert make_plan(TrainConfig(**SMALL), ds).total_steps == 500  # no budget: 10 epochs, at least 500 steps
    assert make_plan(TrainConfig(**{**SMALL, "batch_size": 1, "seq_len": 1}), ds).total_steps == 9990
    with pytest.raises(TrainingError, match="zero batches.*1,000 tokens.*need at least 1,025.*--batch-size 7 or lower"):
        make_plan(TrainConfig(**{**SMALL, "batch_size": 8, "seq_len": 128}), ds)
    with pytest.raises(TrainingError, match="zero batches.*--batch-size 1 --seq-len 999"):
        make_plan(TrainConfig(**{**SMALL, "seq_len": 2000}), ds)
    assert stream_layout(1, 1, 1) == (0, 0)


def test_best_val_loss_is_the_cold_figure_of_poetgen_eval_on_the_best_checkpoint(ds, tmp_path):
    """One scorer: training's validation loss is `poetgen eval`'s cold cross-entropy, every symbol scored once (the
    first included), over the same streams; the old training scorer (no first target, batch-size streams) was not."""
    from typer.testing import CliRunner

    from poetgen.cli.app import app

    rec = Recorder()
    r = train(TrainConfig(max_steps=12, **{**SMALL, "eval_every": 4}), ds, tmp_path / "r", callbacks=rec)
    assert [e["step"] for e in rec.evals] == [4, 8, 12] and len({e["val_loss"] for e in rec.evals}) == 3
    assert r.best_val_loss == min(e["val_loss"] for e in rec.evals)
    out = CliRunner().invoke(app, ["eval", str(r.best_checkpoint), "--json"])
    assert out.exit_code == 0, out.output
    m = json.loads(out.stdout)["models"][0]
    assert m["symbols"] == len(ds.val) == 50 and "val split of" in m["data"]
    assert m["cold"]["nats_per_char"] == pytest.approx(r.best_val_loss, abs=1e-6)
    assert m["cold"]["bits_per_char"] == pytest.approx(r.to_dict()["best_val_bpc"], abs=1e-6)
    assert m["warm"]["nats_per_char"] != pytest.approx(r.best_val_loss, abs=1e-4)  # the check tells them apart


def test_learning_rate_schedule():
    c = TrainConfig(lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(c, 0, 110) == pytest.approx(1e-3)
    assert lr_at(c, 9, 110) == pytest.approx(1e-2)
    assert lr_at(c, 60, 110) == pytest.approx(1e-3 + 9e-3 * 0.5)
    assert lr_at(c, 110, 110) == pytest.approx(1e-3)
    values = [lr_at(c, s, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(c, 50, None) == pytest.approx(1e-2)  # no bound: constant after warmup
    assert lr_at(c, 50, None, time_fraction=1.0) == pytest.approx(1e-3)  # --max-time follows the clock
    assert lr_at(c, 50, 1000, time_fraction=0.5) == pytest.approx(1e-3 + 9e-3 * 0.5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(ds, tmp_path, monkeypatch):
    real = F.cross_entropy
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 13 else out

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    with pytest.raises(TrainingError, match=r"nan at step 13.*lower --lr.*last good checkpoint is .*last\.ckpt"):
        train(TrainConfig(max_steps=30, save_every=5, **SMALL), ds, tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert ckpt.train_state["step"] == 10
    assert all(torch.isfinite(t).all() for t in ckpt.model_state.values())
    assert not (tmp_path / "run" / ".lock").exists()


def test_early_stopping_on_patience(ds, tmp_path, monkeypatch):
    import poetgen.training.loop as tr

    scores = iter([2.0, 1.5, 1.6, 1.7, 1.0, 0.5])
    monkeypatch.setattr(tr, "cross_entropy", lambda *a, **k: SimpleNamespace(cold=SimpleNamespace(nats=next(scores))))
    rec = Recorder()
    r = train(TrainConfig(max_steps=60, patience=2, **{**SMALL, "eval_every": 5}), ds, tmp_path / "r", callbacks=rec)
    assert r.status == "early_stopped" and r.step == 20
    assert r.best_val_loss == 1.5 and [e["best"] for e in rec.evals] == [True, True, False, False]
    assert load_checkpoint(tmp_path / "r" / "best.ckpt").train_state["step"] == 10


def test_run_directory_lock(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(TrainingError, match=f"in use by process {os.getpid()}"):
            with run_lock(run):
                pass
    assert not (run / ".lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (run / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with run_lock(run):  # stale lock of a dead process: taken over
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()


def test_second_fresh_run_into_existing_run_is_refused(ds, tmp_path):
    train(TrainConfig(max_steps=2, **SMALL), ds, tmp_path / "r")
    with pytest.raises(TrainingError, match="already holds a run.*--resume"):
        train(TrainConfig(max_steps=2, **SMALL), ds, tmp_path / "r")


def test_keep_prunes_old_snapshots(ds, tmp_path):
    train(TrainConfig(max_steps=20, keep=2, save_every=4, **SMALL), ds, tmp_path / "r")
    names = sorted(p.name for p in (tmp_path / "r").glob("*.ckpt"))
    assert names == ["best.ckpt", "last.ckpt", "step-00000016.ckpt", "step-00000020.ckpt"]


def test_fine_tune_from_checkpoint_on_another_corpus(tmp_path, ds):
    train(TrainConfig(max_steps=5, **SMALL), ds, tmp_path / "base")
    base = load_checkpoint(tmp_path / "base" / "last.ckpt")
    # A corpus with characters unknown to the base vocabulary.
    other = load_dataset(make_dataset(tmp_path / "other", ["春眠不觉晓，处处闻啼鸟。"] * 30, ["春眠不觉晓"]))
    with pytest.raises(TrainingError, match=r"9 character\(s\) the checkpoint's vocabulary does not know") as e:
        train(TrainConfig(max_steps=3, **SMALL), other, tmp_path / "ft", init_from=base)
    assert all(f"'{ch}'" in str(e.value) for ch in "春眠不觉晓处闻啼鸟")
    r = train(TrainConfig(max_steps=3, **SMALL), other, tmp_path / "ft3", init_from=base, map_unknown=True)
    assert r.status == "completed" and math.isfinite(r.train_loss)
    # A corpus whose characters are a subset, with different ids: remapped, weights carried over.
    subset = load_dataset(make_dataset(tmp_path / "subset", ["低头思故乡。"] * 200, ["低头思故乡。"]))
    assert subset.vocab != base.vocab
    rec = Recorder()
    r = train(TrainConfig(max_steps=4, **{**SMALL, "hidden": 999}), subset, tmp_path / "ft4", init_from=base,
              callbacks=rec)
    tuned = load_checkpoint(tmp_path / "ft4" / "last.ckpt")
    assert tuned.vocab == base.vocab and tuned.model_config.hidden == 48  # the checkpoint's architecture wins
    assert tuned.train_state["step"] == 4
    # Its validation loss is scored through the id map, as `poetgen eval` scores that split for this checkpoint.
    from poetgen.evaluation.scoring import evaluate_checkpoint

    assert evaluate_checkpoint(tmp_path / "ft4" / "best.ckpt").result.cold.nats == pytest.approx(r.best_val_loss,
                                                                                                 abs=1e-6)


def test_sample_lines_are_poetgen_samples_and_do_not_disturb_training(ds, tmp_path):
    """The progress samples come from generate (`poetgen sample`'s code) seeded by the step, and a run that shows
    them (dropout on, so the training RNG stream matters) trains exactly as one that does not."""
    cfg = {**SMALL, "dropout": 0.3, "layers": 2, "eval_every": 4, "sample_length": 15}
    quiet, shown = Recorder(), Recorder()
    train(TrainConfig(max_steps=8, **cfg), ds, tmp_path / "quiet", callbacks=quiet)
    train(TrainConfig(max_steps=8, **{**cfg, "sample_every": 1}), ds, tmp_path / "shown", callbacks=shown)
    assert shown.losses == quiet.losses and [e["val_loss"] for e in shown.evals] == [e["val_loss"] for e in quiet.evals]
    assert len(shown.samples) == 2 and not quiet.samples
    model, ckpt = load_model(tmp_path / "shown" / "last.ckpt")  # the step-8 weights, which drew the second sample
    again = generate(model, ckpt.vocab, options=SampleOptions(temperature=0.8, length=15, seed=8)).samples[0]
    assert shown.samples[1] == again.generated and len(again.generated) <= 15


def test_samples_and_evals_are_reported(ds, tmp_path):
    rec = Recorder()
    r = train(TrainConfig(max_steps=12, **{**SMALL, "eval_every": 4, "sample_every": 2, "sample_length": 10}),
              ds, tmp_path / "r", callbacks=rec)
    assert [e["step"] for e in rec.evals] == [4, 8, 12] and len(rec.samples) == 1
    assert r.best_val_loss == min(e["val_loss"] for e in rec.evals)
    assert rec.evals[0]["val_bpc"] == pytest.approx(rec.evals[0]["val_loss"] / math.log(2))
    model, ckpt = load_model(tmp_path / "r")  # best.ckpt
    assert ckpt.path.name == "best.ckpt" and ckpt.dataset_meta["fingerprint"] == ds.fingerprint


def test_devices_precision_and_compile(ds, tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cpu, "fp32") is None
    from poetgen.model import devices

    native = devices.cpu_bf16_native()
    with monkeypatch.context() as m:
        m.setattr(devices, "cpu_bf16_native", lambda: False)
        with pytest.raises(ConfigError, match="bf16 needs a CUDA device or a CPU with native bf16"):
            autocast_dtype(cpu, "bf16")
        m.setattr(devices, "cpu_bf16_native", lambda: True)
        assert autocast_dtype(cpu, "bf16") is torch.bfloat16
        assert autocast_dtype(cpu, "auto") is None  # auto never picks bf16 on the CPU (README: not 0.01 nats)
    if native:  # the whole loop under CPU autocast: finite losses, fp32 weights saved
        r = train(TrainConfig(**{**SMALL, "max_steps": 3, "eval_every": 3, "precision": "bf16", "threads": 1}), ds,
                  tmp_path / "b")
        assert r.step == 3 and math.isfinite(r.best_val_loss)
        model, _ = load_model(tmp_path / "b")
        assert all(p.dtype == torch.float32 for p in model.parameters())
    if not torch.cuda.is_available():
        assert resolve_device("auto") in (torch.device("cpu"), torch.device("mps"))
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("abacus")
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)
    r = train(TrainConfig(max_steps=2, compile=True, threads=1, **SMALL), ds, tmp_path / "c")
    assert len(compiled) == 1 and r.step == 2


def test_max_time_stops_on_the_clock_with_decayed_rate(ds, tmp_path):
    rec = Recorder()
    lrs, clock = [], []
    rec.on_step = lambda info: (lrs.append(info["lr"]), clock.append(info["elapsed"]))
    r = train(TrainConfig(max_time=1.0, **{**SMALL, "warmup_steps": 0}), ds, tmp_path / "t", callbacks=rec)
    assert r.status == "time_limit" and r.step > 2 and r.step == len(clock)
    # Going on while under budget and stopping once the budget (with the final evaluation's time reserved) is used:
    # no upper bound on the wall clock, which a loaded machine could break.
    assert clock[-2] < 1.0 <= r.elapsed and clock[-1] <= r.elapsed
    assert lrs[0] == pytest.approx(2e-2, rel=0.05) and lrs[-1] < lrs[0] / 2  # the cosine follows the clock
    assert r.best_val_loss is not None  # the final evaluation ran


def test_non_finite_gradient_never_reaches_the_weights(ds, tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def poison_then_measure(params, *a, **k):
        params = list(params)
        calls["n"] += 1
        if calls["n"] == 4:  # the loss stayed finite, but a gradient did not
            params[0].grad.view(-1)[0] = float("inf")
        return real(params, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poison_then_measure)
    with pytest.raises(TrainingError, match="gradient norm became (nan|inf) at step 4"):
        train(TrainConfig(max_steps=10, save_every=1, grad_clip=0.0, **SMALL), ds, tmp_path / "g")
    ckpt = load_checkpoint(tmp_path / "g" / "last.ckpt")
    assert ckpt.train_state["step"] == 3 and all(torch.isfinite(t).all() for t in ckpt.model_state.values())
