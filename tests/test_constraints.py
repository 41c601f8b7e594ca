"""Classical prosody while sampling (issue 16): --tones and --rhyme under the 平水韵, checked by poetry.prosody's
checker, which is written apart from the mask code; and the proof that the masks never leave a step empty."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import REPO
from poetgen.data.vocab import EOT_ID, Vocab
from poetgen.errors import SampleError
from poetgen.generation.constraints import BatchConstraint, FormConstraint
from poetgen.generation.sample import SampleOptions, generate
from poetgen.poetry.forms import FORMS, check_constrained, split_lines
from poetgen.poetry.prosody import check_prosody, check_rhyme, rhyme_book, tone_pattern, tone_patterns

ACROSTICS = {"五绝": "春风明月", "七绝": "春江花月", "五律": "春风明月山花水鸟", "七律": "东南西北白日青山"}


def common_vocab(n: int = 400) -> Vocab:
    """The ``n`` commonest characters of the bundled poems, with ，and 。: many level and oblique characters of
    many rhyme groups, and some the 平水韵 table lacks."""
    counts: Counter = Counter()
    for line in (REPO / "data" / "poems.jsonl").read_text(encoding="utf-8").splitlines():
        counts.update(ch for ch in "".join(json.loads(line)["paragraphs"]) if ch not in "，。？！；：")
    chars = [c for c, _ in counts.most_common(n)]
    return Vocab(["<eot>", "<unk>", *chars, "，", "。"])


@pytest.fixture(scope="module")
def model():
    """A random GRU run by the numpy Runtime: fast, and it knows nothing of tones, so the masks do all the work."""
    import torch

    from poetgen.model.rnn import CharRNN, ModelConfig
    from poetgen.model.runtime import Runtime

    vocab = common_vocab()
    torch.manual_seed(0)
    rnn = CharRNN(ModelConfig(len(vocab), cell="gru", layers=1, hidden=32, embed=16))
    return Runtime.from_state(rnn.config, rnn.state_dict()), vocab


def assert_regulated(text: str, form: str, pattern: str | None = None) -> None:
    check = check_prosody(text, "pingshui", form)
    assert check.regulated, (text, check.problems)
    assert check.agree_246 == 1.0 and check.rhyme.rhymes
    if pattern is not None:  # the checker may prefer another pattern that fits as well (看 is 平 and 仄)
        assert follows(text, form, pattern), (text, pattern)


def follows(text: str, form: str, pattern: str, book: str = "pingshui") -> bool:
    """Every character can take the tone the pattern's template requires at its place."""
    p, b = tone_pattern(form, pattern), rhyme_book(book)
    return all(p.required(i, j) in (None, *b.tones(ch)) for i, line in enumerate(split_lines(text))
               for j, ch in enumerate(line))


# --- 200 samples each ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", list(FORMS))
def test_200_samples_follow_a_pattern_and_rhyme(model, form):
    runtime, vocab = model
    f = FORMS[form]
    patterns = Counter()
    for i, temperature in enumerate((0.5, 1.0, 1.5)):
        o = SampleOptions(form=form, tones=True, rhyme=True, num_samples=200, seed=i, temperature=temperature)
        for s in generate(runtime, vocab, [""], o).samples:
            assert check_constrained(s.text, f.lines, f.chars) == [] and s.ended, s.text
            assert_regulated(s.text, form)
            patterns[check_prosody(s.text, "pingshui", form).pattern] += 1
    assert len(patterns) == 4  # the model's first choices pick every pattern, none is forced
    o = SampleOptions(form=form, acrostic=ACROSTICS[form], tones=True, rhyme=True, num_samples=200, seed=9,
                      temperature=1.0, top_k=50)
    for s in generate(runtime, vocab, [""], o).samples:
        assert check_constrained(s.text, f.lines, f.chars, acrostic=ACROSTICS[form]) == [], s.text
        assert_regulated(s.text, form)


