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
    find_checkpoint(path_or_runs_dir="checkpoints") -> Path
        a file -> itself; a run dir -> its best.ckpt, else last.ckpt, else its newest step-*.ckpt;
        a runs dir -> that rule applied to the run whose checkpoints were written most recently.
    restore_rng(checkpoint)      # put back the torch / CUDA / Python RNG states saved with it
    CheckpointError (poetgen.errors) for a missing, truncated, foreign, pickled or newer-format file.

``load_checkpoint`` and ``load_model`` accept a run directory too (resolved with ``find_checkpoint``).

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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from poetgen import __version__
from poetgen.errors import CheckpointError, PoetgenError
from poetgen.model import CharRNN, ModelConfig
from poetgen.vocab import Vocab

FORMAT = "poetgen-checkpoint"
FORMAT_VERSION = 1
SUFFIX = ".ckpt"
BEST = "best.ckpt"
LAST = "last.ckpt"
STEP_GLOB = "step-*.ckpt"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass
class Checkpoint:
    path: Path
    model_config: ModelConfig
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
    if not isinstance(config, ModelConfig):
        raise CheckpointError("save_checkpoint needs a CharRNN (a model with a ModelConfig)")
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
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "data": data_json}

    from safetensors.torch import save as st_save

    blob = st_save(tensors, metadata)
    return _atomic_write(Path(path), blob)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, blob: bytes) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):  # a full disk, an I/O error: the user's problem to fix, not a crash
            kept = f"; the previous {path.name} is intact" if path.exists() else ""
            raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}{kept}") from None
        raise
    # Make the rename itself durable (not possible on every platform, e.g. Windows).
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
    return path


# --- loading ----------------------------------------------------------------------------------------------------


