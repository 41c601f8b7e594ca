"""Sampling speed and start-up (issue 7, target 4), next to a plain per-step nn.LSTM loop measured in the same run.

    python benchmarks/bench_sample.py            # the figures (a few minutes)
    python benchmarks/bench_sample.py --quick    # shorter runs, fewer repeats
    python benchmarks/bench_sample.py --json     # the rows as JSON on stdout

Model: an untrained LSTM of 2 layers x 256 (embedding 128), at a vocabulary of 65 symbols (Tiny Shakespeare's
size) and 6,000 (about a simplified Tang corpus'), full softmax; at 6,000 also with the adaptive head.

* poetgen, free text: ``generate`` on the numpy engine (what `poetgen sample` runs on the CPU), temperature 1,
  <eot> masked so every row runs the full length; characters per second for 1 and for 64 parallel samples,
  decoding included, prefix included. Also 五绝 --rhyme (a poem and its <eot> per row) at vocabulary 6,000, and
  the cost of --tones --rhyme (平水韵) per poem against --form alone for 五绝 and 七律: whole generate calls of 64
  poems, one BLAS thread, trials alternating, median (issue 16: at most 1.3x).
* anchor: the loop a user writes first, in torch — Embedding -> nn.LSTM -> Linear, softmax of logits / 1.0,
  torch.multinomial, one forward call per character with the state carried (``PlainLoop``). The free-text rows
  with an anchor time the two in turns (poetgen, anchor, poetgen, ...; TRIALS of each after a warm-up of both)
  and give each side's median, so both see the same minutes of a machine whose speed drifts (issue 20).
* whole processes: `poetgen sample` calls (start-up, checkpoint load, sampling, output) on a saved 6,000-symbol
  checkpoint, `poetgen --help`, and `python -c "import torch"` for scale; the median of a few runs.

Threads: poetgen as the CLI runs it (numpy's OpenBLAS threads picked by generation.threads.ThreadTuner while sampling,
OPENBLAS_THREAD_TIMEOUT=4 as the CLI sets it; the tuner keeps what it learned between the calls of one process, as
for a library caller that samples in a loop); the anchor at the better of torch's 1 thread and its default count,
each measured once before the trials. benchmarks/run.py runs ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # before numpy loads OpenBLAS, as poetgen's CLI does

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from poetgen.checkpoint.torch_io import save_checkpoint  # noqa: E402
from poetgen.model.runtime import Runtime  # noqa: E402
from poetgen.model.rnn import CharRNN, ModelConfig  # noqa: E402
from poetgen.generation.sample import SampleOptions, generate
from poetgen.data.vocab import Vocab

VOCABS = (65, 6000)
ANCHOR = "plain per-step nn.LSTM loop (torch, same run)"


def make_vocab(V: int) -> Vocab:
    chars = [chr(0x4E00 + i) for i in range(V - 4)] + ["，", "。"]  # Han characters, so poems in form work
    return Vocab(["<eot>", "<unk>", *chars])


def make_model(V: int, head: str = "full") -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(ModelConfig(V, cell="lstm", layers=2, hidden=256, embed=128, head=head)).eval()


class NoEnd:
    """An engine with <eot> forbidden, so every row generates exactly `length` characters."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def use_table(self) -> None:
        self.runtime.use_table()

    def prefix(self, prefixes):
        scores = self.runtime.prefix(prefixes)
        scores[:, 0] = -np.inf
        return scores

    def select(self, index) -> None:
        self.runtime.select(index)

    def step(self, tokens):
        scores = self.runtime.step(tokens)
        scores[:, 0] = -np.inf
        return scores

    def __getattr__(self, name):  # the runtime's sizes, by which ThreadTuner keeps what it learned
        if name == "runtime":
            raise AttributeError(name)
        return getattr(self.runtime, name)


def poetgen_rate(engine, vocab: Vocab, batch: int, options: SampleOptions, repeats: int) -> tuple[float, int]:
    """Best characters per second over ``repeats`` calls of generate (after a warm-up call), and the BLAS thread
    count that call ended on."""
    best, threads = 0.0, 1
    generate(engine, vocab, [""], SampleOptions(num_samples=batch, length=5, seed=0))
    for r in range(repeats):
        options.seed, options.num_samples = r, batch
        res = generate(engine, vocab, [""], options)
        rate = sum(s.tokens for s in res.samples) / res.seconds
        if rate > best:
            best, threads = rate, res.threads
    return best, threads


PROSODY_LIMIT = 1.3  # issue 16: --tones --rhyme costs at most 1.3x plain --form per poem


