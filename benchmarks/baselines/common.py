"""What the plain-PyTorch baselines share: reading a prepared dataset, threads, timing, scoring, JSON output.

The baselines read the token ids of a dataset written by `poetgen prepare` (train.npy, val.npy, vocab.json) with
numpy alone, so every side of a comparison sees the identical text, split and vocabulary. They import nothing from
poetgen: each is a recipe rebuilt from its public description in plain PyTorch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

EOT = 0  # poetgen's end-of-text id: ends every document in the id streams
LN2 = math.log(2.0)


def load_ids(dataset: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(train ids, val ids, vocabulary size) of a poetgen dataset directory, as int64 arrays in memory."""
    p = Path(dataset)
    vocab = json.loads((p / "vocab.json").read_text(encoding="utf-8"))
    train = np.load(p / "train.npy", mmap_mode="r").astype(np.int64)
    val = np.load(p / "val.npy", mmap_mode="r").astype(np.int64)
    return train, val, len(vocab["symbols"])


def contiguous_text(dataset: str | Path) -> tuple[np.ndarray, int, int, int]:
    """A dataset prepared with `--split tail` as one text: (ids, val_start, val_end, V).

    ids = train + val with the final end-of-text symbol dropped (a single-document text such as Tiny Shakespeare
    has one, at its very end; char-rnn and nanoGPT have none), so ids[val_start:val_end] is the validation text and
    everything before it is the text that precedes it.
    """
    train, val, V = load_ids(dataset)
    if len(val) and val[-1] == EOT:
        val = val[:-1]
    ids = np.concatenate([train, val])
    return ids, len(train), len(ids), V


def split_documents(ids: np.ndarray) -> list[np.ndarray]:
    """Documents of an id stream (each ends in EOT in the stream; returned without it)."""
    ends = np.flatnonzero(ids == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ids[s:e] for s, e in zip(starts, ends)]


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    return ap


def setup_torch(threads: int, seed: int):
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch


def report(result: dict, as_json: bool) -> None:
    """The result: JSON on stdout (for run.py), or key: value lines for a person."""
    if as_json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def score_recurrent(step, ids: np.ndarray, start: int, end: int, streams: int = 16, warmup: int = 1000,
                    window: int = 500) -> tuple[float, int]:
    """Exact mean cross-entropy (nats) of a recurrent model over targets ids[start:end], every one scored once.

    ``step(x, hidden) -> (logits, hidden)`` with x a LongTensor (B, T) and logits (B, T, V).

    The targets are cut into ``streams`` contiguous pieces run side by side; each piece's state is first primed on
    the ``warmup`` symbols before it (not scored; for the first piece these lie in the text before ``start``), so
    every target is predicted with at least ``warmup`` symbols of context, as in one unbroken pass.
    Returns (mean nats, number of targets).
    """
    import torch
    import torch.nn.functional as F

    if start < 1:
        raise ValueError("the first target needs an input before it (start >= 1)")
    n = end - start
    streams = max(1, min(streams, n))
    bounds = [start + (n * i) // streams for i in range(streams + 1)]
    total = 0.0
    with torch.inference_mode():
        # Prime: inputs ids[b - w - 1 : b - 1] bring each stream to the state just before its first input ids[b-1].
        w = max(0, min(warmup, bounds[0] - 1))  # the first stream has the fewest symbols before it
        hidden = None
        if w > 0:
            prime = np.stack([ids[b - 1 - w : b - 1] for b in bounds[:-1]])  # (S, w)
            for j in range(0, w, window):
                _, hidden = step(torch.from_numpy(prime[:, j : j + window]), hidden)
        # Score: stream s feeds ids[b_s - 1 + k] and predicts ids[b_s + k]; shorter streams are padded and masked.
        lens = np.diff(bounds)
        longest = int(lens.max())
        for j in range(0, longest, window):
            T = min(window, longest - j)
            x = np.zeros((streams, T), dtype=np.int64)
            y = np.zeros((streams, T), dtype=np.int64)
            mask = np.zeros((streams, T), dtype=bool)
            for s, b in enumerate(bounds[:-1]):
                k = max(0, min(T, lens[s] - j))
                x[s, :k] = ids[b - 1 + j : b - 1 + j + k]
                y[s, :k] = ids[b + j : b + j + k]
                mask[s, :k] = True
            logits, hidden = step(torch.from_numpy(x), hidden)
            nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), torch.from_numpy(y).reshape(-1),
                                  reduction="none")
            total += float(nll[torch.from_numpy(mask).reshape(-1)].double().sum())
    return total / n, n



def lstm_train_flops_per_char(vocab: int, embed: int, hidden: int, layers: int) -> float:
    """Model FLOPs of one training step per character for embedding -> LSTM layers -> linear head over ``vocab``.

    Forward, per character: each layer's four gates are a (4H x (I + H)) matrix times the input and the previous
    state, 2 * 4H * (I + H) FLOPs (I = embed for the first layer, H above it); the head 2 * H * V. Backward costs
    twice the forward (gradients of the inputs and of the weights), so a training step is 3x. Elementwise work
    (gate nonlinearities, softmax) and the embedding lookup are not counted.
    """
    gates = sum(2 * 4 * hidden * ((embed if layer == 0 else hidden) + hidden) for layer in range(layers))
    return 3.0 * (gates + 2 * hidden * vocab)
