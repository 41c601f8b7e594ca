"""Compact model files: a trained model alone, small enough to ship, in one self-describing safetensors file.

    export_model(ckpt_path, out_path, *, quantize="int8", card=None, text=None) -> ExportReport
    compare(reference, other, ids) -> Comparison     two ModelFiles scored on the same ids (numpy runtime)
    quantize_rows(w) -> (q, scale)                   the int8 scheme below

The file is a poetgen checkpoint of format version 2 (see poetgen.checkpoint.torch_io for the layout) holding only
the model: no optimizer, scheduler, RNG or hidden state, and no training state. Each ``model/<name>`` weight is
stored as one of

* int8: a matrix of at least ``INT8_MIN_SIZE`` entries, with ``quantize="int8"``. Symmetric, per output row:
  ``w[r] ~= q[r] * scale[r]`` with ``scale[r] = max|w[r]| / 127`` and q in [-127, 127]; the scales are the float32
  tensor ``scale/<name>`` (rows,). One scale per row follows the spread of the weights: rows of the embedding
  (one per symbol) and of the gate matrices (one per unit and gate) differ in size by an order of magnitude.
* fp16: the other matrices (every matrix with ``quantize="fp16"``); fp32 for one that exceeds fp16's range.
* fp32: vectors (the biases: a few thousand numbers).

The metadata's JSON ``data`` holds what a checkpoint's does for the model (model_config, vocab, train_config,
dataset_meta, aliases, poetgen_version), plus ``card`` (the model card given to export_model) and ``compact``
(the storage of each tensor, and the source checkpoint: file name, SHA-256, training state). Both readers
(``read_model`` and ``torch_io.load_checkpoint``) turn the weights back into float32 when loading, so the numpy
runtime, eval and ``--init-from`` take a compact file as they take a checkpoint. An older poetgen refuses the file
("newer format"), instead of reading int8 numbers as weights.

Torch-free: numpy and safetensors' numpy API only.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from poetgen import __version__
from poetgen.checkpoint.format import FORMAT, MODEL_VERSION, ModelFile, atomic_write, read_model
from poetgen.checkpoint.shipped import file_sha256
from poetgen.data.vocab import EOT_ID
from poetgen.errors import CheckpointError

QUANTIZE = ("int8", "fp16")
MODEL_SUFFIX = ".safetensors"
# Smaller matrices stay fp16: they hold a few percent of the bytes (biases, a small head's projections), and the
# rounding error of int8 is not worth it for them.
INT8_MIN_SIZE = 4096
FP16_MAX = 65504.0
MIN_ROW = 256


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float matrix (rows, cols) -> int8 q (rows, cols) and float32 scale (rows,), with w ~= q * scale[:, None]
    to within scale / 2 per entry. A row of zeros gets scale 0."""
    w = np.asarray(w, dtype=np.float32)
    scale = (np.abs(w).max(axis=1) / 127.0).astype(np.float32)
    divisor = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(w / divisor[:, None]), -127, 127).astype(np.int8)
    return q, scale


def storage(name: str, w: np.ndarray, quantize: str) -> str:
    """How export_model stores one weight: "int8", "fp16" or "fp32" (see the module docstring)."""
    if w.ndim != 2:
        return "fp32"
    if quantize == "int8" and w.size >= INT8_MIN_SIZE:
        return "int8"
    return "fp16" if float(np.abs(w).max(initial=0.0)) <= FP16_MAX else "fp32"


@dataclass
class Comparison:
    """Two models scored on the same symbols (see ``compare``)."""

    symbols: int  # positions scored
    # max over positions and the whole vocabulary of |log p_reference - log p_other| (the log-softmax of the
    # logits: the full head's logits may shift by a constant without changing anything). Set by the least likely
    # symbols, whose log-probabilities (-20 and below) are the least precise.
    max_abs_logprob_diff: float
    max_abs_target_diff: float  # the same over the symbols that actually came next
    kl: float  # mean KL(reference || other), nats per symbol: the change in the distributions sampling draws from
    ce_reference: float  # mean cross-entropy, nats per symbol
    ce_other: float


@dataclass
class ExportReport:
    path: Path
    bytes: int
    quantize: str
    tensors: dict[str, str]  # state_dict name -> int8 | fp16 | fp32 (tied aliases are stored once)
    parameters: int
    source: Path
    source_bytes: int
    seconds: float  # writing the file (not the comparison)
    comparison: Comparison | None = None  # when export_model was given text

    @property
    def ce_change(self) -> float | None:
        """Exported minus source cross-entropy (nats per symbol) on the text compared."""
        c = self.comparison
        return None if c is None else c.ce_other - c.ce_reference

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"], d["source"], d["ce_change"] = str(self.path), str(self.source), self.ce_change
        return d


