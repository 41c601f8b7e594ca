"""kill -9 trials and concurrent starts with fresh `python -m poetgen train` processes (run by hand).

    python benchmarks/crash_trials.py                    # 100 kill trials, 10 concurrent pairs
    python benchmarks/crash_trials.py --trials 20 --pairs 3 --seed 7

The long version of tests/test_crash_safety.py and tests/test_clobbering.py: there, trials fork from a warm
helper so that 30 fit in CI time; here every process is a fresh interpreter, start-up included, so kills also land
while torch is being imported and the checkpoint is being read. One run (LSTM 1x32 on the bundled corpus,
--save-every 1, evaluation every 5 steps, --keep 2) is killed again and again; every trial after the first is a
`--resume` of it. Half the processes write checkpoints slowly (a wrapper pauses half-way through each write's
bytes), so that many kills land inside a write; a kill inside a write leaves a temporary file, which is how such
kills are counted (the next process to take the lock removes it). Half the kills come at a random moment after
the process starts, half at a random moment after its first new checkpoint.

After each kill: last.ckpt (and best.ckpt, and the snapshots) must load, the step never goes back, and the
next trial's resume must take over the dead process's lock. At the end a resume runs to completion and a sample
is drawn. Prints a Markdown summary for benchmarks/RESULTS.md; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from poetgen.checkpoint.torch_io import load_checkpoint

MODEL = ["--cell", "lstm", "--layers", "1", "--hidden", "32", "--embed", "16", "--batch-size", "4", "--seq-len", "32",
         "--warmup", "2", "--sample-every", "0", "--threads", "1"]

# A fresh interpreter whose checkpoint writes pause half-way (then the ordinary CLI).
SLOW = r"""
import os, sys
from slow_writes import install  # benchmarks/ is on PYTHONPATH (see start)
install(float(os.environ["CRASH_TRIALS_PAUSE"]))
from poetgen.cli import main
sys.argv = ["poetgen", *sys.argv[1:]]
main()
"""


def mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def temps(run: Path) -> set[str]:
    return {p.name for p in run.iterdir() if p.name.endswith(".tmp")} if run.exists() else set()


def start(args: list[str], cwd: Path, env: dict, slow: float, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", SLOW, *args] if slow else [sys.executable, "-m", "poetgen", *args]
    path = os.pathsep.join(x for x in (str(Path(__file__).resolve().parent), env.get("PYTHONPATH")) if x)
    env = {**env, "CRASH_TRIALS_PAUSE": str(slow), "PYTHONPATH": path}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))


def kill_trials(cwd: Path, env: dict, trials: int, rng: random.Random, failures: list[str]) -> dict:
    run = cwd / "checkpoints" / "crash"
    fresh = ["train", "ds", *MODEL, "--max-steps", "100000000", "--save-every", "1", "--eval-every", "5", "--keep", "2",
             "--patience", "0", "--name", "crash", "--quiet"]
    resume = ["train", "--resume", "crash", "--quiet"]
    stats = {"trials": 0, "in_writes": 0, "from_start": 0, "before_first_save": 0, "steps": []}
    seen: set[str] = set()
    startup = []
    for trial in range(trials):
        before = mtime(run / "last.ckpt")
        slow = 0.05 if trial % 2 else 0.0
        log = cwd / "trial.log"
        t0 = time.monotonic()
        proc = start(fresh if trial == 0 else resume, cwd, env, slow, log)
        from_start = trial > 0 and rng.random() < 0.5
        if from_start:  # anywhere from the interpreter's start to a few seconds of training
            time.sleep(rng.uniform(0.0, 1.5 * (sum(startup) / len(startup)) if startup else 8.0))
        else:
            while mtime(run / "last.ckpt") == before and proc.poll() is None:
                time.sleep(0.005)
            startup.append(time.monotonic() - t0)
            time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            failures.append(f"trial {trial}: the process ended by itself ({proc.returncode}): {log.read_text()[-500:]}")
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stats["trials"] += 1
        stats["from_start"] += from_start
        saved = mtime(run / "last.ckpt") != before
        stats["before_first_save"] += not saved
        now = temps(run)
        new = now - seen
        stats["in_writes"] += len(new)
        if saved and now != new:
            failures.append(f"trial {trial}: leftovers of dead writers were not removed: {sorted(now - new)}")
        seen |= now
        try:
            step = load_checkpoint(run / "last.ckpt").train_state["step"]
            for extra in [run / "best.ckpt", *run.glob("step-*.ckpt")]:
                if extra.exists():
                    load_checkpoint(extra)
        except Exception as e:  # noqa: BLE001 - any failure to load is what this script looks for
            failures.append(f"trial {trial}: a checkpoint does not load: {e}")
            continue
        if stats["steps"] and step < stats["steps"][-1]:
            failures.append(f"trial {trial}: the step went back from {stats['steps'][-1]} to {step}")
        stats["steps"].append(step)
        if "Traceback" in log.read_text():
            failures.append(f"trial {trial}: traceback: {log.read_text()[-800:]}")
        print(f"trial {trial + 1}/{trials}: step {step}, {'slow' if slow else 'plain'} writes, "
              f"{'from start' if from_start else 'after a save'}, in a write: {bool(new)}", flush=True)
    stats["startup_s"] = sum(startup) / len(startup) if startup else None

    # The end: a resume that finishes, and a sample from the run.
    target = stats["steps"][-1] + 5
    r = subprocess.run([sys.executable, "-m", "poetgen", *resume, "--max-steps", str(target), "--json"], cwd=cwd,
                       env=env, capture_output=True, text=True)
    if r.returncode != 0 or json.loads(r.stdout)["step"] != target:
        failures.append(f"final resume: exit {r.returncode}: {r.stderr[-800:]}")
    if temps(run) or (run / ".lock").exists():
        failures.append(f"after the final resume: {sorted(temps(run))}, lock {(run / '.lock').exists()}")
    r = subprocess.run([sys.executable, "-m", "poetgen", "sample", "-c", str(run), "-l", "20", "--seed", "1", "-q"],
                       cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        failures.append(f"sample after the trials: exit {r.returncode}: {r.stderr[-500:]}")
    return stats


def concurrent_pairs(cwd: Path, env: dict, pairs: int, failures: list[str]) -> int:
    """Two fresh processes started together into one run directory: exactly one trains."""
    ok = 0
    for i in range(pairs):
        name = f"pair{i}"
        args = ["train", "ds", *MODEL, "--max-steps", "100000000", "--save-every", "5", "--eval-every", "100000000",
                "--name", name, "--quiet"]
        procs = [subprocess.Popen([sys.executable, "-m", "poetgen", *args], cwd=cwd, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        deadline = time.monotonic() + 300
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        ended = [p for p in procs if p.poll() is not None]
        if len(ended) != 1:
            failures.append(f"pair {i}: {len(ended)} of 2 ended")
        else:
            loser, winner = ended[0], next(p for p in procs if p is not ended[0])
            err = loser.stderr.read()
            run = cwd / "checkpoints" / name
            while not (run / "last.ckpt").exists() and winner.poll() is None:
                time.sleep(0.05)
            if loser.returncode == 1 and f"in use by process {winner.pid}" in err and winner.poll() is None:
                ok += 1
            else:
                failures.append(f"pair {i}: loser exit {loser.returncode}: {err[-300:]}")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait()
        print(f"pair {i + 1}/{pairs}: {'one trained, one refused' if ok == i + 1 else 'FAILED'}", flush=True)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=20240609)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="crash-trials-") as d:
        cwd = Path(d)
        env = {**os.environ, "POETGEN_CACHE_DIR": str(cwd / "cache"), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "poetgen", "prepare", "-o", "ds", "-q"], cwd=cwd, env=env, check=True)
        t0 = time.monotonic()
        stats = kill_trials(cwd, env, args.trials, rng, failures)
        pairs_ok = concurrent_pairs(cwd, env, args.pairs, failures)
        wall = time.monotonic() - t0
    print()
    print("| date | kill -9 trials | inside checkpoint writes | before the process's first save | steps reached "
          "| concurrent pairs (one trained, one refused) | failures | wall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {time.strftime('%Y-%m-%d')} | {stats['trials']} (seed {args.seed}) | {stats['in_writes']} "
          f"| {stats['before_first_save']} | {stats['steps'][-1] if stats['steps'] else '-'} "
          f"| {pairs_ok}/{args.pairs} | {len(failures)} | {wall / 60:.1f} min |")
    if stats["startup_s"]:
        print(f"\nMean time from a process's start to its first new checkpoint: {stats['startup_s']:.1f} s")
    for f in failures:
        print("FAILURE:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
