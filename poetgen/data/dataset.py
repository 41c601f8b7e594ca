"""A prepared dataset on disk, and how training reads it.

Layout of a dataset directory (written by :mod:`poetgen.data.prepare`)::

    train.npy    token ids of the training split, one flat array (uint16, or uint32 for > 65,536 symbols)
    val.npy      token ids of the validation split (may be empty)
    vocab.json   the Vocab (see poetgen.data.vocab)
    meta.json    sources with sha256, options, counts, poetgen version, and a fingerprint of the three files above

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


@dataclass
class Dataset:
    path: Path
    vocab: Vocab
    meta: dict
    train: np.ndarray  # (N_train,) memory-mapped token ids
    val: np.ndarray  # (N_val,) memory-mapped token ids

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
    return Dataset(path=p, vocab=vocab, meta=meta, train=arrays["train"], val=arrays["val"])


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
