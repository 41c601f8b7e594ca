"""Poem metrics: is it in form, does it rhyme, does it follow the tone patterns, is it copied, is it varied.

Tones and rhymes are read in a rhyme book of :mod:`poetgen.poetry.prosody` and judged by its checker
(``check_prosody``): ``pingshui`` (the default: the 平水韵 of Tang verse, 上/去/入 oblique) or ``xinyun`` (中华新韵 by
modern Mandarin readings, where the old entering tone reads as level, so real Tang poems score far lower).
Calibration on the 全唐诗 is in benchmarks/RESULTS.md ("Prosody calibration").

Definitions (rates are shares in [0, 1]):

* **format**: the poem's form is the declared one (``--form``, or a record's ``form`` field), else the form
  ``detect_form`` infers. A poem complies when it is *in form* (``poetry.forms.form_problems``: that form's lines of
  Han characters, each followed by one mark, ，；：？！ after odd lines and 。？！ after even ones). A poem with no
  declared form and none that can be inferred does not comply.
* **regular poems**: those whose lines (text between punctuation) have the form's count and length, punctuation
  aside. Rhyme and tones are measured on these only, and their number is reported.
* **rhyme** (``rhyme_rate``): the last characters of all even lines are level and share a level group of the book
  (the first line free, as ``sample --rhyme`` writes without ``--tones``).
* **tones (平仄)**, against the best-fitting of the form's four regulated patterns (``prosody.tone_patterns``:
  平起 / 仄起 x 首句入韵 / 首句不入韵; best first by the 2-4-6 figure, then the full one): ``tone_246`` — mean agreement
  at positions 2, 4 (and 6), where the rule is strict (一三五不论，二四六分明); ``tone_full`` — mean agreement at every
  position (full-pattern agreement); ``tone_perfect_rate`` / ``tone_full_perfect_rate`` — poems that fit at every
  2-4-6 position / at every position. A character that can take either tone fits both; characters the book does
  not know are left out.
* **粘对, 孤平, 三平尾** (``nian_dui_rate``, ``gu_ping_rate``, ``san_ping_wei_rate``): poems with a 失粘/失对 at the
  lines' second characters, with 孤平 in a level-ending line, with three level-only characters at a line's end.
* **regulated** (``regulated_rate``): rhymes (with the first line when the best pattern rhymes it), 2-4-6 all fit,
  and no 粘对, 孤平 or 三平尾 fault: a 律绝 / 律诗.
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
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from poetgen.data.copies import TrainingIndex
from poetgen.errors import CorpusError, PoetgenError
from poetgen.poetry.forms import FORMS, detect_form, form_problems, is_han, parse_form, split_lines

if TYPE_CHECKING:
    from poetgen.poetry.prosody import ProsodyCheck

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
    rhymes: bool | None  # even-line ends level and in one level group; None when not regular
    tone: ProsodyCheck | None  # poetry.prosody's check (best pattern, agreements, 粘对, 孤平, 三平尾)


def measure_poem(poem: Poem | str, book: str = "pingshui") -> PoemCheck:
    from poetgen.poetry.prosody import check_prosody, check_rhyme

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
    return PoemCheck(name, declared, not problems, problems, True, check_rhyme(lines, book, first=False).rhymes,
                     check_prosody(lines, book, name))


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
    book: str = "pingshui"  # the rhyme book tones and rhymes were measured by
    tone_full_perfect_rate: float | None = None  # poems whose every position fits their best pattern
    nian_dui_rate: float | None = None  # poems with a 粘/对 violation (second characters)
    gu_ping_rate: float | None = None  # poems with 孤平 in a line
    san_ping_wei_rate: float | None = None  # poems with 三平尾 in a line
    regulated_rate: float | None = None  # rhyme (first line too when the pattern rhymes it) and tones all regulated
    examples: list[dict] = field(default_factory=list)  # a few failing poems with their problems

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_poems(poems: Iterable[Poem | str], index: TrainingIndex | None = None, examples: int = 3,
                   book: str = "pingshui") -> PoemReport:
    """The metrics of ``poems``, tones and rhymes under ``book`` (``pingshui`` or ``xinyun``)."""
    poems = [Poem(p) if isinstance(p, str) else p for p in poems]
    full = nian_dui = gu_ping = san_ping_wei = regulated = 0
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
        c = measure_poem(poem, book)
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
            full += c.tone.checked_full > 0 and c.tone.agree_full == 1.0
            nian_dui += bool(c.tone.nian_dui)
            gu_ping += bool(c.tone.gu_ping)
            san_ping_wei += bool(c.tone.san_ping_wei)
            regulated += c.tone.regulated
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

    def share(k: int) -> float | None:
        return k / regular if regular else None

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
        book=book,
        tone_full_perfect_rate=share(full),
        nian_dui_rate=share(nian_dui),
        gu_ping_rate=share(gu_ping),
        san_ping_wei_rate=share(san_ping_wei),
        regulated_rate=share(regulated),
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
