"""Reading and checking a checkpoint file without torch: the part of poetgen.checkpoint.torch_io that `poetgen
sample` needs on the CPU (``import torch`` alone takes seconds).

poetgen.checkpoint.torch_io (saving, loading into torch) builds on these functions, so both readers refuse exactly
the same files with the same CheckpointError messages:

    find_checkpoint(path_or_runs_dir) -> Path    a file, a run directory, a runs directory, or a shipped model's name
    default_checkpoint(runs_dir) -> (Path, note)  what sample and eval use without -c: the newest run, else the
                                                 shipped model (poetgen.checkpoint.shipped) and a note saying so
    read_verified(path) -> (blob, metadata)     a complete poetgen safetensors file, before any tensor is decoded
    parse_checkpoint(path, tensors, meta, config_class) -> Parsed    every value a stranger may have written
    read_model(path) -> ModelFile                the model's numpy weights, config and vocabulary (for the runtime)
    dequantize(path, tensors, to_float32)        a compact model's int8 / fp16 weights as float32 (both readers)
    expected_shapes(config) -> {name: shape}     the state_dict shapes of CharRNN(config)

Nothing is ever unpickled, so reading cannot run code. The file layout is described in poetgen.checkpoint.torch_io;
format version 2 adds the compact model files of poetgen.checkpoint.compact (int8 weights with a ``scale/<name>``
tensor each, fp16 weights), which both readers turn back into float32 on load.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from poetgen.errors import CheckpointError, PoetgenError
from poetgen.paths import RUNS_DIR
from poetgen.data.vocab import Vocab

FORMAT = "poetgen-checkpoint"
FORMAT_VERSION = 2  # the newest version this poetgen reads
# save_checkpoint still writes version 1: training checkpoints have not changed, so older poetgens keep reading
# them. Compact model files are version 2, so that an older poetgen refuses them ("upgrade poetgen") instead of
# taking int8 weights for floats.
CHECKPOINT_VERSION = 1
MODEL_VERSION = 2
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


def _runs(p: Path) -> list[Path]:
    return [d for d in p.iterdir() if d.is_dir() and _run_checkpoint(d) is not None]


def find_checkpoint(path_or_runs_dir: str | Path = RUNS_DIR) -> Path:
    """A file -> itself; a run dir -> its best.ckpt, else last.ckpt, else its newest step-*.ckpt; a runs dir ->
    that rule applied to the run whose checkpoints were written most recently; a bare name that is no existing
    path (``tang``) -> the shipped model of that name (poetgen.checkpoint.shipped)."""
    from poetgen.checkpoint import shipped

    p = Path(path_or_runs_dir)
    if p.is_file():
        return p
    if not p.exists():
        name = str(path_or_runs_dir)
        if shipped.is_model_name(name):
            model = shipped.shipped_model(name)
            if model is not None:
                return model.path
            names = shipped.shipped_names()
            if names:
                raise CheckpointError(f"checkpoint not found: {p} (nor a shipped model: {', '.join(names)})")
        raise CheckpointError(f"checkpoint not found: {p}")
    found = _run_checkpoint(p)
    if found is not None:
        return found
    runs = _runs(p)
    if not runs:
        raise CheckpointError(f"no checkpoint in {p} (train one with `poetgen train`)")
    newest = max(runs, key=_newest_mtime)
    return _run_checkpoint(newest)  # type: ignore[return-value]


def default_checkpoint(runs_dir: str | Path = RUNS_DIR) -> tuple[Path, str | None]:
    """What `sample` and `eval` read when no checkpoint is named: ``find_checkpoint(runs_dir)`` when it holds a
    run, else the shipped model ``tang`` with a note for stderr saying so (None when a run was found). With neither,
    find_checkpoint's own error."""
    from poetgen.checkpoint import shipped

    p = Path(runs_dir)
    if p.is_file() or (p.is_dir() and (_run_checkpoint(p) is not None or _runs(p))):
        return find_checkpoint(p), None
    model = shipped.shipped_model(shipped.DEFAULT_MODEL)
    if model is None:
        raise CheckpointError(f"no run in {p} and no shipped model: train one with `poetgen train`, or name a "
                              "checkpoint with -c")
    about = model.card.get("summary")
    note = (f"Using the shipped model {model.name}{f' ({about})' if isinstance(about, str) and about else ''}: "
            f"there is no run in {p}. Train your own with `poetgen train`, or name a checkpoint with -c.")
    return model.path, note


