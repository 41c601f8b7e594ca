"""Helpers shared by the tests: where the repository and ../shared/data are, and a hand-made dataset.

Tests import them with `from helpers import ...` (pytest puts tests/ on sys.path); fixtures live in conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from poetgen.data.vocab import EOT_ID, Vocab

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("POETGEN_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when it is not there."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not available: {p}")
    return p


def make_dataset(path: Path, train_docs: list[str], val_docs: list[str] | None = None) -> Path:
    """Write a minimal valid dataset directory by hand (no prepare), for tests of train/sample/eval."""
    val_docs = val_docs or []
    counts = Counter("".join(train_docs + val_docs))
    vocab = Vocab.from_counts(counts, eot_count=len(train_docs) + len(val_docs))
    path.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ids: list[int] = []
        for d in docs:
            ids.extend(vocab.encode(d))
            ids.append(EOT_ID)
        arr = np.asarray(ids, dtype=vocab.dtype())
        np.save(path / f"{split}.npy", arr)
        h.update(arr.tobytes())
    vocab.save(path / "vocab.json")
    h.update(vocab.to_json().encode())
    meta = {
        "format": "poetgen-dataset",
        "format_version": 1,
        "name": path.name,
        "fingerprint": h.hexdigest(),
        "counts": {"train_documents": len(train_docs), "val_documents": len(val_docs)},
    }
    (path / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")
    return path
