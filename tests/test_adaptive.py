"""The adaptive softmax head (issue 7): exact log-probabilities, the training loss path, configuration, and a tiny
adaptive model through train / eval / resume / sample."""

from __future__ import annotations

import json
import threading

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from poetgen.checkpoint.torch_io import expected_shapes, load_checkpoint, load_model
from poetgen.cli.app import app
from poetgen.training.config import TrainConfig, resolve_config
from poetgen.data.dataset import load_dataset
from poetgen.errors import ConfigError
from poetgen.evaluation.scoring import cross_entropy
from poetgen.model.rnn import AUTO_HEAD_MIN_VOCAB, CELLS, CharRNN, ModelConfig, auto_cutoffs
from poetgen.training.loop import TrainCallbacks, train

torch.set_num_threads(1)
runner = CliRunner()

V, H = 30, 16


def adaptive(cell="lstm", cutoffs=(5, 12), **kw) -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(ModelConfig(vocab_size=V, cell=cell, hidden=H, embed=8, head="adaptive", cutoffs=cutoffs, **kw))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("cutoffs", [(5,), (5, 12), (1, 2, 29)])
def test_log_probs_sum_to_one_and_the_loss_is_their_mean_nll(cell, cutoffs):
    m = adaptive(cell, cutoffs)
    with torch.no_grad():  # trained-looking weights: the biases are zero at first
        for p in m.head.parameters():
            p.normal_(0, 0.5)
    idx, y = torch.randint(0, V, (3, 7)), torch.randint(0, V, (3, 7))
    y[0, :3] = torch.tensor([0, cutoffs[-1], V - 1])  # the first and last ids, and a cluster's first
    scores, h = m(idx)
    assert scores.shape == (3, 7, V)
    torch.testing.assert_close(scores.exp().sum(-1), torch.ones(3, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(F.log_softmax(scores, -1), scores, atol=1e-5, rtol=0)  # what sample/eval apply
    loss, h2 = m(idx, None, y)
    assert loss.dim() == 0
    assert abs(loss.item() - (-scores.gather(-1, y[..., None]).mean().item())) < 1e-5
    torch.testing.assert_close(h, h2)


def test_full_head_loss_path_is_the_old_cross_entropy_exactly():
    torch.manual_seed(0)
    m = CharRNN(ModelConfig(vocab_size=V, hidden=H, embed=8))
    idx, y = torch.randint(0, V, (3, 7)), torch.randint(0, V, (3, 7))
    logits, _ = m(idx)
    loss, _ = m(idx, None, y)
    assert loss.item() == F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1)).item()


def test_every_parameter_gets_a_gradient_even_with_an_empty_cluster():
    """DistributedDataParallel needs every parameter in every step's graph."""
    m = adaptive(cutoffs=(5, 12))
    y = torch.randint(0, 5, (2, 6))  # shortlist targets only: both tail clusters are empty
    loss, _ = m(torch.randint(0, V, (2, 6)), None, y)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    assert all(p.grad.abs().sum() == 0 for n, p in m.named_parameters() if n.startswith("head.tails"))
    m.zero_grad()
    m(torch.randint(0, V, (2, 6)), None, torch.full((2, 6), V - 1))[0].backward()
    assert m.head.tails[1].out.weight.grad.abs().sum() > 0


