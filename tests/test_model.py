from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from poetgen.errors import ConfigError
from poetgen.model.rnn import CELLS, CharRNN, ModelConfig, cat_hidden, detach_hidden, hidden_to, select_hidden

torch.set_num_threads(1)

B, T, V, E, H, L = 3, 5, 11, 6, 7, 2


def tiny(cell: str, **kw) -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(ModelConfig(vocab_size=V, cell=cell, layers=L, hidden=H, embed=E, **kw))


@pytest.mark.parametrize("cell", CELLS)
def test_forward_shapes_and_hidden_layout(cell):
    m = tiny(cell)
    idx = torch.randint(0, V, (B, T))
    logits, hidden = m(idx)
    assert logits.shape == (B, T, V)
    hs = hidden if isinstance(hidden, tuple) else (hidden,)
    assert len(hs) == (2 if cell == "lstm" else 1)
    assert all(h.shape == (L, B, H) for h in hs)
    zero = m.init_hidden(B)
    assert type(zero) is type(hidden) and all(z.abs().sum() == 0 for z in (zero if isinstance(zero, tuple) else (zero,)))


@pytest.mark.parametrize("cell", CELLS)
def test_carried_state_equals_one_long_pass(cell):
    """Feeding a sequence in two windows with the carried state gives the same logits as one pass."""
    m = tiny(cell).eval()
    idx = torch.randint(0, V, (B, 2 * T))
    full, _ = m(idx)
    a, h = m(idx[:, :T])
    b, _ = m(idx[:, T:], detach_hidden(h))
    torch.testing.assert_close(torch.cat([a, b], 1), full)


def test_rnn_cell_is_tanh_and_parameter_count():
    m = tiny("rnn", dropout=0.0)
    assert m.rnn.nonlinearity == "tanh"
    # embedding V*E + layer1 (E*H + H*H + 2H) + layer2 (H*H + H*H + 2H) + head (H*V + V)
    expected = V * E + (E * H + H * H + 2 * H) + (2 * H * H + 2 * H) + H * V + V
    assert m.num_parameters() == expected
    lstm = tiny("lstm")
    assert lstm.num_parameters() == V * E + 4 * (E * H + H * H + 2 * H) + 4 * (2 * H * H + 2 * H) + H * V + V


def test_tied_weights_share_storage_and_count_once():
    m = CharRNN(ModelConfig(vocab_size=V, cell="gru", layers=1, hidden=8, embed=8, tie_weights=True))
    assert m.head.weight is m.embedding.weight
    untied = CharRNN(ModelConfig(vocab_size=V, cell="gru", layers=1, hidden=8, embed=8))
    assert untied.num_parameters() - m.num_parameters() == V * 8
    with pytest.raises(ConfigError, match="embed == hidden"):
        ModelConfig(vocab_size=V, embed=8, hidden=16, tie_weights=True)


def test_select_detach_and_move_hidden():
    m = tiny("lstm")
    _, (h, c) = m(torch.randint(0, V, (B, T)))
    keep = torch.tensor([2, 0])
    h2, c2 = select_hidden((h, c), keep)
    torch.testing.assert_close(h2, h[:, [2, 0]])
    torch.testing.assert_close(c2, c[:, [2, 0]])
    d = detach_hidden((h, c))
    assert h.requires_grad and not d[0].requires_grad and not d[1].requires_grad
    g = tiny("gru")
    _, hg = g(torch.randint(0, V, (B, T)))
    assert select_hidden(hg, torch.tensor([1])).shape == (L, 1, H)
    assert hidden_to(hg, "cpu").device.type == "cpu" and hidden_to(None, "cpu") is None
    # Joining along the batch: rows of the first part, then of the second; selecting them back gives the parts.
    hc, cc = cat_hidden([(h, c), (h2, c2)])
    assert hc.shape == (L, B + 2, H)
    torch.testing.assert_close(select_hidden((hc, cc), torch.arange(B, B + 2))[1], c2)
    torch.testing.assert_close(cat_hidden([hg[:, :1], hg[:, 1:]]), hg)


def test_config_round_trip_and_refusals():
    c = ModelConfig(vocab_size=50, cell="gru", layers=3, hidden=32, embed=16, dropout=0.25)
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown model config key.*heads"):
        ModelConfig.from_dict({**c.to_dict(), "heads": 4})
    with pytest.raises(ConfigError, match="layers must be int"):
        ModelConfig.from_dict({**c.to_dict(), "layers": "3"})
    with pytest.raises(ConfigError, match="layers must be int"):
        ModelConfig.from_dict({**c.to_dict(), "layers": True})
    with pytest.raises(ConfigError, match="tie_weights must be bool"):
        ModelConfig.from_dict({**c.to_dict(), "tie_weights": 1})
    with pytest.raises(ConfigError, match="cell must be one of"):
        ModelConfig(vocab_size=5, cell="transformer")
    with pytest.raises(ConfigError, match="dropout"):
        ModelConfig(vocab_size=5, dropout=1.0)
    assert ModelConfig.from_dict({**c.to_dict(), "dropout": 0}).dropout == 0  # an int is a valid float


