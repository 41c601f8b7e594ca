"""Batched decoding: determinism, sampling knobs, per-sample stopping, and poems in form from a trained model."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from poetgen.errors import SampleError
from poetgen.model.runtime import Runtime
from poetgen.model.rnn import CharRNN, ModelConfig
from poetgen.data.normalize import convert_script
from poetgen.poetry.forms import FORMS, check_constrained, poem_layout, split_lines
from poetgen.generation.sample import SampleOptions, generate, vocab_script
from poetgen.data.vocab import EOT_ID, Vocab

POEMS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
    "黄河远上白云间，一片孤城万仞山。羌笛何须怨杨柳，春风不度玉门关。",
    "故人西辞黄鹤楼，烟花三月下扬州。孤帆远影碧空尽，唯见长江天际流。",
    "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。",
    "空山新雨后，天气晚来秋。明月松间照，清泉石上流。竹喧归浣女，莲动下渔舟。随意春芳歇，王孙自可留。",
    "昔人已乘黄鹤去，此地空余黄鹤楼。黄鹤一去不复返，白云千载空悠悠。"
    "晴川历历汉阳树，芳草萋萋鹦鹉洲。日暮乡关何处是，烟波江上使人愁。",
]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained():
    """A small LSTM trained ~150 steps on eight poems (a few seconds): it has seen the forms, barely."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab = Vocab.from_counts(Counter("".join(POEMS) + "春夏秋冬"), eot_count=len(POEMS))
    ids = []
    for p in POEMS:
        ids += vocab.encode(p) + [EOT_ID]
    data = torch.tensor(ids * 4)
    model = CharRNN(ModelConfig(len(vocab), cell="lstm", layers=1, hidden=64, embed=32))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    T, B = 32, 16
    for _ in range(150):
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=g)
        x = torch.stack([data[s : s + T] for s in starts])
        y = torch.stack([data[s + 1 : s + T + 1] for s in starts])
        logits, _ = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 3.0  # it learned something
    return model.eval(), vocab


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(1)
    vocab = Vocab.from_counts(Counter("".join(POEMS)))
    return CharRNN(ModelConfig(len(vocab), cell="gru", layers=2, hidden=32, embed=16)).eval(), vocab


def texts(result):
    return [s.text for s in result.samples]


# --- basics ---


def test_same_seed_same_output(untrained):
    model, vocab = untrained
    o = SampleOptions(num_samples=5, seed=123, length=40, temperature=1.0, top_p=0.95)
    a, b = generate(model, vocab, ["明月"], o), generate(model, vocab, ["明月"], o)
    assert texts(a) == texts(b) and a.seed == 123
    assert [s.mean_logprob for s in a.samples] == [s.mean_logprob for s in b.samples]
    c = generate(model, vocab, ["明月"], SampleOptions(num_samples=5, seed=124, length=40, temperature=1.0))
    assert texts(c) != texts(a)
    assert all(t.startswith("明月") for t in texts(a))


def test_no_seed_picks_and_reports_one(untrained):
    model, vocab = untrained
    r = generate(model, vocab, [""], SampleOptions(length=20))
    again = generate(model, vocab, [""], SampleOptions(length=20, seed=r.seed))
    assert texts(again) == texts(r)


def test_top_k_larger_than_vocabulary_is_clamped(untrained):
    model, vocab = untrained
    r = generate(model, vocab, ["山"], SampleOptions(num_samples=3, seed=5, length=30, top_k=10 * len(vocab)))
    assert r.options["top_k"] == len(vocab)
    full = generate(model, vocab, ["山"], SampleOptions(num_samples=3, seed=5, length=30))
    assert texts(r) == texts(full)  # clamped to V means no truncation at all


def test_top_k_1_and_tiny_top_p_are_greedy(trained):
    model, vocab = trained
    greedy = texts(generate(model, vocab, ["白日", "空山"], SampleOptions(temperature=0, length=30)))
    assert texts(generate(model, vocab, ["白日", "空山"], SampleOptions(seed=9, top_k=1, length=30))) == greedy
    assert texts(generate(model, vocab, ["白日", "空山"], SampleOptions(seed=9, top_p=1e-6, length=30))) == greedy


