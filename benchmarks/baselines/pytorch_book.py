"""The "pytorch-book" Tang poetry recipe (chenyuntc/pytorch-book, chapter 9) rebuilt in plain PyTorch.

    python benchmarks/baselines/pytorch_book.py DATASET --budget 600 [--json]
    python benchmarks/baselines/pytorch_book.py DATASET --budget 40 --no-score --json   # a speed trial only

DATASET: a directory from `poetgen prepare ../shared/data/tang --script simplified`; its training poems are
trained on and its validation poems scored, so poetgen and this recipe see the same poems and vocabulary. The
recipe, as the book's chapter-9 code describes it:

* every poem becomes <START> + characters + <EOP> and is cut or padded to 125 symbols: longer ones lose their end,
  shorter ones are padded at the FRONT with a padding symbol (Keras-style pad_sequences, padding='pre',
  truncating='post'); poetgen's end-of-text symbol plays <EOP>, two symbols are added for <START> and padding;
* embedding 128, LSTM 2 x 256, a linear output layer over the whole vocabulary (full softmax); PyTorch's default
  initialisation;
* batches of 128 poems, shuffled each epoch; the loss is the mean cross-entropy over all 124 predicted positions,
  padding included (as in the book); Adam, learning rate 1e-3;
* trained until --budget seconds of wall clock have passed (checked before each step).

Scoring, exact over the validation poems: nats (and bits) per REAL symbol, i.e. each poem's characters and its
<EOP> (poetgen scores each poem's characters and its end-of-text symbol: the same count), padding excluded; the
first character is predicted from <START>. Poems longer than 124 characters are scored whole (an LSTM runs any
length). Two ways, both reported: "as trained" (each poem pre-padded to 125 as in training) and "zero state"
(<START> fed to the all-zero state, as the book's generator does); `val_nats` is the better of the two.
Throughput: real characters trained per second (target positions holding a character or <EOP>, i.e. neither
padding nor the <START> that follows it, per second of training); `real_chars_per_sec_warm` leaves out the first
--warmup-steps steps (oneDNN builds its primitives on a first call), the figure a short speed trial reports.
--no-score skips the scoring (its figures are then None).
"""

from __future__ import annotations

import time

import numpy as np

from common import base_parser, load_ids, log, report, setup_torch, split_documents, EOT, LN2