def prosody_cost(runtime: Runtime, vocab: Vocab, form: str, batch: int, trials: int) -> tuple[float, float]:
    """Milliseconds per poem of ``generate`` with ``--form`` alone and with ``--tones --rhyme`` (pingshui), whole
    calls (masks built, prefix, decoding), trials alternating so both see the same machine; -> (plain, prosody)
    medians. A warm-up call of each first (the vocabulary's rhyme-book lookup is cached per process)."""
    kinds = {"plain": {}, "prosody": {"tones": True, "rhyme": True}}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for trial in range(trials + 1):
        for kind, extra in (kinds.items() if trial % 2 else reversed(kinds.items())):
            o = SampleOptions(form=form, num_samples=batch, seed=trial, temperature=1.0, **extra)
            t = time.perf_counter()
            generate(runtime, vocab, [""], o, threads=1)
            if trial:
                times[kind].append((time.perf_counter() - t) * 1000 / batch)
    return statistics.median(times["plain"]), statistics.median(times["prosody"])


TRIALS = {False: 5, True: 3}  # alternating trials of each side, by quick


class PlainLoop:
    """The anchor: a per-step nn.LSTM sampling loop, its model and generator built once."""

    def __init__(self, V: int):
        torch.manual_seed(0)
        self.emb, self.lstm, self.head = nn.Embedding(V, 128), nn.LSTM(128, 256, 2, batch_first=True), nn.Linear(256, V)
        self.gen = torch.Generator().manual_seed(0)
        self.threads = torch.get_num_threads()

    def rate(self, batch: int, length: int) -> float:
        """Characters per second of one run of ``length`` steps at ``batch`` streams, on self.threads threads."""
        default = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                x, hidden = torch.zeros(batch, 1, dtype=torch.long), None
                t = time.perf_counter()
                for _ in range(length):
                    out, hidden = self.lstm(self.emb(x), hidden)
                    probs = torch.softmax(self.head(out[:, -1]) / 1.0, dim=-1)  # (batch, V)
                    x = torch.multinomial(probs, 1, generator=self.gen)  # (batch, 1)
                return batch * length / (time.perf_counter() - t)
        finally:
            torch.set_num_threads(default)

    def pick_threads(self, batch: int, length: int) -> int:
        """The better of torch's 1 thread and its default count for this shape (a warm-up run, then one run each)."""
        rates = {}
        for threads in dict.fromkeys((1, torch.get_num_threads())):
            self.threads = threads
            self.rate(batch, min(length, 20))
            rates[threads] = self.rate(batch, length)
        self.threads = max(rates, key=rates.get)
        return self.threads


def side_by_side(engine, vocab: Vocab, V: int, batch: int, length: int, trials: int) -> dict:
    """poetgen's ``generate`` and the plain loop in turns, ``trials`` runs each after a warm-up of both: each side's
    median characters per second, the BLAS threads poetgen's last call ended on, the anchor's torch threads."""
    anchor = PlainLoop(V)
    anchor_threads = anchor.pick_threads(batch, length)
    generate(engine, vocab, [""], SampleOptions(num_samples=batch, length=5, seed=0))
    ours, theirs, threads = [], [], 1
    for trial in range(trials):
        res = generate(engine, vocab, [""], SampleOptions(num_samples=batch, length=length, temperature=1.0,
                                                          seed=trial))
        ours.append(sum(x.tokens for x in res.samples) / res.seconds)
        threads = res.threads
        theirs.append(anchor.rate(batch, length))
    return {"value": statistics.median(ours), "anchor": statistics.median(theirs), "threads": threads,
            "anchor_threads": anchor_threads, "trials": trials, "values": ours, "anchors": theirs}


