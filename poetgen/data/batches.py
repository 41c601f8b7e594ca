"""How a flat id array becomes training batches and evaluation passes.

A split of N tokens is cut into B = batch_size streams of equal length Ls = (N - 1) // B, and each step feeds
every stream's next window of T = seq_len characters::

    stream 0:  | w0 | w1 | w2 | ... |        step j feeds row s = tokens[s*Ls + j*T : s*Ls + (j+1)*T]
    stream 1:  | w0 | w1 | w2 | ... |        and predicts the same slice shifted by one
    ...
    stream B-1 | w0 | w1 | w2 | ... |        batches per epoch = Ls // T (a partial last window is dropped)

Evaluation lays the whole split out the same way but pads instead of dropping, so every token is scored.

Several processes (poetgen.training.distributed) share the streams: N ranks with B streams each lay the split out as N·B
streams, exactly as one process with B' = N·B would, and rank r takes rows r·B … r·B+B-1::

    stream 0    ┐ rank 0          the rows of all ranks, stacked in rank order, are the single-process
    stream B-1  ┘                 batch of N·B rows: same streams, same windows, same order
    stream B    ┐ rank 1
    ...         ┘

Evaluation is shared the same way (each rank scores its rows; the loss sums are added up across ranks).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from poetgen.model.devices import autocast
from poetgen.errors import TrainingError
from poetgen.data.vocab import EOT_ID, UNK_ID, Vocab, format_symbols

LN2 = math.log(2.0)  # nats -> bits


def stream_layout(n_tokens: int, batch_size: int, seq_len: int) -> tuple[int, int]:
    """(stream length, batches per epoch) for a split of ``n_tokens`` ids (inputs and targets need N - 1 pairs)."""
    stream_len = max(n_tokens - 1, 0) // batch_size
    return stream_len, stream_len // seq_len


class StreamBatches:
    """Windows over B contiguous streams of one split; ``get(j)`` -> LongTensor (B, T + 1) (inputs + next target).

    With ``world_size`` N > 1 the split is cut into N·B streams and this is rank ``rank``'s block of B of them.
    """

    def __init__(
        self, tokens: np.ndarray, batch_size: int, seq_len: int, id_map: np.ndarray | None = None, *,
        rank: int = 0, world_size: int = 1,
    ):
        self.tokens, self.seq_len, self.id_map = tokens, seq_len, id_map
        self.stream_len, self.batches = stream_layout(len(tokens), batch_size * world_size, seq_len)
        self.starts = (rank * batch_size + np.arange(batch_size, dtype=np.int64)) * self.stream_len  # (B,)
        self.offsets = np.arange(seq_len + 1, dtype=np.int64)  # (T+1,)

    def __len__(self) -> int:
        return self.batches

    def get(self, j: int) -> torch.Tensor:
        idx = self.starts[:, None] + j * self.seq_len + self.offsets  # (B, T+1)
        ids = np.asarray(self.tokens[idx], dtype=np.int64)
        if self.id_map is not None:
            ids = self.id_map[ids]
        return torch.from_numpy(ids)


def vocab_map(data_vocab: Vocab, model_vocab: Vocab, map_unknown: bool) -> np.ndarray | None:
    """Dataset id -> model id table for fine-tuning on another corpus; None when the vocabularies are equal."""
    if data_vocab == model_vocab:
        return None
    missing = [s for s in data_vocab.symbols[2:] if s not in model_vocab]
    if missing and not map_unknown:
        raise TrainingError(
            f"the dataset has {len(missing)} character(s) the checkpoint's vocabulary does not know: "
            f"{format_symbols(missing)}. Pass --map-unknown to train them as <unk>, or train from scratch."
        )
    table = np.array(
        [EOT_ID, UNK_ID] + [model_vocab._index.get(s, UNK_ID) for s in data_vocab.symbols[2:]], dtype=np.int64
    )
    return table


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    id_map: np.ndarray | None = None,
    amp: torch.dtype | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[list[float]], list[float]] | None = None,
) -> float | None:
    """Mean loss in nats over EVERY next-character prediction of ``tokens``, with state carried along streams.

    The split is laid out as S <= batch_size streams of ceil(n / S) positions; the tail of the last stream is
    padding that the loss ignores, so no token is dropped. Returns None for a split too short to predict anything.

    Shared by ``world_size`` ranks: S <= batch_size * world_size streams, rank ``rank`` scores rows
    [rank·B, (rank+1)·B) of them (possibly none), and ``reduce`` (a sum over ranks) adds up [loss sum, count], so
    every rank returns the same number, the one a single process with batch_size * world_size streams gets.
    """
    n = len(tokens) - 1
    if n < 1:
        return None
    ids = np.asarray(tokens, dtype=np.int64)
    if id_map is not None:
        ids = id_map[ids]
    S = min(batch_size * world_size, n)
    Ls = -(-n // S)
    lo, hi = min(rank * batch_size, S), min((rank + 1) * batch_size, S)
    x = torch.zeros(S * Ls, dtype=torch.long)
    y = torch.full((S * Ls,), -100, dtype=torch.long)  # -100 = ignored by cross_entropy
    x[:n] = torch.from_numpy(ids[:-1])
    y[:n] = torch.from_numpy(ids[1:])
    x, y = x.view(S, Ls)[lo:hi], y.view(S, Ls)[lo:hi]  # (rows of this rank, Ls)
    count = float((y != -100).sum())
    was_training = model.training
    model.eval()
    total = 0.0
    hidden = None
    try:
        for j in range(0, Ls if hi > lo else 0, seq_len):
            xb, yb = x[:, j : j + seq_len].to(device), y[:, j : j + seq_len].to(device)
            with autocast(device, amp):
                logits, hidden = model(xb, hidden)  # (S, t, V)
            total += F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), yb.reshape(-1), ignore_index=-100, reduction="sum"
            ).item()
    finally:
        model.train(was_training)
    if reduce is not None:
        total, count = reduce([total, count])
    return total / count if count else None  # no count: a rank without rows, and no reduce to add the others
