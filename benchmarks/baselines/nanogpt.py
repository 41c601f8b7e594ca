"""nanoGPT's documented CPU recipe ("baby GPT" on shakespeare_char) rebuilt as a small plain-PyTorch transformer.

    python benchmarks/baselines/nanogpt.py DATASET --max-iters 2000 [--json]

DATASET: a directory from `poetgen prepare input.txt --split tail --val-fraction 0.1`. The recipe is the one
nanoGPT's README gives for a CPU (config/train_shakespeare_char.py with --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0), with the config's and
train.py's other values:

* GPT: token + learned position embeddings, 4 pre-LayerNorm blocks (causal self-attention with 4 heads, MLP
  128 -> 512 -> 128 with GELU), final LayerNorm, output layer tied to the token embedding; no biases (bias=False);
  weights N(0, 0.02), the residual output projections N(0, 0.02 / sqrt(2 * n_layer));
* batches of 12 windows of 64 characters at random offsets of the training text;
* AdamW (betas 0.9, 0.99), weight decay 0.1 on matrices and embeddings only, gradient norm clipped to 1.0;
* learning rate 1e-3, linear warmup over 100 iterations, cosine decay to 1e-4 at iteration 2000.

nanoGPT's periodic evaluations are skipped (they do not change training); the reported wall time is training
alone. Scoring is exact over every character of the validation text, with sliding windows: a window of 64
characters moves by --stride (default 32) and only its last `stride` predictions are scored, so every character is
scored once, with between 65 - stride and 64 characters of context (the characters before the validation text
serve as context for its start). nanoGPT's own estimate averages random windows, where a character has 0-63
characters of context (32 on average): this scoring gives the model more context than that.
"""

from __future__ import annotations

import math
import time

import numpy as np

from common import base_parser, contiguous_text, log, report, setup_torch, LN2


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("dataset")
    ap.add_argument("--max-iters", type=int, default=2000)
    ap.add_argument("--lr-decay-iters", type=int, default=None, help="default: --max-iters")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup-iters", type=int, default=100)
    ap.add_argument("--stride", type=int, default=32, help="scoring: window step (1 = full context everywhere)")
    args = ap.parse_args()
    torch = setup_torch(args.threads, args.seed)
    from torch import nn
    import torch.nn.functional as F

    ids, val_start, val_end, V = contiguous_text(args.dataset)
    train = torch.from_numpy(ids[:val_start])
    C, nh, Tb, nl = args.n_embd, args.n_head, args.block_size, args.n_layer

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(C, bias=False), nn.LayerNorm(C, bias=False)
            self.qkv = nn.Linear(C, 3 * C, bias=False)
            self.proj = nn.Linear(C, C, bias=False)
            self.fc = nn.Linear(C, 4 * C, bias=False)
            self.fc_proj = nn.Linear(4 * C, C, bias=False)

        def forward(self, x):  # (B, T, C)
            B, T, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
            return x + self.fc_proj(F.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(Tb, C)
            self.blocks = nn.ModuleList(Block() for _ in range(nl))
            self.ln_f = nn.LayerNorm(C, bias=False)
            self.head = nn.Linear(C, V, bias=False)
            self.head.weight = self.wte.weight  # tied
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * nl) if name.endswith(("proj.weight",)) else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx):  # (B, T) -> logits (B, T, V)
            x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
            for b in self.blocks:
                x = b(x)
            return self.head(self.ln_f(x))

    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99))
    decay_iters = args.lr_decay_iters or args.max_iters

    def lr_at(it: int) -> float:
        if it < args.warmup_iters:
            return args.lr * (it + 1) / (args.warmup_iters + 1)
        if it > decay_iters:
            return args.min_lr
        ratio = (it - args.warmup_iters) / max(1, decay_iters - args.warmup_iters)
        return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)

    offsets = torch.arange(Tb + 1)
    t0 = time.perf_counter()
    losses = []
    for it in range(args.max_iters):
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        ix = torch.randint(len(train) - Tb - 1, (args.batch_size,))
        chunk = train[ix[:, None] + offsets]  # (B, Tb + 1)
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (it + 1) % 250 == 0:
            log(f"nanogpt iter {it + 1} loss {np.mean(losses[-250:]):.4f} {time.perf_counter() - t0:.0f} s")
    train_seconds = time.perf_counter() - t0

    model.eval()
    t1 = time.perf_counter()
    nats, scored = score_windows(model, torch, F, ids, val_start, val_end, Tb, args.stride)
    report({
        "recipe": "nanoGPT CPU baby GPT: 4 layers x 4 heads x 128, block 64, batch 12, AdamW 1e-3 cosine, 2000 iters",
        "val_nats": nats, "val_bits": nats / LN2, "val_chars": scored, "iters": args.max_iters,
        "train_seconds": train_seconds, "chars_per_sec": args.max_iters * args.batch_size * Tb / train_seconds,
        "final_train_loss": float(np.mean(losses[-50:])) if losses else None, "stride": args.stride,
        "parameters": sum(p.numel() for p in model.parameters()), "score_seconds": time.perf_counter() - t1,
    }, args.json)


def score_windows(model, torch, F, ids: np.ndarray, start: int, end: int, block: int, stride: int,
                  batch: int = 256) -> tuple[float, int]:
    """Mean nats over targets ids[start:end], each scored once, as the last `stride` predictions of a window.

    Window w covers inputs ids[a : a + block] (a = its start) and predicts ids[a + 1 : a + block + 1]; it scores
    the targets from max(a + block + 1 - stride, first not yet scored) on. The last window is shifted back to end
    at `end`, scoring only what is left.
    """
    if not 1 <= stride <= block or start < block:
        raise ValueError("need 1 <= stride <= block and at least `block` symbols before the scored text")
    firsts = list(range(start, end, stride))  # first target each window scores
    total = 0.0
    with torch.inference_mode():
        for i in range(0, len(firsts), batch):
            group = firsts[i : i + batch]
            # A window scoring targets f .. f+stride-1 ends with target f+stride-1: inputs start at f+stride-1-block.
            a = np.array([min(f + stride, end) - 1 - block for f in group])  # (W,) window starts (last: shifted)
            x = torch.from_numpy(np.stack([ids[s : s + block] for s in a]))  # (W, block)
            y = torch.from_numpy(np.stack([ids[s + 1 : s + block + 1] for s in a]))
            nll = F.cross_entropy(model(x).float().reshape(-1, model.head.out_features), y.reshape(-1),
                                  reduction="none").view(len(group), block)
            for r, f in enumerate(group):
                lo = f - (a[r] + 1)  # column of target f
                total += float(nll[r, lo:].double().sum())
    return total / (end - start), end - start


if __name__ == "__main__":
    main()
