"""Poem metrics on handcrafted poems: a correct 五绝, broken ones, a copied line, a known rhyme, tone patterns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from poetgen.errors import CorpusError
from poetgen.data.copies import TrainingIndex
from poetgen.evaluation.poems import Poem, evaluate_poems, measure_poem, read_poems
from poetgen.poetry.prosody import tone_patterns
from poetgen.poetry.forms import FORMS, form_problems
from poetgen.data.vocab import EOT_ID, Vocab

# 王之涣《登鹳雀楼》: a correct 五绝, even lines ending in 流 liú / 楼 lóu (尤 group, level tones).
DENG = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
# 李白《静夜思》as commonly printed: 光/霜/乡 end in 唐 group, level.
JING = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"


def test_a_correct_wujue_complies_rhymes_and_fits_its_tone_pattern():
    c = measure_poem(DENG)
    assert c.form == "五绝" and not c.declared and c.format_ok and c.problems == [] and c.regular and c.rhymes
    # 平水韵: 白 日 入 欲 目 一 are 入声 (oblique); best pattern 仄起首句不入韵 (仄仄平平仄 平平仄仄平 平平平仄仄
    # 仄仄仄平平): positions 2 and 4 all agree (8/8); all positions: only 更 (平, line 4 wants 仄) disagrees -> 19/20.
    assert c.tone.pattern == "仄起首句不入韵"
    assert (c.tone.agree_246, c.tone.checked_246) == (1.0, 8)
    assert (c.tone.agree_full, c.tone.checked_full) == (0.95, 20)
    assert c.tone.regulated and not c.tone.nian_dui and not c.tone.gu_ping and not c.tone.san_ping_wei
    # Modern readings (xinyun) make 一 level, so 一层楼 is a false 三平尾 and 白 欲 disagree as well: 16/20.
    x = measure_poem(DENG, "xinyun")
    assert (x.tone.agree_full, x.tone.san_ping_wei, x.tone.regulated) == (0.8, [4], False)


def test_broken_poems_fail_format_with_a_reason():
    short_line = "白日依山尽，黄河入海流。欲穷千里目，更上一层。"
    c = measure_poem(Poem(short_line, "五绝"))
    assert c.declared and not c.format_ok and not c.regular and c.rhymes is None and c.tone is None
    assert any("line(s) 4 not 5" in p for p in c.problems)
    assert measure_poem(short_line).form is None  # nothing to infer
    assert not measure_poem(short_line).format_ok

    swapped = "白日依山尽。黄河入海流，欲穷千里目，更上一层楼。"  # the lines are right, the marks are not
    c = measure_poem(swapped)
    assert c.form == "五绝" and c.regular and not c.format_ok
    assert c.problems == ["line 1 is not followed by one of ，；：？！"]
    assert c.rhymes  # rhyme and tones are still measured on a regular poem

    assert form_problems(DENG + "。", FORMS["五绝"]) == ["text after the last line: '。'"]
    assert form_problems("白日依山尽，黄河入海流。", FORMS["五绝"])[0] == "2 lines, not 4"
    assert measure_poem(Poem(DENG, "七绝")).format_ok is False  # judged by the declared form
    # whitespace and question marks are allowed
    assert measure_poem("白日依山尽，黄河入海流？\n欲穷千里目！更上一层楼。").format_ok


def test_known_rhyme_and_a_non_rhyme():
    assert measure_poem(DENG).rhymes and measure_poem(JING).rhymes
    no_rhyme = "白日依山尽，黄河入海流。欲穷千里目，更上一层山。"  # 流 尤 vs 山 寒
    assert measure_poem(no_rhyme).rhymes is False


def test_a_poem_built_from_each_pattern_fits_it_exactly():
    level, oblique = "天风山花", "月雨水树"  # 平 / 仄 in the 平水韵, one tone each
    for form in ("五绝", "七律"):
        for p in tone_patterns(form):
            lines = ["".join((level if t == "平" else oblique)[i % 4] for i, t in enumerate(line)) for line in p.lines]
            m = measure_poem("，".join(lines) + "。").tone
            # 首句入韵 and 不入韵 agree at positions 2-4-6 (仄仄平平仄 / 仄仄仄平平): the full figure decides
            assert (m.pattern, m.agree_246, m.agree_full) == (p.name, 1.0, 1.0)


def _index(docs: list[str], chunk: int = 16) -> tuple[TrainingIndex, Vocab]:
    vocab = Vocab(["<eot>", "<unk>"] + sorted(set("".join(docs))))
    ids = []
    for d in docs:
        ids += vocab.encode(d) + [EOT_ID]
    return TrainingIndex(np.array(ids, dtype=np.uint16), vocab, chunk=chunk), vocab


def test_copied_lines_and_7grams_against_the_training_text():
    train = [JING, "春眠不觉晓，处处闻啼鸟。"]
    index, _ = _index(train)
    assert "床前明月光" in index.lines and "处处闻啼鸟" in index.lines
    poem = "床前明月光，春风入海流。欲穷千里目，低头思故乡。"  # lines 1 and 4 copied
    assert index.copied_lines(poem) == (2, 4)
    # reference: every 7-symbol window of the poem against every 7-symbol window of each training document
    grams = {d[i:i + 7] for d in train for i in range(len(d) - 6)}
    windows = [poem[i:i + 7] for i in range(len(poem) - 6)]
    assert index.copied_ngrams(poem) == (sum(w in grams for w in windows), len(windows))
    assert index.copied_ngrams(poem)[0] == 1  # only "，低头思故乡。" (the training text has 月, not 目, before it)
    # a window across two training documents is not in the index
    assert index.copied_ngrams("思故乡。春眠不")[0] == 0
    assert index.copied_ngrams(JING) == (len(JING) - 6, len(JING) - 6)
    assert index.copied_lines("鹅鹅鹅，曲项向天歌。") == (0, 1)  # 鹅鹅鹅 is shorter than 4: not checked
    for chunk in (1, 5, 1 << 20):  # chunked building (lines carried, 7-grams read past the chunk) changes nothing
        other, _ = _index(train, chunk)
        assert other.lines == index.lines and np.array_equal(other.ngrams, index.ngrams)


def test_distinct_and_repeated_characters_by_hand():
    # poem 1 lines 山水山水 / 山花; poem 2 花月. Characters: 8, distinct 4 -> distinct-1 0.5.
    # Pairs within lines: 山水 水山 山水 | 山花 | 花月 = 5, distinct 4 -> 0.8.
    # Repeats within a poem: 山 水 山* 水* 山* 花 | 花 月 -> 3 of 8.
    r = evaluate_poems(["山水山水，山花。", "花月。"])
    assert (r.distinct_1, r.distinct_2, r.repeated_char_rate) == (0.5, 0.8, 0.375)
    assert r.forms == {"none": 2} and r.format_rate == 0.0 and r.regular == 0 and r.rhyme_rate is None
    assert r.copy_line_rate is None  # no training index given


def test_report_over_a_mix_of_poems():
    index, _ = _index([JING])
    broken = "白日依山尽，黄河入海流。欲穷千里目，更上一层。"
    copied = "床前明月光，黄河入海流。欲穷千里目，更上一层楼。"
    r = evaluate_poems([DENG, broken, copied], index)
    assert r.poems == 3 and r.forms == {"五绝": 2, "none": 1}
    assert r.format_rate == pytest.approx(2 / 3) and r.regular == 2 and r.rhyme_rate == 1.0
    assert r.copy_lines_checked == 12 and r.copy_line_rate == pytest.approx(1 / 12)
    assert r.examples == [{"text": broken, "form": None, "problems": ["not in a regular form (4 or 8 lines of 5 or 7)"]}]
    assert r.tone_246 is not None and 0 < r.tone_full <= 1 and sum(r.patterns.values()) == 2
    # 登鹳雀楼 is regulated; the copied poem has 失对 in lines 1-2 (前 and 河 both 平)
    assert r.book == "pingshui" and r.regulated_rate == 0.5 and r.nian_dui_rate == 0.5
    assert (r.gu_ping_rate, r.san_ping_wei_rate, r.tone_full_perfect_rate) == (0.0, 0.0, 0.0)
    x = evaluate_poems([DENG, broken, copied], index, book="xinyun")
    assert x.book == "xinyun" and x.san_ping_wei_rate == 1.0 and x.regulated_rate == 0.0
    assert json.loads(json.dumps(r.to_dict()))["poems"] == 3


def test_read_poems_takes_paragraphs_text_and_form(tmp_path: Path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps({"paragraphs": ["白日依山尽，黄河入海流。", "欲穷千里目，更上一层楼。"]}, ensure_ascii=False) + "\n\n"
        + json.dumps({"text": JING, "form": "wujue"}, ensure_ascii=False) + "\n" + json.dumps("花月。") + "\n",
        encoding="utf-8",
    )
    poems = read_poems(f)
    assert [p.text for p in poems] == [DENG, JING, "花月。"] and [p.form for p in poems] == [None, "五绝", None]
    f.write_text('{"text": "a"}\n{"title": "x"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="line 2"):
        read_poems(f)
    f.write_text('{"text": "a", "form": "haiku"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="line 1.*haiku"):
        read_poems(f)
    with pytest.raises(CorpusError, match="not found"):
        read_poems(tmp_path / "missing.jsonl")