@pytest.mark.parametrize("cell", CELLS)
def test_weight_drop_masks_the_recurrent_matrices_in_training_only(cell):
    """DropConnect (AWD-LSTM): in training each step zeroes a share p of every hidden-to-hidden entry (their
    gradient is then exactly 0) and scales the rest; the stored weights never change, and eval mode runs them as
    they are, the same as a model without weight drop."""
    torch.manual_seed(0)
    config = dict(vocab_size=V, cell=cell, layers=L, hidden=16, embed=E)
    plain = CharRNN(ModelConfig(**config))
    model = CharRNN(ModelConfig(**config, weight_drop=0.5))
    model.load_state_dict(plain.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, V, (B, T + 1))
    loss, _ = model.train()(idx[:, :-1], None, idx[:, 1:])
    loss.backward()
    for k in range(L):
        g_hh, g_ih = getattr(model.rnn, f"weight_hh_l{k}").grad, getattr(model.rnn, f"weight_ih_l{k}").grad
        assert 0.35 < (g_hh == 0).float().mean().item() < 0.65  # about half the entries were dropped
        assert (g_ih == 0).float().mean().item() < 0.05  # the input matrices are not masked
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again, _ = model(idx[:, :-1], None, idx[:, 1:])
    assert again.item() != loss.item()  # a new mask each step
    with torch.no_grad():
        model.eval(), plain.eval()
        assert torch.equal(model(idx)[0], plain(idx)[0])
        plain_train, _ = plain.train()(idx[:, :-1], None, idx[:, 1:])
        assert plain_train.item() != loss.item()


def test_embed_dropout_drops_whole_characters_in_training_only():
    """A dropped character is zero at every position of the batch, a kept one scaled by 1 / (1 - p)."""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=40, layers=1, hidden=8, embed=6, embed_dropout=0.5)).train()
    idx = torch.arange(40).repeat(3, 1)  # every character at three positions
    x = model._embed(idx)  # (3, 40, 6)
    w = model.embedding.weight
    dropped = (x == 0).all(dim=-1)  # (3, 40)
    assert torch.equal(dropped, dropped[:1].expand(3, -1))  # the same characters in every row
    assert 8 < dropped[0].sum().item() < 32
    kept = ~dropped[0]
    assert torch.allclose(x[0, kept], w[kept] * 2)
    assert torch.equal(model.eval()._embed(idx), model.embedding(idx))
    # Through forward: a dropped character's embedding row gets no gradient although it is read 3 times.
    model.train()
    loss, _ = model(idx[:, :-1], None, idx[:, 1:])
    loss.backward()
    no_grad = (model.embedding.weight.grad[:39] == 0).all(dim=1)  # characters 0-38 are inputs
    assert 8 < no_grad.sum().item() < 31
    assert ModelConfig(vocab_size=5).to_dict().keys() == {  # what an older poetgen reads: the new keys only when set
        "vocab_size", "cell", "layers", "hidden", "embed", "dropout", "tie_weights", "head", "cutoffs", "div_value"}
    assert ModelConfig.from_dict(ModelConfig(vocab_size=5, weight_drop=0.25).to_dict()).weight_drop == 0.25
    with pytest.raises(ConfigError, match="embed_dropout must be in"):
        ModelConfig(vocab_size=5, embed_dropout=1.0)
    with pytest.raises(ConfigError, match="weight_drop must be in"):
        ModelConfig(vocab_size=5, weight_drop=-0.1)


@pytest.mark.parametrize("cell", CELLS)
def test_gradient_flows_to_every_parameter(cell):
    m = tiny(cell)
    idx = torch.randint(0, V, (B, T + 1))
    logits, _ = m(idx[:, :-1])
    F.cross_entropy(logits.reshape(-1, V), idx[:, 1:].reshape(-1)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.parametrize("head", ["full", "adaptive"])
def test_bf16_autocast_keeps_the_output_layer_in_fp32(head, cpu_bf16_lstm):
    """Under the CPU's bf16 autocast the recurrent layers run in bf16 but the output layer and the loss in fp32: the
    scores are not rounded to bf16 (which cost 0.024 of the 0.037 nats/char bf16 training lost to fp32 after 400
    steps of `small` on Tiny Shakespeare)."""
    torch.manual_seed(0)
    extra = {"head": "adaptive", "cutoffs": (8, 20)} if head == "adaptive" else {}
    model = CharRNN(ModelConfig(30, cell="lstm", layers=1, hidden=16, embed=8, **extra)).eval()
    idx = torch.randint(0, 30, (2, 5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores, _ = model(idx)
        loss, _ = model(idx[:, :-1], None, idx[:, 1:])
        out, _ = model.rnn(model.embedding(idx))  # what the head reads, from the bf16 LSTM
    assert scores.dtype == torch.float32 and out.dtype == torch.bfloat16
    with torch.no_grad():
        flat = out.float().reshape(-1, 16)
        expected = model.head.log_probs(flat) if head == "adaptive" else model.head(flat)
    assert torch.allclose(scores.reshape(-1, 30), expected, atol=1e-6)
    assert loss.dtype == torch.float32