def test_tones_without_rhyme_and_rhyme_without_tones(model):
    runtime, vocab = model
    tones = generate(runtime, vocab, [""], SampleOptions(form="七绝", tones=True, num_samples=100, seed=3))
    for s in tones.samples:
        assert check_prosody(s.text, "pingshui", "七绝").tones_ok, s.text
    rhyme = generate(runtime, vocab, [""], SampleOptions(form="五律", rhyme=True, num_samples=100, seed=4))
    for s in rhyme.samples:
        assert check_rhyme(split_lines(s.text), "pingshui", first=False).rhymes, s.text
    # the mask makes it: without it a random model rarely rhymes
    plain = generate(runtime, vocab, [""], SampleOptions(form="五律", num_samples=100, seed=4))
    assert sum(check_rhyme(split_lines(s.text), "pingshui", first=False).rhymes for s in plain.samples) < 20


def test_rhyme_group_fixes_the_group(model):
    runtime, vocab = model
    for name in ("东", "上平一东", "東"):
        r = generate(runtime, vocab, [""], SampleOptions(form="五绝", rhyme=True, rhyme_group=name, num_samples=30,
                                                         seed=5, tones=True))
        for s in r.samples:
            check = check_prosody(s.text, "pingshui", "五绝")
            assert check.rhyme.rhymes and check.rhyme.group.label == "上平一东", s.text
    with pytest.raises(SampleError, match="level groups: 东 冬 江 支"):
        SampleOptions(form="五绝", rhyme=True, rhyme_group="屋").validate()  # 入声一屋: oblique
    with pytest.raises(SampleError, match="unknown rhyme group '卍'.*level groups: 东 冬 江"):
        SampleOptions(form="五绝", rhyme=True, rhyme_group="卍").validate()
    with pytest.raises(SampleError, match="applies to --rhyme"):
        SampleOptions(form="五绝", rhyme_group="东").validate()


def test_pattern_fixes_the_pattern(model):
    runtime, vocab = model
    for p in tone_patterns("七律"):
        r = generate(runtime, vocab, [""], SampleOptions(form="七律", tones=True, rhyme=True, pattern=p.name,
                                                         num_samples=40, seed=6, temperature=1.5))
        for s in r.samples:
            assert_regulated(s.text, "七律", p.name)
    with pytest.raises(SampleError, match="valid patterns: 仄起首句不入韵, 仄起首句入韵, 平起首句不入韵, 平起首句入韵"):
        SampleOptions(form="五绝", tones=True, pattern="平起").validate()
    with pytest.raises(SampleError, match="applies to --tones"):
        SampleOptions(form="五绝", pattern="平起首句入韵").validate()


def test_a_prime_that_breaks_the_pattern_says_where(model):
    runtime, vocab = model
    o = SampleOptions(form="五绝", tones=True, rhyme=True, pattern="平起首句不入韵", num_samples=2, seed=1)
    # 平起: the second character must be 平; 月 is 入声
    with pytest.raises(SampleError, match=r"'月' \(仄\) at line 1, character 2 breaks the tone pattern: "
                                          r"平起首句不入韵 needs 平"):
        generate(runtime, vocab, ["明月"], o)
    # a prime that fits goes on in the pattern
    r = generate(runtime, vocab, ["春风"], o)
    assert all(s.text.startswith("春风") for s in r.samples)
    for s in r.samples:
        assert_regulated(s.text, "五绝", "平起首句不入韵")
    # an even line that does not rhyme
    with pytest.raises(SampleError, match="line 2, character 5 does not rhyme"):
        generate(runtime, vocab, ["白日依山尽，黄河入海月"], SampleOptions(form="五绝", rhyme=True, seed=1))


def test_a_prime_picks_the_pattern_when_none_is_named(model):
    runtime, vocab = model
    r = generate(runtime, vocab, ["明月"], SampleOptions(form="五绝", tones=True, rhyme=True, num_samples=50, seed=2))
    for s in r.samples:
        assert_regulated(s.text, "五绝")
        assert check_prosody(s.text, "pingshui", "五绝").pattern.startswith("仄起")  # 月 is 仄


