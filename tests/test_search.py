"""Best-of-N and beam search (poetgen.generation.search) on small models: what they keep, what they refuse, and that
every constraint of sampling holds for them."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from poetgen.data.copies import TrainingIndex
from poetgen.data.vocab import EOT_ID, Vocab
from poetgen.errors import SampleError
from poetgen.generation.sample import SampleOptions, generate
from poetgen.generation.search import pick_best, repeat_limit, too_repetitive
from poetgen.model.config import ModelConfig
from poetgen.model.rnn import CharRNN
from poetgen.model.runtime import Runtime
from poetgen.poetry.forms import check_constrained, split_lines

CHARS = "床前明月光疑是地上霜举头望低思故乡白日依山尽黄河入海流欲穷千里目更一层楼春眠不觉晓处闻啼鸟夜来风雨声花落知多少"
DENG = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab.from_counts(Counter(CHARS + "，。"))


@pytest.fixture(scope="module")
def runtime(vocab) -> Runtime:
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=len(vocab), cell="lstm", layers=1, hidden=32, embed=16))
    return Runtime.from_state(model.config, model.state_dict(), vocab)


class Peaked:
    """An engine whose every step puts most mass on one symbol: the repetition a beam loves, made certain."""

    def __init__(self, vocab: Vocab, favourite: str):
        self.V, self.fav = len(vocab), vocab.id(favourite)
        self.rows = 0

    def _scores(self, n: int) -> np.ndarray:
        s = np.zeros((n, self.V), dtype=np.float32)
        s[:, self.fav] = 5.0
        return s

    def prefix(self, prefixes):
        self.rows = len(prefixes)
        return self._scores(self.rows)

    def select(self, index):
        self.rows = len(index)

    def step(self, tokens):
        return self._scores(len(tokens))


def test_repeat_rule_follows_tang_lines():
    assert repeat_limit(5) == 1 and repeat_limit(7) == 2
    assert not too_repetitive("青青河畔草，郁郁园中柳。")  # 1 repeat per 5-character line: Tang does that
    assert too_repetitive("山山山水绿，春风又到来。")  # 2 repeats in 5 characters: it does not
    assert not too_repetitive("山山水绿水青天，春风又到来。")  # 7 characters may repeat twice
    assert not too_repetitive("the cat sat on the mat.")  # no Han characters: not judged


def test_pick_best_keeps_the_likeliest_survivors_of_each_prime():
    class S:
        def __init__(self, text, lp):
            self.text = self.generated = text
            self.mean_logprob = lp

    index = TrainingIndex(np.array([EOT_ID], dtype=np.int64), Vocab.from_counts(Counter("x")))
    index.lines = {"黄河入海流"}
    runs = [S("春山一夜雨，秋水满前川。", -3.0), S("白日依山尽，黄河入海流。", -1.0),  # copies a line
            S("山山山水绿，春风又到来。", -2.0), S("明月照高楼，流光正徘徊。", -2.5),  # too repetitive / fine
            S("孤舟一系心，寒江独钓雪。", -4.0), S("疑是地上霜，举头望明月。", -3.5)]
    chosen, notes = pick_best(runs, groups=2, keep=1, copies=index)
    # prime 1: the copy (-1.0) and the repetitive one (-2.0) are dropped; prime 2: the likeliest of three
    assert [s.text for s in chosen] == ["春山一夜雨，秋水满前川。", "明月照高楼，流光正徘徊。"] and not notes
    chosen, notes = pick_best(runs[:2], groups=1, keep=2, copies=index)  # only one survives: the best other fills
    assert [s.text for s in chosen] == ["春山一夜雨，秋水满前川。", "白日依山尽，黄河入海流。"] and notes


def test_best_of_beats_plain_sampling_on_mean_log_probability(runtime, vocab):
    best = generate(runtime, vocab, ["春"], SampleOptions(form="五绝", best_of=8, num_samples=4, seed=3))
    plain = generate(runtime, vocab, ["春"], SampleOptions(form="五绝", num_samples=32, seed=3))
    assert len(best.samples) == 4 and best.options["num_samples"] == 4
    assert all(check_constrained(s.text, 4, 5) == [] and s.text.startswith("春") for s in best.samples)
    lp = [s.mean_logprob for s in best.samples]
    assert lp == sorted(lp, reverse=True)  # best first
    assert np.mean(lp) > np.mean([s.mean_logprob for s in plain.samples])


def test_beam_is_deterministic_in_form_and_sorted(runtime, vocab):
    o = SampleOptions(form="七绝", beam=6, num_samples=3, acrostic="春花夜月")
    a = generate(runtime, vocab, ["", "春"], o)
    b = generate(runtime, vocab, ["", "春"], o)
    assert [s.text for s in a.samples] == [s.text for s in b.samples] and len(a.samples) == 6
    for s in a.samples:
        assert check_constrained(s.text, 4, 7, acrostic="春花夜月") == [], s.text
        assert s.ended and s.tokens == 4 * 8 + 1 - len(s.prime)
    for group in (a.samples[:3], a.samples[3:]):  # three different poems per prime
        assert len({s.text for s in group}) == 3 and all(np.isfinite(s.mean_logprob) for s in group)


def test_beam_score_is_the_models_mean_log_probability(runtime, vocab):
    """The beam's score of a poem equals the mean log-probability the model gives it, computed step by step."""
    r = generate(runtime, vocab, [""], SampleOptions(form="五绝", beam=4, num_samples=1))
    s = r.samples[0]
    ids = vocab.encode(s.text) + [EOT_ID]
    scores = runtime.prefix([[EOT_ID]])
    total = 0.0
    for i in ids:
        z = scores[0].astype(np.float64)
        total += z[i] - (z.max() + np.log(np.exp(z - z.max()).sum()))
        scores = runtime.step(np.array([i]))
    assert s.mean_logprob == pytest.approx(total / len(ids), abs=1e-5)


