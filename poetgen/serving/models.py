"""The models a server holds: opened once at start from the names or paths given (never from a request), each
with its Batcher."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poetgen.errors import CheckpointError
from poetgen.serving.batcher import Batcher, Limits


@dataclass
class ServedModel:
    name: str  # what requests call it by ("model": NAME)
    path: Path
    opened: Any  # poetgen.generation.engines.OpenedModel (CPU: a numpy Runtime)
    batcher: Batcher
    card: dict | None  # the model card beside the file (shipped models), else None

    def describe(self) -> dict:
        """What GET /v1/models says of it."""
        c = self.opened.model.config
        return {"name": self.name, "kind": "poem",  # a character language model: poems and free text
                "vocab_size": len(self.opened.vocab), "cell": c.cell, "layers": c.layers, "hidden": c.hidden,
                "head": getattr(c, "head", "full"), "path": str(self.path), "card": self.card}


def default_model_path() -> tuple[Path, str]:
    """With no model named: the shipped ``tang`` model when it exists, else the newest run's best checkpoint
    (CheckpointError when there is neither). -> (path, a line for the log saying which)."""
    from poetgen.checkpoint import shipped
    from poetgen.checkpoint.format import default_checkpoint

    model = shipped.shipped_model(shipped.DEFAULT_MODEL)
    if model is not None:
        return model.path, f"Using the shipped model {model.name}: name others with -c."
    path, _ = default_checkpoint()
    return path, f"Using the newest run's checkpoint {path}: name others with -c."


def model_name(spec: str, path: Path) -> str:
    """``tang`` for a shipped name; a run directory's name for its checkpoint (runs/poems/best.ckpt -> poems);
    else the file's stem."""
    from poetgen.checkpoint import shipped

    if not Path(spec).exists() and shipped.is_model_name(spec):
        return spec
    if path.stem in ("best", "last") or path.stem.startswith("step-"):
        return path.parent.name or path.stem
    return path.stem


def load_models(specs: list[str], limits: Limits, threads: int | None = None) -> tuple[list[ServedModel], list[str]]:
    """Open each checkpoint (a path, a run directory or a shipped name) on the CPU and start its Batcher; with none,
    ``default_model_path()``. -> (models, notes for the log). Two models of one name: the later gets a suffix."""
    from poetgen.checkpoint.format import find_checkpoint
    from poetgen.checkpoint.shipped import read_card
    from poetgen.generation.engines import open_model

    notes: list[str] = []
    if specs:
        found = [(find_checkpoint(s), s) for s in specs]
    else:
        path, note = default_model_path()
        found, notes = [(path, str(path))], [note]
    models: list[ServedModel] = []
    for path, spec in found:
        opened = open_model(path, "cpu")
        if not hasattr(opened.model, "append"):
            raise CheckpointError(f"{path}: the server decodes on the numpy runtime, which this model cannot use")
        name, k = model_name(spec, Path(path)), 2
        while any(m.name == name for m in models):
            name = f"{model_name(spec, Path(path))}-{k}"
            k += 1
        copies = functools.cache(opened.training_copies)  # the training text's index: read once, when first needed
        batcher = Batcher(opened.model, opened.vocab, limits, threads, copies=copies).start()
        models.append(ServedModel(name, Path(path), opened, batcher, read_card(Path(path).with_suffix(".json"))))
    return models, notes
