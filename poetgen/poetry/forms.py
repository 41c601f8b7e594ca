"""Tang poem forms, acrostics, tones and rhyme (the automaton that makes sampling obey them is
poetgen.generation.constraints).

Forms: 五绝 (4 lines of 5), 七绝 (4 of 7), 五律 (8 of 5), 七律 (8 of 7). A poem in form is exactly::

    line 1 ， line 2 。 line 3 ， line 4 。 ... <eot>

every line K Han characters, `，` after odd lines, `。` after even lines (and after the last line, when an
acrostic gives an odd number of lines), then the end-of-text symbol.

Modern-Mandarin tones and rhyme (the ``xinyun`` book of poetgen.poetry.prosody; sampling and eval default to the
Tang-era 平水韵, ``pingshui``, which is prosody's own) — an approximation, not the Middle Chinese of the 平水韵:

* Readings come from pypinyin (it knows traditional characters too), as its heteronym list (多音字), most
  common reading first.
* Tone: a reading is level (平) when its tone is 1 or 2 (阴平, 阳平); tones 3, 4 and neutral are oblique (仄).
  The old entering tone (入声) is lost in Mandarin; 白, 国, 独... read as level here although they were oblique.
* Rhyme group: a final (韵母) belongs to one of the 14 groups of 中华新韵 (`RHYME_GROUPS`), e.g.
  ang/iang/uang -> 唐, eng/ing/ong/iong -> 庚, and apical -i of zhi/chi/shi/ri/zi/ci/si -> 支 apart from i -> 齐.
* A character rhymes in the group of its most common reading, and is level when that reading, or another reading
  with the same final, has tone 1 or 2: 看 kàn/kān, 长 zhǎng/cháng, 重 zhòng/chóng are level; 是 shì (whose rare
  reading tí has another final) is not. Its *level rhyme groups* are that one group if it is level, else none.
  (Counting every reading instead lets 是, 冷, 至, 樂, 暖 end even lines; on 13,171 regular Tang poems this rule
  finds 68.6% of the real even-line endings rhyming against 4.4% of randomly drawn ones.)
* A poem rhymes when the last characters of all even lines have a common level rhyme group. In decoding this is a
  narrowing set: the first even line may end in any level character with a rhyme group; each later even line must
  end in a character sharing a group with the set so far, and the set becomes the intersection.

How sampling plans its masks so that no step is ever left without a character is told in
poetgen.generation.constraints.

Nothing here needs torch; pypinyin is imported only when rhyme is asked for (it takes ~0.3 s to load).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from poetgen.errors import SampleError

COMMA = "，"
PERIOD = "。"
SENTENCE_ENDS = "。？！"
# The marks a line of a poem in form may end with (``form_problems``); sampling writes only COMMA and PERIOD.
ODD_MARKS = "，；：？！"
EVEN_MARKS = "。？！"

# --- forms ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Form:
    name: str  # canonical Chinese name, e.g. "五绝"
    lines: int
    chars: int  # Han characters per line

    @property
    def length(self) -> int:
        """Symbols in the poem, punctuation included, end-of-text excluded."""
        return self.lines * (self.chars + 1)


FORMS = {
    "五绝": Form("五绝", 4, 5),
    "七绝": Form("七绝", 4, 7),
    "五律": Form("五律", 8, 5),
    "七律": Form("七律", 8, 7),
}
_ALIASES = {
    "五绝": ("wujue", "5jue", "五絕", "五言绝句", "五言絕句"),
    "七绝": ("qijue", "7jue", "七絕", "七言绝句", "七言絕句"),
    "五律": ("wulv", "wulu", "wulü", "5lv", "5lu", "五言律诗", "五言律詩"),
    "七律": ("qilv", "qilu", "qilü", "7lv", "7lu", "七言律诗", "七言律詩"),
}
FORM_NAMES: dict[str, str] = {name: name for name in FORMS}
for _name, _aliases in _ALIASES.items():
    FORM_NAMES.update({a: _name for a in _aliases})


def parse_form(name: str) -> Form:
    """A form by its Chinese name or an ASCII alias (case-insensitive): 五绝 wujue 5jue, 七律 qilv 7lv, ..."""
    key = name.strip().lower()
    if key in FORM_NAMES:
        return FORMS[FORM_NAMES[key]]
    valid = ", ".join(f"{n} ({'/'.join(a for a in _ALIASES[n] if a.isascii())})" for n in FORMS)
    raise SampleError(f"unknown form {name!r}; valid forms: {valid}")


def is_han(ch: str) -> bool:
    """True for one CJK ideograph (unified, extensions A-G, compatibility), simplified or traditional."""
    if len(ch) != 1:
        return False
    o = ord(ch)
    return (
        0x4E00 <= o <= 0x9FFF
        or 0x3400 <= o <= 0x4DBF
        or 0xF900 <= o <= 0xFAFF
        or 0x20000 <= o <= 0x3134F
        or 0x2F800 <= o <= 0x2FA1F
    )


_LINE_SPLIT = re.compile(r"[，。？！；：、,.?!;:\s]+")


def split_lines(text: str) -> list[str]:
    """The lines of a poem: text between punctuation marks (any of ，。？！；：、 and ASCII ones), blanks dropped."""
    return [p for p in _LINE_SPLIT.split(text) if p]


def detect_form(text: str) -> str | None:
    """The form a poem has (lenient about which punctuation separates lines), or None.

    4 or 8 lines, all of 5 or all of 7 Han characters -> "五绝" / "七绝" / "五律" / "七律".
    """
    lines = split_lines(text)
    if len(lines) not in (4, 8) or not all(all(is_han(c) for c in line) for line in lines):
        return None
    k = len(lines[0])
    if k not in (5, 7) or any(len(line) != k for line in lines):
        return None
    for form in FORMS.values():
        if form.lines == len(lines) and form.chars == k:
            return form.name
    return None


def form_problems(text: str, form: Form) -> list[str]:
    """What keeps ``text`` from being *in form* (empty: it is): exactly ``form.lines`` lines of ``form.chars`` Han
    characters, each followed by one mark, one of ODD_MARKS after odd lines and of EVEN_MARKS after even ones
    (whitespace ignored). The one definition of "in form" for real poems; what sampling writes is the narrower
    ``check_constrained`` (only ，/。)."""
    body = "".join(text.split())
    lines = split_lines(body)
    problems = []
    if len(lines) != form.lines:
        problems.append(f"{len(lines)} lines, not {form.lines}")
    bad = [i + 1 for i, line in enumerate(lines) if len(line) != form.chars or not all(map(is_han, line))]
    if bad:
        problems.append(f"line(s) {', '.join(map(str, bad))} not {form.chars} Han characters")
    pos = 0
    for i in range(form.lines):
        pos += form.chars
        marks = ODD_MARKS if i % 2 == 0 else EVEN_MARKS
        if pos >= len(body) or body[pos] not in marks:
            if not problems:
                problems.append(f"line {i + 1} is not followed by one of {marks}")
            break
        pos += 1
    else:
        if pos != len(body) and not problems:
            problems.append(f"text after the last line: {body[pos:pos + 10]!r}")
    return problems



def poem_layout(lines: int, chars: int) -> str:
    """A regular expression for the exact structure the constraint produces (for checks and tests)."""
    han = "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f\U0002f800-\U0002fa1f]"
    parts = []
    for i in range(lines):
        punct = COMMA if i % 2 == 0 and i != lines - 1 else PERIOD
        parts.append(f"{han}{{{chars}}}{punct}")
    return "".join(parts)


def check_constrained(text: str, lines: int, chars: int, acrostic: str | None = None,
                      rhyme: bool = False, book: str = "pingshui") -> list[str]:
    """What is wrong with ``text`` as a poem written under the sampling constraint (empty list: nothing): in form
    with exactly ，after odd lines and 。after even ones (``poem_layout``; stricter than ``form_problems``), then the
    acrostic, then the rhyme rule of ``book`` (``pingshui`` or ``xinyun``; see poetry.prosody.check_rhyme): the even
    lines' ends are level and share a level group (the first line is free)."""
    if not re.fullmatch(poem_layout(lines, chars), text):
        return [f"not {lines} lines of {chars} Han characters with ，/。 in place: {text!r}"]
    body = split_lines(text)
    problems = []
    if acrostic is not None:
        for i, (line, head) in enumerate(zip(body, acrostic)):
            if line[0] != head:
                problems.append(f"line {i + 1} starts with {line[0]!r}, not {head!r}")
    if rhyme:
        from poetgen.poetry.prosody import check_rhyme

        check = check_rhyme(body, book, first=False)
        if not check.rhymes:
            problems.append(f"no rhyme ({book}): {check.reason}")
    return problems


