"""Training batches of (first line, answering line) pairs (a pair dataset: poetgen.data.dataset).

A batch holds pairs of one line length, so nothing is padded: each epoch the pairs of each length are shuffled and
cut into global batches of ``world_size`` x ``batch_size`` (a last smaller one kept when it gives every process at
least one row), and the batches' order is shuffled. The shuffle is seeded by (seed, epoch) alone, so the batch of a
step is a function of the step, as for text (poetgen.data.batches): a resumed run reads the same batches. Rank r
takes its share of the rows of each global batch.
"""

from __future__ import annotations

import numpy as np
import torch

BOS_ID = 0  # the decoder's first input (<eot>), as poetgen.model.seq2seq has it


def line_ids(ids: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one line length n -> (first lines (P, n), answering lines (P, n)) as int64."""
    n = int(table[0, 1])
    offsets = table[:, 0:1] + np.arange(n)[None, :]  # (P, n)
    return np.asarray(ids[offsets], dtype=np.int64), np.asarray(ids[offsets + n + 1], dtype=np.int64)


def teacher_inputs(tgt: torch.Tensor) -> torch.Tensor:
    """(B, T) answers -> the decoder's inputs: <eot>, then each answer character but the last."""
    return torch.cat([torch.full_like(tgt[:, :1], BOS_ID), tgt[:, :-1]], dim=1)


class PairBatches:
    def __init__(self, ids: np.ndarray, table: np.ndarray, batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1):
        self.ids, self.table = ids, table
        self.rows, self.seed, self.rank, self.world_size = batch_size * world_size, seed, rank, world_size
        self.groups = [np.flatnonzero(table[:, 1] == n) for n in np.unique(table[:, 1])]
        self._epoch, self._plan = -1, []
        self.count = sum(len(g) // self.rows + (len(g) % self.rows >= world_size) for g in self.groups)

    def __len__(self) -> int:
        return self.count

    def plan(self, epoch: int) -> list[np.ndarray]:
        """The global batches of an epoch: row indices into the table, one line length each."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed % 2**63, epoch])
            batches = []
            for g in self.groups:
                g = rng.permutation(g)
                batches += [g[i:i + self.rows] for i in range(0, len(g), self.rows)
                            if len(g[i:i + self.rows]) >= self.world_size]
            self._plan = [batches[i] for i in rng.permutation(len(batches))]
            self._epoch = epoch
        return self._plan

    def global_batch(self, step: int) -> np.ndarray:
        return self.plan(step // self.count)[step % self.count]

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (first lines (b, n), answering lines (b, n)) of the step's batch."""
        rows = self.global_batch(step)
        lo, hi = self.rank * len(rows) // self.world_size, (self.rank + 1) * len(rows) // self.world_size
        src, tgt = line_ids(self.ids, self.table[rows[lo:hi]])
        return torch.from_numpy(src), torch.from_numpy(tgt)

    def tokens(self, step: int) -> int:
        """Answer characters of the step's global batch (what all ranks score)."""
        rows = self.global_batch(step)
        return int(len(rows) * self.table[rows[0], 1])
