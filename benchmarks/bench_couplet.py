"""对句 (issue 18): the encoder-decoder against poetgen's own left-to-right model, trained for the same wall time on the
same 全唐诗 poems.

    python benchmarks/bench_couplet.py --budget 30m [--data ../shared/data/tang] [--limit-files N]
                                       [--attention dot,additive] [--work DIR] [--threads 2] [--side-by-side]
                                       [--hidden 256] [--dropout 0.1] [--augment reversed,across]

1. Prepares the pairs (prepare --pairs --script simplified) and, from the same files with the same options, the
   text dataset: the split is by poem and seeded by each poem's text, so both hold out the same poems.
2. Trains the encoder-decoder (one per --attention kind) on the pairs, and the anchor on the text, each for
   --budget of wall time; the anchor is what `poetgen train --max-time BUDGET` trains (preset auto). One after the
   other with --threads; with --side-by-side all at once, each in a process pinned to a core of its own with one
   thread (on a 2-core machine: the anchor and one encoder-decoder), so that other work on the machine slows both
   alike.
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
import os
import shutil
import subprocess
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
from poetgen.training.config import parse_duration  # noqa: E402
from poetgen.training.loop import train  # noqa: E402
from poetgen.training.session import TrainRequest  # noqa: E402


def source_files(data: Path, limit: int | None) -> list[str]:
    files = sorted(data.glob("poet.tang.*.json"), key=lambda p: int(p.name.split(".")[2]))
    if not files:
        sys.exit(f"no poet.tang.*.json in {data}")
    return [str(f) for f in files[:limit]]


def seq2seq_flags(args, budget: float) -> dict:
    """The encoder-decoder's recipe as `poetgen train PAIRS` flags (the adaptive head is automatic for the 全唐诗's
    vocabulary; batches of 256 pairs: a pair has only 5-7 answer characters, and smaller batches leave the matrix
    products too small to be efficient)."""
    return {"cell": "gru", "layers": 2, "hidden": args.hidden, "embed": 128, "dropout": args.dropout,
            "batch_size": 256, "lr": 3e-3, "warmup_steps": 100, "max_time": budget, "eval_every": args.eval_every,
            "patience": 0, "sample_every": 0, "device": "cpu", "threads": args.threads, "seed": 1}


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
    ap.add_argument("--dropout", type=float, default=0.1, help="Encoder-decoder dropout.")
    ap.add_argument("--augment", default="", help="prepare --augment for the training pairs: reversed,across.")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--val-limit", type=int, default=None, help="Score only the first N validation pairs.")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    ap.add_argument("--work", type=Path, default=None, help="Keep the datasets and runs here (default: temporary).")
    ap.add_argument("--side-by-side", action="store_true",
                    help="Train the models at once, each pinned to a core of its own with one thread (else one after "
                         "the other with --threads).")
    ap.add_argument("--train-one", default=None, help=argparse.SUPPRESS)  # a child of --side-by-side
    ap.add_argument("--core", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    budget = parse_duration(args.budget)
    if args.train_one:
        os.sched_setaffinity(0, {args.core})
        torch.set_num_threads(1)
        train_one(args, budget, args.work, args.train_one)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-couplet-"))
    try:
        run(args, budget, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def train_one(args, budget: float, work: Path, name: str) -> None:
    """Train the model ``name`` (anchor, or an attention kind) into work/runs/<name>, set up as `poetgen train` sets
    a run up (poetgen.training.session: preset auto's speed probe, precision auto's bf16 probe). The anchor is
    `poetgen train TEXT --max-time BUDGET`; the encoder-decoder `poetgen train PAIRS <seq2seq_flags> --attention
    NAME`."""
    if name == "anchor":
        flags = {"max_time": budget, "device": "cpu", "threads": args.threads, "sample_every": 0}
        request = TrainRequest(str(work / "text"), overrides=flags)
    else:
        request = TrainRequest(str(work / "pairs"), overrides=seq2seq_flags(args, budget), attention=name)
    setup, _ = request.setup(probe=True)
    for note in setup.notes:
        print(f"{name}: {note}", file=sys.stderr)
    train(setup.config, setup.dataset, work / "runs" / (name if name == "anchor" else f"seq2seq-{name}"),
          model_options=None if name == "anchor" else {"attention": name})


def train_side_by_side(args, work: Path, names: list[str]) -> None:
    """One process per model, each pinned to a core of its own with one thread, all at once: the same wall time
    on the same machine, and whatever else runs beside them slows them alike (one after the other, a burst of other
    work would fall on one of them)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(names) > len(cores):
        sys.exit(f"--side-by-side trains {len(names)} models at once and needs as many cores; this process has "
                 f"{len(cores)}")
    procs = []
    for name, core in zip(names, cores):
        cmd = [sys.executable, __file__, "--train-one", name, "--core", str(core), "--budget", args.budget,
               "--hidden", str(args.hidden), "--dropout", str(args.dropout), "--eval-every", str(args.eval_every),
               "--threads", "1", "--work", str(work)]
        procs.append((name, subprocess.Popen(cmd)))
    failed = [name for name, p in procs if p.wait() != 0]
    if failed:
        sys.exit(f"training failed: {', '.join(failed)}")


