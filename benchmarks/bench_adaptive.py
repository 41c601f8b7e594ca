"""Full vs adaptive softmax head (issue 7): training characters per second, and the exact validation loss after a
fixed number of steps, for the same model, data, seed and schedule.

    nice -n 19 python benchmarks/bench_adaptive.py DATA --steps 300 --batch 64 --seq 64 --threads 2 \\
        --heads full adaptive adaptive:1000,4000

Each head trains through poetgen.training.loop.train (the real step), one after the other (back to back, so the ratios
are fair on a shared machine). chars/s is measured over steps 6..N (the first steps warm up allocators); the
validation loss is the whole val split (poetgen's end-of-run evaluation), in nats per character.

    nice -n 19 python benchmarks/bench_adaptive.py DATA --interleave 30 --batch 64 --seq 128 --threads 2

times the training step alone (forward with targets, backward, clipping, AdamW: the train loop's step) of every
head in turn, step by step (A B C A B C ...), so that a busy shared machine slows all heads alike; it reports the
median and best step time of each as characters per second.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from poetgen.training.config import TrainConfig
from poetgen.data.dataset import load_dataset
from poetgen.evaluation.units import LN2
from poetgen.training.loop import TrainCallbacks, train


class Clock(TrainCallbacks):
    def __init__(self, skip: int):
        self.skip, self.t0, self.t1, self.steps = skip, None, None, 0

    def on_step(self, info):
        if info["step"] % 50 == 0:
            print(f"  step {info['step']} loss {info['loss']:.3f}", file=sys.stderr, flush=True)
        if info["step"] == self.skip:
            self.t0 = time.perf_counter()
        elif info["step"] > self.skip:
            self.t1, self.steps = time.perf_counter(), self.steps + 1


def run(data, head_spec: str, args) -> dict:
    head, _, cut = head_spec.partition(":")
    cfg = TrainConfig.from_dict(dict(  # from_dict parses the cutoffs string
        layers=2, hidden=256, embed=128, dropout=0.0, batch_size=args.batch, seq_len=args.seq, max_steps=args.steps,
        warmup_steps=min(100, args.steps // 5), eval_every=10**9, sample_every=0, log_every=10**6, seed=args.seed,
        threads=args.threads, head=head, cutoffs=cut, device="cpu",
    ))
    clock = Clock(skip=min(5, args.steps - 1))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        result = train(cfg, data, Path(tmp) / "run", callbacks=clock)
        wall = time.perf_counter() - t
    tokens = clock.steps * args.batch * args.seq
    return {
        "head": head_spec, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "chars_per_s": tokens / (clock.t1 - clock.t0), "val_nats": result.last_val_loss,
        "val_bpc": result.last_val_loss / LN2 if result.last_val_loss is not None else None,
        "train_loss": result.train_loss, "wall_s": wall,
    }


def interleave(data, args) -> None:
    import numpy as np

    from poetgen.model.rnn import CharRNN, ModelConfig
    from poetgen.data.batches import StreamBatches

    batches = StreamBatches(data.train, args.batch, args.seq)
    setups = []
    for spec in args.heads:
        head, _, cut = spec.partition(":")
        cfg = TrainConfig.from_dict(dict(layers=2, hidden=256, embed=128, dropout=0.0, head=head, cutoffs=cut))
        torch.manual_seed(args.seed)
        model = CharRNN(ModelConfig(vocab_size=len(data.vocab), **cfg.model_dict())).train()
        setups.append((spec, model, torch.optim.AdamW(model.parameters(), lr=2e-3), [None]))
    times: dict[str, list[float]] = {spec: [] for spec, *_ in setups}
    for step in range(args.interleave):
        batch = batches.get(step % len(batches))
        for spec, model, opt, hidden in setups:
            t = time.perf_counter()
            loss, h = model(batch[:, :-1], hidden[0], batch[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            hidden[0] = tuple(x.detach() for x in h)
            times[spec].append(time.perf_counter() - t)
    chars = args.batch * args.seq
    base = float(np.median(times[args.heads[0]][2:]))
    for spec, ts in times.items():
        ts = ts[2:]  # warm-up
        med = float(np.median(ts))
        print(json.dumps({"head": spec, "batch": args.batch, "seq": args.seq, "steps": len(ts),
                          "chars_per_s_median": chars / med, "chars_per_s_best": chars / min(ts),
                          "speedup_vs_first": base / med}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-val", action="store_true", help="drop the validation split (timing only)")
    p.add_argument("--interleave", type=int, default=0, metavar="STEPS", help="time steps only, heads in turn")
    p.add_argument("--heads", nargs="+", default=["full", "adaptive"], help="full | adaptive | adaptive:N,N,...")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    if args.interleave:
        interleave(data, args)
        return
    if args.no_val:
        data.val = data.val[:1]
    for spec in args.heads:
        print(json.dumps(run(data, spec, args)), flush=True)


if __name__ == "__main__":
    main()
