"""Model metrics: exact cross-entropy (hand-computed and against a one-character-at-a-time loop), cold and warm
semantics, every position scored once, data in the model's vocabulary."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import make_dataset
from poetgen.data.dataset import load_dataset
from poetgen.errors import DatasetError
from poetgen.data.dataset import recorded_dataset
from poetgen.evaluation.scoring import (
    LOGIT_BUDGET, Score, choose_window, cross_entropy, dataset_data, source_data,
)
from poetgen.model.rnn import CharRNN, ModelConfig
from poetgen.data.vocab import EOT_ID, UNK_ID, Vocab


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _model(cell: str = "lstm", V: int = 9, seed: int = 0) -> CharRNN:
    torch.manual_seed(seed)
    m = CharRNN(ModelConfig(vocab_size=V, cell=cell, layers=2, hidden=8, embed=4))
    with torch.no_grad():  # larger weights than the default init, so the state matters and cold != warm
        for p in m.parameters():
            p.mul_(6.0)
    return m.eval()


def _ids(n: int, V: int = 9, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, n).astype(np.uint16)


def _loop(model, ids, prime_from: int, start: int, stop: int) -> float:
    """Sum of losses at positions [start, stop) by a plain loop: zero state at ``prime_from``, the inputs from there
    to ``start`` fed unscored; position i predicts ids[i] from ids[i - 1] (<eot> before position 0)."""
    hidden, total = None, 0.0
    with torch.no_grad():
        for i in range(prime_from, stop):
            x = int(ids[i - 1]) if i > 0 else EOT_ID
            logits, hidden = model(torch.tensor([[x]]), hidden)
            if i >= start:
                total += F.cross_entropy(logits[0], torch.tensor([int(ids[i])])).item()
    return total


def _layout(n: int, streams: int) -> list[tuple[int, int]]:
    Ls = -(-n // min(streams, n))
    return [(s, min(s + Ls, n)) for s in range(0, n, Ls)]


def test_bits_per_char_is_nats_over_ln2_and_perplexity_is_exp():
    s = Score(1.2345)
    assert s.bits == 1.2345 / math.log(2) and s.perplexity == pytest.approx(math.exp(1.2345), rel=1e-12)
    r = cross_entropy(_model(), _ids(50), streams=3, warmup=5)
    for score in (r.cold, r.warm):
        assert score.bits == pytest.approx(score.nats / math.log(2), rel=1e-12)
        assert score.to_dict()["bits_per_char"] == score.bits


def test_hand_computed_cross_entropy_of_a_model_with_a_known_output_distribution():
    # Zero output weights: the logits are the output bias whatever the input and state, so the model predicts the
    # fixed distribution p = softmax(bias) everywhere and the loss is the mean of -log p[target].
    V = 5
    model = _model(V=V)
    p = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=torch.float64)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(p.log().float())
    ids = np.array([0, 2, 2, 4, 1, 3, 2, 0, 4, 4, 1], dtype=np.uint16)
    counts = Counter(ids.tolist())  # 0:2, 1:2, 2:3, 3:1, 4:3
    expected = -(2 * math.log(0.1) + 2 * math.log(0.2) + 3 * math.log(0.3) + math.log(0.15) + 3 * math.log(0.25)) / 11
    assert expected == pytest.approx(-sum(n * math.log(p[i]) for i, n in counts.items()) / 11)
    for streams, warmup in ((1, 0), (3, 2), (11, 100)):
        r = cross_entropy(model, ids, streams=streams, warmup=warmup)
        assert r.symbols == 11
        assert r.cold.nats == pytest.approx(expected, abs=1e-6)
        if warmup:
            assert r.warm.nats == pytest.approx(expected, abs=1e-6)
    # and a uniform distribution: exactly ln V per symbol
    with torch.no_grad():
        model.head.bias.zero_()
    assert cross_entropy(model, ids, streams=4).cold.nats == pytest.approx(math.log(V), abs=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_one_stream_equals_the_per_character_loop(cell):
    model, ids = _model(cell), _ids(97)
    ref = _loop(model, ids, 0, 0, len(ids)) / len(ids)
    r = cross_entropy(model, ids, streams=1, warmup=10, window=7)
    assert r.symbols == 97 and r.streams == 1
    assert r.cold.nats == pytest.approx(ref, abs=1e-6)
    assert r.warm.nats == pytest.approx(ref, abs=1e-6)  # nothing precedes the only stream: warm == cold


@pytest.mark.parametrize("streams,warmup,window", [(4, 6, 5), (7, 1, 3), (5, 30, 64), (13, 2, 1)])
def test_cold_and_warm_semantics_stream_by_stream(streams, warmup, window):
    """cold: each stream from the zero state; warm: from the zero state `warmup` positions earlier (fewer at the
    start of the text), those positions fed but not scored. Every position is scored exactly once."""
    model, ids = _model("lstm"), _ids(61)
    layout = _layout(len(ids), streams)
    assert sum(b - a for a, b in layout) == len(ids)
    cold = sum(_loop(model, ids, a, a, b) for a, b in layout) / len(ids)
    warm = sum(_loop(model, ids, max(0, a - warmup), a, b) for a, b in layout) / len(ids)
    r = cross_entropy(model, ids, streams=streams, warmup=warmup, window=window)
    assert r.streams == len(layout) and r.symbols == len(ids)
    assert r.cold.nats == pytest.approx(cold, abs=1e-6)
    assert r.warm.nats == pytest.approx(warm, abs=1e-6)
    assert abs(r.cold.nats - r.warm.nats) > 1e-4  # the state matters for this model


def test_warmup_longer_than_the_text_equals_one_unbroken_pass():
    model, ids = _model("gru"), _ids(80)
    single = cross_entropy(model, ids, streams=1, warmup=0).cold.nats
    r = cross_entropy(model, ids, streams=8, warmup=10_000, window=4)
    assert r.warm.nats == pytest.approx(single, abs=1e-6)
    assert r.cold.nats != pytest.approx(single, abs=1e-4)
    assert cross_entropy(model, ids, streams=8, warmup=0).warm is None


def test_window_keeps_one_window_of_logits_within_the_budget():
    for S, V in ((32, 7000), (64, 65), (1, 10**6)):
        T = choose_window(S, V)
        assert T >= 1 and (T == 1 or 2 * S * T * V <= LOGIT_BUDGET)


def test_bf16_autocast_scores_the_same_positions_with_nearly_the_same_figures():
    """Training's bf16 runs score their validation split under autocast: the forward passes change, not the sums."""
    model, ids = _model("gru"), _ids(70)
    fp32 = cross_entropy(model, ids, streams=4, warmup=3)
    bf16 = cross_entropy(model.train(), ids, streams=4, warmup=3, amp=torch.bfloat16)
    assert bf16.symbols == fp32.symbols == 70 and model.training  # scored in eval mode, then put back
    for a, b in ((fp32.cold, bf16.cold), (fp32.warm, bf16.warm)):
        assert a.nats != b.nats and b.nats == pytest.approx(a.nats, abs=0.05)


