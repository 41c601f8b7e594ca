"""The models a server holds: opened once at start from the names or paths given (never from a request), each
with what decodes its requests: a Batcher for a poem model (numpy runtime), a CoupletWorker for a pair (对句,
encoder-decoder) model, which runs in torch: torch is imported only when such a model is served."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poetgen.errors import CheckpointError
from poetgen.serving.batcher import Batcher, Limits
from poetgen.serving.couplets import CoupletWorker

POEM, COUPLET = "poem", "couplet"  # a character language model (poems, free text); an encoder-decoder (对句)


@dataclass
class PairModel:
    model: Any  # poetgen.model.seq2seq.Seq2Seq, on the CPU, in eval mode
    vocab: Any  # poetgen.data.vocab.Vocab


@dataclass
class ServedModel:
    name: str  # what requests call it by ("model": NAME)
    path: Path
    opened: Any  # POEM: poetgen.generation.engines.OpenedModel (CPU: a numpy Runtime); COUPLET: a PairModel
    batcher: Batcher | CoupletWorker
    card: dict | None  # the model card beside the file (shipped models), else None
    kind: str = POEM

    def describe(self) -> dict:
        """What GET /v1/models says of it."""
        c = self.opened.model.config
        d = {"name": self.name, "kind": self.kind, "vocab_size": len(self.opened.vocab), "cell": c.cell,
             "layers": c.layers, "hidden": c.hidden}
        if self.kind == COUPLET:
            d["attention"] = c.attention
        else:
            d["head"] = getattr(c, "head", "full")
        return {**d, "path": str(self.path), "card": self.card}


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


def _open_pair(path: Path, limits: Limits, threads: int | None) -> tuple[PairModel, CoupletWorker]:
    import torch

    from poetgen.checkpoint.torch_io import load_model

    if threads:
        torch.set_num_threads(threads)
    model, ckpt = load_model(path, "cpu")
    return PairModel(model, ckpt.vocab), CoupletWorker(model, ckpt.vocab, limits).start()


def load_models(specs: list[str], limits: Limits, threads: int | None = None) -> tuple[list[ServedModel], list[str]]:
    """Open each checkpoint (a path, a run directory or a shipped name) on the CPU and start what decodes for it (a
    Batcher; a CoupletWorker for a pair model); with none, ``default_model_path()``. -> (models, notes for the log).
    Two models of one name: the later gets a suffix."""
    from poetgen.checkpoint.format import checkpoint_kind, find_checkpoint
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
        name, k = model_name(spec, Path(path)), 2
        while any(m.name == name for m in models):
            name = f"{model_name(spec, Path(path))}-{k}"
            k += 1
        card = read_card(Path(path).with_suffix(".json"))
        if checkpoint_kind(path) == "seq2seq":
            pair, worker = _open_pair(Path(path), limits, threads)
            models.append(ServedModel(name, Path(path), pair, worker, card, COUPLET))
            continue
        opened = open_model(path, "cpu")
        if not hasattr(opened.model, "append"):
            raise CheckpointError(f"{path}: the server decodes on the numpy runtime, which this model cannot use")
        copies = functools.cache(opened.training_copies)  # the training text's index: read once, when first needed
        batcher = Batcher(opened.model, opened.vocab, limits, threads, copies=copies).start()
        models.append(ServedModel(name, Path(path), opened, batcher, card))
    return models, notes
