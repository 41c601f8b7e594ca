"""Sampling speed (run by hand, not in the tests).

    python benchmarks/bench_sample.py            # LSTM 256 x 2, vocabulary 6,000
    python benchmarks/bench_sample.py --quick    # fewer repeats

Measures, for an untrained LSTM of 2 layers x 256 (embedding 128) over a 6,000-symbol vocabulary (about the
size of a simplified Tang corpus), generated characters per second for 1 and for 64 parallel samples — free text
(<eot> masked out so every row runs the full length) and 五绝 with --rhyme — at 1 thread and at torch's default
thread count, next to the bare forward step (the ceiling: what decoding costs on top is the difference). Then the wall time of whole `poetgen sample` processes, start-up included, next to the bare
`import torch` and `poetgen --help` for scale.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from poetgen.checkpoint import save_checkpoint
from poetgen.model import CharRNN, ModelConfig
from poetgen.sample import SampleOptions, generate
from poetgen.vocab import Vocab

V = 6000


def make_model() -> tuple[CharRNN, Vocab]:
    torch.manual_seed(0)
    chars = [chr(0x4E00 + i) for i in range(V - 4)] + ["，", "。"]
    vocab = Vocab(["<eot>", "<unk>", *chars])
    model = CharRNN(ModelConfig(len(vocab), cell="lstm", layers=2, hidden=256, embed=128)).eval()
    return model, vocab


class NoEnd(nn.Module):
    """The model with <eot> forbidden, so every row generates exactly `length` characters."""

    def __init__(self, model: CharRNN):
        super().__init__()
        self.model = model

    def forward(self, idx, hidden=None):
        logits, hidden = self.model(idx, hidden)
        logits[..., 0] = float("-inf")
        return logits, hidden


def chars_per_second(model, vocab, batch: int, options: SampleOptions, repeats: int) -> float:
    best = 0.0
    generate(model, vocab, [""], SampleOptions(num_samples=batch, length=5, seed=0))  # warm-up
    for r in range(repeats):
        options.seed, options.num_samples = r, batch
        res = generate(model, vocab, [""], options)
        chars = sum(s.tokens for s in res.samples)
        best = max(best, chars / res.seconds)
    return best


def forward_only(model, batch: int, steps: int, repeats: int) -> float:
    """The ceiling: the model's own step, fed a constant, with no decoding at all."""
    best = 0.0
    with torch.inference_mode():
        x, hidden = torch.ones(batch, 1, dtype=torch.long), None
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(steps):
                _, hidden = model(x, hidden)
            best = max(best, batch * steps / (time.perf_counter() - t))
    return best


def wall(cmd: list[str], repeats: int, cwd: Path) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    repeats = 1 if args.quick else 3
    model, vocab = make_model()
    free = NoEnd(model)
    default_threads = torch.get_num_threads()

    rows = []
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for batch in (1, 64):
            length = 400 if batch == 1 else 100
            cps = chars_per_second(free, vocab, batch, SampleOptions(length=length, temperature=1.0), repeats)
            rows.append((f"free text, length {length}", batch, threads, cps))
            cps = chars_per_second(model, vocab, batch, SampleOptions(form="五绝", rhyme=True), repeats)
            rows.append(("五绝 --rhyme", batch, threads, cps))
            rows.append(("model forward only", batch, threads, forward_only(model, batch, length, repeats)))
    torch.set_num_threads(default_threads)

    print(f"LSTM 2 x 256, embed 128, vocabulary {V:,}; torch {torch.__version__}, default threads {default_threads}")
    print(f"{'run':<24} {'samples':>7} {'threads':>7} {'chars/s':>10}")
    for name, batch, threads, cps in rows:
        print(f"{name:<24} {batch:>7} {threads:>7} {cps:>10,.0f}")

    with tempfile.TemporaryDirectory() as d:
        cwd = Path(d)
        save_checkpoint(cwd / "checkpoints" / "run" / "best.ckpt", model, vocab, rng=False)
        exe = [sys.executable, "-m", "poetgen"]
        runs = [
            ("python -c 'import torch'", [sys.executable, "-c", "import torch"]),
            ("poetgen --help", [*exe, "--help"]),
            ("poetgen sample -l 100", [*exe, "sample", "-l", "100", "--seed", "0"]),
            ("poetgen sample --form 五绝", [*exe, "sample", "--form", "五绝", "--seed", "0"]),
            ("  ... --rhyme -n 64", [*exe, "sample", "--form", "五绝", "--rhyme", "-n", "64", "--seed", "0"]),
        ]
        print(f"\n{'end to end (median of ' + str(repeats) + ')':<32} {'seconds':>8}")
        for name, cmd in runs:
            print(f"{name:<32} {wall(cmd, repeats, cwd):>8.2f}")


if __name__ == "__main__":
    main()