def test_empty_text_and_bad_arguments_are_errors():
    with pytest.raises(DatasetError, match="empty"):
        cross_entropy(_model(), np.zeros(0, dtype=np.uint16))
    with pytest.raises(DatasetError):
        cross_entropy(_model(), _ids(5), streams=0)


def test_dataset_split_in_another_vocabulary_is_mapped_and_unknowns_counted(tmp_path: Path):
    ds = load_dataset(make_dataset(tmp_path / "d", ["春风", "明月"], ["春月花", "风花"]))
    model_vocab = Vocab(["<eot>", "<unk>", "春", "风", "明", "月"])  # no 花
    ev = dataset_data(ds, model_vocab, "val")
    assert ev.symbols == 7 and ev.documents == 2 and ev.characters == 5
    assert ev.unknown == 2 and ev.unknown_chars == ["花"]
    assert model_vocab.decode(ev.ids[np.arange(7)], eot="|", unk="?") == "春月?|风?|"
    assert ev.notes and "mapped" in ev.notes[0]
    model = _model(V=len(model_vocab))
    direct = np.array(model_vocab.encode("春月", "unk") + [UNK_ID, EOT_ID] + model_vocab.encode("风", "unk")
                      + [UNK_ID, EOT_ID], dtype=np.int64)
    assert cross_entropy(model, ev.ids, streams=2).cold.nats == pytest.approx(
        cross_entropy(model, direct, streams=2).cold.nats, abs=1e-9)


def test_raw_sources_are_read_as_documents_in_the_model_vocabulary(tmp_path: Path):
    vocab = Vocab(["<eot>", "<unk>", "春", "风", "明", "月", "，", "。"])
    (tmp_path / "a.jsonl").write_text(
        '{"paragraphs": ["春风,明月。"]}\n{"text": "月明星"}\n', encoding="utf-8")  # ASCII comma -> ，
    ev = source_data([str(tmp_path / "a.jsonl")], vocab)
    try:
        assert ev.documents == 2 and ev.symbols == 6 + 1 + 3 + 1
        assert vocab.decode(np.asarray(ev.ids), eot="|", unk="?") == "春风，明月。|月明?|"
        assert ev.unknown == 1 and ev.unknown_chars == ["星"]
    finally:
        ev.close()
    with pytest.raises(DatasetError, match="no text"):
        (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
        source_data([str(tmp_path / "empty.txt")], vocab)


def test_a_checkpoint_whose_dataset_is_gone_says_so_and_suggests_data(tmp_path: Path):
    with pytest.raises(DatasetError, match="is gone.*--data"):
        recorded_dataset({"path": str(tmp_path / "nowhere")})
    with pytest.raises(DatasetError, match="--data"):
        recorded_dataset({})
