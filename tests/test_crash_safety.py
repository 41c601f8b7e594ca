"""Crash safety of `poetgen train`: kill -9 at random moments, and writes that fail half-way.

kill -9: training processes are forked from a helper process that has imported torch and poetgen once (a fresh
interpreter costs seconds here, a fork milliseconds), then run the real `poetgen train` command line and are killed
with SIGKILL at seeded random moments: some measured from the start of the process (loading, locking, the first
steps), some from its first new checkpoint. Half of the processes write their checkpoints slowly (a pause half-way
through the bytes), so many kills land inside a write; those leave a temporary file behind, which is how they are
counted. After every kill, last.ckpt (and best.ckpt, and the snapshots) load, and the next trial is a
`poetgen train --resume` of the same run, which must take over the dead process's lock and save again.
benchmarks/crash_trials.py is the long version with fresh `python -m poetgen` processes.

Failing writes: OSError(ENOSPC / EIO) injected at each stage of a checkpoint write and into the metrics log, at
the first save and at a later one: exit 1 with `Error: ...`, no traceback, no temporary file, the previous
checkpoint intact, and the run resumable once the disk is fine again.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import make_dataset
from poetgen.checkpoint.torch_io import load_checkpoint, load_model
from poetgen.cli.app import app

torch.set_num_threads(1)
runner = CliRunner()
pytestmark = [
    pytest.mark.slow,  # dozens of trainings killed with SIGKILL
    pytest.mark.skipif(not hasattr(os, "fork"), reason="the trials fork and send SIGKILL (POSIX)"),
]

POEMS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"]
TINY = ["--layers", "1", "--hidden", "16", "--embed", "8", "--batch-size", "2", "--seq-len", "16", "--warmup", "1",
        "--sample-every", "0", "--threads", "1"]
TRIALS = 30
SEED = 20240609

# The helper process: imports once, then forks one `poetgen train` per request (see the module docstring).
FORK_SERVER = r"""
import json, os, sys, time, traceback
import torch
torch.set_num_threads(1)
import poetgen.checkpoint.torch_io as ck
import poetgen.cli.app, poetgen.training.config, poetgen.data.dataset, poetgen.data.prepare, poetgen.training.runs, poetgen.training.loop
import safetensors.torch

def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()

# One tiny run here first: what `train` imports lazily (torch.device("meta") alone costs 1.5 s) is then imported
# once, not in every child.
warm = json.loads(sys.argv[1])
os.chdir(warm["cwd"])
try:
    poetgen.cli.app.app(warm["argv"], prog_name="poetgen")
except SystemExit as e:
    assert not e.code, e.code
reply({"ready": True})
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        reply({"exit": os.waitstatus_to_exitcode(status)})
        continue
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(req["cwd"])
            log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1); os.dup2(log, 2); os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            if req.get("slow"):
                from slow_writes import install  # benchmarks/slow_writes.py, on PYTHONPATH
                install(req["slow"])
            poetgen.cli.app.app(req["argv"], prog_name="poetgen")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    reply({"pid": pid})