def test_acrostic_keeps_the_patterns_that_fit_it(model):
    runtime, vocab = model
    # 五绝 B lines (平平仄仄平) fix their first character as 平: 白 (入声) at line 2 rules out the 仄起 patterns
    r = generate(runtime, vocab, [""], SampleOptions(form="五绝", acrostic="春白秋风", tones=True, rhyme=True,
                                                     num_samples=50, seed=8))
    for s in r.samples:
        assert_regulated(s.text, "五绝")
        assert check_prosody(s.text, "pingshui", "五绝").pattern.startswith("平起"), s.text
    with pytest.raises(SampleError, match="fits no tone pattern of 五绝.*白 \\(仄\\)"):
        FormConstraint(vocab, "五绝", acrostic="白白白白", tones=True)
    with pytest.raises(SampleError, match="line 2, character 1 where the acrostic has 白"):
        FormConstraint(vocab, "五绝", acrostic="春白秋风", tones=True, pattern="仄起首句不入韵")


def test_style_conditions_a_toned_sample(model):
    runtime, vocab = model
    a = generate(runtime, vocab, [""], SampleOptions(form="五绝", tones=True, rhyme=True, num_samples=20, seed=3))
    b = generate(runtime, vocab, [""], SampleOptions(form="五绝", tones=True, rhyme=True, num_samples=20, seed=3,
                                                     style="春风明月"))
    assert [s.text for s in a.samples] != [s.text for s in b.samples]
    for s in b.samples:
        assert_regulated(s.text, "五绝")


def test_xinyun_still_rhymes_as_before(model):
    runtime, vocab = model
    r = generate(runtime, vocab, [""], SampleOptions(form="七律", rhyme=True, rhyme_book="xinyun", num_samples=100,
                                                     seed=7))
    for s in r.samples:
        assert check_constrained(s.text, 8, 7, rhyme=True, book="xinyun") == [], s.text
    t = generate(runtime, vocab, [""], SampleOptions(form="五绝", tones=True, rhyme=True, rhyme_book="xinyun",
                                                     num_samples=50, seed=7))
    for s in t.samples:
        check = check_prosody(s.text, "xinyun", "五绝")
        assert check.regulated, (s.text, check.problems)


# --- never a dead end --------------------------------------------------------------------------------------------

POOL = ("东风红中同空虫 冬钟松容 江窗双 支时诗思知 微飞归衣 鱼书居 虞无夫 齐西啼 灰回来开 真人春 文云君 元门言 寒看安"
        " 删山间关 先天年前 萧桥 肴 豪高 歌多何 麻花家 阳光长乡 庚明声 青星亭 蒸灯 尤楼秋流 侵心深金 覃南 盐 咸"
        " 月白雪国独十日一不 上下水里好 夜去万岁 鸟草少 乾看思 啊咦囧").replace(" ", "")


@settings(max_examples=150, deadline=None)
@given(chars=st.sets(st.sampled_from(POOL), min_size=1, max_size=25), form=st.sampled_from(list(FORMS)),
       tones=st.booleans(), rhyme=st.booleans(), book=st.sampled_from(["pingshui", "xinyun"]),
       pattern=st.sampled_from([None, 0, 1, 2, 3]), seed=st.integers(0, 2**32 - 1))
def test_never_a_dead_end(chars, form, tones, rhyme, book, pattern, seed):
    """Over random small (often poor) vocabularies: either a clean SampleError up front, or every step of every
    walk has a symbol to choose, and the walk is a regulated poem by the independent checker."""
    vocab = Vocab(["<eot>", "<unk>", *sorted(chars), "，", "。"])
    name = tone_patterns(form)[pattern].name if tones and pattern is not None else None
    try:
        c = FormConstraint(vocab, form, rhyme=rhyme, tones=tones, pattern=name, rhyme_book=book)
    except SampleError:
        return
    rng = np.random.default_rng(seed)
    B = 8
    batch = BatchConstraint(c, [c.start()] * B)
    states = [c.start()] * B
    ids = np.zeros((B, c.length + 1), dtype=np.int64)
    for t in range(c.length + 1):
        allowed = batch.allowed()  # (B, V)
        assert allowed.any(axis=1).all()
        for r in range(B):
            assert (allowed[r] == c.allowed(states[r])).all()  # the batch steps the reference's masks
        token = (rng.random(allowed.shape) * allowed).argmax(axis=1)
        batch.advance(token)
        states = [c.advance(s, int(k)) for s, k in zip(states, token)]
        ids[:, t] = token
    f = FORMS[form]
    for r in range(B):
        assert ids[r, -1] == EOT_ID
        text = vocab.decode(ids[r, :-1].tolist())
        assert check_constrained(text, f.lines, f.chars) == []
        lines = split_lines(text)
        if tones:
            check = check_prosody(text, book, form)
            assert check.tones_ok, (text, check.problems)
            if rhyme:
                assert check.rhyme.rhymes, (text, check.problems)
            if name is not None:
                assert follows(text, form, name, book), (text, name)
        if rhyme:
            assert check_rhyme(lines, book, first=False).rhymes, text