def test_beam_refuses_repetition_repeated_lines_and_copies(vocab):
    engine = Peaked(vocab, "山")  # the model wants 山 at every step
    r = generate(engine, vocab, [""], SampleOptions(form="五律", beam=4, num_samples=2))
    for s in r.samples:
        lines = split_lines(s.text)
        assert all(len(x) - len(set(x)) <= repeat_limit(5) for x in lines), s.text
        assert len(set(lines)) == len(lines), s.text
        assert max(Counter("".join(lines)).values()) <= 2, s.text  # no character three times in a poem
        assert "山" in s.text  # the favourite is still used, within the rules
    index = TrainingIndex(np.array([EOT_ID], dtype=np.int64), vocab)
    free = generate(engine, vocab, [""], SampleOptions(form="五绝", beam=2, num_samples=1)).samples[0].text
    index.lines = set(split_lines(free))  # every line the beam wrote is now "in the training text"
    again = generate(engine, vocab, [""], SampleOptions(form="五绝", beam=2, num_samples=1), copies=index)
    assert not set(split_lines(again.samples[0].text)) & index.lines


def test_beam_and_best_of_options_are_checked(runtime, vocab):
    with pytest.raises(SampleError, match="at most that many"):
        generate(runtime, vocab, [""], SampleOptions(form="五绝", beam=2, num_samples=3))
    with pytest.raises(SampleError, match="give one of them"):
        SampleOptions(beam=2, best_of=2).validate()
    with pytest.raises(SampleError, match="--best-of must be at least 1"):
        SampleOptions(best_of=0).validate()


class Follows:
    """An engine that prefers the character which follows the text so far in ``target`` (a famous poem)."""

    def __init__(self, vocab: Vocab, target: str):
        self.vocab, self.target, self.h = vocab, target, []

    def _scores(self, hist: list[int]) -> np.ndarray:
        s = np.zeros(len(self.vocab), dtype=np.float32)
        text = "".join(self.vocab.symbols[i] if i >= 2 else "" for i in hist)
        for n in range(min(len(text), 8), 0, -1):
            i = self.target.find(text[-n:])
            if i >= 0 and i + n < len(self.target):
                s[self.vocab.id(self.target[i + n])] = 8.0
                return s
        s[self.vocab.id(self.target[0])] = 8.0
        return s

    def prefix(self, prefixes):
        self.h = [list(p) for p in prefixes]
        return np.stack([self._scores(h) for h in self.h])

    def select(self, index):
        self.h = [list(self.h[i]) for i in np.asarray(index)]

    def step(self, tokens):
        for h, t in zip(self.h, tokens):
            h.append(int(t))
        return np.stack([self._scores(h) for h in self.h])


def test_beam_counts_the_prime_in_its_rules():
    """A copied line that the prime began is still a copy (the rules start from the prime, not after it)."""
    target = "床前明月光，疑是地上霜。举头望山月，低头思故乡。"
    vocab = Vocab(["<eot>", "<unk>", *sorted(set(target + "天地人和春秋夏冬"))])
    index = TrainingIndex(np.array([EOT_ID], dtype=np.int64), vocab)
    index.lines = {"床前明月光", "疑是地上霜"}
    for prime in ("", "床前"):
        r = generate(Follows(vocab, target), vocab, [prime], SampleOptions(form="五绝", beam=4), copies=index)
        lines = split_lines(r.samples[0].text)
        assert not set(lines) & index.lines and r.samples[0].text.startswith(prime), r.samples[0].text
    free = generate(Follows(vocab, target), vocab, ["床前"], SampleOptions(form="五绝", beam=4)).samples[0].text
    assert free.startswith("床前明月光")  # without the index the model's favourite line is kept


def test_beam_never_dead_ends_where_the_constraint_has_a_way():
    """The beam's own rules are preferences: with 20 symbols, a fixed rhyme group and a 律诗 they cannot all hold,
    and the constraint's way is taken instead of returning nothing."""
    vocab = Vocab(["<eot>", "<unk>", *"，。东天山人花春秋风云月雪日白水石柳"])

    class Noise:
        def prefix(self, p):
            return np.zeros((len(p), len(vocab)), np.float32)

        def select(self, i):
            pass

        def step(self, t):
            return np.random.default_rng(len(t)).normal(size=(len(t), len(vocab))).astype(np.float32)

    r = generate(Noise(), vocab, [""], SampleOptions(form="五律", rhyme=True, rhyme_group="东", beam=2), threads=1)
    assert len(r.samples) == 1 and check_constrained(r.samples[0].text, 8, 5) == [], r.samples[0].text


def test_best_of_judges_copies_by_what_it_wrote_and_never_repeats_a_poem(runtime, vocab):
    index = TrainingIndex(np.array([EOT_ID], dtype=np.int64), vocab)
    index.lines = {"床前明月光"}  # the prime is a famous line: continuing it is not copying
    r = generate(runtime, vocab, ["床前明月光，"], SampleOptions(form="五绝", best_of=4, num_samples=2, seed=1),
                 copies=index)
    assert not r.notes and len({s.text for s in r.samples}) == 2
    greedy = generate(runtime, vocab, [""], SampleOptions(form="五绝", best_of=4, num_samples=2, temperature=0))
    assert len(greedy.samples) == 1 and any("not all different" in n for n in greedy.notes)  # 8 equal: one kept
