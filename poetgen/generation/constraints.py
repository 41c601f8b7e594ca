"""The automaton that makes sampling obey a poem's form, acrostic, rhyme and tone pattern: boolean masks over the
vocabulary, precomputed per position, so the rule holds at any temperature and with any truncation (top-k, top-p).

``FormConstraint`` is the reference, one sample at a time; ``BatchConstraint`` steps the same masks for a whole
batch (numpy arrays, one row per active sample). What the rules are (forms, rhyme books, tone patterns) is
poetgen.poetry's (``forms`` and ``prosody``).

State of a sample: its position, the set of rhyme groups still open (a bit set over the book's level groups: 30 in
the 平水韵, 14 in 中华新韵) and, with ``tones``, the set of tone patterns still consistent with what was drawn (a bit
set over the form's four patterns; without ``tones`` one pattern that leaves every tone free).

What may come next, for a state (pos p, patterns S, groups G): the union over the patterns k in S of

    table[p] & tone mask of k at p               (& a character of a group in G, where p is a rhyme position of k)

Rhyme positions are the ends of the even lines, and the end of the first line for the patterns that rhyme it
(首句入韵). There, under a pattern that does not rhyme the first line, only characters that cannot be level may
stand: a character that can be either (看, 思) would leave the poem's pattern ambiguous.

Never a dead end (proved by tests/test_constraints.py), because the choices are planned up front:

* G starts as the groups with at least one character of the vocabulary (or the one ``rhyme_group`` asks for, if
  it has one) and only narrows to groups of the character drawn, so every group in G always has a character;
  rhyme positions require 平 in every pattern, and members of level groups can be level.
* S starts as the patterns whose every position has an allowed character in this vocabulary (and that fit the
  acrostic), and narrows to the patterns the drawn character fits, which are never none.
So each step's mask has a character: the one any remaining pattern and group allows.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from poetgen.data.vocab import EOT_ID, Vocab, format_symbols
from poetgen.errors import SampleError
from poetgen.poetry.forms import COMMA, PERIOD, Form, is_han, parse_form

# tone codes of a (pattern, position): what a character must be able to be there
# Tone requirement codes of the mask tables (prosody's FREE / LEVEL / OBLIQUE are its template's strings).
CODE_FREE, CODE_LEVEL, CODE_OBLIQUE, CODE_OBLIQUE_ONLY = 0, 1, 2, 3
_CODE = {None: CODE_FREE, "平": CODE_LEVEL, "仄": CODE_OBLIQUE}


@functools.lru_cache(maxsize=4)
def _vocab_prosody(symbols: tuple[str, ...], book: str):
    """VocabProsody, once per vocabulary and book: a 6,000-symbol lookup is worth keeping between calls."""
    from poetgen.poetry.prosody import VocabProsody

    return VocabProsody(symbols, book)


# --- the constraint automaton ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConstraintState:
    pos: int = 0  # symbols of the poem so far (punctuation included); lines * (chars + 1) + 1 once ended
    groups: int = 0  # bit set over the book's level rhyme groups the next rhyme may use (0 without rhyme)
    patterns: int = 1  # bit set over the tone patterns still possible (one free pattern without tones)


class FormConstraint:
    """Which symbol may come next in a poem of ``lines`` x ``chars``, as precomputed boolean masks over the vocabulary.

    ``form`` fixes lines and chars; an ``acrostic`` fixes the first character of each line (and the line count
    when there is no form; lines then have ``line_length`` characters, 7 by default). ``rhyme``: the even lines
    end in level characters of one group of ``rhyme_book`` (``pingshui`` or ``xinyun``), ``rhyme_group`` if given,
    else the group of the first rhyme drawn. ``tones``: the poem follows one of the four regulated patterns of its
    form (``pattern``: that one), positions as ``prosody.TonePattern.template`` says. The masks are numpy arrays so
    that a batched sampler can index them by position:

        ``table``       (P + 2, V) bool    structure: allowed ids at each position; rows P and P + 1 allow only <eot>
        ``rows``        (R, V) bool        distinct masks; ``index[S, p]`` is the row for patterns S at position p
        ``fits``        (P + 2, V) uint8   patterns each id fits at each position (bit set)
        ``rhyme_bits``  (P + 2,) uint8     patterns for which the position is a rhyme position
        ``char_groups`` (V,) int64         level rhyme groups of each id as a bit set (0: cannot rhyme)

    The per-sample API (``start``/``allowed``/``advance``/``done``) is the reference the batched sampler follows.
    """

    def __init__(
        self,
        vocab: Vocab,
        form: str | Form | None = None,
        acrostic: str | None = None,
        rhyme: bool = False,
        line_length: int | None = None,
        *,
        rhyme_book: str = "pingshui",
        rhyme_group: str | None = None,
        tones: bool = False,
        pattern: str | None = None,
    ):
        if form is None and not acrostic:
            raise SampleError("a poem constraint needs a form or an acrostic")
        self.vocab = vocab
        self.form = parse_form(form) if isinstance(form, str) else form
        self.acrostic = acrostic or None
        if rhyme_group is not None and not rhyme:
            raise SampleError("--rhyme-group applies to --rhyme")  # the same rule as SampleOptions.validate
        if pattern is not None and not tones:
            raise SampleError("--pattern applies to --tones")
        self.rhyme, self.tones = rhyme, tones
        self.book_name = rhyme_book
        self.rhyme_group = rhyme_group
        self.pattern = pattern
        if self.form is not None:
            if line_length is not None and line_length != self.form.chars:
                raise SampleError(f"--line-length {line_length} contradicts the form {self.form.name}")
            self.lines, self.chars = self.form.lines, self.form.chars
            if self.acrostic is not None and len(self.acrostic) != self.lines:
                raise SampleError(
                    f"the acrostic {self.acrostic!r} has {len(self.acrostic)} characters but {self.form.name} "
                    f"has {self.lines} lines"
                )
        else:
            if line_length not in (None, 5, 7):
                raise SampleError(f"line length must be 5 or 7, not {line_length}")
            self.lines, self.chars = len(self.acrostic), line_length or 7  # type: ignore[arg-type]
        self.length = self.lines * (self.chars + 1)
        self._build()

    # --- masks ---
    def _build(self) -> None:
        vocab, V = self.vocab, len(self.vocab)
        symbols = vocab.symbols
        han = np.array([i >= 2 and is_han(s) for i, s in enumerate(symbols)], dtype=bool)
        if not han.any():
            raise SampleError("the model's vocabulary has no Han characters, so it cannot write a poem in form")
        missing = [p for p in (COMMA, PERIOD) if p not in vocab]
        if missing:
            raise SampleError(f"the model's vocabulary lacks {format_symbols(missing)}, needed for a poem in form")
        if self.acrostic is not None:
            bad = [c for c in self.acrostic if not is_han(c)]
            if bad:
                raise SampleError(f"acrostic characters must be Han characters: {format_symbols(bad)}")
            unknown = vocab.unknown(self.acrostic)
            if unknown:
                raise SampleError(f"acrostic character(s) not in the model's vocabulary: {format_symbols(unknown)}")

        P = self.length
        table = np.zeros((P + 2, V), dtype=bool)
        comma, period = vocab.id(COMMA), vocab.id(PERIOD)
        for p in range(P):
            line, col = divmod(p, self.chars + 1)
            if col == self.chars:
                table[p, comma if line % 2 == 0 and line != self.lines - 1 else period] = True
            elif col == 0 and self.acrostic is not None:
                table[p, vocab.id(self.acrostic[line])] = True
            else:
                table[p] = han
        table[P:, EOT_ID] = True
        self.table = table

        if self.rhyme or self.tones:
            from poetgen.poetry.prosody import rhyme_book

            self.book = rhyme_book(self.book_name)
            vp = _vocab_prosody(tuple(symbols), self.book.name)
            level, oblique = vp.level & han, vp.oblique & han
        else:
            self.book = None
            level = oblique = np.zeros(V, dtype=bool)
        # (4, V): what each tone code allows
        self.tone_masks = np.stack([np.ones(V, dtype=bool), level, oblique, oblique & ~level])

        self.patterns = self._patterns()
        K = len(self.patterns) if self.patterns else 1
        codes = np.zeros((K, P + 2), dtype=np.int8)  # (K, P + 2) tone code of each pattern at each position
        rhyme_bits = np.zeros(P + 2, dtype=np.uint8)
        for p in range(P):
            line, col = divmod(p, self.chars + 1)
            if col == self.chars:
                continue
            for k in range(K):
                if self.patterns:
                    codes[k, p] = _CODE[self.patterns[k].required(line, col)]
                    first_rhymes = self.patterns[k].first_rhymes
                else:
                    first_rhymes = False
                if self.rhyme and col == self.chars - 1 and (line % 2 == 1 or (line == 0 and first_rhymes)):
                    rhyme_bits[p] |= 1 << k
                elif self.rhyme and self.patterns and line == 0 and col == self.chars - 1:
                    codes[k, p] = CODE_OBLIQUE_ONLY  # an ambiguous 看 here could read as a rhyme: see the module doc
        self.codes, self.rhyme_bits = codes, rhyme_bits
        fits = np.zeros((P + 2, V), dtype=np.uint8)
        for k in range(K):
            fits |= self.tone_masks[codes[k]].astype(np.uint8) << k
        self.fits = fits

        char_groups = np.zeros(V, dtype=np.int64)
        self.group_list: tuple = ()
        start_groups = 0
        if self.rhyme:
            self.group_list = tuple(g for g in self.book.all_groups() if g.level)
            bit = {g: 1 << i for i, g in enumerate(self.group_list)}
            for g, ids in vp.groups.items():
                char_groups[ids] |= bit[g]
            char_groups[~level] = 0
            start_groups = int(np.bitwise_or.reduce(char_groups))
            if not start_groups:
                raise SampleError(f"--rhyme: no character of the model's vocabulary is level with a rhyme group in "
                                  f"the {self.book.name} book ({self.book.description})")
            if self.rhyme_group is not None:
                g = self.book.group(self.rhyme_group)
                if not g.level:
                    raise SampleError(f"--rhyme-group {self.rhyme_group}: {g.label} is an oblique group; level groups: "
                                      f"{' '.join(self.book.level_group_names())}")
                if not start_groups & bit[g]:
                    raise SampleError(f"--rhyme-group {self.rhyme_group}: the model's vocabulary has no character of "
                                      f"{g.label}")
                start_groups = bit[g]
        self.char_groups = char_groups
        self.start_groups = start_groups
        self.start_patterns = self._start_patterns(K)
        self._index_rows(K)

    def _patterns(self) -> tuple:
        if not self.tones:
            return ()
        from poetgen.poetry.prosody import FORM_SHAPES, tone_pattern, tone_patterns

        name = next((f for f, shape in FORM_SHAPES.items() if shape == (self.lines, self.chars)), None)
        if name is None:
            raise SampleError(f"--tones needs a regulated form (五绝 七绝 五律 七律), not {self.lines} lines of "
                              f"{self.chars} characters")
        if self.pattern is not None:
            return (tone_pattern(name, self.pattern),)
        return tone_patterns(name)

    def _start_patterns(self, K: int) -> int:
        """The patterns a sample may follow: all K, less those this vocabulary cannot fill at some position and
        those the acrostic breaks; SampleError when none is left."""
        usable = (1 << K) - 1
        if not self.patterns:
            return usable
        P = self.length
        for k in range(K):
            rows = self.table[:P] & self.tone_masks[self.codes[k, :P]]  # (P, V)
            rhyming = (self.rhyme_bits[:P] >> k) & 1 == 1
            rows[rhyming] &= (self.char_groups[None, :] & self.start_groups) != 0
            empty = [p for p in range(P) if not rows[p].any()]
            if empty:
                usable &= ~(1 << k)
                line, col = divmod(empty[0], self.chars + 1)
                if self.acrostic is not None and col == 0:
                    continue  # said below, with every pattern
                if self.pattern is not None:
                    raise SampleError(f"--pattern {self.pattern}: no character of the model's vocabulary can stand at "
                                      f"line {line + 1}, character {col + 1} ({self._need(k, empty[0])})")
        if usable:
            return usable
        if self.acrostic is not None:
            why = []
            for k in range(K):
                for i, ch in enumerate(self.acrostic):
                    p = i * (self.chars + 1)
                    if not self.fits[p, self.vocab.id(ch)] >> k & 1:
                        why.append(f"{self.patterns[k].name} needs {self._need(k, p)} at line {i + 1}, character 1 "
                                   f"where the acrostic has {ch} ({self._tones_of(ch)})")
                        break
            if len(why) == K:
                raise SampleError(f"--tones: the acrostic {self.acrostic!r} fits no tone pattern of "
                                  f"{self.patterns[0].form}: " + "; ".join(why))
        raise SampleError(f"--tones: the model's vocabulary cannot fill any tone pattern of {self.patterns[0].form} "
                          "(it lacks level or oblique characters)")

    def _index_rows(self, K: int) -> None:
        """``rows`` (R, V): the distinct masks table[p] & (union over S of the tone masks); ``index`` (2**K, P + 2)."""
        P2 = self.length + 2
        kinds: dict[bytes, int] = {}  # distinct structure rows (Han, ，, 。, <eot>, an acrostic character)
        kind = [kinds.setdefault(self.table[p].tobytes(), len(kinds)) for p in range(P2)]
        rows: dict[tuple, int] = {}
        mats: list[np.ndarray] = []
        index = np.zeros((1 << K, P2), dtype=np.intp)
        for S in range(1 << K):
            for p in range(P2):
                codes = tuple(sorted({int(self.codes[k, p]) for k in range(K) if S >> k & 1}))
                key = (kind[p], codes)
                if key not in rows:
                    m = np.zeros(len(self.vocab), dtype=bool)
                    for c in codes:
                        m |= self.tone_masks[c]
                    rows[key] = len(mats)
                    mats.append(m & self.table[p])
                index[S, p] = rows[key]
        self.rows, self.index = np.stack(mats), index

    # --- one sample ---
    def start(self) -> ConstraintState:
        return ConstraintState(0, self.start_groups, self.start_patterns)

    def allowed(self, state: ConstraintState) -> np.ndarray:
        """(V,) bool: the ids that may come next (the union, over the patterns still possible, of what each allows)."""
        p = min(state.pos, self.length + 1)
        out = np.zeros(len(self.vocab), dtype=bool)
        for k in range(self.codes.shape[0]):
            if state.patterns >> k & 1:
                m = self.table[p] & self.tone_masks[self.codes[k, p]]
                if self.rhyme_bits[p] >> k & 1:
                    m = m & ((self.char_groups & state.groups) != 0)
                out |= m
        return out

    def advance(self, state: ConstraintState, token: int) -> ConstraintState:
        """The state after ``token``; SampleError, saying where and why, if the constraint forbids it."""
        p = min(state.pos, self.length + 1)
        if not self.allowed(state)[token]:
            raise SampleError(self._why(state, token))
        fit = state.patterns & int(self.fits[p, token])
        rs = int(self.rhyme_bits[p])
        groups = state.groups
        rhyming = fit & rs if int(self.char_groups[token]) & groups else 0
        if rhyming:
            patterns, groups = rhyming, groups & int(self.char_groups[token])
        else:
            patterns = fit & ~rs
        return ConstraintState(min(state.pos + 1, self.length + 1), groups, patterns)

    def done(self, state: ConstraintState) -> bool:
        """True once the poem has ended (the end-of-text symbol came after the last line)."""
        return state.pos > self.length

    # --- messages ---
    def _tones_of(self, ch: str) -> str:
        t = self.book.tones(ch) if self.book is not None else frozenset()
        return "/".join(sorted(t)) if t else f"no tone in the {self.book_name} book"

    def _need(self, k: int, p: int) -> str:
        return {CODE_FREE: "any character", CODE_LEVEL: "平", CODE_OBLIQUE: "仄",
                CODE_OBLIQUE_ONLY: "仄 (not 平: the first line does "
                "not rhyme)"}[int(self.codes[k, p])]

    def _why(self, state: ConstraintState, token: int) -> str:
        p = min(state.pos, self.length + 1)
        ch = self.vocab.decode([token], eot="<eot>")
        line, col = divmod(p, self.chars + 1)
        where = f"line {line + 1}, character {col + 1}" if p < self.length and col < self.chars else \
            f"position {p + 1}"
        if not self.table[p, token]:
            return (f"{ch!r} cannot stand at position {p + 1} ({where}) of a poem of {self.lines} lines of "
                    f"{self.chars} characters{self._describe()}")
        live = [k for k in range(self.codes.shape[0]) if state.patterns >> k & 1]
        if self.patterns and not any(self.fits[p, token] >> k & 1 for k in live):
            needs = "; ".join(f"{self.patterns[k].name} needs {self._need(k, p)}" for k in live)
            return f"{ch!r} ({self._tones_of(ch)}) at {where} breaks the tone pattern: {needs}"
        open_groups = [g.label for i, g in enumerate(self.group_list) if state.groups >> i & 1]
        shown = " ".join(open_groups) if len(open_groups) <= 6 else f"{len(open_groups)} groups"
        return (f"{ch!r} at {where} does not rhyme: the rhyme needs a level character of {shown} "
                f"({self.book_name}); {ch!r} is {self._tones_of(ch)}")

    def _describe(self) -> str:
        parts = []
        if self.acrostic:
            parts.append(f"acrostic {self.acrostic!r}")
        if self.rhyme:
            parts.append(f"rhyme ({self.book_name}{', ' + self.rhyme_group if self.rhyme_group else ''})")
        if self.tones:
            parts.append(f"tones ({self.pattern or 'any regulated pattern'})")
        return f" ({', '.join(parts)})" if parts else ""

    def describe(self) -> str:
        name = self.form.name if self.form else f"{self.lines} lines of {self.chars}"
        return name + self._describe()


class BatchConstraint:
    """FormConstraint's masks stepped for a whole batch at once (numpy arrays, rows = active samples).

    ``allowed()`` -> (B, V) bool for the current rows; ``advance(tokens (B,))`` moves every row by its token;
    ``keep(index)`` keeps (or repeats) rows. Away from rhyme positions a step is one gather of precomputed masks."""

    def __init__(self, c: FormConstraint, states: list[ConstraintState]):
        self.rows, self.index = c.rows, c.index  # (R, V) bool, (2**K, P + 2) row ids
        self.table, self.tone_masks, self.codes = c.table, c.tone_masks, c.codes
        self.fits = c.fits  # (P + 2, V) uint8
        self.rhyme_bits = c.rhyme_bits.astype(np.int64)  # (P + 2,)
        self.char_groups = c.char_groups  # (V,) int64 bit sets
        self.rhyme = c.rhyme
        self.last = c.length + 1
        self.pos = np.array([s.pos for s in states], dtype=np.intp)  # (B,)
        self.groups = np.array([s.groups for s in states], dtype=np.int64)  # (B,)
        self.patterns = np.array([s.patterns for s in states], dtype=np.int64)  # (B,)

    def allowed(self) -> np.ndarray:
        allowed = self.rows[self.index[self.patterns, self.pos]]  # (B, V)
        if self.rhyme:
            rs = self.rhyme_bits[self.pos] & self.patterns  # (B,) patterns that rhyme here
            at = np.flatnonzero(rs)
            if len(at):
                pos = self.pos[at]
                ingroup = (self.char_groups[None, :] & self.groups[at, None]) != 0  # (b, V)
                rhyming = self.rows[self.index[rs[at], pos]] & ingroup
                free = self.rows[self.index[self.patterns[at] & ~self.rhyme_bits[pos], pos]]  # index[0] is empty
                allowed[at] = rhyming | free
        return allowed

    def advance(self, token: np.ndarray) -> None:
        fit = self.patterns & self.fits[self.pos, token]  # (B,)
        if self.rhyme:
            rs = self.rhyme_bits[self.pos]
            cg = self.char_groups[token]
            rhyming = np.where((cg & self.groups) != 0, fit & rs, 0)
            self.groups = np.where(rhyming != 0, self.groups & cg, self.groups)
            fit = np.where(rhyming != 0, rhyming, fit & ~rs)
        self.patterns = fit
        self.pos = np.minimum(self.pos + 1, self.last)

    def keep(self, index: np.ndarray) -> None:
        self.pos, self.groups, self.patterns = self.pos[index], self.groups[index], self.patterns[index]

    @classmethod
    def joined(cls, parts: Sequence[BatchConstraint]) -> BatchConstraint:
        """The rows of ``parts`` (BatchConstraints of one FormConstraint) as one, in that order, so that
        ``allowed()`` and ``advance`` run once for all (a server's many one-row requests: one numpy call each
        instead of one per request); ``split(parts)`` hands each part its rows back."""
        first = parts[0]
        if any(p.rows is not first.rows for p in parts):
            raise ValueError("BatchConstraints of different FormConstraints cannot be joined")
        if len(parts) == 1:
            return first  # (split then has nothing to do)
        out = copy.copy(first)
        out.pos = np.concatenate([p.pos for p in parts])
        out.groups = np.concatenate([p.groups for p in parts])
        out.patterns = np.concatenate([p.patterns for p in parts])
        return out

    def split(self, parts: Sequence[BatchConstraint]) -> None:
        """Each of ``parts`` (what this one was ``joined`` from) takes its rows of this one's state."""
        if len(parts) == 1 and parts[0] is self:
            return
        at = 0
        for p in parts:
            end = at + len(p.pos)
            p.pos, p.groups, p.patterns = self.pos[at:end], self.groups[at:end], self.patterns[at:end]
            at = end
