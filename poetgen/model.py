"""The character-level recurrent language model: embedding -> stacked RNN / LSTM / GRU -> linear output layer.

Shapes: B = batch (parallel streams), T = time steps, V = vocabulary size, E = embedding size, H = hidden size,
L = layers. Hidden state is ``(h, c)`` for the LSTM and a single tensor for RNN / GRU, each ``(L, B, H)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Union

import torch
from torch import nn

from poetgen.config import check_type
from poetgen.errors import ConfigError

CELLS = ("rnn", "lstm", "gru")

Hidden = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ModelConfig:
    vocab_size: int
    cell: str = "lstm"  # rnn (tanh) | lstm | gru
    layers: int = 2
    hidden: int = 256
    embed: int = 128
    dropout: float = 0.0  # on the embedding output, between layers, and before the output layer
    tie_weights: bool = False  # output layer shares the embedding matrix; needs embed == hidden

    def __post_init__(self) -> None:
        for f in fields(self):
            check_type(f"model {f.name}", getattr(self, f.name), f.type)
        if self.vocab_size < 2:
            raise ConfigError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if self.cell not in CELLS:
            raise ConfigError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        for name in ("layers", "hidden", "embed"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.tie_weights and self.embed != self.hidden:
            raise ConfigError(
                f"tie_weights needs embed == hidden (got embed={self.embed}, hidden={self.hidden}): "
                "the output layer reuses the embedding matrix"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"model config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(map(str, unknown))}")
        if "vocab_size" not in d:
            raise ConfigError("model config is missing vocab_size")
        return cls(**d)


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed)
        self.drop = nn.Dropout(c.dropout)
        rnn_cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[c.cell]
        extra = {"nonlinearity": "tanh"} if c.cell == "rnn" else {}
        # torch applies `dropout` only between layers, and warns when there is a single layer.
        self.rnn = rnn_cls(
            c.embed, c.hidden, num_layers=c.layers, dropout=c.dropout if c.layers > 1 else 0.0,
            batch_first=True, **extra,
        )
        self.head = nn.Linear(c.hidden, c.vocab_size)
        if c.tie_weights:
            self.head.weight = self.embedding.weight  # (V, E) == (V, H)
        self._init_weights()

    def _init_weights(self) -> None:
        # Small uniform embedding (as in pytorch/examples): N(0, 1) rows are far too large once tied to the output.
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if not self.config.tie_weights:
            nn.init.uniform_(self.head.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)
        if self.config.cell == "lstm":
            # Forget-gate bias 1 (gate order i, f, g, o): remember by default, which speeds early learning.
            H = self.config.hidden
            for name, p in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    with torch.no_grad():
                        p[H : 2 * H].fill_(1.0)

    def forward(self, idx: torch.Tensor, hidden: Hidden | None = None) -> tuple[torch.Tensor, Hidden]:
        """idx: (B, T) token ids -> logits (B, T, V) and the hidden state after the last step."""
        x = self.drop(self.embedding(idx))  # (B, T, E)
        out, hidden = self.rnn(x, hidden)  # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        return logits, hidden

    def init_hidden(self, batch_size: int, device: torch.device | str | None = None) -> Hidden:
        """Zero state, (L, B, H) per tensor, on ``device`` (default: where the weights are)."""
        p = next(self.parameters())
        shape = (self.config.layers, batch_size, self.config.hidden)
        device = p.device if device is None else device
        h = torch.zeros(shape, dtype=p.dtype, device=device)
        if self.config.cell == "lstm":
            return (h, torch.zeros_like(h))
        return h

    def num_parameters(self) -> int:
        """Distinct trainable values (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())


# --- hidden-state helpers (the state is a tensor or an (h, c) tuple) -------------------------------------------


def detach_hidden(hidden: Hidden | None) -> Hidden | None:
    """Cut the autograd graph between windows (truncated BPTT) while keeping the values."""
    if hidden is None:
        return None
    if isinstance(hidden, tuple):
        return tuple(h.detach() for h in hidden)  # type: ignore[return-value]
    return hidden.detach()


def select_hidden(hidden: Hidden, index: torch.Tensor) -> Hidden:
    """Keep the batch rows in ``index`` (LongTensor (K,)): (L, B, H) -> (L, K, H)."""
    if isinstance(hidden, tuple):
        return tuple(h.index_select(1, index) for h in hidden)  # type: ignore[return-value]
    return hidden.index_select(1, index)


def hidden_to(hidden: Hidden | None, device: torch.device | str) -> Hidden | None:
    if hidden is None:
        return None
    if isinstance(hidden, tuple):
        return tuple(h.to(device) for h in hidden)  # type: ignore[return-value]
    return hidden.to(device)
