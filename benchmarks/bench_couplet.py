"""对句 (issue 18): the encoder-decoder against poetgen's own left-to-right model, trained for the same wall time on the
same 全唐诗 poems.

    python benchmarks/bench_couplet.py --budget 30m [--data ../shared/data/tang] [--limit-files N]
                                       [--attention dot,additive] [--work DIR] [--threads 2]

1. Prepares the pairs (prepare --pairs --script simplified) and, from the same files with the same options, the
   text dataset: the split is by poem and seeded by each poem's text, so both hold out the same poems.
2. Trains the encoder-decoder (one per --attention kind) on the pairs, and the anchor on the text, each for
   --budget of wall time; the anchor is what `poetgen train --max-time BUDGET` trains (preset auto).
3. On every pair of the validation split: the cross-entropy of the answering line given its first line (nats per
   answer character; the anchor reads <eot>, the first line and its ，then scores the answer), and character BLEU-4
   with beam 4 for both (the same masks for both: the first line's length and punctuation, Han characters, no
   first-line character at its same position).
4. On the 律诗 middle couplets (颔联, 颈联) of the validation split: the encoder-decoder's tone opposition at the line
   end with --tones, and its same-length rate, with and without --tones.

Prints a markdown table for benchmarks/RESULTS.md. Everything is written under --work (default: a temporary
directory, removed at the end); nothing made from the shared data is kept.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from poetgen.data.dataset import MIDDLE, load_dataset  # noqa: E402
from poetgen.data.prepare import PrepareOptions, prepare  # noqa: E402
from poetgen.evaluation.couplets import bleu4, evaluate_couplets  # noqa: E402
from poetgen.generation.couplet import Masks  # noqa: E402
from poetgen.model.rnn import select_hidden  # noqa: E402
from poetgen.training.config import TrainConfig, parse_duration, resolve_config  # noqa: E402
from poetgen.training.loop import machine_speed, train  # noqa: E402


def source_files(data: Path, limit: int | None) -> list[str]:
    files = sorted(data.glob("poet.tang.*.json"), key=lambda p: int(p.name.split(".")[2]))
    if not files:
        sys.exit(f"no poet.tang.*.json in {data}")
    return [str(f) for f in files[:limit]]


def seq2seq_config(args, budget: float) -> TrainConfig:
    return TrainConfig(cell="gru", layers=2, hidden=args.hidden, embed=128, dropout=0.1, batch_size=64, lr=3e-3,
                       warmup_steps=100, max_time=budget, eval_every=args.eval_every, patience=0, sample_every=0,
                       device="cpu", threads=args.threads, seed=1)


@torch.no_grad()
def anchor_scores(model, vocab, pairs, width: int = 4) -> tuple[float, list[str]]:
    """The LM's nats per answer character given '<eot> first，' (all pairs, batched by length), and its beam answers
    under the encoder-decoder's masks."""
    model.eval()
    comma = vocab.id("，")
    masks = Masks(vocab)
    nats, chars, answers = 0.0, 0, {}
    lengths = sorted({len(f) for f, _ in pairs})
    for n in lengths:
        which = [i for i, (f, _) in enumerate(pairs) if len(f) == n]
        for lo in range(0, len(which), 128):
            rows = which[lo:lo + 128]
            first = torch.tensor([vocab.encode(pairs[i][0]) for i in rows])  # (P, n)
            answer = torch.tensor([vocab.encode(pairs[i][1]) for i in rows])  # (P, n)
            P = len(rows)
            prefix = torch.cat([torch.zeros(P, 1, dtype=torch.long), first, torch.full((P, 1), comma)], dim=1)
            logits, _ = model(torch.cat([prefix, answer[:, :-1]], dim=1))  # (P, n + 2 + n - 1, V)
            logp = torch.log_softmax(logits[:, n + 1:].float(), dim=-1)  # the positions predicting the answer
            nats -= float(logp.gather(2, answer[:, :, None]).sum())
            chars += answer.numel()
            # beam search, `width` hypotheses per first line, under the same masks as the encoder-decoder's
            _, hidden = model(prefix[:, :-1])
            hidden = select_hidden(hidden, torch.arange(P).repeat_interleave(width))
            tokens = torch.full((P * width,), comma)
            allowed = np.stack([masks.line(pairs[i][0]) for i in rows])  # (P, n, V)
            score = np.where(np.arange(P * width) % width == 0, 0.0, -np.inf)
            hist = np.zeros((P * width, 0), dtype=np.int64)
            for t in range(n):
                out, hidden = model(tokens[:, None], hidden)
                lp = torch.log_softmax(out[:, 0].float(), dim=-1).numpy().astype(np.float64)
                lp = np.where(allowed[np.arange(P * width) // width, t], lp, -np.inf)
                total = (score[:, None] + lp).reshape(P, -1)
                best = np.argsort(-total, axis=1, kind="stable")[:, :width]
                parent = (best // lp.shape[1] + np.arange(P)[:, None] * width).reshape(-1)
                chosen = (best % lp.shape[1]).reshape(-1)
                score = np.take_along_axis(total, best, axis=1).reshape(-1)
                hidden = select_hidden(hidden, torch.from_numpy(parent))
                hist = np.concatenate([hist[parent], chosen[:, None]], axis=1)
                tokens = torch.from_numpy(chosen)
            for p, i in enumerate(rows):
                answers[i] = vocab.decode(hist[p * width].tolist())  # rows of a beam are sorted best first
    return nats / chars, [answers[i] for i in range(len(pairs))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "tang")
    ap.add_argument("--limit-files", type=int, default=None, help="Only the first N files (tests, quick looks).")
    ap.add_argument("--budget", default="30m", help="Training wall time of each model (90s, 30m, ...).")
    ap.add_argument("--attention", default="dot", help="Attention kinds to train, comma-separated: dot,additive.")
    ap.add_argument("--hidden", type=int, default=256, help="Encoder-decoder hidden size (per direction).")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--val-limit", type=int, default=None, help="Score only the first N validation pairs.")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    ap.add_argument("--work", type=Path, default=None, help="Keep the datasets and runs here (default: temporary).")
    args = ap.parse_args()
    budget = parse_duration(args.budget)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-couplet-"))
    try:
        run(args, budget, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args, budget: float, work: Path) -> None:
    files = source_files(args.data, args.limit_files)
    t0 = time.perf_counter()
    options = dict(script="simplified", seed=1337, val_fraction=0.05)
    prepare(files, work / "pairs", PrepareOptions(pairs=True, **options), force=True)
    prepare(files, work / "text", PrepareOptions(**options), force=True)
    pairs_ds, text_ds = load_dataset(work / "pairs"), load_dataset(work / "text")
    print(f"prepared {len(files)} file(s) in {time.perf_counter() - t0:.0f} s: {len(pairs_ds.pairs['train']):,} "
          f"train pairs, {len(pairs_ds.pairs['val']):,} val pairs; text {len(text_ds.train):,} / {len(text_ds.val):,} "
          "characters", file=sys.stderr)

    rows = np.arange(len(pairs_ds.pairs["val"]))[: args.val_limit]
    lines = pairs_ds.pair_lines("val", rows)
    pairs = [(pairs_ds.vocab.decode(f.tolist()), pairs_ds.vocab.decode(a.tolist())) for f, a, _ in lines]
    refs = [a for _, a in pairs]
    results = []

    # the anchor: what `poetgen train --max-time BUDGET` trains on the text of the same poems
    anchor_cfg = resolve_config(None, None, {"max_time": budget, "device": "cpu", "threads": args.threads,
                                             "sample_every": 0}, train_tokens=len(text_ds.train),
                                speed=lambda settings: machine_speed("cpu", args.threads or None))
    r = train(anchor_cfg, text_ds, work / "runs" / "anchor")
    from poetgen.checkpoint.torch_io import load_model

    lm, ckpt = load_model(r.best_checkpoint or r.last_checkpoint)
    unknown = {c for f, a in pairs for c in f + a + "，" if c not in ckpt.vocab}
    if unknown:
        sys.exit(f"the text vocabulary lacks {''.join(sorted(unknown))}: the datasets differ")
    nats, answers = anchor_scores(lm, ckpt.vocab, pairs)
    results.append({"model": f"left-to-right LM ({anchor_cfg.cell} {anchor_cfg.layers}x{anchor_cfg.hidden}, "
                             f"{r.step:,} steps)", "nats": nats, "bleu": bleu4(answers, refs),
                    "exact": sum(a == b for a, b in zip(answers, refs)) / len(refs), "middle": None})

    for attention in args.attention.split(","):
        cfg = seq2seq_config(args, budget)
        r = train(cfg, pairs_ds, work / "runs" / f"seq2seq-{attention}", model_options={"attention": attention})
        model, ckpt = load_model(r.best_checkpoint or r.last_checkpoint)
        full = evaluate_couplets(model, ckpt, [str(work / "pairs")], beam=4, limit=args.val_limit)
        has_middle = bool(np.any(pairs_ds.pairs["val"][:, 2] & MIDDLE))
        middle = [evaluate_couplets(model, ckpt, [str(work / "pairs")], beam=4, tones=tones, middle_only=True)
                  for tones in (False, True)] if has_middle else None
        results.append({"model": f"encoder-decoder, {attention} attention (gru 2x{args.hidden}, {r.step:,} steps)",
                        "nats": full.nats_per_char, "bleu": full.bleu4, "exact": full.exact_match, "middle": middle})

    anchor = results[0]["nats"]
    print(f"\n### 对句: encoder-decoder vs left-to-right LM, {args.budget} each ({len(files)} file(s) of 全唐诗, "
          f"{len(pairs):,} val pairs)\n")
    print("| model | nats/char of the answer given the first line | vs LM | BLEU-4 (char, beam 4) | exact match | "
          "律诗 middle: end tones opposed, --tones | same length (plain / --tones) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for x in results:
        m = x["middle"]
        mid = (f"{m[1].rates.tone_end_rate:.1%} of {m[1].rates.tone_end_lines}",
               f"{m[0].rates.same_length_rate:.1%} / {m[1].rates.same_length_rate:.1%}") if m else ("-", "-")
        change = "" if x is results[0] else f"{(x['nats'] - anchor) / anchor:+.1%}"
        print(f"| {x['model']} | {x['nats']:.3f} | {change} | {x['bleu']:.2f} | {x['exact']:.1%} | {mid[0]} | "
              f"{mid[1]} |")
    if not all(math.isfinite(x["nats"]) for x in results):
        sys.exit("a figure is not finite")


if __name__ == "__main__":
    main()
