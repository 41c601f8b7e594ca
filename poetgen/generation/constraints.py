"""The automaton that makes sampling obey a poem's form, acrostic and rhyme: boolean masks over the vocabulary,
precomputed per position, so the rule holds at any temperature and with any truncation (top-k, top-p).

``FormConstraint`` is the reference, one sample at a time; ``BatchConstraint`` steps the same masks for a whole
batch (numpy arrays, one row per active sample). What the rules are (forms, tones, rhyme groups) is poetgen.poetry's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from poetgen.data.vocab import EOT_ID, Vocab, format_symbols
from poetgen.errors import SampleError
from poetgen.poetry.forms import COMMA, GROUP_NAMES, PERIOD, Form, is_han, level_rhyme_groups, parse_form


def _group_bits(ch: str) -> int:
    bits = 0
    for g in level_rhyme_groups(ch):
        bits |= 1 << GROUP_NAMES.index(g)
    return bits


ALL_GROUPS = (1 << len(GROUP_NAMES)) - 1  # every rhyme group still open


# --- the constraint automaton ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConstraintState:
    pos: int = 0  # symbols of the poem so far (punctuation included); lines * (chars + 1) + 1 once ended
    groups: int = ALL_GROUPS  # bit set over GROUP_NAMES: rhyme groups the next even-line end may use


class FormConstraint:
    """Which symbol may come next in a poem of ``lines`` x ``chars``, as precomputed boolean masks over the vocabulary.

    ``form`` fixes lines and chars; an ``acrostic`` fixes the first character of each line (and the line count
    when there is no form; lines then have ``line_length`` characters, 7 by default). The masks are numpy arrays so
    that a batched sampler can move them to any tensor library once and index them by position:

        ``table``      (P + 2, V) bool   allowed ids at each position; rows P and P + 1 allow only <eot>
        ``rhyme_pos``  (P + 2,) bool     positions of even-line ends (where the rhyme mask applies)
        ``char_groups`` (V,) int64        level rhyme groups of each id as a bit set (0: cannot end an even line)

    The per-sample API (``start``/``allowed``/``advance``/``done``) is the reference the batched sampler follows.
    """

    def __init__(
        self,
        vocab: Vocab,
        form: str | Form | None = None,
        acrostic: str | None = None,
        rhyme: bool = False,
        line_length: int | None = None,
    ):
        if form is None and not acrostic:
            raise SampleError("a poem constraint needs a form or an acrostic")
        self.vocab = vocab
        self.form = parse_form(form) if isinstance(form, str) else form
        self.acrostic = acrostic or None
        self.rhyme = rhyme
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
        rhyme_pos = np.zeros(P + 2, dtype=bool)
        comma, period = vocab.id(COMMA), vocab.id(PERIOD)
        for p in range(P):
            line, col = divmod(p, self.chars + 1)
            if col == self.chars:
                table[p, comma if line % 2 == 0 and line != self.lines - 1 else period] = True
            elif col == 0 and self.acrostic is not None:
                table[p, vocab.id(self.acrostic[line])] = True
            else:
                table[p] = han
            if self.rhyme and line % 2 == 1 and col == self.chars - 1:
                rhyme_pos[p] = True
        table[P:, EOT_ID] = True

        char_groups = np.zeros(V, dtype=np.int64)
        if self.rhyme:
            for i in np.flatnonzero(han):
                char_groups[i] = _group_bits(symbols[i])
            if not char_groups.any():
                raise SampleError("--rhyme: no character of the model's vocabulary has a level-toned reading")
        self.table, self.rhyme_pos, self.char_groups = table, rhyme_pos, char_groups

    # --- one sample ---
    def start(self) -> ConstraintState:
        return ConstraintState()

    def allowed(self, state: ConstraintState) -> np.ndarray:
        """(V,) bool: the ids that may come next."""
        p = min(state.pos, self.length + 1)
        mask = self.table[p]
        if self.rhyme_pos[p]:
            rhyming = mask & ((self.char_groups & state.groups) != 0)
            if rhyming.any():
                return rhyming
        return mask

    def advance(self, state: ConstraintState, token: int) -> ConstraintState:
        """The state after ``token``; SampleError if the constraint forbids it."""
        if not self.allowed(state)[token]:
            raise SampleError(
                f"{self.vocab.decode([token], eot='<eot>')!r} cannot stand at position {state.pos + 1} "
                f"of a poem of {self.lines} lines of {self.chars} characters{self._describe()}"
            )
        p = min(state.pos, self.length + 1)
        groups = state.groups
        if self.rhyme_pos[p] and groups & int(self.char_groups[token]):
            groups &= int(self.char_groups[token])
        return ConstraintState(min(state.pos + 1, self.length + 1), groups)

    def done(self, state: ConstraintState) -> bool:
        """True once the poem has ended (the end-of-text symbol came after the last line)."""
        return state.pos > self.length

    def _describe(self) -> str:
        parts = []
        if self.acrostic:
            parts.append(f"acrostic {self.acrostic!r}")
        if self.rhyme:
            parts.append("rhyme")
        return f" ({', '.join(parts)})" if parts else ""

    def describe(self) -> str:
        name = self.form.name if self.form else f"{self.lines} lines of {self.chars}"
        return name + self._describe()


class BatchConstraint:
    """FormConstraint's masks stepped for a whole batch at once (numpy arrays, rows = active samples)."""

    def __init__(self, c: FormConstraint, states: list[ConstraintState]):
        self.table = c.table  # (P + 2, V) bool
        self.rhyme_pos = c.rhyme_pos  # (P + 2,) bool
        self.char_groups = c.char_groups  # (V,) int64 bit sets
        self.rhyme = c.rhyme
        self.last = c.length + 1
        self.pos = np.array([s.pos for s in states], dtype=np.intp)  # (B,)
        self.groups = np.array([s.groups for s in states], dtype=np.int64)  # (B,)
        self.at_rhyme: np.ndarray | None = None

    def allowed(self) -> np.ndarray:
        allowed = self.table[self.pos]  # (B, V)
        self.at_rhyme = None
        if self.rhyme:
            at = self.rhyme_pos[self.pos]  # (B,)
            if at.any():
                rhyming = allowed & ((self.char_groups[None, :] & self.groups[:, None]) != 0)  # (B, V)
                at = at & rhyming.any(1)  # an empty rhyme mask falls back to the plain one
                allowed = np.where(at[:, None], rhyming, allowed)
                self.at_rhyme = at
        return allowed

    def advance(self, token: np.ndarray) -> None:
        if self.at_rhyme is not None:
            self.groups = np.where(self.at_rhyme, self.groups & self.char_groups[token], self.groups)
        self.pos = np.minimum(self.pos + 1, self.last)

    def keep(self, index: np.ndarray) -> None:
        self.pos, self.groups = self.pos[index], self.groups[index]