def _read_verified(path: Path) -> tuple[bytes, dict]:
    """Read the file and check it is a complete poetgen safetensors checkpoint, before any tensor is decoded."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    # A safetensors file is an 8-byte little-endian header length, then a JSON header starting with "{".
    n = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else 0
    if blob[8:9] != b"{" or n > _MAX_HEADER:
        if blob[:1] == b"\x80" or blob[:4] == b"PK\x03\x04":  # pickle protocol >= 2, or torch.save's zip
            kind = "a PyTorch (torch.save) archive" if blob[:2] == b"PK" else "a Python pickle"
            raise CheckpointError(
                f"{path} is {kind}, not a poetgen checkpoint; poetgen never loads pickles, because loading one "
                "can run arbitrary code"
            )
        raise CheckpointError(f"{path} is not a poetgen checkpoint")
    if 8 + n > len(blob):
        raise CheckpointError(f"{path} is truncated (incomplete header): the file was cut short")
    try:
        header = json.loads(blob[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a poetgen checkpoint (unreadable header)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a poetgen checkpoint")
    try:
        version = int(meta.get("format_version", ""))
    except (TypeError, ValueError):
        raise CheckpointError(f"{path} has an invalid checkpoint format version") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses checkpoint format {version}, newer than this poetgen reads ({FORMAT_VERSION}); "
            "upgrade poetgen"
        )
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{path} is damaged: a tensor entry of its header has no valid data_offsets") from None
    if 8 + n + end != len(blob):
        raise CheckpointError(
            f"{path} is truncated or damaged: expected {8 + n + end} bytes, found {len(blob)}"
        )
    return blob, meta


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint (or a run directory's best one). Never executes code from the file."""
    path = find_checkpoint(path)
    blob, meta = _read_verified(path)
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(blob)
        data = json.loads(meta["data"])
    except Exception as e:  # safetensors raises its own error type; the file is damaged either way
        raise CheckpointError(f"{path} is damaged: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is damaged: its metadata is not a JSON object")
    try:
        model_config = ModelConfig.from_dict(data["model_config"])
        vocab = Vocab.from_dict(data["vocab"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is missing {e}") from None
    except PoetgenError as e:
        raise CheckpointError(f"{path}: {e}") from None
    # Everything below reads values a stranger may have written: a malformed one is a damaged file, never a crash.
    try:
        return _parse(path, tensors, data, meta, model_config, vocab, map_location)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
        raise CheckpointError(f"{path} is damaged: {type(e).__name__}: {e}") from None


def _parse(path, tensors, data, meta, model_config, vocab, map_location) -> Checkpoint:
    def moved(t: torch.Tensor) -> torch.Tensor:
        return t.to(map_location)

    model_state = {k[len("model/") :]: moved(t) for k, t in tensors.items() if k.startswith("model/")}
    for alias, original in data.get("aliases", {}).items():
        model_state[alias] = model_state[original]
    extra = {k[len("state/") :]: moved(t) for k, t in tensors.items() if k.startswith("state/")}

    optimizer_state = None
    if "optimizer" in data:
        state: dict[int, dict] = {}
        for k, t in tensors.items():
            if k.startswith("optim/"):
                _, pid, key = k.split("/", 2)
                state.setdefault(int(pid), {})[key] = moved(t)
        for pid, scalars in data["optimizer"]["scalars"].items():
            state.setdefault(int(pid), {}).update(scalars)
        groups = data["optimizer"]["param_groups"]
        for g in groups:  # JSON turned tuples into lists; torch optimizers expect tuples for betas
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
        optimizer_state = {"state": state, "param_groups": groups}

    rng_state = None
    if "rng/torch" in tensors:
        cuda = [tensors[f"rng/cuda/{i}"] for i in range(sum(k.startswith("rng/cuda/") for k in tensors))]
        py = data.get("rng_python")
        rng_state = {
            "torch": tensors["rng/torch"],
            "cuda": cuda,
            "python": (py[0], tuple(py[1]), py[2]) if py else None,
        }

    if model_config.vocab_size != len(vocab):
        raise CheckpointError(f"{path} is inconsistent: model vocab_size {model_config.vocab_size} != {len(vocab)}")
    _check_weights(path, model_config, model_state)
    for name in ("train_config", "train_state", "dataset_meta"):
        if not isinstance(data.get(name) or {}, dict):
            raise CheckpointError(f"{path} is damaged: {name} is not a JSON object")
    for key in ("path", "fingerprint", "name"):
        if not isinstance((data.get("dataset_meta") or {}).get(key, ""), str):
            raise CheckpointError(f"{path} is damaged: dataset_meta {key} is not a string")
    if rng_state is not None:
        if rng_state["torch"].dtype != torch.uint8 or rng_state["torch"].shape != torch.get_rng_state().shape:
            raise CheckpointError(f"{path} is damaged: its saved torch RNG state is not one")
        if rng_state["python"] is not None:
            random.Random().setstate(rng_state["python"])  # raises on a malformed state, touches no global RNG
    return Checkpoint(
        path=path,
        model_config=model_config,
        vocab=vocab,
        model_state=model_state,
        train_config=data.get("train_config") or {},
        train_state=data.get("train_state") or {},
        dataset_meta=data.get("dataset_meta") or {},
        poetgen_version=str(data.get("poetgen_version", "")),
        format_version=int(meta["format_version"]),
        optimizer_state=optimizer_state,
        scheduler_state=data.get("scheduler"),
        rng_state=rng_state,
        tensors=extra,
    )


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes of CharRNN(config), worked out without building it (building even on the meta
    device costs a second and a half of imports the first time). tests/test_foreign_files.py checks it against the
    real model for every cell."""
    V, E, H, G = config.vocab_size, config.embed, config.hidden, {"rnn": 1, "gru": 3, "lstm": 4}[config.cell]
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (V, E)}
    for i in range(config.layers):
        shapes[f"rnn.weight_ih_l{i}"] = (G * H, E if i == 0 else H)
        shapes[f"rnn.weight_hh_l{i}"] = (G * H, H)
        shapes[f"rnn.bias_ih_l{i}"] = shapes[f"rnn.bias_hh_l{i}"] = (G * H,)
    if config.head == "adaptive":  # see poetgen.model.AdaptiveHead
        bounds = (*config.cutoffs, V)
        shapes["head.root.weight"] = (config.cutoffs[0] + len(config.cutoffs), H)
        shapes["head.root.bias"] = (config.cutoffs[0] + len(config.cutoffs),)
        for i in range(len(config.cutoffs)):
            d, n = max(1, int(H // config.div_value ** (i + 1))), bounds[i + 1] - bounds[i]
            shapes[f"head.tails.{i}.proj.weight"] = (d, H)
            shapes[f"head.tails.{i}.out.weight"], shapes[f"head.tails.{i}.out.bias"] = (n, d), (n,)
    else:
        shapes["head.weight"], shapes["head.bias"] = (V, H), (V,)
    return shapes


def _check_weights(path: Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    """The weights must be exactly those of the model the config describes, checked before any model is built:
    a foreign config could otherwise ask for a model too large to allocate, or so many layers that building one
    never ends. The sizes are first bounded by tensors actually in the file (so that listing the expected shapes
    is cheap), then all compared."""
    emb, last = state.get("embedding.weight"), state.get(f"rnn.weight_hh_l{config.layers - 1}")
    if (
        emb is None or last is None or f"rnn.weight_hh_l{config.layers}" in state
        or tuple(emb.shape) != (config.vocab_size, config.embed) or last.dim() != 2 or last.shape[1] != config.hidden
    ):
        raise CheckpointError(f"{path}: weights do not match the model config ({config.cell} {config.layers}x"
                              f"{config.hidden}, embed {config.embed}, {config.vocab_size} symbols)")
    expected = expected_shapes(config)
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        bad = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise CheckpointError(f"{path}: weights do not match the model config: "
                              + ", ".join(f"{k} {found.get(k, 'missing')} (expected {expected.get(k, 'none')})"
                                          for k in bad[:4]))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[CharRNN, Checkpoint]:
    """Build the CharRNN a checkpoint describes, load its weights, move it to ``device``, set eval mode."""
    ckpt = load_checkpoint(path, map_location="cpu")
    model = CharRNN(ckpt.model_config)
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


# --- finding ----------------------------------------------------------------------------------------------------


def _run_checkpoint(run_dir: Path) -> Path | None:
    """best, else last, else the newest step-* checkpoint of one run directory."""
    for name in (BEST, LAST):
        if (run_dir / name).is_file():
            return run_dir / name
    steps = sorted(run_dir.glob(STEP_GLOB))
    return steps[-1] if steps else None


def _newest_mtime(run_dir: Path) -> float:
    return max((p.stat().st_mtime for p in run_dir.glob(f"*{SUFFIX}")), default=0.0)


def find_checkpoint(path_or_runs_dir: str | Path = "checkpoints") -> Path:
    p = Path(path_or_runs_dir)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    found = _run_checkpoint(p)
    if found is not None:
        return found
    runs = [d for d in p.iterdir() if d.is_dir() and _run_checkpoint(d) is not None]
    if not runs:
        raise CheckpointError(f"no checkpoint in {p} (train one with `poetgen train`)")
    newest = max(runs, key=_newest_mtime)
    return _run_checkpoint(newest)  # type: ignore[return-value]