def export_model(
    ckpt_path: str | Path,
    out_path: str | Path,
    *,
    quantize: str = "int8",
    card: dict | None = None,
    text: str | Sequence[int] | np.ndarray | None = None,
    max_symbols: int = 32768,
) -> ExportReport:
    """Write the model of a checkpoint (a file, a run directory, or a compact file) to ``out_path`` as a compact
    model file, atomically. ``card``: the model card (any JSON object) stored in the file's metadata.

    ``text`` (a string, encoded with the model's vocabulary, unknown characters as <unk>; or ids): the source and
    the exported model are then both scored on its first ``max_symbols`` symbols, and the report carries the
    largest log-probability difference and the change in cross-entropy."""
    if quantize not in QUANTIZE:
        raise CheckpointError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    try:
        card_json = json.loads(json.dumps(card or {}, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the model card must be plain JSON values: {e}") from None
    if not isinstance(card_json, dict):
        raise CheckpointError("the model card must be a JSON object")
    src = read_model(ckpt_path)
    out = Path(out_path)
    if out.exists() and out.resolve() == src.path.resolve():
        raise CheckpointError(f"{out} is the checkpoint being exported; write the compact file elsewhere")

    t0 = time.perf_counter()
    tensors: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    aliases: dict[str, str] = {}
    stored: dict[int, str] = {}  # id(array) -> name: tied weights are one array under two names
    for name, w in src.weights.items():
        if id(w) in stored:
            aliases[name] = stored[id(w)]
            continue
        stored[id(w)] = name
        if not np.isfinite(w).all():
            raise CheckpointError(f"{src.path} has non-finite weights in {name}; it cannot be exported")
        kind = kinds[name] = storage(name, w, quantize)
        if kind == "int8":
            tensors[f"model/{name}"], tensors[f"scale/{name}"] = quantize_rows(w)
        else:
            tensors[f"model/{name}"] = np.ascontiguousarray(w, dtype=np.float16 if kind == "fp16" else np.float32)

    data = {
        "model_config": src.model_config.to_dict(),
        "vocab": src.vocab.to_dict(),
        "train_config": src.data.get("train_config") or {},
        "dataset_meta": src.data.get("dataset_meta") or {},
        "aliases": aliases,
        "poetgen_version": __version__,
        "compact": {
            "quantize": quantize,
            "tensors": kinds,
            "source": {"file": src.path.name, "sha256": file_sha256(src.path),
                       "train_state": src.data.get("train_state") or {}},
        },
        "card": card_json,
    }
    metadata = {"format": FORMAT, "format_version": str(MODEL_VERSION),
                "data": json.dumps(data, ensure_ascii=False, allow_nan=True)}
    from safetensors.numpy import save as st_save

    atomic_write(out, st_save(tensors, metadata))
    seconds = time.perf_counter() - t0
    report = ExportReport(
        path=out, bytes=out.stat().st_size, quantize=quantize, tensors=kinds,
        parameters=sum(int(w.size) for name, w in src.weights.items() if name not in aliases),
        source=src.path, source_bytes=src.path.stat().st_size, seconds=seconds,
    )
    if text is not None:
        ids = src.vocab.encode(text, on_unknown="unk") if isinstance(text, str) else text
        report.comparison = compare(src, read_model(out), np.asarray(ids)[:max_symbols])
    return report


def compare(reference: ModelFile, other: ModelFile, ids: Sequence[int] | np.ndarray, streams: int = 32) -> Comparison:
    """Score both models on ``ids`` with the numpy runtime: the symbols are cut into up to ``streams`` rows of
    equal length, at least MIN_ROW each (the last few symbols that do not fill a row are left out), each row
    starting from the zero state with the end-of-text symbol as input, as every document starts. Exact: every
    position's full distribution."""
    from poetgen.model.runtime import Runtime, log_softmax

    ids = np.asarray(ids, dtype=np.intp).ravel()
    if len(ids) == 0:
        raise CheckpointError("no text to compare the models on")
    if reference.model_config != other.model_config or reference.vocab != other.vocab:
        raise CheckpointError("the models differ in architecture or vocabulary; they cannot be compared")
    S = max(1, min(streams, len(ids) // MIN_ROW))  # rows long enough that few positions start cold
    L = len(ids) // S
    targets = ids[: S * L].reshape(S, L)
    inputs = np.concatenate([np.full((S, 1), EOT_ID, dtype=np.intp), targets[:, :-1]], axis=1)
    runtimes = [Runtime(m.model_config, m.weights) for m in (reference, other)]
    for rt in runtimes:
        rt.reset(S)
    rows = np.arange(S)
    nll, worst, worst_target, kl = [0.0, 0.0], 0.0, 0.0, 0.0
    for t in range(L):
        logp = []
        for k, rt in enumerate(runtimes):
            s = log_softmax(rt.step(inputs[:, t]).astype(np.float64))  # a copy: the runtime reuses its buffer
            nll[k] -= float(s[rows, targets[:, t]].sum())
            logp.append(s)
        diff = logp[0] - logp[1]  # (S, V)
        worst = max(worst, float(np.abs(diff).max()))
        worst_target = max(worst_target, float(np.abs(diff[rows, targets[:, t]]).max()))
        kl += float((np.exp(logp[0]) * diff).sum())
    n = S * L
    return Comparison(n, worst, worst_target, kl / n, nll[0] / n, nll[1] / n)