# --- tones and rhyme ------------------------------------------------------------------------------------------

# The 14 rhyme groups of 中华新韵 (中华诗词学会), by pinyin final; "-i" is the apical vowel of zhi/chi/shi/ri/zi/ci/si.
RHYME_GROUPS: dict[str, tuple[str, ...]] = {
    "麻": ("a", "ia", "ua"),
    "波": ("o", "e", "uo"),
    "皆": ("ie", "üe", "ê"),
    "开": ("ai", "uai"),
    "微": ("ei", "uei"),
    "豪": ("ao", "iao"),
    "尤": ("ou", "iou"),
    "寒": ("an", "ian", "uan", "üan"),
    "文": ("en", "in", "uen", "ün"),
    "唐": ("ang", "iang", "uang"),
    "庚": ("eng", "ing", "ueng", "ong", "iong"),
    "齐": ("i", "er", "ü"),
    "支": ("-i",),
    "姑": ("u",),
}
GROUP_NAMES = tuple(RHYME_GROUPS)
_FINAL_TO_GROUP = {f: g for g, finals in RHYME_GROUPS.items() for f in finals}
_APICAL_INITIALS = {"zh", "ch", "sh", "r", "z", "c", "s"}
_SYLLABLE = re.compile(r"^([a-zü]+)([1-5])$")


