"""One self-describing checkpoint file: a safetensors file whose header carries everything that is not a tensor.

Interface (stable; sample/eval rely on it)::

    save_checkpoint(path, model, vocab, *, train_config=None, train_state=None, optimizer=None, scheduler=None,
                    dataset_meta=None, extra_tensors=None, rng=True) -> Path
    load_checkpoint(path, map_location="cpu") -> Checkpoint
        Checkpoint(path, model_config: ModelConfig, vocab: Vocab, model_state: dict[str, Tensor],
                   train_config: dict, train_state: dict, dataset_meta: dict, poetgen_version: str,
                   format_version: int, optimizer_state: dict | None, scheduler_state: dict | None,
                   rng_state: dict | None, tensors: dict[str, Tensor])
    load_model(path, device="cpu") -> (CharRNN in eval mode on device, Checkpoint)
    find_checkpoint(path_or_runs_dir=RUNS_DIR) -> Path
        a file -> itself; a run dir -> its best.ckpt, else last.ckpt, else its newest step-*.ckpt;
        a runs dir -> that rule applied to the run whose checkpoints were written most recently;
        a bare name that is no existing path (``tang``) -> that shipped model (poetgen.checkpoint.shipped).
    default_checkpoint(runs_dir=RUNS_DIR) -> (Path, note or None)   the newest run, else the shipped model
    restore_rng(checkpoint)      # put back the torch / CUDA / Python RNG states saved with it
    CheckpointError (poetgen.errors) for a missing, truncated, foreign, pickled or newer-format file.

``load_checkpoint`` and ``load_model`` accept a run directory too (resolved with ``find_checkpoint``), and a compact
model file (poetgen.checkpoint.compact): its int8 / fp16 weights come back as float32, with no optimizer, scheduler
or RNG state, so it serves sampling, eval and ``--init-from`` (a fresh optimizer) but not ``--resume``.

File layout: the safetensors tensors are ``model/<name>`` (weights; a tied matrix is stored once, its alias
recorded), ``optim/<param index>/<key>`` (optimizer state tensors), ``rng/torch`` and ``rng/cuda/<i>`` (uint8 RNG
states) and ``state/<name>`` (extra tensors, e.g. the hidden state carried by training). The header's
``__metadata__`` holds ``format`` = "poetgen-checkpoint", ``format_version`` and ``data``: a JSON object with
model_config, vocab, train_config, train_state, dataset_meta, optimizer param groups and scalar state, scheduler
state, Python RNG state and the poetgen version. Nothing is ever unpickled, so loading cannot run code.

Writes are atomic: a temporary file in the same directory, fsync, ``os.replace``, fsync of the directory; a crash
at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from poetgen import __version__
from poetgen.checkpoint.format import (  # noqa: F401  (the torch-free half; re-exported names are this API's)
    BEST,
    CHECKPOINT_VERSION,
    FORMAT,
    FORMAT_VERSION,
    LAST,
    STEP_GLOB,
    SUFFIX,
    atomic_write,
    decode_tensors,
    default_checkpoint,
    dequantize,
    expected_shapes,
    find_checkpoint,
    parse_checkpoint,
    read_verified,
)
from poetgen.errors import CheckpointError
from poetgen.model.config import AnyModelConfig, Seq2SeqConfig
from poetgen.model.rnn import CharRNN, ModelConfig
from poetgen.data.vocab import Vocab


@dataclass
class Checkpoint:
    path: Path
    model_config: ModelConfig | Seq2SeqConfig  # the kind of model: a Seq2SeqConfig is an encoder-decoder
    vocab: Vocab
    model_state: dict[str, torch.Tensor]
    train_config: dict
    train_state: dict
    dataset_meta: dict
    poetgen_version: str
    format_version: int
    optimizer_state: dict | None = None  # torch Optimizer.state_dict() layout, ready for load_state_dict
    scheduler_state: dict | None = None
    rng_state: dict | None = None  # {"torch": uint8 Tensor, "cuda": [uint8 Tensor], "python": tuple}
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # extra tensors saved with extra_tensors=


# --- saving -----------------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    vocab: Vocab,
    *,
    train_config: dict | None = None,
    train_state: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    dataset_meta: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    rng: bool = True,
) -> Path:
    """Write one checkpoint atomically. ``model`` may be a CharRNN or its ``torch.compile`` wrapper."""
    model = getattr(model, "_orig_mod", model)  # torch.compile prefixes names with _orig_mod.
    config = getattr(model, "config", None)
    if not isinstance(config, (ModelConfig, Seq2SeqConfig)):
        raise CheckpointError("save_checkpoint needs a CharRNN or a Seq2Seq (a model with its config)")
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"vocabulary has {len(vocab)} symbols but the model expects {config.vocab_size}")

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if key in seen:  # tied weights: safetensors refuses shared storage, and one copy is enough
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[f"model/{name}"] = _cpu(t)

    data: dict[str, Any] = {
        "model_config": config.to_dict(),
        "vocab": vocab.to_dict(),
        "train_config": train_config or {},
        "train_state": train_state or {},
        "dataset_meta": dataset_meta or {},
        "aliases": aliases,
        "poetgen_version": __version__,
    }
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, dict] = {}
        for pid, pstate in sd["state"].items():
            for k, v in pstate.items():
                if torch.is_tensor(v):
                    tensors[f"optim/{pid}/{k}"] = _cpu(v)
                else:
                    scalars.setdefault(str(pid), {})[k] = v
        data["optimizer"] = {"param_groups": sd["param_groups"], "scalars": scalars}
    if scheduler is not None:
        data["scheduler"] = scheduler.state_dict()
    if rng:
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda/{i}"] = s
        data["rng_python"] = random.getstate()
    for name, t in (extra_tensors or {}).items():
        tensors[f"state/{name}"] = _cpu(t)

    try:
        data_json = json.dumps(data, ensure_ascii=False, allow_nan=True)
    except TypeError as e:
        raise CheckpointError(f"checkpoint data must be plain JSON values: {e}") from None
    metadata = {"format": FORMAT, "format_version": str(CHECKPOINT_VERSION), "data": data_json}

    from safetensors.torch import save as st_save

    blob = st_save(tensors, metadata)
    return _atomic_write(Path(path), blob)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _atomic_write(path: Path, blob: bytes) -> Path:
    # Through this module's ``os``: benchmarks/slow_writes.py swaps it for one that writes slowly (crash trials).
    return atomic_write(path, blob, fs=os)


# --- loading ----------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint (or a run directory's best one). Never executes code from the file.

    The checks are poetgen.checkpoint.format's (shared with the torch-free reader of `poetgen sample`)."""
    path = find_checkpoint(path)
    blob, meta = read_verified(path)
    from safetensors.torch import load as st_load

    tensors = dequantize(path, decode_tensors(path, blob, st_load), lambda t: t.float())
    p = parse_checkpoint(path, tensors, meta, AnyModelConfig)
    if p.rng_state is not None:
        t = p.rng_state["torch"]
        if t.dtype != torch.uint8 or t.shape != torch.get_rng_state().shape:
            raise CheckpointError(f"{path} is damaged: its saved torch RNG state is not one")

    copies: dict[int, torch.Tensor] = {}

    def moved(t: torch.Tensor) -> torch.Tensor:  # tied weights (one tensor under two names) stay one tensor
        if id(t) not in copies:
            copies[id(t)] = t.to(map_location)
        return copies[id(t)]

    optimizer_state = p.optimizer_state
    if optimizer_state is not None:
        for pstate in optimizer_state["state"].values():
            for k, v in pstate.items():
                if torch.is_tensor(v):
                    pstate[k] = moved(v)
    data = p.data
    return Checkpoint(
        path=path,
        model_config=p.model_config,
        vocab=p.vocab,
        model_state={k: moved(t) for k, t in p.model_state.items()},
        train_config=data.get("train_config") or {},
        train_state=data.get("train_state") or {},
        dataset_meta=data.get("dataset_meta") or {},
        poetgen_version=str(data.get("poetgen_version", "")),
        format_version=p.format_version,
        optimizer_state=optimizer_state,
        scheduler_state=data.get("scheduler"),
        rng_state=p.rng_state,
        tensors={k: moved(t) for k, t in p.extra.items()},
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Checkpoint]:
    """Build the model a checkpoint describes (a CharRNN, or a Seq2Seq for an encoder-decoder config), load its
    weights, move it to ``device``, set eval mode."""
    from poetgen.model.seq2seq import build_model

    ckpt = load_checkpoint(path, map_location="cpu")
    model = build_model(ckpt.model_config)
    try:
        model.load_state_dict(ckpt.model_state)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt.path}: weights do not match the model config: {e}") from None
    model.to(device)
    model.eval()
    return model, ckpt


def restore_rng(ckpt: Checkpoint) -> None:
    """Put back the RNG states saved with the checkpoint (CUDA states only if this machine has those devices)."""
    if not ckpt.rng_state:
        return
    torch.set_rng_state(ckpt.rng_state["torch"].cpu())
    cuda = ckpt.rng_state.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    if ckpt.rng_state.get("python") is not None:
        random.setstate(ckpt.rng_state["python"])
