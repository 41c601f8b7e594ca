"""Reading and checking a checkpoint file without torch: the part of poetgen.checkpoint.torch_io that `poetgen sample` needs
on the CPU (``import torch`` alone takes seconds).

poetgen.checkpoint.torch_io (saving, loading into torch) builds on these functions, so both readers refuse exactly the same
files with the same CheckpointError messages:

    find_checkpoint(path_or_runs_dir) -> Path
    read_verified(path) -> (blob, metadata)     a complete poetgen safetensors file, before any tensor is decoded
    parse_checkpoint(path, tensors, meta, config_class) -> Parsed    every value a stranger may have written
    read_model(path) -> ModelFile                the model's numpy weights, config and vocabulary (for poetgen.model.runtime)
    expected_shapes(config) -> {name: shape}     the state_dict shapes of CharRNN(config)

Nothing is ever unpickled, so reading cannot run code. The file layout is described in poetgen.checkpoint.torch_io.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from poetgen.errors import CheckpointError, PoetgenError
from poetgen.data.vocab import Vocab

FORMAT = "poetgen-checkpoint"
FORMAT_VERSION = 1
SUFFIX = ".ckpt"
BEST = "best.ckpt"
LAST = "last.ckpt"
STEP_GLOB = "step-*.ckpt"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


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
    """A file -> itself; a run dir -> its best.ckpt, else last.ckpt, else its newest step-*.ckpt; a runs dir ->
    that rule applied to the run whose checkpoints were written most recently."""
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


# --- the file ---------------------------------------------------------------------------------------------------


def read_verified(path: Path) -> tuple[bytes, dict]:
    """Read the file and check it is a complete poetgen safetensors checkpoint, before any tensor is decoded."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise _unreadable(path, e) from None
    return blob, _verify(path, blob, len(blob))


def read_header(path: Path) -> dict:
    """read_verified's checks, reading only the header (the tensors are then read by name, see read_model)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if n <= _MAX_HEADER:
                head += f.read(max(n, 1))  # and the byte after the length when the header is empty
    except OSError as e:
        raise _unreadable(path, e) from None
    return _verify(path, head, size)


def _unreadable(path: Path, e: OSError) -> CheckpointError:
    if isinstance(e, FileNotFoundError):
        return CheckpointError(f"checkpoint not found: {path}")
    if isinstance(e, IsADirectoryError):
        return CheckpointError(f"{path} is a directory, not a checkpoint file")
    return CheckpointError(f"cannot read checkpoint {path}: {e}")


def _verify(path: Path, blob: bytes, size: int) -> dict:
    """The checks on the file's first bytes (``blob``: at least its 8-byte length and header, where the file has
    them) and its ``size``: -> the header's metadata."""
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
    if 8 + n > size:
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
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path} is truncated or damaged: expected {8 + n + end} bytes, found {size}"
        )
    return meta


def decode_tensors(path: Path, blob: bytes, load: Callable[[bytes], dict]) -> dict:
    """``load`` (safetensors.numpy.load or safetensors.torch.load) on the verified bytes; any failure is damage."""
    try:
        return load(blob)
    except Exception as e:  # safetensors raises its own error type; the file is damaged either way
        raise CheckpointError(f"{path} is damaged: {e}") from None


# --- the contents -----------------------------------------------------------------------------------------------


@dataclass
class Parsed:
    """What parse_checkpoint read, before any tensor library is involved (tensors are passed through as given)."""

    data: dict  # the JSON metadata object
    model_config: Any  # an instance of the config class passed in
    vocab: Vocab
    model_state: dict[str, Any]  # name -> tensor, tied aliases resolved
    extra: dict[str, Any]  # state/<name> tensors
    optimizer_state: dict | None
    rng_state: dict | None  # {"torch": tensor, "cuda": [tensor], "python": tuple | None}
    format_version: int
    notes: list[str] = field(default_factory=list)


