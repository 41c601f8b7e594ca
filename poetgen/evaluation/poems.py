"""Poem metrics: is it in form, does it rhyme, does it follow the tone patterns, is it copied, is it varied.

Every tone and rhyme reading comes from :mod:`poetgen.poetry.forms` and is the *modern-Mandarin approximation*
(pypinyin readings, tones 1-2 level, the 14 groups of 中华新韵), not the Middle Chinese of the Tang poets: the old
entering tone (入声) is lost, so even real Tang poems do not score 100% here.

Definitions (rates are shares in [0, 1]):

* **format**: the poem's form is the declared one (``--form``, or a record's ``form`` field), else the form
  ``detect_form`` infers. A poem complies when it is *in form* (``poetry.forms.form_problems``: that form's lines of
  Han characters, each followed by one mark, ，；：？！ after odd lines and 。？！ after even ones). A poem with no
  declared form and none that can be inferred does not comply.
* **regular poems**: those whose lines (text between punctuation) have the form's count and length, punctuation
  aside. Rhyme and tones are measured on these only, and their number is reported.
* **rhyme**: the last characters of all even lines share a level rhyme group (``poetry.rhymes``).
* **tones (平仄)**: each line is compared with the regulated-verse patterns built from the four basic five-character
  lines A 仄仄平平仄, B 平平仄仄平, C 平平平仄仄, D 仄仄仄平平 (seven-character lines put the two opposite tones in front,
  e.g. A7 平平仄仄平平仄). A quatrain is A B C D or C D A B (the 律诗 repeats it); when the first line rhymes
  (首句入韵) it takes the level-ending line instead: D B C D or B D A B. The four patterns per form are named by
  the tone of the first line's second character (平起 / 仄起) and 首句入韵 / 首句不入韵. Two figures, both for the
  pattern that fits best (first by the 2-4-6 figure, then the full one): ``tone_246`` — agreement at positions
  2, 4 (and 6) of each line, where the rule is strict (一三五不论，二四六分明); ``tone_full`` — agreement at every
  position. Characters without a reading are left out of both.
* **copy**: a line (of 4 or more characters) is copied when it occurs as a whole line in the training text; a
  7-gram is any 7 consecutive symbols of the poem, punctuation included, and is copied when the training text
  holds it (within one document).
* **distinct-1 / distinct-2**: distinct Han characters / all Han characters, and distinct adjacent pairs within
  lines / all such pairs, over all poems together.
* **repeated characters**: the share of a poem's Han characters that already occurred earlier in the same poem,
  over all poems together.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path


from poetgen.errors import CorpusError, PoetgenError
from poetgen.poetry.forms import (
    FORMS, Form, detect_form, form_problems, is_han, is_level, parse_form, rhymes, split_lines,
)
from poetgen.data.copies import MIN_COPY_LINE, NGRAM, TrainingIndex  # noqa: F401  (re-exported)

LEVEL, OBLIQUE = "平", "仄"

# --- tone patterns --------------------------------------------------------------------------------------------

_BASE5 = {"A": "仄仄平平仄", "B": "平平仄仄平", "C": "平平平仄仄", "D": "仄仄仄平平"}
_CYCLES = (("A", "B", "C", "D"), ("C", "D", "A", "B"))
_RHYMING_FIRST = {"A": "D", "C": "B"}  # the first line, when it rhymes, ends level instead


def _line_pattern(name: str, chars: int) -> str:
    five = _BASE5[name]
    if chars == 5:
        return five
    flip = {LEVEL: OBLIQUE, OBLIQUE: LEVEL}
    return flip[five[0]] * 2 + five


@dataclass(frozen=True)
class TonePattern:
    name: str  # e.g. "仄起首句不入韵"
    lines: tuple[str, ...]  # one 平/仄 string per line


def tone_patterns(form: Form | str) -> list[TonePattern]:
    """The four standard patterns of a regulated form (平起 / 仄起 x 首句入韵 / 不入韵)."""
    form = parse_form(form) if isinstance(form, str) else form
    out = []
    for cycle in _CYCLES:
        for first_rhymes in (False, True):
            names = list(cycle) * (form.lines // 4)
            if first_rhymes:
                names[0] = _RHYMING_FIRST[names[0]]
            lines = tuple(_line_pattern(n, form.chars) for n in names)
            start = "平起" if lines[0][1] == LEVEL else "仄起"
            out.append(TonePattern(f"{start}首句{'入韵' if first_rhymes else '不入韵'}", lines))
    return out


def tones(line: str) -> str:
    """平 / 仄 per character (modern Mandarin reading), ? for a character without a reading."""
    from poetgen.poetry.forms import readings

    return "".join((LEVEL if is_level(c) else OBLIQUE) if readings(c) else "?" for c in line)


@dataclass
class ToneMatch:
    pattern: str
    agree_246: float
    agree_full: float
    checked_246: int
    checked_full: int


def match_tones(lines: Sequence[str], form: Form | str) -> ToneMatch:
    """The best-fitting standard pattern for ``lines`` (already of the form's shape) and its agreement."""
    form = parse_form(form) if isinstance(form, str) else form
    actual = [tones(line) for line in lines]
    strict = set(range(1, form.chars - 1, 2))  # 0-based 1, 3 (5) for 五言; 1, 3, 5 for 七言
    best: ToneMatch | None = None
    for p in tone_patterns(form):
        hit246 = n246 = hit = n = 0
        for got, want in zip(actual, p.lines):
            for i, (g, w) in enumerate(zip(got, want)):
                if g == "?":
                    continue
                n += 1
                hit += g == w
                if i in strict:
                    n246 += 1
                    hit246 += g == w
        m = ToneMatch(p.name, hit246 / n246 if n246 else 0.0, hit / n if n else 0.0, n246, n)
        if best is None or (m.agree_246, m.agree_full) > (best.agree_246, best.agree_full):
            best = m
    assert best is not None
    return best


# --- one poem ---------------------------------------------------------------------------------------------------


@dataclass
class Poem:
    text: str
    form: str | None = None  # declared form, if any


@dataclass
class PoemCheck:
    form: str | None  # declared, else inferred, else None
    declared: bool
    format_ok: bool
    problems: list[str]
    regular: bool  # lines fit the form, punctuation aside
    rhymes: bool | None  # None when not regular
    tone: ToneMatch | None


def measure_poem(poem: Poem | str) -> PoemCheck:
    poem = Poem(poem) if isinstance(poem, str) else poem
    declared = poem.form is not None
    name = parse_form(poem.form).name if declared else detect_form(poem.text)  # type: ignore[arg-type]
    if name is None:
        return PoemCheck(None, False, False, ["not in a regular form (4 or 8 lines of 5 or 7)"], False, None, None)
    form = FORMS[name]
    problems = form_problems(poem.text, form)
    lines = split_lines("".join(poem.text.split()))
    regular = len(lines) == form.lines and all(len(x) == form.chars and all(map(is_han, x)) for x in lines)
    if not regular:
        return PoemCheck(name, declared, False, problems, False, None, None)
    return PoemCheck(name, declared, not problems, problems, True, rhymes([x[-1] for x in lines[1::2]]),
                     match_tones(lines, form))


# --- copying from the training text -----------------------------------------------------------------------------

# --- all poems ----------------------------------------------------------------------------------------------------


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@dataclass
class PoemReport:
    poems: int
    forms: dict[str, int]  # declared or inferred form -> poems; "none" for no form
    format_rate: float
    regular: int  # poems whose lines fit their form: rhyme and tones are measured on these
    rhyme_rate: float | None
    tone_246: float | None  # mean per poem
    tone_full: float | None
    tone_perfect_rate: float | None  # poems whose 2-4-6 positions all fit their best pattern
    patterns: dict[str, int]
    copy_line_rate: float | None  # None without a training index
    copy_lines_checked: int
    copy_ngram_rate: float | None
    copy_ngrams_checked: int
    distinct_1: float | None
    distinct_2: float | None
    repeated_char_rate: float | None
    examples: list[dict] = field(default_factory=list)  # a few failing poems with their problems

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_poems(poems: Iterable[Poem | str], index: TrainingIndex | None = None, examples: int = 3) -> PoemReport:
    poems = [Poem(p) if isinstance(p, str) else p for p in poems]
    forms: Counter = Counter()
    patterns: Counter = Counter()
    ok = regular = rhymed = perfect = 0
    t246: list[float] = []
    tfull: list[float] = []
    copied_l = checked_l = copied_n = checked_n = 0
    chars: Counter = Counter()
    pairs: Counter = Counter()
    n_chars = n_pairs = repeats = 0
    failures = []
    for poem in poems:
        c = measure_poem(poem)
        forms[c.form or "none"] += 1
        ok += c.format_ok
        if not c.format_ok and len(failures) < examples:
            failures.append({"text": poem.text, "form": c.form, "problems": c.problems})
        if c.regular:
            regular += 1
            rhymed += bool(c.rhymes)
            assert c.tone is not None
            patterns[c.tone.pattern] += 1
            t246.append(c.tone.agree_246)
            tfull.append(c.tone.agree_full)
            perfect += c.tone.checked_246 > 0 and c.tone.agree_246 == 1.0
        if index is not None:
            a, b = index.copied_lines(poem.text)
            copied_l, checked_l = copied_l + a, checked_l + b
            a, b = index.copied_ngrams(poem.text)
            copied_n, checked_n = copied_n + a, checked_n + b
        seen: set[str] = set()
        for line in split_lines(poem.text):
            han = [ch for ch in line if is_han(ch)]
            for ch in han:
                repeats += ch in seen
                seen.add(ch)
            chars.update(han)
            n_chars += len(han)
            pairs.update(zip(han, han[1:]))
            n_pairs += max(len(han) - 1, 0)
    n = len(poems)
    return PoemReport(
        poems=n,
        forms=dict(forms.most_common()),
        format_rate=ok / n if n else 0.0,
        regular=regular,
        rhyme_rate=rhymed / regular if regular else None,
        tone_246=_mean(t246),
        tone_full=_mean(tfull),
        tone_perfect_rate=perfect / regular if regular else None,
        patterns=dict(patterns.most_common()),
        copy_line_rate=(copied_l / checked_l if checked_l else 0.0) if index is not None else None,
        copy_lines_checked=checked_l,
        copy_ngram_rate=(copied_n / checked_n if checked_n else 0.0) if index is not None else None,
        copy_ngrams_checked=checked_n,
        distinct_1=len(chars) / n_chars if n_chars else None,
        distinct_2=len(pairs) / n_pairs if n_pairs else None,
        repeated_char_rate=repeats / n_chars if n_chars else None,
        examples=failures,
    )


def read_poems(path: str | Path) -> list[Poem]:
    """Poems from a JSON Lines file: records with ``paragraphs`` (a list of lines, as in chinese-poetry) or
    ``text`` (as `poetgen sample --json` writes), and an optional ``form``; a plain JSON string is a poem too.
    Read by poetgen.data.corpus, as `prepare` and `eval --data` read JSON Lines (encodings, errors with the line)."""
    from poetgen.data.corpus import ReadOptions, SourceFile, inspect, read_pieces

    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"poems file not found: {p}")
    source = SourceFile(p, str(p), "jsonl", size=p.stat().st_size)
    inspect(source)
    poems = []
    for piece in read_pieces(source, ReadOptions(format="jsonl")):
        form = piece.form
        if form is not None and not isinstance(form, str):
            raise CorpusError(f"{piece.where}: 'form' must be a string")
        if form:
            try:
                form = parse_form(form).name
            except PoetgenError as e:
                raise CorpusError(f"{piece.where}: {e}") from None
        poems.append(Poem(piece.text, form or None))
    if not poems:
        raise CorpusError(f"{p} holds no poems")
    return poems