def test_joined_batch_constraints_step_as_their_parts_would():
    """BatchConstraint.joined (the server's many requests of one form, stepped at once) gives each part the masks
    and states it would have had alone, rows finishing on the way included; parts of two forms are refused."""
    vocab = common_vocab()
    c = FormConstraint(vocab, "五律", rhyme=True, tones=True)
    rng = np.random.default_rng(0)
    parts = [BatchConstraint(c, [c.start()] * n) for n in (1, 3, 1, 2)]
    alone = [BatchConstraint(c, [c.start()] * n) for n in (1, 3, 1, 2)]
    for t in range(c.length + 1):
        joined = BatchConstraint.joined(parts)
        allowed = joined.allowed()
        assert np.array_equal(allowed, np.concatenate([a.allowed() for a in alone]))
        token = (rng.random(allowed.shape) * allowed).argmax(axis=1)
        joined.advance(token)
        joined.split(parts)
        at = 0
        for part, a in zip(parts, alone):
            a.advance(token[at : at + len(a.pos)])
            at += len(a.pos)
            assert [x.tolist() for x in (part.pos, part.groups, part.patterns)] == [
                x.tolist() for x in (a.pos, a.groups, a.patterns)]
        if t == 10:  # a row of the second part ends, the third part's only row too
            for part in (parts, alone):
                part[1].keep(np.array([0, 2]))
                part[2].keep(np.array([], dtype=np.intp))
    other = BatchConstraint(FormConstraint(vocab, "五绝"), [FormConstraint(vocab, "五绝").start()])
    with pytest.raises(ValueError):
        BatchConstraint.joined([parts[0], other])


def test_a_vocabulary_that_cannot_rhyme_or_fill_a_pattern_is_refused_up_front():
    only_oblique = Vocab(["<eot>", "<unk>", *"月白雪国独", "，", "。"])
    with pytest.raises(SampleError, match="no character of the model's vocabulary is level"):
        FormConstraint(only_oblique, "五绝", rhyme=True)
    with pytest.raises(SampleError, match="cannot fill any tone pattern"):
        FormConstraint(only_oblique, "五绝", tones=True)
    few = Vocab(["<eot>", "<unk>", *"东风月白", "，", "。"])
    with pytest.raises(SampleError, match="no character of 下平七阳"):
        FormConstraint(few, "五绝", rhyme=True, rhyme_group="阳")
    assert FormConstraint(few, "五绝", rhyme=True, rhyme_group="东").start_groups == 1


def test_masks_are_exactly_the_templates():
    """With one pattern, the mask at each character is every Han character that can take the template's tone there
    (any where it is free), and at the rhyme positions those of the rhyme's open groups."""
    vocab = common_vocab(400)
    book = rhyme_book("pingshui")
    han = {i for i, s in enumerate(vocab.symbols) if i >= 2 and s not in "，。"}
    for p in tone_patterns("七绝"):
        c = FormConstraint(vocab, "七绝", tones=True, pattern=p.name)
        state = c.start()
        for j in range(7):
            want = p.required(0, j)
            allowed = set(np.flatnonzero(c.allowed(state)))
            assert allowed == {i for i in han if want is None or want in book.tones(vocab.symbols[i])}, (p.name, j)
            state = c.advance(state, min(allowed))
    c = FormConstraint(vocab, "七绝", tones=True, rhyme=True, pattern="平起首句入韵")
    state = c.start()
    for ch in "秦时明月汉时关，万里长征人未":  # 王昌龄《出塞》: 关 (删) fixes the group
        state = c.advance(state, vocab.id(ch))
    allowed = {vocab.symbols[i] for i in np.flatnonzero(c.allowed(state))}
    assert "间" in allowed and "关" in allowed and "山" in allowed and "门" not in allowed  # 删, not 元
    assert all(any(g.label == "上平十五删" for g in book.level_groups(ch)) for ch in allowed)
