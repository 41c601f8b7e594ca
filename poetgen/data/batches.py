"""How a flat id array becomes training batches.

A split of N tokens is cut into B = batch_size streams of equal length Ls = (N - 1) // B, and each step feeds
every stream's next window of T = seq_len characters::

    stream 0:  | w0 | w1 | w2 | ... |        step j feeds row s = tokens[s*Ls + j*T : s*Ls + (j+1)*T]
    stream 1:  | w0 | w1 | w2 | ... |        and predicts the same slice shifted by one
    ...
    stream B-1 | w0 | w1 | w2 | ... |        batches per epoch = Ls // T (a partial last window is dropped)

Several processes (poetgen.training.distributed) share the streams: N ranks with B streams each lay the split out as N·B
streams, exactly as one process with B' = N·B would, and rank r takes rows r·B … r·B+B-1::

    stream 0    ┐ rank 0          the rows of all ranks, stacked in rank order, are the single-process
    stream B-1  ┘                 batch of N·B rows: same streams, same windows, same order
    stream B    ┐ rank 1
    ...         ┘

Scoring (the validation loss, `poetgen eval`) is not here: poetgen.evaluation.scoring.cross_entropy.
"""

from __future__ import annotations

import numpy as np
import torch

from poetgen.data.vocab import EOT_ID, UNK_ID, Vocab, format_symbols
from poetgen.errors import TrainingError


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


def vocab_map(data_vocab: Vocab, model_vocab: Vocab, *, map_unknown: bool) -> np.ndarray | None:
    """Data id -> model id table (data in another vocabulary: fine-tuning on another corpus, scoring other text);
    None when the vocabularies are equal. Symbols the model lacks become <unk> with ``map_unknown``; without it
    they are refused (TrainingError naming them, as fine-tuning must not train them silently as <unk>)."""
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
