"""The character vocabulary: symbols ordered by frequency, with two special symbols first.

Id 0 is the end-of-text symbol (every document ends in it, so models learn to stop) and id 1 is `<unk>`, which
stands for every symbol the vocabulary dropped (``min_count``) or never saw. Every other symbol is one Unicode
character. The vocabulary travels inside datasets (``vocab.json``) and checkpoints, so nothing else is needed to
encode a prompt or decode a sample.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from poetgen.errors import VocabError

EOT = "<eot>"
UNK = "<unk>"
SPECIALS = (EOT, UNK)
EOT_ID = 0
UNK_ID = 1
FORMAT = "poetgen-vocab"
FORMAT_VERSION = 1


class Vocab:
    """An ordered list of symbols: ``[EOT, UNK, *characters]``, characters by descending frequency."""

    def __init__(self, symbols: Sequence[str], counts: Sequence[int] | None = None):
        symbols = list(symbols)
        if symbols[:2] != list(SPECIALS):
            raise VocabError(f"a vocabulary must start with {EOT} and {UNK}, got {symbols[:2]!r}")
        for s in symbols[2:]:
            if not isinstance(s, str) or len(s) != 1:
                raise VocabError(f"vocabulary symbols must be single characters, got {s!r}")
        if len(set(symbols)) != len(symbols):
            raise VocabError("vocabulary has repeated symbols")
        if counts is not None and len(counts) != len(symbols):
            raise VocabError(f"vocabulary has {len(symbols)} symbols but {len(counts)} counts")
        self.symbols: list[str] = symbols
        self.counts: list[int] | None = [int(c) for c in counts] if counts is not None else None
        self._index = {s: i for i, s in enumerate(symbols)}

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_count: int = 1, eot_count: int = 0) -> Vocab:
        """Build from character counts. Symbols seen fewer than ``min_count`` times become ``<unk>``.

        Order: descending count, ties broken by code point, so the same counts always give the same vocabulary.
        """
        if min_count < 1:
            raise VocabError(f"min_count must be at least 1, got {min_count}")
        kept = sorted(((c, n) for c, n in counts.items() if n >= min_count), key=lambda cn: (-cn[1], ord(cn[0])))
        unk_count = sum(n for n in counts.values() if n < min_count)
        symbols = [EOT, UNK] + [c for c, _ in kept]
        return cls(symbols, [eot_count, unk_count] + [n for _, n in kept])

    # --- basic protocol ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.symbols == other.symbols

    def __repr__(self) -> str:
        return f"Vocab({len(self)} symbols)"

    @property
    def eot_id(self) -> int:
        return EOT_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    def id(self, symbol: str) -> int:
        try:
            return self._index[symbol]
        except KeyError:
            raise VocabError(f"symbol {symbol!r} is not in the vocabulary") from None

    def dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds every id (uint16 up to 65,536 symbols)."""
        return np.dtype(np.uint16) if len(self) <= 1 << 16 else np.dtype(np.uint32)

    # --- encoding ------------------------------------------------------------------------------------------
    def unknown(self, text: str) -> list[str]:
        """The distinct characters of ``text`` not in the vocabulary, in order of first appearance."""
        seen: dict[str, None] = {}
        for ch in text:
            if ch not in self._index:
                seen.setdefault(ch, None)
        return list(seen)

    def encode(self, text: str, on_unknown: str = "error") -> list[int]:
        """Map characters to ids.

        ``on_unknown``: ``"error"`` raises VocabError naming every unknown character; ``"unk"`` maps them to
        ``<unk>``; ``"skip"`` drops them.
        """
        if on_unknown not in ("error", "unk", "skip"):
            raise ValueError(f"on_unknown must be 'error', 'unk' or 'skip', not {on_unknown!r}")
        index = self._index
        if on_unknown == "error":
            missing = self.unknown(text)
            if missing:
                raise VocabError(
                    f"{len(missing)} character(s) not in the model's vocabulary: {format_symbols(missing)}"
                )
            return [index[ch] for ch in text]
        if on_unknown == "unk":
            return [index.get(ch, UNK_ID) for ch in text]
        return [index[ch] for ch in text if ch in index]

    def lookup_table(self, max_codepoint: int = 0x110000) -> np.ndarray:
        """A code point -> id table (unknown code points map to ``<unk>``) for vectorised encoding."""
        table = np.full(max_codepoint + 1, UNK_ID, dtype=np.uint32)
        for i, s in enumerate(self.symbols[2:], start=2):
            table[ord(s)] = i
        return table

    def decode(self, ids: Iterable[int], eot: str = "\n", unk: str = "\ufffd") -> str:
        """Map ids back to text; the end-of-text symbol becomes ``eot`` and ``<unk>`` becomes ``unk``."""
        out = []
        n = len(self.symbols)
        for i in ids:
            i = int(i)
            if i == EOT_ID:
                out.append(eot)
            elif i == UNK_ID:
                out.append(unk)
            elif 0 <= i < n:
                out.append(self.symbols[i])
            else:
                raise VocabError(f"id {i} is outside the vocabulary of {n} symbols")
        return "".join(out)

    # --- (de)serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d: dict = {"format": FORMAT, "format_version": FORMAT_VERSION, "symbols": self.symbols}
        if self.counts is not None:
            d["counts"] = self.counts
        return d

    @classmethod
    def from_dict(cls, d: object) -> Vocab:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise VocabError("not a poetgen vocabulary")
        version = d.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise VocabError(
                f"vocabulary format version {version!r} is newer than this poetgen understands ({FORMAT_VERSION})"
            )
        symbols = d.get("symbols")
        counts = d.get("counts")
        if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
            raise VocabError("vocabulary 'symbols' must be a list of strings")
        if counts is not None and (not isinstance(counts, list) or not all(isinstance(c, int) for c in counts)):
            raise VocabError("vocabulary 'counts' must be a list of integers")
        return cls(symbols, counts)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=0, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VocabError(f"vocabulary file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VocabError(f"cannot read vocabulary {path}: {e}") from None
        return cls.from_dict(d)


def format_symbols(symbols: Sequence[str], limit: int = 20) -> str:
    """Show characters so that invisible ones are visible: '床', 'U+0007', ... (at most ``limit``)."""
    shown = []
    for s in symbols[:limit]:
        shown.append(repr(s) if s.isprintable() and not s.isspace() else f"U+{ord(s):04X}")
    more = f" and {len(symbols) - limit} more" if len(symbols) > limit else ""
    return ", ".join(shown) + more