def test_parameters_shapes_and_names():
    m = adaptive(cutoffs=(5, 12), div_value=2.0)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items() if k.startswith("head.")}
    assert shapes == {
        "head.root.weight": (7, H), "head.root.bias": (7,),  # 5 shortlist symbols + 2 clusters
        "head.tails.0.proj.weight": (8, H), "head.tails.0.out.weight": (7, 8), "head.tails.0.out.bias": (7,),
        "head.tails.1.proj.weight": (4, H), "head.tails.1.out.weight": (18, 4), "head.tails.1.out.bias": (18,),
    }
    assert expected_shapes(m.config) == {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert m.num_parameters() == sum(v.numel() for v in m.state_dict().values())


def test_config_resolves_auto_and_round_trips():
    big = ModelConfig(vocab_size=8798, head="auto")
    assert big.head == "adaptive" and big.cutoffs == auto_cutoffs(8798) == (1000, 4000)
    assert ModelConfig(vocab_size=AUTO_HEAD_MIN_VOCAB - 1, head="auto").head == "full"
    assert ModelConfig(vocab_size=50, head="auto", cutoffs=[10]).head == "adaptive"  # cutoffs given: adaptive
    assert ModelConfig(vocab_size=40, head="adaptive").cutoffs == (10,)
    assert all(0 < c[0] and list(c) == sorted(set(c)) and c[-1] < v for v in (3, 4, 65, 9000, 30000)
               for c in [auto_cutoffs(v)])
    c = ModelConfig(vocab_size=50, head="adaptive", cutoffs=[10, 20], div_value=2)
    d = json.loads(json.dumps(c.to_dict()))
    assert ModelConfig.from_dict(d) == c and d["cutoffs"] == [10, 20]
    old = {k: v for k, v in ModelConfig(vocab_size=50).to_dict().items() if k not in ("head", "cutoffs", "div_value")}
    assert ModelConfig.from_dict(old).head == "full"  # a checkpoint from before the adaptive head


@pytest.mark.parametrize("kw, message", [
    (dict(cutoffs=[10, 10]), "cutoffs must rise strictly"),
    (dict(cutoffs=[20, 10]), "cutoffs must rise strictly"),
    (dict(cutoffs=[0, 10]), "cutoffs must rise strictly"),
    (dict(cutoffs=[10, 50]), "at most vocab_size - 1 = 49"),
    (dict(cutoffs=[10, 2.5]), "cutoffs must be a list of integers"),
    (dict(cutoffs="10"), "cutoffs must be a list of integers"),
    (dict(cutoffs=[True]), "cutoffs must be a list of integers"),
    (dict(div_value=0.5), "div_value must be a number of at least 1"),
    (dict(tie_weights=True, embed=256), "tie_weights needs the full head"),
    (dict(head="full", cutoffs=[10]), "cutoffs apply to the adaptive head only"),
    (dict(head="hierarchical"), "head must be"),
])
def test_bad_head_settings_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(vocab_size=50, **{"head": "adaptive", **kw})


def test_train_config_checks_and_parses_cutoffs():
    cfg = resolve_config(overrides={"head": "adaptive", "cutoffs": "10, 20"})
    assert cfg.cutoffs == (10, 20) and cfg.model_dict()["cutoffs"] == (10, 20)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert resolve_config(overrides={"head": "adaptive", "cutoffs": ""}).cutoffs == ()
    for bad, message in [({"cutoffs": "10,x"}, "comma-separated whole numbers"),
                         ({"cutoffs": "20,10"}, "rising positive"),
                         ({"cutoffs": [0]}, "rising positive"),
                         ({"head": "full", "cutoffs": "10"}, "adaptive head only"),
                         ({"head": "soft"}, "head must be one of"),
                         ({"div_value": float("nan")}, "div_value")]:
        with pytest.raises(ConfigError, match=message):
            resolve_config(overrides={"head": "adaptive", **bad})


# --- end to end ------------------------------------------------------------------------------------------------

TINY = ["--layers", "1", "--hidden", "32", "--embed", "16", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2",
        "--warmup", "2", "--sample-every", "0", "--threads", "1", "--head", "adaptive", "--cutoffs", "10,25",
        "--div-value", "2"]


def test_cli_trains_evaluates_resumes_and_samples_an_adaptive_model(tmp_path, monkeypatch, tiny_dataset):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POETGEN_CACHE_DIR", str(tmp_path / "cache"))
    r = runner.invoke(app, ["train", str(tiny_dataset), *TINY, "--max-steps", "8", "--eval-every", "4",
                            "--name", "ad", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    run = tmp_path / "checkpoints" / "ad"
    model, ckpt = load_model(run / "last.ckpt")
    assert (ckpt.model_config.head, ckpt.model_config.cutoffs, ckpt.model_config.div_value) == ("adaptive",
                                                                                                (10, 25), 2.0)
    assert "head.root.weight" in ckpt.model_state and "head.weight" not in ckpt.model_state
    # poetgen eval: the same exact val loss as the run's last evaluation (both score every val position).
    r = runner.invoke(app, ["eval", str(run / "last.ckpt"), "--json", "--warmup", "0"])
    assert r.exit_code == 0, r.output
    nats = json.loads(r.stdout)["models"][0]["cold"]["nats_per_char"]
    ds = load_dataset(tiny_dataset)
    assert nats == pytest.approx(cross_entropy(model, ds.val, warmup=0).cold.nats, abs=1e-9)
    assert 0 < nats < 5 and summary["last_val_loss"] == pytest.approx(nats, abs=0.3)
    # a resumed run goes on with the same head; changing it is refused
    r = runner.invoke(app, ["train", "--resume", str(run), "--head", "full", "--max-steps", "12", "-q"])
    assert r.exit_code == 1 and "head" in r.stderr
    r = runner.invoke(app, ["train", "--resume", str(run), "--max-steps", "12", "-q"])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(run / "last.ckpt").train_state["step"] == 12
    r = runner.invoke(app, ["sample", "-c", str(run), "--seed", "1", "-n", "2", "--length", "20"])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.strip()) > 0 and set(r.stdout) - set("\n ") <= set("".join(ds.vocab.symbols[2:]))


class _Rec(TrainCallbacks):
    def __init__(self, stop_at=None):
        self.losses, self.evals, self.stop, self.stop_at = {}, [], threading.Event(), stop_at

    def on_step(self, info):
        self.losses[info["step"]] = info["loss"]
        if info["step"] == self.stop_at:
            self.stop.set()

    def on_eval(self, info):
        self.evals.append(info["val_loss"])


def test_an_adaptive_run_resumes_exactly(tiny_dataset, tmp_path):
    ds = load_dataset(tiny_dataset)
    cfg = TrainConfig(layers=1, hidden=32, embed=16, dropout=0.2, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2,
                      eval_every=5, sample_every=0, max_steps=12, head="adaptive", cutoffs=(10, 25))
    full = _Rec()
    train(cfg, ds, tmp_path / "full", callbacks=full)
    first = _Rec(stop_at=7)
    assert train(cfg, ds, tmp_path / "split", callbacks=first, stop=first.stop).step == 7
    second = _Rec()
    train(cfg, ds, tmp_path / "split", resume=load_checkpoint(tmp_path / "split" / "last.ckpt"), callbacks=second)
    resumed = {**first.losses, **second.losses}
    assert sorted(resumed) == list(range(1, 13))
    assert max(abs(resumed[s] - full.losses[s]) for s in resumed) <= 1e-6
    assert first.evals + second.evals == pytest.approx(full.evals, abs=1e-6)
    assert full.losses[12] < full.losses[1]  # it learns
    a = load_checkpoint(tmp_path / "full" / "last.ckpt").model_state
    b = load_checkpoint(tmp_path / "split" / "last.ckpt").model_state
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