@dataclass(frozen=True)
class Reading:
    syllable: str  # e.g. "guang1" (pypinyin TONE3, neutral tone as 5, ü as v)
    final: str  # e.g. "uang", "-i", "üe"
    tone: int  # 1-5
    group: str | None  # 中华新韵 group, None for finals outside the table (m, n, ng, io)

    @property
    def level(self) -> bool:
        return self.tone in (1, 2)


@functools.lru_cache(maxsize=None)
def _reading(marked: str) -> Reading | None:
    """One syllable as pypinyin's dictionary spells it ("guāng") -> Reading. Cached: a vocabulary of thousands of
    characters has ~1,500 distinct syllables, and converting them is most of the cost of a rhyme table."""
    from pypinyin.contrib.tone_convert import tone_to_tone3, to_finals, to_initials

    syllable = tone_to_tone3(marked, neutral_tone_with_five=True)  # "guang1"; ü stays "v"
    m = _SYLLABLE.match(syllable.replace("v", "ü"))
    if not m:
        return None
    final = to_finals(syllable, strict=True).replace("v", "ü")
    if final == "i" and to_initials(syllable, strict=True) in _APICAL_INITIALS:
        final = "-i"
    return Reading(syllable, final, int(m.group(2)), _FINAL_TO_GROUP.get(final))


@functools.lru_cache(maxsize=None)
def readings(ch: str) -> tuple[Reading, ...]:
    """Every modern reading pypinyin knows for one character (heteronyms, most common first); () for none.

    Read straight from pypinyin's character dictionary: the same list as ``pinyin(ch, heteronym=True)``, 20 times
    faster for a whole vocabulary.
    """
    from pypinyin.pinyin_dict import pinyin_dict

    if not is_han(ch):
        return ()
    found = (_reading(s) for s in pinyin_dict.get(ord(ch), "").split(",") if s)
    return tuple(dict.fromkeys(r for r in found if r is not None))


def is_level(ch: str) -> bool:
    """True when the most common reading of ``ch``, or another reading with the same final, has tone 1 or 2."""
    rs = readings(ch)
    return bool(rs) and any(r.level and r.final == rs[0].final for r in rs)


def level_rhyme_groups(ch: str) -> frozenset[str]:
    """The groups ``ch`` can rhyme in at an even line's end: its ``rhyme_key`` if it is level, else none."""
    key = rhyme_key(ch)
    return frozenset((key,)) if key is not None and is_level(ch) else frozenset()


def rhyme_key(ch: str) -> str | None:
    """The rhyme group of the most common reading of ``ch`` (whatever its tone), or None."""
    rs = readings(ch)
    return rs[0].group if rs else None


def rhymes(chars: list[str] | str) -> bool:
    """The rhyme rule: all characters are level-toned and share at least one level rhyme group."""
    common: frozenset[str] | None = None
    for ch in chars:
        groups = level_rhyme_groups(ch)
        common = groups if common is None else common & groups
        if not common:
            return False
    return common is not None
