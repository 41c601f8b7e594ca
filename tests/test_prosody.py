"""Classical prosody: the 平水韵 and 中华新韵 books, the regulated patterns and the poem checker (no torch needed)."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from poetgen.errors import PoetgenError, SampleError
from poetgen.poetry.prosody import (
    FORM_SHAPES,
    LEVEL,
    OBLIQUE,
    RhymeBook,
    RhymeGroup,
    VocabProsody,
    check_prosody,
    check_rhyme,
    group_chars,
    gu_ping,
    level_chars,
    oblique_chars,
    rhyme_book,
    san_ping_wei,
    tone_pattern,
    tone_patterns,
)

DENG_GUANQUE = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"  # 王之涣《登鹳雀楼》
CHUNXIAO = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"  # 孟浩然《春晓》
JINGYESI = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"  # 李白《静夜思》
DENGGAO = ("风急天高猿啸哀，渚清沙白鸟飞回。无边落木萧萧下，不尽长江滚滚来。"
           "万里悲秋常作客，百年多病独登台。艰难苦恨繁霜鬓，潦倒新停浊酒杯。")  # 杜甫《登高》
SHANJU = ("空山新雨后，天气晚来秋。明月松间照，清泉石上流。"
          "竹喧归浣女，莲动下渔舟。随意春芳歇，王孙自可留。")  # 王维《山居秋暝》

P, Z = frozenset((LEVEL,)), frozenset((OBLIQUE,))


def tones_of(pattern: str) -> list[frozenset[str]]:
    return [frozenset((c,)) if c in (LEVEL, OBLIQUE) else frozenset((LEVEL, OBLIQUE)) for c in pattern]


@pytest.fixture(scope="module")
def ps() -> RhymeBook:
    return rhyme_book("pingshui")


@pytest.fixture(scope="module")
def xy() -> RhymeBook:
    return rhyme_book("xinyun")


# --- the books ------------------------------------------------------------------------------------------------


def test_pingshui_has_106_groups_30_of_them_level(ps):
    groups = ps.all_groups()
    assert len(groups) == 106 and len({g.name for g in groups}) == 106
    assert sum(g.level for g in groups) == 30
    assert [g.label for g in groups[:3]] == ["上平一东", "上平二冬", "上平三江"]
    assert groups[15].label == "下平一先" and groups[-1].label == "入声十七洽"
    assert {g.tone for g in groups} == {"上平", "下平", "上声", "去声", "入声"}
    assert ps.level_group_names()[:5] == ("东", "冬", "江", "支", "微")


@pytest.mark.parametrize("ch, label", [("东", "上平一东"), ("红", "上平一东"), ("楼", "下平十一尤"), ("光", "下平七阳"),
                                       ("门", "上平十三元"), ("山", "上平十五删"), ("鸟", "上声十七筿")])
def test_single_group_characters(ps, ch, label):
    assert [g.label for g in ps.groups(ch)] == [label]


@pytest.mark.parametrize("ch", list("白月雪国独十"))
def test_entering_tone_is_oblique_under_pingshui(ps, xy, ch):
    assert ps.tones(ch) == Z
    assert all(g.tone == "入声" for g in ps.groups(ch)) and ps.groups(ch)
    assert ps.level_groups(ch) == frozenset()


def test_entering_tone_under_xinyun(xy):
    # Mandarin spread the entering tone over all four tones: 白 国 独 十 became level, 月 (yuè) 雪 (xuě) did not
    assert [xy.can_be_level(c) for c in "白国独十月雪"] == [True] * 4 + [False] * 2
    assert xy.level_groups("白") == {RhymeGroup("开", LEVEL)}


@pytest.mark.parametrize("ch, level, oblique", [("看", "上平十四寒", "去声十五翰"), ("思", "上平四支", "去声四寘"),
                                                ("望", "下平七阳", "去声二十三漾"), ("重", "上平二冬", "去声二宋")])
def test_characters_in_two_tones_count_as_either(ps, ch, level, oblique):
    labels = {g.label for g in ps.groups(ch)}
    assert {level, oblique} <= labels
    assert ps.tones(ch) == {LEVEL, OBLIQUE}
    assert ps.can_be_level(ch) and ps.can_be_oblique(ch)


@pytest.mark.parametrize("simple, trad", [("东", "東"), ("门", "門"), ("乡", "鄉"), ("发", "發"), ("泪", "淚")])
def test_simplified_characters_find_the_traditional_entries(ps, simple, trad):
    assert trad in ps.table_characters() and simple not in ps.table_characters()
    assert ps.groups(simple) == ps.groups(trad) != frozenset()


def test_a_simplified_character_has_the_entries_of_every_traditional_one(ps):
    # 干 stands for 干, 乾 and 幹 in simplified text; a traditional character keeps only its own entries
    gan = {g.label for g in ps.groups("干")}
    assert {g.label for g in ps.groups("乾")} == {"上平十四寒", "下平一先"}
    assert {g.label for g in ps.groups("幹")} == {"上平十四寒", "去声十五翰"}
    assert gan == {"上平十四寒", "下平一先", "去声十五翰"}
    assert ps.groups("發") == ps.groups("髮") == ps.groups("发")


def test_compatibility_ideograph_finds_the_unified_entry(ps):
    assert ps.groups("\uf9d1") == ps.groups("六")  # CJK COMPATIBILITY IDEOGRAPH-F9D1 is 六


@pytest.mark.parametrize("ch", ["A", "，", "", "東風", "\U00020000"])
def test_unknown_characters_have_no_tone_and_no_group(ps, ch):
    assert ps.tones(ch) == frozenset() and ps.groups(ch) == frozenset()
    assert not ps.knows(ch) and not ps.can_be_level(ch) and not ps.can_be_oblique(ch)


def test_xinyun_is_the_rule_of_poetry_forms(xy):
    from poetgen.poetry.forms import is_level, level_rhyme_groups, rhyme_key

    for ch in "东白看长是冷楼光鸟少国":
        assert xy.can_be_level(ch) == is_level(ch)
        assert {g.name for g in xy.level_groups(ch)} == level_rhyme_groups(ch)
        assert {g.name for g in xy.groups(ch)} == {rhyme_key(ch)}


def test_group_by_name(ps, xy):
    assert ps.group("东") == ps.group("東") == ps.group("上平一东") == RhymeGroup("东", "上平", 1)
    assert ps.group("篠") == ps.group("筿")  # OpenCC simplifies 篠 to 筿
    assert xy.group("庚") == RhymeGroup("庚", LEVEL)
    with pytest.raises(SampleError, match="unknown rhyme group 'xx'.*东 冬 江"):
        ps.group("xx")
    with pytest.raises(SampleError, match="valid books: pingshui, xinyun"):
        rhyme_book("guangyun")


# --- patterns -------------------------------------------------------------------------------------------------


def test_the_four_standard_patterns_of_each_form():
    """Written out by hand (the eval metrics use these patterns too: evaluation.poems has no copy of its own)."""
    five = {p.name: "，".join(p.lines) for p in tone_patterns("五绝")}
    assert five == {
        "仄起首句不入韵": "仄仄平平仄，平平仄仄平，平平平仄仄，仄仄仄平平",
        "仄起首句入韵": "仄仄仄平平，平平仄仄平，平平平仄仄，仄仄仄平平",
        "平起首句不入韵": "平平平仄仄，仄仄仄平平，仄仄平平仄，平平仄仄平",
        "平起首句入韵": "平平仄仄平，仄仄仄平平，仄仄平平仄，平平仄仄平",
    }
    seven = {p.name: "，".join(p.lines) for p in tone_patterns("七绝")}
    assert seven["平起首句入韵"] == "平平仄仄仄平平，仄仄平平仄仄平，仄仄平平平仄仄，平平仄仄仄平平"
    assert seven["仄起首句入韵"] == "仄仄平平仄仄平，平平仄仄仄平平，平平仄仄平平仄，仄仄平平仄仄平"
    lv = {p.name: p.lines for p in tone_patterns("五律")}
    assert lv["仄起首句不入韵"] == ("仄仄平平仄", "平平仄仄平", "平平平仄仄", "仄仄仄平平") * 2
    assert all(len(p.lines) == 8 and all(len(x) == 7 for x in p.lines) for p in tone_patterns("七律"))
    for form in FORM_SHAPES:
        assert [p.first_rhymes for p in tone_patterns(form)] == [False, True, False, True]


def test_wujue_patterns_by_hand():
    p = tone_pattern("五绝", "仄起首句不入韵")
    assert p.lines == ("仄仄平平仄", "平平仄仄平", "平平平仄仄", "仄仄仄平平")
    assert p.template == ("*仄*平仄", "平平*仄平", "*平*仄仄", "*仄仄平平")
    assert p.rhyme_lines == (1, 3)
    assert p.required(0, 0) is None and p.required(0, 1) == OBLIQUE and p.required(1, 0) == LEVEL
    q = tone_pattern("七律", "平起首句入韵")
    assert q.lines[:2] == ("平平仄仄仄平平", "仄仄平平仄仄平") and q.rhyme_lines == (0, 1, 3, 5, 7)
    assert q.template[:2] == ("*平*仄仄平平", "*仄平平*仄平")
    with pytest.raises(SampleError, match="valid patterns: 仄起首句不入韵"):
        tone_pattern("五绝", "平起")
    with pytest.raises(SampleError, match="unknown form"):
        tone_patterns("六绝")


@pytest.mark.parametrize("form", list(FORM_SHAPES))
def test_every_filling_of_a_template_is_regulated(form):
    """Each line, filled in every way its template allows, fits the pattern at 2-4-6 with no 孤平 and no 三平尾."""
    for p in tone_patterns(form):
        for full, template in zip(p.lines, p.template):
            free = [i for i, t in enumerate(template) if t == "*"]
            assert free and all(i % 2 == 0 for i in free)  # only odd positions (1-based) are ever free
            assert all(t == f for t, f in zip(template, full) if t != "*")
            for fill in itertools.product((LEVEL, OBLIQUE), repeat=len(free)):
                line = list(full)
                for i, t in zip(free, fill):
                    line[i] = t
                ts = tones_of("".join(line))
                assert not gu_ping(ts) and not san_ping_wei(ts), (p.name, "".join(line))


def test_the_fixed_odd_positions_are_needed():
    # B and D lines with the fixed position flipped fall into 孤平 and 三平尾
    assert gu_ping(tones_of("仄平仄仄平")) and gu_ping(tones_of("仄仄仄平仄仄平"))
    assert san_ping_wei(tones_of("仄仄平平平")) and san_ping_wei(tones_of("平平仄仄平平平"))


def test_gu_ping_and_san_ping_wei_by_hand():
    assert not gu_ping(tones_of("平平仄仄平"))
    assert not gu_ping(tones_of("仄平平仄平"))  # 拗救: two level characters besides the rhyme
    assert not gu_ping(tones_of("仄仄仄平平"))  # the one level character stands just before the rhyme
    assert gu_ping(tones_of("平仄仄仄平"))
    assert not gu_ping(tones_of("仄平仄仄仄"))  # ends oblique: 孤平 is about rhyming lines
    assert not gu_ping([Z, P, tones_of("*")[0], Z, P])  # a character of both tones is given the benefit
    assert not san_ping_wei([Z, Z, tones_of("*")[0], P, P])


class ToneNameBook(RhymeBook):
    """A book in which the characters 平 and 仄 are their own tones, 平 in one level group."""

    name = "toy"
    G = RhymeGroup("平", "上平", 1)

    def all_groups(self):
        return (self.G,)

    def tones(self, ch):
        return frozenset((ch,)) if ch in (LEVEL, OBLIQUE) else frozenset()

    def groups(self, ch):
        return frozenset((self.G,)) if ch == LEVEL else frozenset()


@pytest.mark.parametrize("form", list(FORM_SHAPES))
def test_each_pattern_written_out_is_found_and_regulated(form):
    for p in tone_patterns(form):
        c = check_prosody(list(p.lines), ToneNameBook())
        assert (c.pattern, c.agree_246, c.agree_full, c.regulated) == (p.name, 1.0, 1.0, True)
        assert c.rhyme.first_rhymes == p.first_rhymes and not c.nian_dui


# --- worked examples ----------------------------------------------------------------------------------------------


def test_deng_guanque_lou(ps):
    c = check_prosody(DENG_GUANQUE, ps)
    assert (c.form, c.pattern, c.kind) == ("五绝", "仄起首句不入韵", "律绝")
    assert c.rhyme.rhymes and c.rhyme.group.label == "下平十一尤" and c.rhyme.ends == "流楼"
    assert (c.agree_246, c.checked_246) == (1.0, 8)
    assert (c.agree_full, c.checked_full) == (0.95, 20)  # 欲 (仄) at the free first position of 平平平仄仄
    assert c.problems == [] and c.unknown == ""


def test_deng_guanque_lou_under_xinyun_has_a_false_san_ping_wei(xy):
    # 一 (入声, yī today) reads level in Mandarin: 一层楼 looks like 三平尾
    c = check_prosody(DENG_GUANQUE, xy)
    assert c.rhyme.rhymes and c.rhyme.group == RhymeGroup("尤", LEVEL)
    assert c.san_ping_wei == [4] and c.kind == "古绝"


@pytest.mark.parametrize("book, group", [("pingshui", "上声十七筿"), ("xinyun", "豪(仄)")])
def test_chunxiao_rhymes_oblique_and_is_rejected_by_level_rules(book, group):
    c = check_prosody(CHUNXIAO, book)
    assert not c.rhyme.rhymes and c.rhyme.group is None
    assert c.rhyme.oblique_group.label == group and not c.rhyme.oblique_group.level
    assert c.rhyme.reason.startswith("仄韵 (oblique rhyme): the even lines end in 鸟/少")
    assert c.problems[0].startswith("does not rhyme: 仄韵") and c.kind == "古绝"
    # the even-line ends, and 晓 too, are oblique-only in the 平水韵
    assert all(rhyme_book("pingshui").tones(ch) == Z for ch in "晓鸟少")


def test_jingyesi_is_a_gujue(ps):
    c = check_prosody(JINGYESI, ps)
    assert c.rhyme.rhymes and c.rhyme.group.name == "阳" and c.rhyme.first_rhymes and c.rhyme.ends == "光霜乡"
    assert c.pattern == "平起首句入韵" and c.agree_246 == 0.75
    assert c.gu_ping == [2]  # 疑是地上霜: 平仄仄仄平
    assert c.nian_dui == ["失粘 lines 2-3 (是 仄, 头 平)", "失对 lines 3-4 (头 平, 头 平)"]
    assert not c.regulated and c.kind == "古绝"


def test_denggao_follows_its_pattern(ps):
    c = check_prosody(DENGGAO, ps)
    assert (c.form, c.pattern, c.kind) == ("七律", "仄起首句入韵", "律诗")
    assert c.rhyme.rhymes and c.rhyme.group.label == "上平十灰" and c.rhyme.ends == "哀回来台杯"
    assert c.agree_246 == 1.0 and c.checked_246 == 24 and c.problems == []


def test_denggao_under_xinyun_does_not_rhyme(xy):
    c = check_prosody(DENGGAO, xy)  # 回/杯 (ei) and 来/台 (ai) parted in Mandarin
    assert not c.rhyme.rhymes and "share no level group" in c.rhyme.reason and c.kind == "古风"


def test_shanju_qiuming_follows_its_pattern(ps):
    c = check_prosody(SHANJU, ps)
    assert (c.form, c.pattern, c.kind) == ("五律", "平起首句不入韵", "律诗")
    assert c.rhyme.rhymes and c.rhyme.group.name == "尤" and not c.rhyme.first_rhymes
    assert c.agree_246 == 1.0 and c.checked_246 == 15  # 浣 is not in the table: left out of the count
    assert c.unknown == "浣"


def test_an_unknown_rhyme_character_fails_the_rhyme_with_a_reason(ps):
    c = check_prosody(DENG_GUANQUE.replace("楼", "\U00020000"), ps)
    assert not c.rhyme.rhymes and c.rhyme.unknown == "\U00020000"
    assert c.rhyme.reason == "not in the pingshui rhyme book: \U00020000"
    assert c.checked_full == 19 and c.agree_246 == 1.0


def test_rhyme_reasons(ps):
    r = check_rhyme(["白日依山尽", "黄河入海流", "欲穷千里目", "更上一层山"], ps)
    assert not r.rhymes and r.reason == "the even lines share no level group: 流 下平十一尤, 山 上平十五删"
    r = check_rhyme(["白日依山尽", "黄河入海流", "欲穷千里目", "更上一层月"], ps)
    assert not r.rhymes and r.reason == "even-line end(s) 月 oblique"
    # the first line counts only when asked: 尽 is oblique
    assert check_rhyme(DENG_GUANQUE[:-1].replace("。", "，").split("，"), ps, first=False).rhymes
    r = check_rhyme(DENG_GUANQUE[:-1].replace("。", "，").split("，"), ps, first=True)
    assert not r.rhymes and r.ends == "尽流楼"


def test_check_poem_refuses_other_shapes(ps):
    with pytest.raises(PoetgenError, match="not 4 or 8 lines"):
        check_prosody("床前明月光，疑是地上霜。", ps)
    with pytest.raises(PoetgenError, match="not a 七绝"):
        check_prosody(DENG_GUANQUE, ps, form="七绝")


# --- for masks ------------------------------------------------------------------------------------------------


def test_vocab_prosody_masks(ps):
    symbols = ["<eot>", "<unk>", "，", "东", "白", "看", "红", "A", "楼", "流"]
    v = VocabProsody(symbols, ps)
    assert v.level.tolist() == [False, False, False, True, False, True, True, False, True, True]
    assert v.oblique.tolist() == [False, False, False, False, True, True, False, False, False, False]
    assert v.group_ids("东").tolist() == [3, 6] and v.group_ids("尤").tolist() == [8, 9]
    assert v.group_ids("阳").tolist() == []
    assert [g.name for g in v.groups] == ["东", "寒", "尤"]  # the book's order, only groups the vocabulary has
    assert v.tone_mask(None).all() and v.tone_mask(LEVEL) is v.level
    assert level_chars(symbols, ps) == [3, 5, 6, 8, 9] and oblique_chars(symbols, ps) == [4, 5]
    assert group_chars(symbols, "东", ps) == [3, 6] and group_chars(symbols, "翰", ps) == [5]


def test_importing_prosody_loads_nothing_heavy():
    code = ("import sys, poetgen.poetry.prosody; "
            "print(sorted(m for m in ('numpy', 'opencc', 'pypinyin', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
