"""Run directories: where a training run lives, who may write it, and how a `train` invocation becomes a run.

A run directory (``checkpoints/<run-name>/``) holds::

    last.ckpt          the newest state (saved every --save-every steps, at the end, on interruption)
    best.ckpt          the state with the lowest validation loss so far
    step-<k>.ckpt      snapshots, only with --keep N (the N newest are kept)
    metrics.jsonl      one JSON object per line: type "start"/"resume", "train" (every --log-every steps), "eval"
    .lock              {"pid", "host"} of the trainer writing it; removed when it stops
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: the pid check alone
    fcntl = None  # type: ignore[assignment]

from poetgen.checkpoint.torch_io import BEST, LAST, Checkpoint, find_checkpoint, load_checkpoint
from poetgen.training.config import (
    FIXED_ON_RESUME, MODEL_FIELDS, TrainConfig, normalise_keys, resolve_config, with_overrides,
)
from poetgen.data.dataset import Dataset, load_dataset
from poetgen.model.config import REGULARISERS
from poetgen.errors import CheckpointError, ConfigError, TrainingError
from poetgen.paths import RUNS_DIR

METRICS = "metrics.jsonl"
LOCK = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


def _owner(fd: int) -> tuple[int, str]:
    """(pid, host) written in an open lock file; (-1, "") when it is empty or unreadable."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0))
        return int(owner["pid"]), str(owner.get("host", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return -1, ""


def _in_use(run_dir: Path, pid: int, host: str) -> TrainingError:
    where = f"process {pid}" + (f" on {host}" if host != socket.gethostname() else "") if pid > 0 else \
        "another process"
    return TrainingError(f"run directory {run_dir} is in use by {where}; wait for it, stop it, or choose another "
                         "--name")


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Refuse a second trainer in the same run directory; a lock left by a dead process is taken over.

    The lock file is held with flock(2) for the whole run, so reading the owner and taking over a stale lock are
    one atomic step: two trainers started at once never both proceed (checking a pid and then writing the file
    let them, about one start in six with a stale lock), and the kernel drops the flock of a killed process. The
    file's {"pid", "host"} names the owner; a live owner on this host that holds no flock, or any owner on
    another host, is respected as well. The owner removes the file before it lets go of the flock, so whoever
    then gets a flock on the removed file starts over on the path's new file.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    me, host_me = os.getpid(), socket.gethostname()
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid, host = _owner(fd)
                    for _ in range(50):  # the owner writes its pid just after it takes the flock
                        if pid > 0 and (host != host_me or _pid_alive(pid)):
                            break
                        time.sleep(0.01)
                        pid, host = _owner(fd)
                    raise _in_use(run_dir, pid, host) from None
                try:
                    current = os.fstat(fd).st_ino == os.stat(lock).st_ino
                except FileNotFoundError:
                    current = False
                if not current:  # its owner removed it between our open and our flock
                    os.close(fd)
                    continue
            pid, host = _owner(fd)
            if pid > 0 and (host != host_me or (pid != me and _pid_alive(pid))):
                raise _in_use(run_dir, pid, host)
            os.ftruncate(fd, 0)  # empty, or a dead process's: take it over
            os.pwrite(fd, json.dumps({"pid": me, "host": host_me}).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        break
    for tmp in run_dir.glob(".*.ckpt.*.tmp"):  # half-written by a trainer that died (kill -9, power loss)
        tmp.unlink(missing_ok=True)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def rewind_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint's step (the resumed run writes them again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut short by a crash
    path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")


# --- from command-line arguments to a run ---------------------------------------------------------------------


@dataclass
class RunSetup:
    config: TrainConfig
    dataset: Dataset
    run_dir: Path
    resume: Checkpoint | None = None
    init_from: Checkpoint | None = None
    notes: list[str] = field(default_factory=list)  # what the set-up measured and chose, for the user (stderr)


def locate_run(run: str | Path, runs_dir: Path) -> tuple[Path, Path]:
    """(run directory, checkpoint to resume) for ``--resume RUN``: a run directory, a run name under
    ``runs_dir``, or a checkpoint file (a snapshot) inside a run directory."""
    p = Path(run)
    if not p.exists() and (runs_dir / run).exists():
        p = runs_dir / run
    if p.is_file():
        return p.parent, p
    if p.is_dir():
        for name in (LAST, BEST):  # best.ckpt alone: stopped between the first evaluation's two saves
            if (p / name).is_file():
                return p, p / name
        raise CheckpointError(f"{p} has no checkpoint to resume from: it stopped before its first save. "
                              "Start it again with the same command, without --resume")
    raise CheckpointError(f"run not found: {run} (looked in the current directory and in {runs_dir})")


def default_run_name(dataset: Dataset, config: TrainConfig) -> str:
    # Datasets prepared on the fly live in <cache>/datasets/<stem>-<16 hex digits>: keep the readable stem.
    name = re.sub(r"-[0-9a-f]{16}$", "", dataset.name)
    stem = re.sub(r"[^\w.-]+", "_", name).strip("_") or "run"
    return f"{stem}-{config.cell}-{time.strftime('%Y%m%d-%H%M%S')}"


def _checked_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"--name must be a plain directory name, got {name!r}")
    return name


def _open_data(data: str | None, on_progress: Callable[[dict], None] | None) -> Dataset:
    from poetgen.data.prepare import resolve_training_data

    return load_dataset(resolve_training_data(data, on_progress=on_progress))


def _refuse_changes(overrides: dict[str, Any], base: TrainConfig, keys: tuple[str, ...], why: str) -> None:
    changed = [k for k in keys if k in overrides and overrides[k] != getattr(base, k)]
    if changed:
        shown = ", ".join(f"{k} ({getattr(base, k)!r} -> {overrides[k]!r})" for k in changed)
        raise ConfigError(f"{why}: {shown}")


def saved_train_config(train_config: dict, model_config: Any, where: str) -> TrainConfig:
    """The training configuration a checkpoint recorded. The output layer's settings are the checkpoint's model's
    own, resolved (a checkpoint from before the adaptive head has no `head`, and one that recorded `auto` trained
    what auto meant then: an encoder-decoder written before it had the adaptive head has the full one, whatever
    `auto` means today); other settings added to poetgen after it was written take today's default."""
    d = dict(train_config) if isinstance(train_config, dict) else train_config
    if isinstance(d, dict):
        for k in ("head", "cutoffs", "div_value"):
            if hasattr(model_config, k):
                d[k] = getattr(model_config, k)
    return TrainConfig.from_dict(d, where)


def setup_run(
    data: str | None,
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    resume: str | None = None,
    init_from: str | None = None,
    runs_dir: str | Path = RUNS_DIR,
    name: str | None = None,
    on_progress: Callable[[dict], None] | None = None,
    speed: Callable[[dict[str, Any], str], float] | None = None,
) -> RunSetup:
    """Turn `train` arguments into a configuration, a dataset and a run directory.

    ``overrides`` are the flags the user actually gave (field name -> value). DATA may be a dataset directory,
    a raw corpus (prepared on the fly and cached), or None: the bundled corpus, or on resume the run's own data.
    ``speed``: how preset `auto` learns this machine's speed (see poetgen.training.config.resolve_config).
    """
    runs_dir = Path(runs_dir)
    overrides = normalise_keys(overrides or {}, "flags")
    if resume is not None:
        if init_from is not None:
            raise ConfigError("--resume and --init-from cannot be combined")
        if preset is not None or config_file is not None:
            raise ConfigError("a resumed run keeps its configuration; change single settings with flags instead "
                              "of --preset / --config")
        run_dir, ckpt_path = locate_run(resume, runs_dir)
        if name is not None and _checked_name(name) != run_dir.name:
            raise ConfigError("--name cannot rename a run that is resumed")
        ckpt = load_checkpoint(ckpt_path)
        base = saved_train_config(ckpt.train_config, ckpt.model_config, f"{ckpt_path} training config")
        _refuse_changes(overrides, base, FIXED_ON_RESUME,
                        "these settings cannot change on --resume (fine-tune with --init-from instead)")
        config = with_overrides(base, overrides)
        if data is None:
            recorded = ckpt.dataset_meta.get("path")
            if not recorded or not Path(recorded).exists():
                raise TrainingError(f"the run's dataset ({recorded or 'unknown'}) is gone; pass DATA to resume with")
            data = recorded
        return RunSetup(config, _open_data(data, on_progress), run_dir, resume=ckpt)

    dataset = _open_data(data, on_progress)
    config = resolve_config(preset, config_file, overrides, train_tokens=dataset.auto_tokens, speed=speed)
    ckpt = None
    if init_from is not None:
        ckpt = load_checkpoint(find_checkpoint(init_from))
        arch = {k: getattr(ckpt.model_config, k) for k in MODEL_FIELDS if k not in REGULARISERS}
        _refuse_changes(overrides, TrainConfig(**{**config.to_dict(), **arch}), tuple(arch),
                        f"--init-from {ckpt.path} fixes the architecture; these flags disagree with it")
        config = TrainConfig(**{**config.to_dict(), **arch})
    run_dir = runs_dir / (_checked_name(name) if name is not None else default_run_name(dataset, config))
    return RunSetup(config, dataset, run_dir, init_from=ckpt)
