"""An index of a training text's lines and 7-grams, to tell a copied line from a new one: what `eval` reports as
the copy rate and what `sample --best-of` drops candidates by. Lines are kept as a set of strings, 7-grams as a
sorted array of 64-bit hashes."""

from __future__ import annotations

import numpy as np

from poetgen.data.vocab import EOT_ID, UNK_ID, Vocab
from poetgen.poetry.forms import split_lines

MIN_COPY_LINE = 4  # shorter lines are too common to count as copied
NGRAM = 7


_P = np.uint64(1_000_003)


def _ngram_hashes(ids: np.ndarray, n: int = NGRAM) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bit polynomial hash of every n-gram of ``ids`` (wrapping uint64 arithmetic), and whether it holds no
    <eot> and no <unk> (the others never count as copied)."""
    ids = np.asarray(ids, dtype=np.uint64)
    m = max(len(ids) - n + 1, 0)
    h = np.zeros(m, dtype=np.uint64)
    ok = np.ones(m, dtype=bool)
    for k in range(n if m else 0):
        part = ids[k : k + m]
        with np.errstate(over="ignore"):
            h = h * _P + part + np.uint64(1)
        ok &= (part != EOT_ID) & (part != UNK_ID)
    return h, ok


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy's hash-based unique is ~10x slower on millions of uint64 hashes)."""
    a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) else a


def _is_separator(ch: str) -> bool:
    return not split_lines(ch)


class TrainingIndex:
    """The lines and 7-grams of a training text, to tell copied lines and 7-grams from new ones.

    Lines are kept as a set of strings; 7-grams as a sorted array of 64-bit hashes (8 bytes each), so the index of
    the whole 全唐诗 fits in tens of MB. Built from the id stream ``chunk`` ids at a time: the 7-grams starting in a
    chunk read 6 ids past its end, and a line cut by the chunk's end is carried to the next.
    """

    def __init__(self, ids: np.ndarray, vocab: Vocab, chunk: int = 1 << 20):
        self.vocab = vocab
        symbols = np.array(["\n", "\ufffd"] + vocab.symbols[2:], dtype=object)
        self.lines: set[str] = set()
        hashes = []
        carry = ""
        n = len(ids)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            part = np.asarray(ids[start : min(n, stop + NGRAM - 1)], dtype=np.int64)
            h, ok = _ngram_hashes(part)
            hashes.append(_sorted_unique(h[: stop - start][ok[: stop - start]]))
            text = carry + "".join(symbols[part[: stop - start]])
            cut = len(text)
            while cut > 0 and not _is_separator(text[cut - 1]):
                cut -= 1
            carry = text[cut:] if stop < n else ""
            self.lines.update(x for x in split_lines(text if stop == n else text[:cut])
                              if len(x) >= MIN_COPY_LINE and "\ufffd" not in x)
        self.ngrams = _sorted_unique(np.concatenate(hashes)) if hashes else np.zeros(0, dtype=np.uint64)

    def copied_lines(self, text: str) -> tuple[int, int]:
        """(copied, checked) lines of ``text``."""
        lines = [x for x in split_lines(text) if len(x) >= MIN_COPY_LINE]
        return sum(x in self.lines for x in lines), len(lines)

    def copied_ngrams(self, text: str) -> tuple[int, int]:
        """(copied, checked) 7-grams of ``text`` (whitespace removed)."""
        body = "".join(text.split())
        checked = max(len(body) - NGRAM + 1, 0)
        if not checked or not len(self.ngrams):
            return 0, checked
        h, ok = _ngram_hashes(np.array(self.vocab.encode(body, on_unknown="unk"), dtype=np.int64))
        h = h[ok]
        i = np.searchsorted(self.ngrams, h)
        found = (i < len(self.ngrams)) & (self.ngrams[np.minimum(i, len(self.ngrams) - 1)] == h)
        return int(found.sum()), checked


def training_copies(dataset_meta: dict | None) -> TrainingIndex | None:
    """The index of the training split a model was trained on, when that dataset is on this machine (the path its
    checkpoint recorded); None when it is not (a shipped model's, or a dataset since deleted). Built once per
    dataset and process (the 全唐诗's takes a few seconds)."""
    from poetgen.data.dataset import recorded_dataset
    from poetgen.errors import DatasetError

    try:
        ds = recorded_dataset(dataset_meta or {})
    except DatasetError:
        return None
    key = (str(ds.path.resolve()), (dataset_meta or {}).get("fingerprint"))
    if key not in _BUILT:
        _BUILT[key] = TrainingIndex(ds.train, ds.vocab)
    return _BUILT[key]


_BUILT: dict[tuple, TrainingIndex] = {}