def trained(work: Path, name: str):
    from poetgen.checkpoint.torch_io import load_model

    run = work / "runs" / name
    model, ckpt = load_model(run / "best.ckpt" if (run / "best.ckpt").exists() else run / "last.ckpt")
    return model, ckpt, int(ckpt.train_state.get("step", 0))


def precision(ckpt) -> str:
    return "bf16" if ckpt.train_config.get("precision") == "bf16" else "fp32"


def run(args, budget: float, work: Path) -> None:
    files = source_files(args.data, args.limit_files)
    t0 = time.perf_counter()
    options = dict(script="simplified", seed=1337, val_fraction=0.05)
    augment = tuple(a for a in args.augment.split(",") if a)
    prepare(files, work / "pairs", PrepareOptions(pairs=True, augment=augment, **options), force=True)
    prepare(files, work / "text", PrepareOptions(**options), force=True)
    pairs_ds, text_ds = load_dataset(work / "pairs"), load_dataset(work / "text")
    print(f"prepared {len(files)} file(s) in {time.perf_counter() - t0:.0f} s: {len(pairs_ds.pairs['train']):,} "
          f"train pairs, {len(pairs_ds.pairs['val']):,} val pairs; text {len(text_ds.train):,} / {len(text_ds.val):,} "
          "characters", file=sys.stderr)

    attentions = args.attention.split(",")
    if args.side_by_side:
        train_side_by_side(args, work, ["anchor", *attentions])
    else:
        for name in ["anchor", *attentions]:
            train_one(args, budget, work, name)

    rows = np.arange(len(pairs_ds.pairs["val"]))[: args.val_limit]
    lines = pairs_ds.pair_lines("val", rows)
    pairs = [(pairs_ds.vocab.decode(f.tolist()), pairs_ds.vocab.decode(a.tolist())) for f, a, _ in lines]
    refs = [a for _, a in pairs]
    results = []

    lm, ckpt, steps = trained(work, "anchor")
    unknown = {c for f, a in pairs for c in f + a + "，" if c not in ckpt.vocab}
    if unknown:
        sys.exit(f"the text vocabulary lacks {''.join(sorted(unknown))}: the datasets differ")
    nats, answers = anchor_scores(lm, ckpt.vocab, pairs)
    mc = ckpt.model_config
    results.append({"model": f"left-to-right LM ({mc.cell} {mc.layers}x{mc.hidden}, {mc.head} head, {precision(ckpt)}, "
                             f"{steps:,} steps)", "nats": nats,
                    "bleu": bleu4(answers, refs), "exact": sum(a == b for a, b in zip(answers, refs)) / len(refs),
                    "middle": None})

    for attention in attentions:
        model, ckpt, steps = trained(work, f"seq2seq-{attention}")
        full = evaluate_couplets(model, ckpt, [str(work / "pairs")], beam=4, limit=args.val_limit)
        has_middle = bool(np.any(pairs_ds.pairs["val"][:, 2] & MIDDLE))
        middle = [evaluate_couplets(model, ckpt, [str(work / "pairs")], beam=4, tones=tones, middle_only=True)
                  for tones in (False, True)] if has_middle else None
        mc = ckpt.model_config
        results.append({"model": f"encoder-decoder, {attention} attention ({mc.cell} {mc.layers}x{mc.hidden}, "
                                 f"{mc.head} head, {precision(ckpt)}, {steps:,} steps)",
                        "nats": full.nats_per_char, "bleu": full.bleu4, "exact": full.exact_match, "middle": middle})

    anchor = results[0]["nats"]
    how = "side by side, one core and one thread each" if args.side_by_side else f"one after the other, " \
        f"{args.threads or torch.get_num_threads()} threads"
    print(f"\n### 对句: encoder-decoder vs left-to-right LM, {args.budget} each, {how} ({len(files)} file(s) of "
          f"全唐诗, {len(pairs):,} val pairs)\n")
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
