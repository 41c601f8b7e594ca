"""The shipped Tang model as a user meets it (issue 17), each figure next to an anchor measured in the same run.

    python benchmarks/bench_shipped.py --dataset DIR [--model tang] [--poems 200] [--json]

DIR: the prepared 全唐诗 dataset the model was trained on (`poetgen prepare ../shared/data/tang --script simplified`):
its training split is the copy index, as it is for `poetgen sample --best-of` on a machine that has it.

* start-up: `poetgen sample --prime 床前 -n 4` as a whole process (Python's start, imports, the model's hash check
  and load, sampling, output), median of 5, next to `python -c pass` (Python's own start) in the same run; the
  target is under 1 s after Python starts.
* choosing: N `--form 七绝` poems (N different primes: the first characters of N common Tang line openings drawn from
  the vocabulary's most frequent characters, so beam search, which is deterministic, writes N different poems)
  plain (one sample each), `--best-of 8` and `--beam 8`: line copy rate against the training split, mean
  log-probability per character under the model, repeated characters, and seconds per poem; plain sampling is
  the anchor of the other two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def wall(cmd: list[str], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, help="the prepared dataset the model was trained on")
    ap.add_argument("--model", default="tang")
    ap.add_argument("--poems", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from poetgen.checkpoint.format import find_checkpoint
    from poetgen.data.copies import TrainingIndex
    from poetgen.data.dataset import load_dataset
    from poetgen.generation.engines import open_model
    from poetgen.generation.sample import SampleOptions, generate
    from poetgen.poetry.forms import is_han, split_lines

    poetgen = [sys.executable, "-m", "poetgen"]
    python_start = wall([sys.executable, "-c", "pass"])
    sample_cmd = [*poetgen, "sample", "-c", args.model, "--prime", "床前", "-n", "4", "-q"]
    sample_wall = wall(sample_cmd)
    rows: dict = {"start-up": {"command": " ".join(["poetgen", *sample_cmd[3:]]), "seconds": sample_wall,
                               "python_start": python_start, "after_python": sample_wall - python_start}}

    path = find_checkpoint(args.model)
    opened = open_model(path, "cpu")
    vocab = opened.vocab
    ds = load_dataset(args.dataset)
    t = time.perf_counter()
    index = TrainingIndex(ds.train, ds.vocab)
    rows["copy index"] = {"seconds": time.perf_counter() - t, "lines": len(index.lines)}
    han = [s for s in vocab.symbols[2:] if is_han(s)]
    primes = han[: args.poems]  # the most frequent characters first (ids are sorted by frequency)

    def measure(name: str, options: SampleOptions) -> None:
        t = time.perf_counter()
        r = generate(opened.model, vocab, primes, options, copies=index)
        seconds = time.perf_counter() - t
        copied = checked = repeated = chars = 0
        for s in r.samples:
            c, n = index.copied_lines(s.text)
            copied, checked = copied + c, checked + n
            body = [ch for ch in s.text if is_han(ch)]
            chars += len(body)
            repeated += sum(len(x) - len(set(x)) for x in split_lines(s.text))
        rows[name] = {"poems": len(r.samples), "copy_rate": copied / checked, "lines": checked,
                      "mean_logprob": statistics.fmean(s.mean_logprob for s in r.samples),
                      "repeated_char_rate": repeated / chars, "seconds_per_poem": seconds / len(r.samples),
                      "example": r.samples[0].text}

    measure("plain", SampleOptions(form="七绝", seed=1))
    measure("best-of 8", SampleOptions(form="七绝", seed=1, best_of=8))
    measure("beam 8", SampleOptions(form="七绝", beam=8))
    for name in ("best-of 8", "beam 8"):
        rows[name]["cost_vs_plain"] = rows[name]["seconds_per_poem"] / rows["plain"]["seconds_per_poem"]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    s = rows["start-up"]
    print(f"| start-up | `{s['command']}`: {s['seconds']:.2f} s | `python -c pass` {s['python_start']:.2f} s | "
          f"{s['after_python']:.2f} s after Python starts |")
    print("| decoding | copy rate | mean log-prob/char | repeated chars | s/poem | cost vs plain |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in ("plain", "best-of 8", "beam 8"):
        x = rows[name]
        print(f"| {name} | {x['copy_rate']:.2%} of {x['lines']} | {x['mean_logprob']:.3f} | "
              f"{x['repeated_char_rate']:.2%} | {x['seconds_per_poem']:.3f} | {x.get('cost_vs_plain', 1.0):.2f}x |")
    for name in ("plain", "best-of 8", "beam 8"):
        print(f"{name}: {rows[name]['example']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
