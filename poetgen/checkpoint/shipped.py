"""The models shipped inside the package (``poetgen/shipped/``): names, model cards, and the hash check on load.

Each shipped model is two files in the shipped directory::

    <name>.json            its model card: a JSON object with "format": "poetgen-model-card", "name", "file" (the
                           model file's name in the same directory), "sha256" and "bytes" of that file, and whatever
                           the card says of the model (data, command, steps, validation figures, known weaknesses)
    <name>.<ext>           the model file (a compact model, see poetgen.checkpoint.compact)

A model file next to a card (``<stem>.json``) that records a SHA-256 is checked against it whenever it is read
(``verify_card``, called by both checkpoint readers), so a damaged copy is refused instead of sampling garbage.

The shipped directory is ``$POETGEN_SHIPPED_DIR`` if set (tests), else the package's own ``poetgen/shipped``.
Torch-free: `poetgen sample` resolves names and reads cards without it.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

from poetgen.errors import CheckpointError
from poetgen.paths import PACKAGE_DIR

CARD_FORMAT = "poetgen-model-card"
ENV_SHIPPED = "POETGEN_SHIPPED_DIR"
DEFAULT_MODEL = "tang"  # what sample and eval fall back to when there is no run in ./checkpoints
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class ShippedModel:
    name: str
    path: Path  # the model file
    card: dict  # the whole model card, as stored


def shipped_dir() -> Path:
    """Where the shipped models are: ``$POETGEN_SHIPPED_DIR``, else the installed package's ``shipped`` folder."""
    env = os.environ.get(ENV_SHIPPED)
    return Path(env).expanduser() if env else PACKAGE_DIR / "shipped"


def is_model_name(text: str) -> bool:
    """A bare name such as ``tang`` (letters, digits, ``_.-``; no path separator), as opposed to a path."""
    return bool(_NAME.fullmatch(text))


def read_card(path: Path) -> dict | None:
    """The model card at ``path``, or None when the file is missing or is not a poetgen model card."""
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return card if isinstance(card, dict) and card.get("format") == CARD_FORMAT else None


def list_shipped(directory: str | Path | None = None) -> list[ShippedModel]:
    """Every shipped model whose card and file are both present, by name."""
    d = Path(directory) if directory is not None else shipped_dir()
    found = []
    for card_path in sorted(d.glob("*.json")) if d.is_dir() else []:
        card = read_card(card_path)
        name, file = (card or {}).get("name"), (card or {}).get("file")
        if not (isinstance(name, str) and isinstance(file, str)) or name != card_path.stem:
            continue
        path = d / file
        if Path(file).name == file and path.is_file():  # a card may name only a file beside it
            found.append(ShippedModel(name, path, card))  # type: ignore[arg-type]
    return found


def shipped_model(name: str, directory: str | Path | None = None) -> ShippedModel | None:
    """The shipped model called ``name``, or None."""
    return next((m for m in list_shipped(directory) if m.name == name), None)


def shipped_names(directory: str | Path | None = None) -> list[str]:
    return [m.name for m in list_shipped(directory)]


def file_sha256(path: Path, blob: bytes | None = None) -> str:
    """The SHA-256 of a file (of ``blob``, its bytes, when the caller has already read them).

    Hashed from a read-only memory map where the file allows one: no copy of its bytes (a third of the time for the
    12 MB shipped model, whose check is part of every `poetgen sample` start-up); else read in chunks."""
    if blob is not None:
        return hashlib.sha256(blob).hexdigest()
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            try:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                    h.update(view)
                    return h.hexdigest()
            except (OSError, ValueError):  # an empty file, or one that cannot be mapped (a pipe, some filesystems)
                pass
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    return h.hexdigest()


def write_card(model_path: str | Path, card: dict) -> Path:
    """Write the model card of ``model_path`` beside it (``<stem>.json``, atomically): ``card``'s fields after the
    ones poetgen fills in (format, name = the file's stem, file, sha256, bytes), which the card cannot override."""
    from poetgen.checkpoint.format import atomic_write

    model_path = Path(model_path)
    if not is_model_name(model_path.stem):
        raise CheckpointError(f"{model_path.stem!r} is not a model name (letters, digits, '_', '.', '-')")
    fixed = {"format": CARD_FORMAT, "name": model_path.stem, "file": model_path.name,
             "sha256": file_sha256(model_path), "bytes": model_path.stat().st_size}
    full = {**fixed, **{k: v for k, v in card.items() if k not in fixed}}
    try:
        text = json.dumps(full, ensure_ascii=False, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the model card must be plain JSON values: {e}") from None
    return atomic_write(model_path.with_suffix(".json"), text.encode("utf-8"))


def verify_card(path: Path, blob: bytes | None = None) -> bool:
    """If a model card ``<stem>.json`` beside ``path`` records this file's SHA-256, check it: a file whose bytes
    changed is a CheckpointError saying how to get a good copy. -> True when the hash was checked (and matched),
    False when there was nothing to check against (a training run's checkpoints have no card)."""
    card_path = path.with_suffix(".json")
    if card_path == path or not card_path.is_file():
        return False
    card = read_card(card_path)
    expected = (card or {}).get("sha256")
    if not isinstance(expected, str) or (card or {}).get("file") != path.name:
        return False
    actual = file_sha256(path, blob)
    if actual == expected.lower():
        return True
    if _is_shipped(path):
        fix = ("reinstall poetgen to get a good copy (pip install --force-reinstall poetgen; in a git clone, "
               f"git checkout -- {path})")
    else:
        fix = "copy or export the model again"
    raise CheckpointError(
        f"{path} is damaged: its SHA-256 is {actual[:16]}..., not the {expected[:16]}... its model card "
        f"{card_path.name} records; {fix}"
    )


def _is_shipped(path: Path) -> bool:
    try:
        return path.resolve().parent == shipped_dir().resolve()
    except OSError:
        return False


def describe_shipped(name: str | None = None) -> list[dict]:
    """The model cards of the shipped models (of ``name`` alone when given), each with its ``name``, ``path`` and
    ``verified`` (True: the file's SHA-256 matched its card's; False: the card records none). A damaged file is a
    CheckpointError for ``name`` alone; in the whole list it is ``verified: False`` with the ``problem``. An unknown
    name is a CheckpointError naming the others."""
    if name is not None:
        model = shipped_model(name)
        if model is None:
            known = ", ".join(shipped_names()) or "none"
            raise CheckpointError(f"no shipped model named {name!r} (shipped: {known})")
        models = [model]
    else:
        models = list_shipped()
    out = []
    for m in models:
        entry = {**m.card, "name": m.name, "path": str(m.path)}
        try:
            entry["verified"] = verify_card(m.path)
        except CheckpointError as e:
            if name is not None:
                raise
            entry.update(verified=False, problem=str(e))
        out.append(entry)
    return out