# --- the file ---------------------------------------------------------------------------------------------------


def read_verified(path: Path) -> tuple[bytes, dict]:
    """Read the file and check it is a complete poetgen safetensors checkpoint, before any tensor is decoded (and,
    for a model with a model card beside it, that its SHA-256 is the card's)."""
    from poetgen.checkpoint.shipped import verify_card

    try:
        blob = path.read_bytes()
    except OSError as e:
        raise _unreadable(path, e) from None
    verify_card(path, blob)
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


# --- writing ----------------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, blob: bytes, *, fs: Any = os) -> Path:
    """Write ``blob`` to ``path`` atomically: a temporary file in the same directory, fsync, ``os.replace``, fsync
    of the directory; a crash at any moment leaves the previous file intact. ``fs``: the ``os`` module to use."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    try:
        with fs.fdopen(fd, "wb") as f:
            fs.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
            f.write(blob)
            f.flush()
            fs.fsync(f.fileno())
        fs.replace(tmp, path)
    except BaseException as e:
        try:
            fs.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):  # a full disk, an I/O error: the user's problem to fix, not a crash
            kept = f"; the previous {path.name} is intact" if path.exists() else ""
            raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}{kept}") from None
        raise
    # Make the rename itself durable (not possible on every platform, e.g. Windows).
    try:
        dfd = fs.open(path.parent, fs.O_RDONLY)
    except OSError:
        return path
    try:
        fs.fsync(dfd)
    except OSError:
        pass
    finally:
        fs.close(dfd)
    return path


def _dtype(t: Any) -> str:
    """"int8", "float16", ... for a numpy array or a torch tensor ("torch.int8")."""
    return str(t.dtype).rsplit(".", 1)[-1]


def dequantize(path: Path, tensors: dict[str, Any], to_float32: Callable[[Any], Any],
               int8: Callable[[Any, Any], Any] | None = None) -> dict[str, Any]:
    """The tensors with every model weight in float32: an int8 ``model/<name>`` (rows, columns) times its float32
    ``scale/<name>`` (rows,), row by row (poetgen.checkpoint.compact's per-row symmetric quantization); a float16
    one converted. The ``scale/`` tensors are dropped; anything else passes unchanged. ``to_float32`` converts one
    array or tensor to a new float32 one (numpy and torch alike), which is then scaled in place; ``int8(q, scale)``,
    when given, makes an int8 weight instead (a one-pass product, or the pair kept for the numpy runtime)."""
    out = {k: t for k, t in tensors.items() if not k.startswith("scale/")}
    for key, s in tensors.items():
        if key.startswith("scale/"):
            name = key[len("scale/") :]
            q = tensors.get(f"model/{name}")
            if q is None or _dtype(q) != "int8" or len(q.shape) != 2:
                raise CheckpointError(f"{path} is damaged: it has a scale for {name}, which is no int8 matrix")
            if _dtype(s) != "float32" or tuple(s.shape) != (q.shape[0],):
                raise CheckpointError(f"{path} is damaged: the scale of {name} is not {q.shape[0]} float32 numbers")
    for key, t in out.items():
        if not key.startswith("model/"):
            continue
        kind = _dtype(t)
        if kind == "int8":
            scale = tensors.get(f"scale/{key[len('model/') :]}")
            if scale is None:
                raise CheckpointError(f"{path} is damaged: int8 weights {key[len('model/') :]} without their scale")
            if int8 is not None:
                out[key] = int8(t, scale)
            else:
                w = to_float32(t)
                w *= scale[:, None]
                out[key] = w
        elif kind == "float16":
            out[key] = to_float32(t)
    return out


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
    never another exception. ``config_class`` has ``from_dict`` (poetgen.model.config.ModelConfig, or
    AnyModelConfig for either kind of model); tensors only need ``.shape``."""
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
    return shapes | head_shapes(config, "head")


def head_shapes(config: Any, name: str) -> dict[str, tuple[int, ...]]:
    """The output layer's shapes under ``name``: a full (V, H) layer, or poetgen.model.rnn.AdaptiveHead."""
    V, H = config.vocab_size, config.hidden
    if getattr(config, "head", "full") != "adaptive":
        return {f"{name}.weight": (V, H), f"{name}.bias": (V,)}
    bounds = (*config.cutoffs, V)
    shortlist = config.cutoffs[0] + len(config.cutoffs)
    shapes = {f"{name}.root.weight": (shortlist, H), f"{name}.root.bias": (shortlist,)}
    for i in range(len(config.cutoffs)):
        d, n = max(1, int(H // config.div_value ** (i + 1))), bounds[i + 1] - bounds[i]
        shapes[f"{name}.tails.{i}.proj.weight"] = (d, H)
        shapes[f"{name}.tails.{i}.out.weight"], shapes[f"{name}.tails.{i}.out.bias"] = (n, d), (n,)
    return shapes


def seq2seq_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes of poetgen.model.seq2seq.Seq2Seq(config) (tests/test_seq2seq.py checks them against
    the real model). The shared embedding appears under its three names."""
    V, E, H, L, G = config.vocab_size, config.embed, config.hidden, config.layers, {"gru": 3, "lstm": 4}[config.cell]
    shapes: dict[str, tuple[int, ...]] = {f"{p}embedding.weight": (V, E) for p in ("", "encoder.", "decoder.")}
    for part, directions in (("encoder", ("", "_reverse")), ("decoder", ("",))):
        for i in range(L):
            for d in directions:
                inputs = E if i == 0 else H * len(directions)
                shapes[f"{part}.rnn.weight_ih_l{i}{d}"] = (G * H, inputs)
                shapes[f"{part}.rnn.weight_hh_l{i}{d}"] = (G * H, H)
                shapes[f"{part}.rnn.bias_ih_l{i}{d}"] = shapes[f"{part}.rnn.bias_hh_l{i}{d}"] = (G * H,)
    for name in ("bridge", "bridge_c") if config.cell == "lstm" else ("bridge",):
        shapes[f"encoder.{name}.weight"], shapes[f"encoder.{name}.bias"] = (H, 2 * H), (H,)
    shapes["decoder.attention.key.weight"] = (H, 2 * H)
    if config.attention == "additive":
        shapes["decoder.attention.query.weight"], shapes["decoder.attention.v.weight"] = (H, H), (1, H)
    shapes["decoder.combine.weight"], shapes["decoder.combine.bias"] = (H, 3 * H), (H,)
    return shapes | head_shapes(config, "decoder.out")


def check_weights(path: Path, config: Any, found: dict[str, tuple[int, ...]]) -> None:
    """The weights (name -> shape) must be exactly those of the model the config describes, checked before any
    model is built: a foreign config could otherwise ask for a model too large to allocate, or so many layers that
    building one never ends. The sizes are first bounded by tensors actually in the file (so that listing the
    expected shapes is cheap), then all compared."""
    if getattr(config, "kind", "charrnn") == "seq2seq":
        return _check_seq2seq(path, config, found)
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
    _same_shapes(path, expected_shapes(config), found)


def _same_shapes(path: Path, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> None:
    """CheckpointError naming the first tensors whose shapes differ from the config's (or that are missing/extra)."""
    if found != expected:
        bad = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise CheckpointError(f"{path}: weights do not match the model config: "
                              + ", ".join(f"{k} {found.get(k, 'missing')} (expected {expected.get(k, 'none')})"
                                          for k in bad[:4]))


def _check_seq2seq(path: Path, config: Any, found: dict[str, tuple[int, ...]]) -> None:
    last = found.get(f"decoder.rnn.weight_hh_l{config.layers - 1}")
    if (len(found) < 12 * config.layers or found.get("embedding.weight") != (config.vocab_size, config.embed)
            or last is None or len(last) != 2 or last[1] != config.hidden):
        raise CheckpointError(f"{path}: weights do not match the model config (encoder-decoder {config.cell} "
                              f"{config.layers}x{config.hidden}, embed {config.embed}, {config.vocab_size} symbols)")
    _same_shapes(path, seq2seq_shapes(config), found)


def checkpoint_kind(path: str | Path) -> str:
    """charrnn or seq2seq: what model a checkpoint holds, from its header alone (no tensor read, no torch), so that
    `poetgen sample` can choose how to run it. Damage is left for the full read to report."""
    from poetgen.model.config import model_kind

    path = find_checkpoint(path)
    try:
        return model_kind(json.loads(read_header(path)["data"]).get("model_config"))
    except (KeyError, TypeError, ValueError, AttributeError):
        return "charrnn"
    except PoetgenError as e:
        raise CheckpointError(f"{path}: {e}") from None


# --- the model alone, in numpy ----------------------------------------------------------------------------------


@dataclass
class ModelFile:
    path: Path
    model_config: Any  # poetgen.model.config.ModelConfig
    vocab: Vocab
    weights: dict[str, Any]  # state_dict name -> float32 numpy array (tied names share one; see read_model's keep_int8)
    format_version: int = CHECKPOINT_VERSION
    data: dict = field(default_factory=dict)  # the file's JSON metadata (train_config, dataset_meta, card, ...)


def read_model(path: str | Path, keep_int8: bool = False) -> ModelFile:
    """The model of a checkpoint (or of a run directory's best one) as numpy arrays, checked exactly as
    poetgen.checkpoint.torch_io.load_checkpoint checks it. Only the model's tensors are read (not the optimizer's).

    ``keep_int8``: a compact file's int8 matrices stay as they are stored, each a poetgen.model.runtime.Int8Rows (its
    int8 numbers and row scales), for the numpy Runtime, which scales them as it lays out its weights (no float32
    copy of the model in between: a third of the shipped model's start-up load)."""
    import numpy as np
    from safetensors import safe_open

    from poetgen.checkpoint.shipped import verify_card
    from poetgen.model.config import AnyModelConfig

    path = find_checkpoint(path)
    verify_card(path)
    meta = read_header(path)
    try:
        with safe_open(str(path), framework="numpy") as f:  # checks every header entry against the file
            tensors = {k: f.get_tensor(k) if k.startswith(("model/", "scale/"))
                       else _Spec(tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                       for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type; the file is damaged either way
        raise CheckpointError(f"{path} is damaged: {e}") from None
    if keep_int8:
        from poetgen.model.runtime import Int8Rows

        int8: Callable[[Any, Any], Any] = Int8Rows
    else:  # float32(q) * scale in one pass, the same numbers as a float32 copy scaled in place
        int8 = lambda q, scale: np.multiply(q, scale[:, None], dtype=np.float32)  # noqa: E731
    tensors = dequantize(path, tensors, lambda a: a.astype(np.float32), int8)
    parsed = parse_checkpoint(path, tensors, meta, AnyModelConfig)
    if getattr(parsed.model_config, "kind", "charrnn") != "charrnn":
        raise CheckpointError(f"{path} holds a {parsed.model_config.kind} (对句 encoder-decoder) model, which the "
                              "numpy runtime does not run; poetgen.generation.couplet runs it with torch")
    if parsed.rng_state is not None and parsed.rng_state["torch"].dtype != "U8":
        raise CheckpointError(f"{path} is damaged: its saved torch RNG state is not one")
    return ModelFile(path, parsed.model_config, parsed.vocab, parsed.model_state, parsed.format_version, parsed.data)


@dataclass
class _Spec:
    """A tensor read_model does not load: its shape and safetensors dtype name ("U8", "F32", ...)."""

    shape: tuple[int, ...]
    dtype: str