MAXLEN = 125


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("dataset")
    ap.add_argument("--budget", type=float, default=600.0, help="training seconds (wall clock)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--embed", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps left out of real_chars_per_sec_warm")
    ap.add_argument("--no-score", action="store_true", help="train only (a speed trial): no validation scoring")
    args = ap.parse_args()
    torch = setup_torch(args.threads, args.seed)
    from torch import nn
    import torch.nn.functional as F

    train_ids, val_ids, V = load_ids(args.dataset)
    START, PAD = V, V + 1  # EOP = poetgen's end-of-text id 0
    n_sym = V + 2
    train_poems = split_documents(train_ids)
    val_poems = split_documents(val_ids)

    data = np.full((len(train_poems), MAXLEN), PAD, dtype=np.int64)  # (N, 125)
    for i, p in enumerate(train_poems):
        seq = np.concatenate([[START], p, [EOT]])[:MAXLEN]
        data[i, MAXLEN - len(seq):] = seq
    data_t = torch.from_numpy(data)

    class PoetryModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = nn.Embedding(n_sym, args.embed)
            self.lstm = nn.LSTM(args.embed, args.hidden, num_layers=2, batch_first=True)
            self.linear = nn.Linear(args.hidden, n_sym)

        def forward(self, x):  # (B, T) -> logits (B, T, n_sym)
            out, _ = self.lstm(self.embeddings(x))
            return self.linear(out)

    model = PoetryModel()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)

    steps, real, epoch_pos, losses = 0, 0, 0, []
    order = torch.randperm(len(data_t), generator=gen)
    t0 = time.perf_counter()
    t_warm, real_warm = None, 0
    while time.perf_counter() - t0 < args.budget:
        if epoch_pos >= len(order):
            order, epoch_pos = torch.randperm(len(data_t), generator=gen), 0
        batch = data_t[order[epoch_pos : epoch_pos + args.batch_size]]  # the last batch of an epoch may be short
        epoch_pos += args.batch_size
        x, y = batch[:, :-1], batch[:, 1:]
        loss = F.cross_entropy(model(x).reshape(-1, n_sym), y.reshape(-1))  # padding included, as in the book
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        real += int(((y != PAD) & (y != START)).sum())  # characters and <EOP>: what poetgen's streams hold
        if steps == args.warmup_steps:
            t_warm, real_warm = time.perf_counter(), real
        losses.append(loss.item())
        if steps % 50 == 0:
            log(f"pytorch-book step {steps} loss {np.mean(losses[-50:]):.4f} {time.perf_counter() - t0:.0f} s")
    train_seconds = time.perf_counter() - t0
    epochs = (steps * args.batch_size) / len(data_t)

    warm = (real - real_warm) / (t0 + train_seconds - t_warm) if t_warm and steps > args.warmup_steps else None

    model.eval()
    t1 = time.perf_counter()
    as_trained = zero_state = best = None
    if not args.no_score:
        as_trained = score(model, torch, F, val_poems, START, PAD, pre_pad=True)
        zero_state = score(model, torch, F, val_poems, START, PAD, pre_pad=False)
        best = min(as_trained, zero_state)
    scored = sum(len(p) + 1 for p in val_poems)
    report({
        "recipe": "pytorch-book ch. 9: pad to 125 (pre), embed 128, LSTM 2x256, full softmax, Adam 1e-3, batch 128",
        "val_nats": best, "val_bits": best / LN2 if best is not None else None, "val_nats_as_trained": as_trained,
        "val_nats_zero_state": zero_state, "val_symbols": scored, "val_poems": len(val_poems),
        "unigram_nats": unigram(train_ids, val_ids, V), "steps": steps, "epochs": epochs,
        "train_seconds": train_seconds, "real_chars_per_sec": real / train_seconds,
        "real_chars_per_sec_warm": warm, "warmup_steps": args.warmup_steps,
        "positions_per_sec": steps * args.batch_size * (MAXLEN - 1) / train_seconds,
        "padding_share": 1.0 - real / max(1, steps * args.batch_size * (MAXLEN - 1)),
        "final_train_loss": float(np.mean(losses[-20:])) if losses else None,
        "parameters": sum(p.numel() for p in model.parameters()), "score_seconds": time.perf_counter() - t1,
    }, args.json)


def score(model, torch, F, poems: list[np.ndarray], START: int, PAD: int, pre_pad: bool, batch: int = 64) -> float:
    """Mean nats per real symbol (characters + <EOP>) over the poems, padding excluded.

    Sequence of a poem: [PAD]*k + [START] + poem + [EOP], with k filling it to 125 when ``pre_pad`` (else 0);
    the targets scored are poem + [EOP]. Sequences are grouped by length and padded at the END (which cannot
    change the earlier outputs of a left-to-right LSTM), those positions masked.
    """
    seqs = []
    for p in poems:
        k = max(0, MAXLEN - len(p) - 2) if pre_pad else 0
        seqs.append((np.concatenate([np.full(k, PAD), [START], p, [EOT]]).astype(np.int64), k))
    seqs.sort(key=lambda s: len(s[0]))
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(seqs), batch):
            group = seqs[i : i + batch]
            T = max(len(s) for s, _ in group) - 1
            x = np.full((len(group), T), PAD, dtype=np.int64)
            y = np.zeros((len(group), T), dtype=np.int64)
            mask = np.zeros((len(group), T), dtype=bool)
            for r, (s, k) in enumerate(group):
                x[r, : len(s) - 1], y[r, : len(s) - 1] = s[:-1], s[1:]
                mask[r, k : len(s) - 1] = True  # targets from the first character (after START) to EOP
            logits = model(torch.from_numpy(x))
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), torch.from_numpy(y).reshape(-1),
                                  reduction="none")
            m = torch.from_numpy(mask).reshape(-1)
            total += float(nll[m].double().sum())
            count += int(m.sum())
    return total / count


def unigram(train_ids: np.ndarray, val_ids: np.ndarray, V: int) -> float:
    """Nats per symbol of a character-frequency model (add-one smoothed training counts) on the validation ids."""
    counts = np.bincount(train_ids, minlength=V).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_ids].mean())


if __name__ == "__main__":
    main()