"""


class ForkServer:
    def __init__(self, workdir: Path):
        benchmarks = str(Path(__file__).resolve().parent.parent / "benchmarks")  # slow_writes.py
        path = os.pathsep.join(x for x in (benchmarks, os.environ.get("PYTHONPATH")) if x)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "POETGEN_CACHE_DIR": str(workdir),
               "PYTHONPATH": path}
        make_dataset(workdir / "ds", POEMS * 20, POEMS)
        warm = {"cwd": str(workdir), "argv": ["train", "ds", *TINY, "--max-steps", "2", "--eval-every", "1",
                                               "--keep", "1", "--name", "warm", "--quiet"]}
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER, json.dumps(warm)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self._read() == {"ready": True}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def start(self, argv: list[str], cwd: Path, log: Path, slow: float = 0.0) -> int:
        return self._ask({"op": "run", "argv": argv, "cwd": str(cwd), "log": str(log), "slow": slow})["pid"]

    def wait(self, pid: int) -> int:
        """Reap the child (a dead child that is not reaped still looks alive to the run lock)."""
        return self._ask({"op": "wait", "pid": pid})["exit"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def forks(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("fork-server"))
    yield server
    server.close()


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POETGEN_CACHE_DIR", str(tmp_path / "cache"))
    make_dataset(tmp_path / "ds", POEMS * 20, POEMS)
    return tmp_path


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _temp_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))


def test_kill_9_at_random_moments_never_loses_the_run(forks, cwd):
    rng = random.Random(SEED)
    run = cwd / "checkpoints" / "crash"
    fresh = ["train", "ds", *TINY, "--max-steps", "1000000", "--save-every", "1", "--eval-every", "3",
             "--patience", "0", "--keep", "2", "--log-every", "1", "--name", "crash", "--quiet"]
    resume = ["train", "--resume", "crash", "--quiet"]
    in_writes, steps, leftovers_seen, killed = 0, [], set(), []
    for trial in range(TRIALS):
        before = _mtime(run / "last.ckpt")
        slow = 0.02 if trial % 2 else 0.0
        log = cwd / f"trial-{trial}.log"
        pid = forks.start(fresh if trial == 0 else resume, cwd, log, slow)
        from_start = trial > 0 and rng.random() < 0.5  # trial 0 must save once: there is nothing to resume before
        if from_start:
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            deadline = time.monotonic() + 60
            while _mtime(run / "last.ckpt") == before:  # the resumed process saved: the resume worked
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        code = forks.wait(pid)
        assert code == -signal.SIGKILL, (trial, code, log.read_text())  # it was still running: no error, no end
        killed.append(pid)
        if (run / ".lock").exists() and (run / ".lock").read_text():  # a stale lock, for the next to take over
            assert json.loads((run / ".lock").read_text())["pid"] in killed  # (this one's, or an earlier one's)

        temps = set(_temp_files(run))
        new_temps = temps - leftovers_seen
        assert len(new_temps) <= 1, new_temps  # one write at a time
        in_writes += len(new_temps)
        if _mtime(run / "last.ckpt") != before:  # this process took the lock: it removed the dead ones' leftovers
            assert temps == new_temps, (temps, leftovers_seen)
        leftovers_seen.update(temps)
        last = load_checkpoint(run / "last.ckpt")
        steps.append(last.train_state["step"])
        assert steps[-1] >= (steps[-2] if len(steps) > 1 else 1), steps  # never goes back
        if not from_start:
            assert last.path.stat().st_mtime_ns != before
        for extra in [run / "best.ckpt", *run.glob("step-*.ckpt")]:
            if extra.exists():
                load_checkpoint(extra)
        load_model(run)  # what `poetgen sample -c RUN` would use
        assert "Traceback" not in log.read_text()

    # Kills landed inside checkpoint writes, and the run moved on between kills.
    assert in_writes >= 4, (in_writes, steps)
    assert steps[-1] > steps[0] + TRIALS // 2, steps
    # The last kill left a stale lock of a dead process; the resume takes it over and finishes.
    lock = json.loads((run / ".lock").read_text() or "{}")
    r = runner.invoke(app, ["train", "--resume", "crash", "--max-steps", str(steps[-1] + 3), "--json", "--quiet"])
    assert r.exit_code == 0, (lock, r.output)
    assert json.loads(r.stdout)["step"] == steps[-1] + 3
    assert load_checkpoint(run / "last.ckpt").train_state["step"] == steps[-1] + 3
    assert not (run / ".lock").exists() and _temp_files(run) == []
    r = runner.invoke(app, ["sample", "-c", str(run), "-l", "10", "--seed", "1", "-q"])
    assert r.exit_code == 0 and r.stdout.strip(), r.output
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train_steps = [x["step"] for x in records if x["type"] == "train"]
    assert train_steps == sorted(train_steps) and train_steps[-1] == steps[-1] + 3  # rewound at every resume
    print(f"\n{TRIALS} kill -9 trials, {in_writes} inside checkpoint writes, steps {steps}")


def test_kill_9_before_the_first_checkpoint_leaves_a_run_that_can_start_again(forks, cwd):
    """A run killed before it saved anything has no work to lose, but must not block its own name."""
    run = cwd / "checkpoints" / "early"
    pid = forks.start(["train", "ds", *TINY, "--max-steps", "1000000", "--save-every", "1000000",
                       "--eval-every", "1000000", "--log-every", "1", "--name", "early", "--quiet"],
                      cwd, cwd / "early.log")
    deadline = time.monotonic() + 60
    while '"type": "train"' not in ((run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""):
        assert time.monotonic() < deadline, (cwd / "early.log").read_text()
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    assert forks.wait(pid) == -signal.SIGKILL
    assert not (run / "last.ckpt").exists() and (run / ".lock").exists()
    r = runner.invoke(app, ["train", "--resume", "early", "--quiet"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "stopped before its first save" in r.stderr
    r = runner.invoke(app, ["train", "ds", *TINY, "--max-steps", "3", "--name", "early", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["type"] for x in records].count("start") == 1  # the dead attempt's log is not mixed in
    # Killed between the first evaluation's two saves (best.ckpt written, last.ckpt not yet): resume from best.
    (run / "last.ckpt").unlink()
    r = runner.invoke(app, ["train", "--resume", "early", "--max-steps", "5", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["step"] == 5 and load_checkpoint(run / "last.ckpt").train_state["step"] == 5
    r = runner.invoke(app, ["train", "ds", *TINY, "--max-steps", "3", "--name", "early", "--quiet"])
    assert r.exit_code == 1 and "already holds a run" in r.stderr  # now it has checkpoints: never started over


# --- failing writes ---------------------------------------------------------------------------------------------


class _FailingOS:
    """Stands in for `os` inside poetgen.checkpoint.torch_io: the chosen stage of the chosen checkpoint write fails."""

    def __init__(self, stage: str, at_write: int, err: int):
        self.stage, self.at_write, self.err = stage, at_write, err
        self.writes = 0  # checkpoint writes begun (mkstemp calls)
        self.injected = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def _maybe_fail(self, stage: str) -> None:
        if stage == self.stage and self.writes == self.at_write:
            self.injected += 1
            raise OSError(self.err, os.strerror(self.err))

    def fdopen(self, fd, *a, **k):
        self.writes += 1
        self._maybe_fail("open")
        f = os.fdopen(fd, *a, **k)
        outer = self

        class File:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return f.__exit__(*exc)

            def fileno(self):
                return f.fileno()

            def flush(self):
                f.flush()

            def write(self, b):
                f.write(b[: len(b) // 2])  # half the bytes reach the temporary file, then the disk is full
                outer._maybe_fail("write")
                return f.write(b[len(b) // 2 :])

        return File()

    def fsync(self, fd):
        if not os.path.isdir(f"/proc/self/fd/{fd}"):  # the file's fsync; the directory's is best effort anyway
            self._maybe_fail("fsync")
        return os.fsync(fd)

    def replace(self, src, dst):
        self._maybe_fail("replace")
        return os.replace(src, dst)


@pytest.mark.parametrize("at_write", [1, 4])  # the very first save (nothing to keep), and a later one
@pytest.mark.parametrize("stage, err", [("open", errno.ENOSPC), ("write", errno.ENOSPC), ("write", errno.EIO),
                                        ("fsync", errno.EIO), ("replace", errno.ENOSPC)])
def test_a_failing_checkpoint_write_keeps_the_previous_one_and_says_so(cwd, monkeypatch, stage, err, at_write):
    import poetgen.checkpoint.torch_io as ck

    fake = _FailingOS(stage, at_write, err)
    monkeypatch.setattr(ck, "os", fake)
    run = cwd / "checkpoints" / "full"
    # --save-every 1, no evaluation before step 100: write k is last.ckpt at step k.
    r = runner.invoke(app, ["train", "ds", *TINY, "--max-steps", "20", "--save-every", "1", "--eval-every", "100",
                            "--name", "full", "--quiet"])
    assert fake.injected == 1
    assert r.exit_code == 1, (r.output, r.exception)
    assert r.stderr.startswith("Error: cannot write checkpoint") and os.strerror(err) in r.stderr, r.stderr
    assert "Traceback" not in r.output
    assert _temp_files(run) == [] and not (run / ".lock").exists()
    if at_write == 1:
        assert not (run / "last.ckpt").exists() and "intact" not in r.stderr
        return
    assert "the previous last.ckpt is intact" in r.stderr
    assert load_checkpoint(run / "last.ckpt").train_state["step"] == at_write - 1
    monkeypatch.setattr(ck, "os", os)  # space again: the run goes on from the kept checkpoint
    r = runner.invoke(app, ["train", "--resume", "full", "--max-steps", "6", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["step"] == 6


def test_a_full_disk_while_logging_metrics_is_a_clear_error(cwd, monkeypatch):
    import builtins

    import poetgen.training.loop as tr

    real_open = builtins.open
    calls = {"metrics": 0}

    def open_(file, mode="r", *a, **k):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            calls["metrics"] += 1
            if calls["metrics"] == 5:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(tr, "open", open_, raising=False)
    r = runner.invoke(app, ["train", "ds", *TINY, "--max-steps", "20", "--save-every", "1", "--eval-every", "100",
                            "--log-every", "1", "--name", "log", "--quiet"])
    assert calls["metrics"] == 5
    assert r.exit_code == 1 and r.stderr.startswith("Error: No space left on device"), (r.output, r.exception)
    assert "metrics.jsonl" in r.stderr and "Traceback" not in r.output
    run = cwd / "checkpoints" / "log"
    assert load_checkpoint(run / "last.ckpt").train_state["step"] >= 3 and not (run / ".lock").exists()
