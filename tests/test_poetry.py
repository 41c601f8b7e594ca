"""Forms, tones, rhyme and the constraint automaton (no torch needed)."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poetgen.errors import SampleError
from poetgen.generation.constraints import FormConstraint
from poetgen.poetry.forms import (
    FORMS,
    check_constrained,
    detect_form,
    is_han,
    is_level,
    level_rhyme_groups,
    parse_form,
    poem_layout,
    rhyme_key,
    rhymes,
    split_lines,
)
from poetgen.data.vocab import EOT_ID, Vocab

JINGYESI = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
DENG = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
CHUNWANG = "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。"
QIJUE = "黄河远上白云间，一片孤城万仞山。羌笛何须怨杨柳，春风不度玉门关。"
TEXT = JINGYESI + DENG + CHUNWANG + QIJUE + "春夏秋冬"


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab.from_counts(Counter(TEXT))


# --- forms ---


@pytest.mark.parametrize(
    "name, expected",
    [("五绝", (4, 5)), ("wujue", (4, 5)), ("5jue", (4, 5)), ("QiJue", (4, 7)), ("7jue", (4, 7)), ("五絕", (4, 5)),
     ("wulv", (8, 5)), ("5lv", (8, 5)), ("七律", (8, 7)), ("qilv", (8, 7)), ("7lv", (8, 7)), (" 七言律诗 ", (8, 7))],
)
def test_parse_form_names_and_aliases(name, expected):
    form = parse_form(name)
    assert (form.lines, form.chars) == expected
    assert form.length == expected[0] * (expected[1] + 1)


def test_parse_form_unknown_lists_valid_names():
    with pytest.raises(SampleError) as e:
        parse_form("sonnet")
    msg = str(e.value)
    assert "'sonnet'" in msg
    for name in ("五绝", "七绝", "五律", "七律", "wujue", "qilv", "5jue", "7lv"):
        assert name in msg


def test_detect_form():
    assert detect_form(JINGYESI) == "五绝"
    assert detect_form(QIJUE) == "七绝"
    assert detect_form(CHUNWANG) == "五律"
    assert detect_form("床前明月光，疑是地上霜？举头望明月！低头思故乡；") == "五绝"  # lenient punctuation
    assert detect_form("床前明月光，疑是地上霜。") is None  # two lines
    assert detect_form("床前明月光，疑是地上霜。举头望明月，低头思故乡啊。") is None  # a line of 6
    assert detect_form("abcde，fghij。klmno，pqrst。") is None
    assert detect_form("") is None


def test_is_han():
    assert all(is_han(c) for c in "床鄉樓长長")
    assert is_han("\U00020000")  # extension B
    assert not any(is_han(c) for c in "，。a1 あア한")
    assert not is_han("床前")


def test_split_lines():
    assert split_lines(JINGYESI) == ["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡"]


# --- tones and rhyme ---


def test_level_tones():
    assert is_level("光") and is_level("霜") and is_level("流")
    assert not is_level("月") and not is_level("雨") and not is_level("子")
    # 多音字: a level reading with the primary reading's final counts; a rare reading with another final does not.
    assert is_level("看") and is_level("长") and is_level("重")
    assert not is_level("是")
    assert not is_level("a") and not is_level("，")


def test_rhyme_groups():
    assert rhyme_key("光") == rhyme_key("霜") == rhyme_key("乡") == "唐"
    assert rhyme_key("流") == rhyme_key("楼") == "尤"
    assert rhyme_key("诗") == "支" and rhyme_key("衣") == "齐"  # apical -i apart from i
    assert rhyme_key("东") == rhyme_key("风") == rhyme_key("情") == "庚"
    assert rhyme_key("鄉") == "唐" and rhyme_key("樓") == "尤"  # traditional characters too
    assert level_rhyme_groups("月") == frozenset()
    assert level_rhyme_groups("山") == frozenset({"寒"})
    assert rhyme_key("，") is None


def test_rhymes_rule():
    assert rhymes("霜乡") and rhymes(["间", "山", "关"]) and rhymes("深心金")
    assert rhymes("流楼")
    assert not rhymes("霜楼")  # different groups
    assert not rhymes("霜上")  # 上 shàng is oblique
    assert not rhymes("诗衣")
    assert not rhymes("")
    # The modern-reading approximation: 还 is read hái (开) and 簪 zān (寒), so these Tang rhymes are missed.
    assert not rhymes("间还") and not rhymes("心簪")


def test_check_poem():
    assert check_constrained(JINGYESI, 4, 5) == []
    assert check_constrained(JINGYESI, 4, 5, rhyme=True, book="xinyun") == []
    assert check_constrained(CHUNWANG, 8, 5) == []
    # 簪 zān no longer rhymes with 深心金 in Mandarin; in the 平水韵 all four are 下平十二侵
    assert "簪" in check_constrained(CHUNWANG, 8, 5, rhyme=True, book="xinyun")[0]
    assert check_constrained(CHUNWANG, 8, 5, rhyme=True) == []
    assert check_constrained(QIJUE, 4, 7, rhyme=True, book="xinyun") == []
    assert check_constrained(QIJUE, 4, 7, rhyme=True) == []
    assert check_constrained(DENG, 4, 5, acrostic="白黄欲更") == []
    assert check_constrained(DENG, 4, 5, acrostic="白黄欲春") != []
    assert check_constrained(JINGYESI, 4, 7) != []
    assert check_constrained(JINGYESI.replace("，", "。", 1), 4, 5) != []
    assert check_constrained("床前明月光，疑是地上霜。举头望明月，低头思故上。", 4, 5, rhyme=True) != []
    assert "oblique" in check_constrained(DENG.replace("楼", "月"), 4, 5, rhyme=True)[0]  # 月: 入声


# --- the constraint ---


def walk(c: FormConstraint, text: str):
    state = c.start()
    for ch in text:
        state = c.advance(state, c.vocab.id(ch))
    return state


def test_constraint_structure(vocab):
    c = FormConstraint(vocab, "五绝")
    han = {i for i, s in enumerate(vocab.symbols) if is_han(s)}
    state = c.start()
    for p, ch in enumerate(JINGYESI):
        allowed = set(np.flatnonzero(c.allowed(state)))
        if p % 6 == 5:
            assert allowed == {vocab.id("，" if p in (5, 17) else "。")}
        else:
            assert allowed == han
        assert not c.done(state)
        state = c.advance(state, vocab.id(ch))
    assert set(np.flatnonzero(c.allowed(state))) == {EOT_ID}
    state = c.advance(state, EOT_ID)
    assert c.done(state)
    assert set(np.flatnonzero(c.allowed(state))) == {EOT_ID}


def test_constraint_refuses_what_the_form_forbids(vocab):
    c = FormConstraint(vocab, "五绝")
    with pytest.raises(SampleError, match="position 6"):
        walk(c, "床前明月光疑")
    with pytest.raises(SampleError):
        walk(c, "床前明月光。")  # 。 after the first line
    with pytest.raises(SampleError):
        walk(c, JINGYESI + "床")  # nothing but the end after the last line


def test_acrostic(vocab):
    c = FormConstraint(vocab, None, acrostic="春夏秋冬", line_length=5)
    assert (c.lines, c.chars) == (4, 5)
    assert set(np.flatnonzero(c.allowed(c.start()))) == {vocab.id("春")}
    state = walk(c, "春前明月光，")
    assert set(np.flatnonzero(c.allowed(state))) == {vocab.id("夏")}
    assert FormConstraint(vocab, None, acrostic="春夏秋冬").chars == 7  # the default line length
    odd = FormConstraint(vocab, None, acrostic="春夏秋", line_length=5)
    assert odd.table[17, vocab.id("。")] and not odd.table[17, vocab.id("，")]  # the last line ends in 。


def test_acrostic_errors(vocab):
    with pytest.raises(SampleError, match="'龍'"):
        FormConstraint(vocab, "五绝", acrostic="春夏秋龍")
    with pytest.raises(SampleError, match="4 lines"):
        FormConstraint(vocab, "五绝", acrostic="春夏秋冬春")
    with pytest.raises(SampleError, match="Han"):
        FormConstraint(vocab, None, acrostic="春a")
    with pytest.raises(SampleError, match="contradicts"):
        FormConstraint(vocab, "五绝", line_length=7)
    with pytest.raises(SampleError):
        FormConstraint(vocab)


def test_vocabulary_that_cannot_write_poems():
    with pytest.raises(SampleError, match="no Han"):
        FormConstraint(Vocab.from_counts(Counter("hello, world.")), "五绝")
    with pytest.raises(SampleError, match="'。'"):
        FormConstraint(Vocab.from_counts(Counter("床前明月光，")), "五绝")
    with pytest.raises(SampleError, match="level"):
        FormConstraint(Vocab.from_counts(Counter("月是上下，。")), "五绝", rhyme=True, rhyme_book="xinyun")
    with pytest.raises(SampleError, match="level"):
        FormConstraint(Vocab.from_counts(Counter("月是上下，。")), "五绝", rhyme=True)


def test_rhyme_masks(vocab):
    """The modern rule (xinyun), as it was before the 平水韵 became the default."""
    c = FormConstraint(vocab, "五绝", rhyme=True, rhyme_book="xinyun")
    state = walk(c, "床前明月光，疑是地上")
    allowed = [vocab.symbols[i] for i in np.flatnonzero(c.allowed(state))]
    assert "霜" in allowed and "月" not in allowed and "上" not in allowed
    assert allowed and all(is_level(ch) and level_rhyme_groups(ch) for ch in allowed)
    state = walk(c, "床前明月光，疑是地上霜。举头望明月，低头思故")
    allowed = [vocab.symbols[i] for i in np.flatnonzero(c.allowed(state))]
    assert set(allowed) == {s for s in vocab.symbols[2:] if level_rhyme_groups(s) == {"唐"}}
    assert {"乡", "光", "霜"} <= set(allowed)
    # The odd lines are free: 月 may end line 3.
    assert c.allowed(walk(c, "床前明月光，疑是地上霜。举头望明"))[vocab.id("月")]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), form=st.sampled_from(list(FORMS)), rhyme=st.booleans(),
       book=st.sampled_from(["pingshui", "xinyun"]))
def test_random_walks_always_give_poems(vocab, seed, form, rhyme, book):
    """Any path the automaton allows is a correct poem: it is the structure, not luck."""
    rng = random.Random(seed)
    c = FormConstraint(vocab, form, rhyme=rhyme, rhyme_book=book)
    state, ids = c.start(), []
    while not c.done(state):
        token = rng.choice(list(np.flatnonzero(c.allowed(state))))
        ids.append(int(token))
        state = c.advance(state, int(token))
    assert ids[-1] == EOT_ID and EOT_ID not in ids[:-1]
    text = vocab.decode(ids[:-1])
    f = FORMS[form]
    assert re.fullmatch(poem_layout(f.lines, f.chars), text)
    assert check_constrained(text, f.lines, f.chars, rhyme=rhyme, book=book) == []


def test_import_needs_neither_torch_nor_pypinyin():
    code = "import sys, poetgen.poetry.forms; print('torch' in sys.modules, 'pypinyin' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_rhyme_on_a_traditional_vocabulary():
    """pypinyin reads traditional characters, so a traditional model rhymes too."""
    trad = Vocab.from_counts(Counter("牀前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。黃河遠上白雲間，一片孤城萬仞山。"))
    c = FormConstraint(trad, "五绝", rhyme=True, rhyme_book="xinyun")
    state = walk(c, "牀前明月光，疑是地上霜。舉頭望明月，低頭思故")
    allowed = {trad.symbols[i] for i in np.flatnonzero(c.allowed(state))}
    assert allowed == {"光", "霜", "鄉", "牀", "黃"}  # 唐 and level; not 上 (shàng, oblique) nor 間 (寒)
    # the 平水韵 table is traditional: 下平七阳 holds the same five, and 望 (阳 and 漾) too; 上 is oblique there too
    c = FormConstraint(trad, "五绝", rhyme=True)
    state = walk(c, "牀前明月光，疑是地上霜。舉頭望明月，低頭思故")
    assert {trad.symbols[i] for i in np.flatnonzero(c.allowed(state))} == {"光", "霜", "鄉", "牀", "黃", "望"}