def parse_checkpoint(path: Path, tensors: dict[str, Any], meta: dict, config_class: Any) -> Parsed:
    """Check everything a stranger may have written into a checkpoint: a malformed value is a CheckpointError,
    never another exception. ``config_class`` has ``from_dict`` (poetgen.model.rnn.ModelConfig or its torch-free
    twin); tensors only need ``.shape``."""
    try:
        data = json.loads(meta["data"])
    except Exception as e:
        raise CheckpointError(f"{path} is damaged: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is damaged: its metadata is not a JSON object")
    try:
        model_config = config_class.from_dict(data["model_config"])
        vocab = Vocab.from_dict(data["vocab"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is missing {e}") from None
    except PoetgenError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        return _parse(path, tensors, data, meta, model_config, vocab)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
        raise CheckpointError(f"{path} is damaged: {type(e).__name__}: {e}") from None


def _parse(path, tensors, data, meta, model_config, vocab) -> Parsed:
    model_state = {k[len("model/") :]: t for k, t in tensors.items() if k.startswith("model/")}
    for alias, original in data.get("aliases", {}).items():
        model_state[alias] = model_state[original]
    extra = {k[len("state/") :]: t for k, t in tensors.items() if k.startswith("state/")}

    optimizer_state = None
    if "optimizer" in data:
        state: dict[int, dict] = {}
        for k, t in tensors.items():
            if k.startswith("optim/"):
                _, pid, key = k.split("/", 2)
                state.setdefault(int(pid), {})[key] = t
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
    check_weights(path, model_config, {k: tuple(v.shape) for k, v in model_state.items()})
    for name in ("train_config", "train_state", "dataset_meta"):
        if not isinstance(data.get(name) or {}, dict):
            raise CheckpointError(f"{path} is damaged: {name} is not a JSON object")
    for key in ("path", "fingerprint", "name"):
        if not isinstance((data.get("dataset_meta") or {}).get(key, ""), str):
            raise CheckpointError(f"{path} is damaged: dataset_meta {key} is not a string")
    if rng_state is not None:
        if len(rng_state["torch"].shape) != 1:
            raise CheckpointError(f"{path} is damaged: its saved torch RNG state is not one")
        if rng_state["python"] is not None:
            random.Random().setstate(rng_state["python"])  # raises on a malformed state, touches no global RNG
    return Parsed(data, model_config, vocab, model_state, extra, optimizer_state, rng_state,
                  int(meta["format_version"]))


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes of CharRNN(config), worked out without building it (building even on the meta
    device costs a second and a half of imports the first time). tests/test_foreign_files.py checks it against the
    real model for every cell."""
    V, E, H, G = config.vocab_size, config.embed, config.hidden, {"rnn": 1, "gru": 3, "lstm": 4}[config.cell]
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (V, E)}
    for i in range(config.layers):
        shapes[f"rnn.weight_ih_l{i}"] = (G * H, E if i == 0 else H)
        shapes[f"rnn.weight_hh_l{i}"] = (G * H, H)
        shapes[f"rnn.bias_ih_l{i}"] = shapes[f"rnn.bias_hh_l{i}"] = (G * H,)
    if getattr(config, "head", "full") == "adaptive":  # see poetgen.model.rnn.AdaptiveHead
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


def check_weights(path: Path, config: Any, found: dict[str, tuple[int, ...]]) -> None:
    """The weights (name -> shape) must be exactly those of the model the config describes, checked before any
    model is built: a foreign config could otherwise ask for a model too large to allocate, or so many layers that
    building one never ends. The sizes are first bounded by tensors actually in the file (so that listing the
    expected shapes is cheap), then all compared."""
    emb, last = found.get("embedding.weight"), found.get(f"rnn.weight_hh_l{config.layers - 1}")
    if (
        # 4 tensors per layer and the embedding: a config claiming 10**8 layers next to a tensor named for the last
        # one would otherwise list 4 * 10**8 expected shapes (minutes and gigabytes from a 100-byte file).
        len(found) < 4 * config.layers + 1
        or emb is None or last is None or f"rnn.weight_hh_l{config.layers}" in found
        or tuple(emb) != (config.vocab_size, config.embed) or len(last) != 2 or last[1] != config.hidden
    ):
        raise CheckpointError(f"{path}: weights do not match the model config ({config.cell} {config.layers}x"
                              f"{config.hidden}, embed {config.embed}, {config.vocab_size} symbols)")
    expected = expected_shapes(config)
    if found != expected:
        bad = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise CheckpointError(f"{path}: weights do not match the model config: "
                              + ", ".join(f"{k} {found.get(k, 'missing')} (expected {expected.get(k, 'none')})"
                                          for k in bad[:4]))


# --- the model alone, in numpy ----------------------------------------------------------------------------------


@dataclass
class ModelFile:
    path: Path
    model_config: Any  # poetgen.model.config.ModelConfig
    vocab: Vocab
    weights: dict[str, Any]  # state_dict name -> float32 numpy array (tied names share one array)


def read_model(path: str | Path) -> ModelFile:
    """The model of a checkpoint (or of a run directory's best one) as numpy arrays, checked exactly as
    poetgen.checkpoint.torch_io.load_checkpoint checks it. Only the model's tensors are read (not the optimizer's)."""
    from safetensors import safe_open

    from poetgen.model.config import ModelConfig

    path = find_checkpoint(path)
    meta = read_header(path)
    try:
        with safe_open(str(path), framework="numpy") as f:  # checks every header entry against the file
            tensors = {k: f.get_tensor(k) if k.startswith("model/") else _Spec(tuple(f.get_slice(k).get_shape()),
                                                                                f.get_slice(k).get_dtype())
                       for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type; the file is damaged either way
        raise CheckpointError(f"{path} is damaged: {e}") from None
    parsed = parse_checkpoint(path, tensors, meta, ModelConfig)
    if parsed.rng_state is not None and parsed.rng_state["torch"].dtype != "U8":
        raise CheckpointError(f"{path} is damaged: its saved torch RNG state is not one")
    return ModelFile(path, parsed.model_config, parsed.vocab, parsed.model_state)


@dataclass
class _Spec:
    """A tensor read_model does not load: its shape and safetensors dtype name ("U8", "F32", ...)."""

    shape: tuple[int, ...]
    dtype: str