def test_length_limit(untrained):
    model, vocab = untrained
    # Temperature 5 flattens the distribution so <eot> (1 in 80) rarely comes in 7 steps.
    r = generate(model, vocab, ["月"], SampleOptions(num_samples=8, seed=0, length=7, temperature=5.0))
    for s in r.samples:
        assert s.tokens <= 7
        assert s.ended or (s.tokens == 7 and len(s.generated) == 7)
    assert any(not s.ended for s in r.samples)


def test_per_sample_stopping_matches_single_runs(trained):
    """Rows end at their own <eot> at different steps; the rest carry on exactly as they would alone."""
    model, vocab = trained
    primes = [POEMS[0][:-1], "", POEMS[1][:6], "千山"]  # the first is one symbol from its end
    o = SampleOptions(temperature=0, length=60)
    batch = generate(model, vocab, primes, o)
    tokens = [s.tokens for s in batch.samples]
    assert batch.samples[0].ended and tokens[0] <= 3 and len(set(tokens)) > 1
    for s in batch.samples:
        assert "\n" not in s.text  # nothing after the end
        assert s.tokens == len(s.generated) + s.ended
    for prime, s in zip(primes, batch.samples):
        alone = generate(model, vocab, [prime], o).samples[0]
        assert alone.text == s.text and alone.mean_logprob == pytest.approx(s.mean_logprob, abs=1e-5)


def test_mean_logprob_equals_a_full_forward_pass(trained):
    """The step-by-step carried state gives the same probabilities as running the whole text at once."""
    model, vocab = trained
    r = generate(model, vocab, ["黄河", ""], SampleOptions(num_samples=2, seed=3, length=40, temperature=1.2))
    for s in r.samples:
        prime_ids = vocab.encode(s.prime)
        gen_ids = vocab.encode(s.generated) + ([EOT_ID] if s.ended else [])
        seq = torch.tensor([[EOT_ID] + prime_ids + gen_ids])
        with torch.no_grad():
            logp = model(seq)[0].log_softmax(-1)[0]  # (T, V)
        n = len(prime_ids)
        picked = [logp[n + i, t].item() for i, t in enumerate(gen_ids)]
        assert s.mean_logprob == pytest.approx(sum(picked) / len(picked), abs=1e-4)


class Spy:
    """An engine that records what decoding asks of the one it wraps."""

    def __init__(self, engine):
        self.engine, self.prefixes, self.steps = engine, [], []

    def prefix(self, prefixes):
        self.prefixes.append([list(p) for p in prefixes])
        return self.engine.prefix(prefixes)

    def select(self, index):
        self.engine.select(index)

    def step(self, tokens):
        self.steps.append(len(tokens))
        return self.engine.step(tokens)


