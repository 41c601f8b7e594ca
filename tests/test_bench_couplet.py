"""benchmarks/bench_couplet.py at a tiny budget: the one command the 30-minute comparison of issue 18 runs."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import REPO, shared_path


@pytest.mark.slow
def test_bench_couplet_prints_both_models_rows(tmp_path):
    data = shared_path("tang")
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_couplet.py"), "--data", str(data), "--limit-files", "1",
         "--budget", "5s", "--val-limit", "40", "--hidden", "32", "--eval-every", "20", "--threads", "1",
         "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| model | nats/char of the answer given the first line")
    assert rows[1].startswith("| left-to-right LM") and rows[2].startswith("| encoder-decoder, dot attention")
    nats = [float(row.split("|")[2]) for row in rows[1:]]
    assert all(0 < x < 12 for x in nats)
    assert re.search(r"\| [+-]\d+\.\d%", rows[2])  # the change against the anchor
    assert "100.0% / 100.0%" in rows[2]  # the middle couplets' answers keep their length, plain and --tones
    assert (tmp_path / "work" / "pairs" / "val_pairs.npy").exists()