def wall(cmd: list[str], repeats: int, cwd: Path) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(quick: bool = False) -> list[dict]:
    """Every figure as a row: {name, value, unit, anchor (or None), anchor_name} and, for speeds, vocab, streams,
    threads; for whole processes, command (what follows `python -m`)."""
    repeats = 1 if quick else 3
    lengths = {1: 150 if quick else 400, 64: 40 if quick else 100}
    rows: list[dict] = []

    def row(name, value, unit, anchor=None, anchor_name="", **extra) -> None:
        rows.append({"name": name, "value": value, "unit": unit, "anchor": anchor, "anchor_name": anchor_name,
                     **extra})

    for V in VOCABS:
        vocab = make_vocab(V)
        model = make_model(V)
        runtime = Runtime.from_state(model.config, model.state_dict())
        for batch, length in lengths.items():
            x = side_by_side(NoEnd(runtime), vocab, V, batch, length, TRIALS[quick])
            row(f"free text, vocab {V:,}, {batch} stream{'s' * (batch > 1)}", x.pop("value"), "chars/s",
                x.pop("anchor"), ANCHOR, vocab=V, streams=batch, **x)
        if V >= 1000:
            for batch in lengths:
                cps, threads = poetgen_rate(runtime, vocab, batch, SampleOptions(form="五绝", rhyme=True), repeats)
                row(f"五绝 --rhyme, vocab {V:,}, {batch} stream{'s' * (batch > 1)}", cps, "chars/s",
                    vocab=V, streams=batch, threads=threads)
            for form in ("五绝", "七律"):
                plain, prosody = prosody_cost(runtime, vocab, form, 64, 5 if quick else 11)
                row(f"{form} --tones --rhyme vs --form, vocab {V:,}, 64 poems, ms/poem (limit {PROSODY_LIMIT}x)",
                    prosody, "ms/poem", plain, f"--form {form} alone (same run, alternating trials, median)",
                    vocab=V, streams=64, limit=PROSODY_LIMIT, ok=prosody <= PROSODY_LIMIT * plain)
            adaptive = make_model(V, head="adaptive")
            rt = Runtime.from_state(adaptive.config, adaptive.state_dict())
            for batch, length in lengths.items():
                cps, threads = poetgen_rate(NoEnd(rt), vocab, batch, SampleOptions(length=length, temperature=1.0),
                                            repeats)
                row(f"free text, vocab {V:,} adaptive head {adaptive.config.cutoffs}, {batch} stream"
                    f"{'s' * (batch > 1)}", cps, "chars/s", vocab=V, streams=batch, threads=threads)

    with tempfile.TemporaryDirectory() as d:
        cwd = Path(d)
        V = 6000
        save_checkpoint(cwd / "checkpoints" / "run" / "best.ckpt", make_model(V), make_vocab(V), rng=False)
        exe = [sys.executable, "-m", "poetgen"]
        calls = [
            ("python -c 'import torch'", [sys.executable, "-c", "import torch"]),
            ("poetgen --help", [*exe, "--help"]),
            ("poetgen sample --form 五绝 -n 4", [*exe, "sample", "--form", "五绝", "-n", "4", "--seed", "0"]),
            ("poetgen sample -l 100", [*exe, "sample", "-l", "100", "--seed", "0"]),
            ("poetgen sample --form 五绝 --rhyme -n 64", [*exe, "sample", "--form", "五绝", "--rhyme", "-n", "64",
                                                       "--seed", "0"]),
        ]
        times = {name: wall(cmd, 2 if quick else 5, cwd) for name, cmd in calls}
    torch_import = times["python -c 'import torch'"]
    for name, seconds in times.items():
        if "import torch" in name:
            row(f"`{name}` (for scale)", seconds, "s", command=name)
        else:
            row(f"whole `{name}` call (vocab {V:,})" if "sample" in name else f"`{name}`", seconds, "s",
                torch_import, "python -c 'import torch'", command=name)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs, one repeat")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    rows = measure(args.quick)
    if args.json:
        print(json.dumps({
            "rows": rows,
            # the shape benchmarks/run.py's hook reads
            "speed": [{"run": r["name"], "samples": r["streams"], "threads": r["threads"], "chars_per_sec": r["value"]}
                      for r in rows if r["unit"] == "chars/s"],
            "wall": [{"run": r["command"], "seconds": r["value"]} for r in rows if r["unit"] == "s"],
        }, ensure_ascii=False, indent=2))
        return
    print(f"LSTM 2 x 256, embed 128, untrained; numpy {np.__version__}, torch {torch.__version__}; poetgen's threads "
          "tuned while sampling, the anchor's the better of torch on 1 and on its default count")
    print(f"{'run':<58} {'poetgen':>12} {'anchor':>12} {'ratio':>7}")
    for r in rows:
        fmt = "{:>12,.0f}" if r["unit"] == "chars/s" else "{:>12.2f}"
        anchor = fmt.format(r["anchor"]) if r["anchor"] else f"{'':>12}"
        ratio = f"{r['value'] / r['anchor']:>6.2f}x" if r["anchor"] else ""
        print(f"{r['name'] + ' (' + r['unit'] + ')':<58} {fmt.format(r['value'])} {anchor} {ratio}")
    print("anchor: chars/s rows -", ANCHOR + f", median of {TRIALS[args.quick]} alternating trials of each side; "
          "seconds rows - python -c 'import torch'")


if __name__ == "__main__":
    main()