class TorchOnly(nn.Module):
    """The model behind a plain module: generate cannot turn it into a numpy Runtime, so torch steps it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, hidden=None):
        return self.model(idx, hidden)


def test_prefix_is_fed_once(trained):
    model, vocab = trained
    spy = Spy(Runtime.from_state(model.config, model.state_dict()))
    generate(spy, vocab, ["白日依山", "白日依山", "空山"], SampleOptions(num_samples=3, seed=0, length=10))
    assert spy.prefixes == [[[0, *vocab.encode("白日依山")], [0, *vocab.encode("空山")]]]  # distinct, <eot> first
    assert len(spy.steps) <= 9 and spy.steps[0] == 9  # then one symbol per row and step
    calls = []
    handle = model.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    try:
        generate(TorchOnly(model), vocab, ["白日依山", "白日依山", "空山"], SampleOptions(num_samples=3, seed=0, length=10))
    finally:
        handle.remove()
    long_calls = [c for c in calls if c[1] > 1]
    assert sorted(long_calls) == [(1, 3), (1, 5)]  # one call per distinct prefix length, <eot> + prime
    assert all(c[1] == 1 for c in calls if c not in long_calls)
    assert len(calls) - len(long_calls) <= 9


@pytest.mark.parametrize("options", [
    SampleOptions(num_samples=4, seed=21, length=40, temperature=1.0),
    SampleOptions(num_samples=4, seed=22, length=40, top_k=5, top_p=0.9, repetition_penalty=1.3),
    SampleOptions(num_samples=4, seed=23, form="五绝", rhyme=True),
    SampleOptions(temperature=0, length=30),
])
def test_numpy_and_torch_engines_agree(trained, options):
    """The same model stepped by torch or by numpy: the same samples (scores agree to ~1e-6, so the seeded draws
    land alike) and the same model log-probabilities."""
    model, vocab = trained
    a = generate(model, vocab, ["白日", "空山"], options)  # a CharRNN on the CPU: the numpy Runtime
    b = generate(TorchOnly(model), vocab, ["白日", "空山"], options)
    assert texts(a) == texts(b)
    assert [s.mean_logprob for s in a.samples] == pytest.approx([s.mean_logprob for s in b.samples], abs=1e-5)


def test_primes_are_prime_major(untrained):
    model, vocab = untrained
    r = generate(model, vocab, ["山", "河"], SampleOptions(num_samples=3, seed=0, length=5))
    assert [s.prime for s in r.samples] == ["山"] * 3 + ["河"] * 3
    assert all(s.text.startswith(s.prime) for s in r.samples)


def test_stream_callback_writes_the_first_sample(untrained):
    model, vocab = untrained
    pieces = []
    r = generate(model, vocab, ["明月"], SampleOptions(seed=4, length=25, temperature=1.0), on_text=pieces.append)
    assert "".join(pieces) == r.samples[0].text and pieces[0] == "明月" and len(pieces) > 1


def test_repetition_penalty():
    class Fixed(nn.Module):
        """Logits that always prefer id 2, then 3, then 4 (B, T, V), whatever the input."""

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([-9.0, -9.0, 3.0, 2.0, 1.0]))

        def forward(self, idx, hidden=None):
            return self.w.expand(idx.size(0), idx.size(1), 5), torch.zeros(1, idx.size(0), 1)

    vocab = Vocab(["<eot>", "<unk>", "a", "b", "c"])
    plain = generate(Fixed(), vocab, [""], SampleOptions(temperature=0, length=4)).samples[0].text
    assert plain == "aaaa"
    # A used character's probability is divided by the penalty: its logit drops by log(penalty).
    assert generate(Fixed(), vocab, [""], SampleOptions(temperature=0, length=4, repetition_penalty=2.0)).samples[
        0
    ].text == "aaaa"  # a 3 - 0.69 still beats b 2
    assert generate(Fixed(), vocab, [""], SampleOptions(temperature=0, length=4, repetition_penalty=4.0)).samples[
        0
    ].text == "abaa"  # a 3 - 1.39 loses to b 2; then a 1.61 beats b 2 - 1.39 and c 1
    assert generate(Fixed(), vocab, ["ab"], SampleOptions(temperature=0, length=1, repetition_penalty=8.0)).samples[
        0
    ].text == "abc"  # the prime counts as already used: a 3 - 2.08 and b 2 - 2.08 lose to c 1


def test_repetition_penalty_is_the_same_for_logits_and_log_probabilities():
    """The adaptive head gives log-probabilities, the full head logits: the penalty must treat them alike."""
    class Scores(nn.Module):
        def __init__(self, log_softmax: bool):
            super().__init__()
            w = torch.tensor([-9.0, -9.0, 3.0, 2.0, 1.0])
            self.w = nn.Parameter(torch.log_softmax(w, 0) if log_softmax else w)

        def forward(self, idx, hidden=None):
            return self.w.expand(idx.size(0), idx.size(1), 5), torch.zeros(1, idx.size(0), 1)

    vocab = Vocab(["<eot>", "<unk>", "a", "b", "c"])
    o = SampleOptions(num_samples=16, length=30, seed=5, repetition_penalty=3.0, temperature=0.7)
    texts = [[s.text for s in generate(Scores(ls), vocab, [""], o).samples] for ls in (False, True)]
    assert texts[0] == texts[1]


def test_tiny_temperature_is_greedy_without_warnings(untrained, recwarn):
    o = SampleOptions(num_samples=3, length=20, seed=1)
    greedy = texts(generate(*untrained, [""], SampleOptions(num_samples=3, length=20, seed=1, temperature=0)))
    for t in (1e-30, 1e-45, 1e-50):
        o.temperature = t
        assert texts(generate(*untrained, [""], o)) == greedy
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


# --- errors ---


def test_unknown_prime_character(untrained):
    model, vocab = untrained
    with pytest.raises(SampleError, match="'龘'") as e:
        generate(model, vocab, ["明月龘"], SampleOptions(length=5))
    assert "prime" in str(e.value)
    with pytest.raises(SampleError, match="style"):
        generate(model, vocab, [""], SampleOptions(length=5, style="xyz"))


def test_bad_options(untrained):
    model, vocab = untrained
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0), dict(top_p=1.5), dict(length=0),
                dict(num_samples=0), dict(repetition_penalty=0), dict(rhyme=True), dict(line_length=5),
                dict(output_script="klingon")):
        with pytest.raises(SampleError):
            generate(model, vocab, [""], SampleOptions(**bad))
    with pytest.raises(SampleError, match="too short"):
        generate(model, vocab, [""], SampleOptions(form="五绝", length=10))
    with pytest.raises(SampleError, match="does not fit"):
        generate(model, vocab, ["床前明月光。"], SampleOptions(form="五绝"))


# --- scripts ---


def test_prime_converted_to_the_models_script():
    torch.manual_seed(0)
    trad = convert_script("".join(POEMS), "traditional")
    vocab = Vocab.from_counts(Counter(trad))
    assert vocab_script(vocab) == "traditional"
    model = CharRNN(ModelConfig(len(vocab), layers=1, hidden=16, embed=8)).eval()
    r = generate(model, vocab, ["举头望"], SampleOptions(seed=0, length=5))
    assert r.samples[0].text.startswith("舉頭望") and r.samples[0].prime == "举头望"
    assert len(r.notes) == 1 and "举头望 -> 舉頭望" in r.notes[0] and "traditional" in r.notes[0]
    simp = generate(model, vocab, ["举头望"], SampleOptions(seed=0, length=5, output_script="simplified"))
    assert simp.samples[0].text == convert_script(r.samples[0].text, "simplified")
    assert simp.samples[0].text.startswith("举头望")
    acro = generate(model, vocab, [""], SampleOptions(seed=0, acrostic="举头", line_length=5))
    assert [line[0] for line in split_lines(acro.samples[0].text)] == ["舉", "頭"]
    with pytest.raises(SampleError, match="'龘'"):
        generate(model, vocab, ["举龘"], SampleOptions(length=5))
    # Nothing to convert, nothing said.
    assert generate(model, vocab, ["舉頭"], SampleOptions(seed=0, length=3)).notes == []


# --- poems in form, from a barely trained model ---


@pytest.mark.parametrize("form", list(FORMS))
def test_200_samples_in_each_form(trained, form):
    model, vocab = trained
    r = generate(model, vocab, [""], SampleOptions(form=form, num_samples=200, seed=11, temperature=1.0))
    f = FORMS[form]
    layout = re.compile(poem_layout(f.lines, f.chars))
    assert len(r.samples) == 200
    for s in r.samples:
        assert layout.fullmatch(s.text), s.text
        assert s.ended and s.tokens == f.length + 1
    assert len(set(texts(r))) > 150  # samples, not one poem repeated


def test_200_acrostics(trained):
    model, vocab = trained
    for form, acrostic in (("七绝", "春夏秋冬"), (None, "明月山")):
        r = generate(model, vocab, [""], SampleOptions(form=form, acrostic=acrostic, line_length=None if form else 5,
                                                       num_samples=200, seed=12, temperature=1.0))
        chars = 7 if form else 5
        for s in r.samples:
            assert check_constrained(s.text, len(acrostic), chars, acrostic=acrostic) == [], s.text


def test_200_rhyming_poems(trained):
    model, vocab = trained
    for form in ("五绝", "七律"):
        f = FORMS[form]
        r = generate(model, vocab, [""], SampleOptions(form=form, rhyme=True, num_samples=200, seed=13))
        for s in r.samples:
            assert check_constrained(s.text, f.lines, f.chars, rhyme=True) == [], s.text


def test_form_with_prime_and_style(trained):
    model, vocab = trained
    o = SampleOptions(form="五绝", num_samples=20, seed=14, style="空山新雨后")
    r = generate(model, vocab, ["白日", "床前明月光，"], o)
    for s in r.samples:
        assert check_constrained(s.text, 4, 5) == [] and s.text.startswith(s.prime)
        assert not s.text.startswith("空山新雨后")
    plain = generate(model, vocab, ["白日", "床前明月光，"], SampleOptions(form="五绝", num_samples=20, seed=14))
    assert [s.mean_logprob for s in plain.samples] != [s.mean_logprob for s in r.samples]  # the style conditions


def test_training_mode_model_is_sampled_in_eval_mode_and_restored():
    torch.manual_seed(0)
    vocab = Vocab.from_counts(Counter("".join(POEMS)))
    model = CharRNN(ModelConfig(len(vocab), layers=2, hidden=16, embed=8, dropout=0.5)).train()
    o = SampleOptions(num_samples=3, seed=8, length=20)
    a = generate(model, vocab, [""], o)
    assert model.training
    assert texts(generate(model.eval(), vocab, [""], o)) == texts(a)  # dropout was off


def test_draws_follow_the_distribution():
    """20,000 one-step draws from fixed probabilities (0, 0, .5, .3, .2) land within 1.5 points of them."""

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.0, 0.0, 0.5, 0.3, 0.2]).log())  # -inf for <eot>, <unk>

        def forward(self, idx, hidden=None):
            return self.w.expand(idx.size(0), idx.size(1), 5), torch.zeros(1, idx.size(0), 1)

    vocab = Vocab(["<eot>", "<unk>", "a", "b", "c"])
    r = generate(Fixed(), vocab, [""], SampleOptions(num_samples=20000, length=1, temperature=1.0, seed=0))
    counts = Counter(s.text for s in r.samples)
    assert set(counts) == {"a", "b", "c"}
    for ch, p in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(counts[ch] / 20000 - p) < 0.015
    hot = generate(Fixed(), vocab, [""], SampleOptions(num_samples=20000, length=1, temperature=1e6, seed=0))
    assert abs(Counter(s.text for s in hot.samples)["c"] / 20000 - 1 / 3) < 0.015  # flat, <eot>/<unk> still out


@pytest.mark.parametrize("V", [5, 300, 1000, pytest.param(6000, marks=pytest.mark.slow)])  # 6000: a 480 MB array
def test_two_level_draw_follows_the_weights_and_never_picks_a_zero(V):
    """_draw over 20,000 rows: each symbol's share within 1.5 points of its weight; zero weights never, even a
    lone positive weight far below the others (1e-30) in a block of its own, and block edges."""
    from poetgen.generation.sample import BLOCK, _draw, _generator

    weights = np.zeros((20000, V), dtype=np.float32)
    picks = {1: 0.5, V - 1: 0.3, min(BLOCK, V - 2): 0.2}  # the last symbol, a block's first
    for i, w in picks.items():
        weights[:, i] = w
    got = _draw(weights, _generator(0))
    counts = Counter(got.tolist())
    assert set(counts) <= set(picks)
    for i, w in picks.items():
        assert abs(counts[i] / 20000 - w) < 0.015
    lone = np.zeros((500, V), dtype=np.float32)
    lone[:, V // 2] = 1e-30
    assert (_draw(lone, _generator(1)) == V // 2).all()
    lone[:, 0] = 1.0  # now the tiny one is ~never drawn, and nothing else is
    assert set(_draw(lone, _generator(2)).tolist()) <= {0, V // 2}


def test_negative_seeds_have_their_own_samples(untrained):
    model, vocab = untrained
    o = lambda seed: SampleOptions(num_samples=3, seed=seed, length=30, temperature=1.0)  # noqa: E731
    a, b = generate(model, vocab, [""], o(-7)), generate(model, vocab, [""], o(7))
    assert texts(a) != texts(b) and texts(a) == texts(generate(model, vocab, [""], o(-7)))
    assert texts(generate(model, vocab, [""], o(2**64 - 1))) != texts(generate(model, vocab, [""], o(-1)))
