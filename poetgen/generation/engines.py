"""What decoding runs on (an *engine*), and opening a model file as one.

An engine is the numpy ``Runtime`` (poetgen.model.runtime: the CPU, no torch) or a torch module on its device behind
``TorchEngine`` (CUDA, MPS, or any module with ``forward(idx, hidden)``). Decoding (poetgen.generation.sample) is the
same numpy code for both. ``open_model`` picks the engine for a device name the way `poetgen sample` does: the CPU
never imports torch.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from poetgen.data.vocab import Vocab
from poetgen.model.runtime import Runtime, length_groups


class Engine(Protocol):
    """What decoding needs from a model (poetgen.model.runtime.Runtime has exactly this)."""

    def prefix(self, prefixes: list[list[int]]) -> np.ndarray:
        """Start one row per prefix: -> scores (U, V) after each whole prefix."""

    def select(self, index: np.ndarray) -> None:
        """Keep the rows ``index`` (K,) of the state, in that order (rows may repeat)."""

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (B,) -> scores (B, V) (float32; the caller may change them in place)."""


class TorchEngine:
    """A torch module with ``forward(idx (B, T), hidden) -> (scores (B, T, V), hidden)`` on its own device, behind the
    Engine interface. Call inside ``torch.inference_mode()`` with the module in eval mode."""

    def __init__(self, model: Any):
        import torch

        self.torch, self.model = torch, model
        self.device = next(model.parameters()).device
        self.hidden: Any = None

    def _scores(self, logits: Any) -> np.ndarray:
        return logits.float().cpu().numpy()

    def prefix(self, prefixes: list[list[int]]) -> np.ndarray:
        """Each distinct prefix length is one batched call."""
        from poetgen.model.rnn import cat_hidden

        torch = self.torch
        groups, inverse = length_groups(prefixes)
        logits_parts, hidden_parts = [], []
        for members in groups:
            idx = torch.tensor([prefixes[u] for u in members], dtype=torch.long, device=self.device)  # (G, T)
            logits, hidden = self.model(idx)  # (G, T, V)
            logits_parts.append(logits[:, -1])
            hidden_parts.append(hidden)
        self.hidden = cat_hidden(hidden_parts)
        self.select(inverse)
        return self._scores(torch.cat(logits_parts))[inverse]

    def select(self, index: np.ndarray) -> None:
        from poetgen.model.rnn import select_hidden

        self.hidden = select_hidden(self.hidden, self.torch.as_tensor(np.asarray(index, dtype=np.int64),
                                                                      device=self.device))

    def step(self, tokens: np.ndarray) -> np.ndarray:
        idx = self.torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=self.device)[:, None]  # (B, 1)
        logits, self.hidden = self.model(idx, self.hidden)  # (B, 1, V)
        return self._scores(logits[:, -1])


def engine_for(model: Any) -> tuple[Any, Callable[[], Any]]:
    """-> (engine, a context manager factory to run decoding in). A CharRNN on the CPU becomes a numpy Runtime."""
    if hasattr(model, "step") and hasattr(model, "prefix") and hasattr(model, "select"):
        return model, nullcontext
    import torch

    from poetgen.model.rnn import CharRNN

    raw = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    if isinstance(raw, CharRNN) and next(raw.parameters()).device.type == "cpu":
        return Runtime.from_state(raw.config, raw.state_dict()), nullcontext

    class _EvalMode:
        """Dropout would draw from the global RNG: no longer the seed alone would decide the output."""

        def __enter__(self):
            self.was_training, self.mode = model.training, torch.inference_mode()
            model.eval()
            self.mode.__enter__()

        def __exit__(self, *exc):
            self.mode.__exit__(*exc)
            model.train(self.was_training)

    return TorchEngine(model), _EvalMode


def load_runtime(path: str | Path) -> Runtime:
    """A checkpoint (or a run directory's best one) as a Runtime, with ``vocab``, ``config`` and ``path`` set.

    Validated as ``poetgen.checkpoint.torch_io.load_checkpoint`` does (the same checks, no torch); only the model's
    tensors are decoded."""
    from poetgen.checkpoint.format import read_model

    ckpt = read_model(path, keep_int8=True)
    return Runtime(ckpt.model_config, ckpt.weights, ckpt.vocab, ckpt.path)



def torch_gpu_build() -> bool:
    """True when the installed torch is a CUDA (or ROCm) build, found without importing it (seconds)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    for root in spec.submodule_search_locations:
        lib = Path(root) / "lib"
        if any(lib.glob("libtorch_cuda*")) or any(lib.glob("torch_cuda*")) or any(lib.glob("libtorch_hip*")):
            return True
    return False




@dataclass
class OpenedModel:
    model: Any  # a Runtime (CPU) or a torch CharRNN on its device
    vocab: Vocab
    path: Path
    device: str  # "cpu" (numpy) or the torch device it runs on
    dataset_meta: dict = field(default_factory=dict)  # what the checkpoint recorded of its training data

    def training_copies(self) -> Any:
        """The index of the lines of the text the model was trained on (poetgen.data.copies), or None when that
        dataset is not on this machine (a shipped model's is not)."""
        from poetgen.data.copies import training_copies

        return training_copies(self.dataset_meta)


def open_model(path: str | Path, device: str = "auto", threads: int | None = None) -> OpenedModel:
    """A model file ready to sample from, on ``device`` (auto: CUDA when the installed torch is a CUDA build, else the
    CPU). On the CPU it runs on numpy and torch is never imported (seconds saved at start-up); elsewhere the torch
    model steps on its device, with ``threads`` CPU threads for torch. An unknown device name is refused by torch's
    device resolution (poetgen.model.devices)."""
    path = Path(path)
    if not (device == "cpu" or (device == "auto" and not torch_gpu_build())):
        import torch

        from poetgen.checkpoint.torch_io import load_model
        from poetgen.model.devices import resolve_device

        torch_device = resolve_device(device)
        if torch_device.type != "cpu":
            if threads is not None:
                torch.set_num_threads(threads)
            model, ckpt = load_model(path, torch_device)
            return OpenedModel(model, ckpt.vocab, path, str(torch_device), ckpt.dataset_meta)
    from poetgen.checkpoint.format import read_model

    mf = read_model(path, keep_int8=True)  # int8 weights scaled once, into the Runtime's own layout
    return OpenedModel(Runtime(mf.model_config, mf.weights, mf.vocab, mf.path), mf.vocab, path, "cpu",
                       mf.data.get("dataset_meta") or {})
