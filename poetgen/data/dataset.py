"""A prepared dataset on disk, and how training reads it.

Layout of a dataset directory (written by :mod:`poetgen.data.prepare`)::

    train.npy    token ids of the training split, one flat array (uint16, or uint32 for > 65,536 symbols)
    val.npy      token ids of the validation split (may be empty)
    vocab.json   the Vocab (see poetgen.data.vocab)
    meta.json    sources with sha256, options, counts, poetgen version, and a fingerprint of the three files above

A pair dataset (``prepare --pairs``, meta ``kind`` = "pairs") holds (first line, answering line) pairs: each split's
ids are first line, <eot>, answering line, <eot>, pair after pair, and ``train_pairs.npy`` / ``val_pairs.npy`` (int64,
(P, 3)) give each pair's start in those ids, its line length n and flags (MIDDLE: a 律诗's 颔联 or 颈联; REVERSED and
ACROSS: training pairs added by ``prepare --augment``). The first line is ids[start : start + n], the answer
ids[start + n + 1 : start + 2n + 1].

Every document in the id streams ends in the end-of-text id (0), so the streams can be cut anywhere.
The arrays are memory-mapped, so a dataset larger than memory trains fine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from poetgen.errors import DatasetError, PoetgenError
from poetgen.data.vocab import Vocab

FORMAT = "poetgen-dataset"
FORMAT_VERSION = 1
FILES = ("train.npy", "val.npy", "vocab.json", "meta.json")
PAIRS = {"train": "train_pairs.npy", "val": "val_pairs.npy"}
MIDDLE = 1  # pair flag: a middle couplet (颔联, 颈联) of a 五律 or 七律, antithetical by rule
REVERSED = 2  # pair flag (training only, prepare --augment reversed): a couplet backwards
ACROSS = 4  # pair flag (training only, prepare --augment across): a couplet's last line, the next one's first


@dataclass
class Dataset:
    path: Path
    vocab: Vocab
    meta: dict
    train: np.ndarray  # (N_train,) memory-mapped token ids
    val: np.ndarray  # (N_val,) memory-mapped token ids
    pairs: dict | None = None  # pair datasets: split -> (P, 3) int64 table (start, length, flags)

    @property
    def is_pairs(self) -> bool:
        return self.pairs is not None

    def pair_lines(self, split: str, rows: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """(first line ids, answering line ids, flags) of each pair of ``split`` (``rows`` of its table: all)."""
        ids, table = getattr(self, split), self.pairs[split]  # type: ignore[index]
        table = table if rows is None else table[rows]
        return [(np.asarray(ids[s:s + n], dtype=np.int64), np.asarray(ids[s + n + 1:s + 2 * n + 1], dtype=np.int64),
                 int(f)) for s, n, f in table]

    @property
    def auto_tokens(self) -> int:
        """The training split's size as preset `auto` weighs it (poetgen.training.config.auto_preset: enough text
        that a preset without dropout will not overfit it): a pair dataset's pairs added by ``prepare --augment``
        repeat its lines and do not count."""
        if self.pairs is None:
            return len(self.train)
        table = self.pairs["train"]
        own = table[(table[:, 2] & (REVERSED | ACROSS)) == 0]
        return int((2 * own[:, 1] + 2).sum())

    @property
    def fingerprint(self) -> str:
        """sha256 over the token arrays and the vocabulary: equal fingerprints mean equal data."""
        return str(self.meta.get("fingerprint", ""))

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.path.name)


def _max_id(arr: np.ndarray, chunk: int = 1 << 24) -> int:
    """Largest id, read in chunks so a memory-mapped split is not pulled into memory at once."""
    return max((int(arr[i:i + chunk].max()) for i in range(0, len(arr), chunk)), default=-1)


def is_dataset_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "meta.json").is_file()


def load_dataset(path: str | Path) -> Dataset:
    """Open a prepared dataset directory. Raises DatasetError if it is missing, incomplete or from a newer poetgen."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"dataset not found: {p}")
    if not p.is_dir():
        raise DatasetError(f"not a dataset directory (run `poetgen prepare` first): {p}")
    missing = [f for f in FILES if not (p / f).is_file()]
    if missing:
        raise DatasetError(f"{p} is not a complete poetgen dataset: missing {', '.join(missing)}")
    try:
        meta = json.loads((p / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read {p / 'meta.json'}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DatasetError(f"{p / 'meta.json'} is not poetgen dataset metadata")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DatasetError(f"dataset format version {version!r} is newer than this poetgen reads ({FORMAT_VERSION})")
    try:
        vocab = Vocab.load(p / "vocab.json")
    except PoetgenError as e:
        raise DatasetError(f"{p}: {e}") from None
    arrays = {}
    for split in ("train", "val"):
        try:
            arr = np.load(p / f"{split}.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read {p / (split + '.npy')}: {e}") from None
        if arr.ndim != 1 or arr.dtype not in (np.uint16, np.uint32):
            raise DatasetError(f"{p / (split + '.npy')} is not a flat array of token ids")
        if _max_id(arr) >= len(vocab):
            raise DatasetError(
                f"{p / (split + '.npy')} holds ids up to {_max_id(arr)} but the vocabulary has {len(vocab)} symbols: "
                "the dataset is damaged; prepare it again"
            )
        arrays[split] = arr
    pairs = _load_pairs(p, arrays) if meta.get("kind") == "pairs" else None
    return Dataset(path=p, vocab=vocab, meta=meta, train=arrays["train"], val=arrays["val"], pairs=pairs)


def _load_pairs(p: Path, arrays: dict) -> dict:
    """The pair tables, checked against their splits: every pair inside its ids."""
    tables = {}
    for split, name in PAIRS.items():
        try:
            table = np.load(p / name, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{p} is a pair dataset but {name} cannot be read: {e}") from None
        n = len(arrays[split])
        if table.ndim != 2 or table.shape[1] != 3 or table.dtype != np.int64 or (len(table) and (
                table[:, 1].min() < 1 or table[:, 0].min() < 0 or (table[:, 0] + 2 * table[:, 1] + 2).max() > n)):
            raise DatasetError(f"{p / name} is not a table of pairs inside {split}.npy: the dataset is damaged; "
                               "prepare it again")
        tables[split] = table
    return tables


def recorded_dataset(dataset_meta: dict) -> Dataset:
    """The dataset a model was trained on, by the path its checkpoint recorded (``dataset_meta``), or
    DatasetError saying it is not there (a shipped model's never is)."""
    recorded = dataset_meta.get("path")
    if not recorded:
        raise DatasetError("the checkpoint does not record its dataset; give the text to evaluate with --data")
    if not is_dataset_dir(recorded):
        raise DatasetError(f"the checkpoint's dataset {recorded} is gone; give the text to evaluate with --data")
    dataset = load_dataset(recorded)
    return dataset
