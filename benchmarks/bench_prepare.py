"""Throughput and peak memory of `poetgen prepare` on a generated corpus (run by hand, not in the tests).

    python benchmarks/bench_prepare.py              # 1 GB (generated once into benchmarks/out/, then reused)
    python benchmarks/bench_prepare.py --size-mb 64 # quick

The corpus is synthetic Chinese text: lines of 5 or 7 characters drawn from 3,000 common Han code points,
punctuated like poems, with a blank line every 8 lines (documents with --doc-sep blank). Peak memory is the
child process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out"


def generate(path: Path, size_mb: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    han = np.arange(0x4E00, 0x4E00 + 3000, dtype=np.uint32)
    target = size_mb * 1_000_000
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        written = 0
        while written < target:
            # 8 lines of 7 characters + punctuation per document: (7+1)*8 + blank line
            n_docs = 20_000
            body = rng.choice(han, size=(n_docs, 8, 7))
            punct = np.where(np.arange(8) % 2 == 0, ord("，"), ord("。")).astype(np.uint32)
            lines = np.concatenate([body, np.broadcast_to(punct[None, :, None], (n_docs, 8, 1))], axis=2)
            docs = lines.reshape(n_docs, -1)
            nl = np.full((n_docs, 2), ord("\n"), dtype=np.uint32)
            block = np.concatenate([docs, nl], axis=1).astype("<u4").tobytes().decode("utf-32-le").encode("utf-8")
            f.write(block)
            written += len(block)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    corpus = OUT / f"synthetic-{args.size_mb}mb.txt"
    if not corpus.exists():
        t = time.perf_counter()
        generate(corpus, args.size_mb)
        print(f"generated {corpus} in {time.perf_counter() - t:.1f} s")
    size = corpus.stat().st_size
    dest = OUT / "prepared"
    shutil.rmtree(dest, ignore_errors=True)
    cmd = [sys.executable, "-m", "poetgen", "prepare", str(corpus), "--doc-sep", "blank", "-o", str(dest), "--json"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"command: {' '.join(cmd[1:])}")
    print(f"input {size / 1e6:.0f} MB, wall {wall:.1f} s, throughput {size / 1e6 / wall:.1f} MB/s, "
          f"peak RSS {peak_mb:.0f} MB")
    shutil.rmtree(dest, ignore_errors=True)


if __name__ == "__main__":
    main()
