"""numpy's BLAS thread count while sampling: set it for a block (``blas_threads``), or let ``ThreadTuner`` pick it by
timing the decoding steps themselves (which count is faster depends on the batch and on what else runs)."""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Iterator

import numpy as np


@functools.lru_cache(maxsize=1)
def _openblas() -> tuple[Any, Any] | None:
    """(set_num_threads, get_num_threads) of the OpenBLAS numpy uses, or None (another BLAS, or not found)."""
    base = Path(np.__file__).parent
    candidates = [*glob.glob(str(base.parent / "numpy.libs" / "*openblas*")),
                  *glob.glob(str(base / ".dylibs" / "*openblas*"))]
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for setter, getter in (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
                               ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
                               ("openblas_set_num_threads", "openblas_get_num_threads")):
            if hasattr(lib, setter) and hasattr(lib, getter):
                fs, fg = getattr(lib, setter), getattr(lib, getter)
                fs.argtypes, fs.restype, fg.restype = [ctypes.c_int], None, ctypes.c_int
                return fs, fg
    return None


@contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run numpy's matrix products on ``n`` threads inside the block (None: leave them as they are).

    Fixed counts are for callers that know; sampling picks its count with ``ThreadTuner``. Where the BLAS is not
    OpenBLAS this does nothing (OMP_NUM_THREADS still applies)."""
    found = _openblas() if n is not None else None
    if found is None:
        yield
        return
    set_threads, get_threads = found
    before = get_threads()
    if before == n:  # nothing to change: leave the process-wide count alone (other threads may be in a BLAS call)
        yield
        return
    set_threads(int(n))  # type: ignore[arg-type]
    try:
        yield
    finally:
        set_threads(before)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Seconds of steps on one thread before another count is first tried (see ThreadTuner).
WARMUP = 0.5


@dataclass
class _Learned:
    """What a ThreadTuner call learned, for the next call in the process with the same key."""

    ran: float
    incumbent: int
    measured: dict[int, float] = field(default_factory=dict)
    wait: int = 32
    countdown: int = 4


_LEARNED: dict[Hashable, _Learned] = {}
_LEARNED_LOCK = threading.Lock()
_LEARNED_MAX = 256  # keys kept (a process sampling from many models forgets the oldest)


def _recall(key: Hashable | None) -> _Learned | None:
    if key is None:
        return None
    with _LEARNED_LOCK:
        return _LEARNED.get(key)


def _remember(key: Hashable, learned: _Learned) -> None:
    with _LEARNED_LOCK:
        _LEARNED.pop(key, None)
        _LEARNED[key] = learned
        while len(_LEARNED) > _LEARNED_MAX:
            del _LEARNED[next(iter(_LEARNED))]


def forget() -> None:
    """Drop what ThreadTuner calls have learned in this process (tests; a machine whose load changed for good)."""
    with _LEARNED_LOCK:
        _LEARNED.clear()


def sampling_key(engine: Any, rows: int) -> tuple | None:
    """What makes decoding steps alike for ThreadTuner: the engine's kind and sizes, and the batch to within a
    factor of two (which thread count wins depends on both). None for an engine that does not tell its sizes (a
    torch module's: a new engine each call, and numpy's threads do not run its steps): nothing is kept."""
    sizes = tuple(getattr(engine, name, None) for name in ("cell", "L", "H", "V"))
    head = getattr(engine, "_head", None)
    if all(x is None for x in sizes):
        return None
    return (type(engine).__name__, *sizes, type(head).__name__ if head is not None else None,
            max(int(rows), 1).bit_length())


class ThreadTuner:
    """Picks numpy's BLAS thread count for a loop of like steps by timing the steps themselves.

    Whether more threads help depends on what else the machine is doing, not only on the sizes: a 64-row step of an
    LSTM 256x2 ran 1.6x faster on 2 OpenBLAS threads than on one with the cores idle, and 2.1x slower beside one
    busy process (OpenBLAS's threads spin while they wait, and a step stalls whenever one of them loses its core;
    measured 2026-11-29). Even one stream can gain: with 6,000 symbols its output layer is a product big enough to
    share (1.36x on 2 idle cores).

    So one thread runs first, and now and then the other count is tried for ``trial`` steps (the first step after a
    switch is not counted: threads wake up). It takes over if its mean time per row is lower by 5%; a trial is
    cut short at its first step 3x slower than the current count (a stall: contention), and every lost trial
    doubles the wait before the next (from ``every`` steps up to 64x that), so a busy machine pays for a few
    stalled steps per call at most. While running, the current count's time is followed (a moving average); if
    it grows past 1.5x what the other count last measured, the other is tried at once.

    No trial starts before the first count has run ``warmup`` seconds of steps: a trial costs slow steps (threads
    waking up, stalls on a busy machine, two cores' CPU time), and a short call has little to win back.
    `poetgen sample -c tang -n 4` (22 steps of 4 rows, 2x768:
    0.13-0.19 s of steps on one thread) spent 0.08-0.17 s more CPU with a trial from its fifth step on, beside a
    training on both cores (measured 2026-12-02); a long call loses at most ``warmup`` seconds of a faster count's
    gain.

    With a ``key`` (what the steps are: the model's sizes and the batch's, see ``sampling_key``) what a call learned
    is kept for the next call in the process with the same key: the seconds of warm-up run, the count that won,
    the times measured and the wait before the next trial. A caller that samples in a loop (eval's poem report, one
    call per prime; a library user's service) makes many short calls of like steps; each alone is too short to try
    the other count, together they are not, and once a count has won, later calls start on it (and leave it, as
    above, if it turns slow). A new process starts from nothing, so a single `poetgen sample` call is unchanged.
    Use::

        with ThreadTuner(key=sampling_key(engine, rows)) as tuner:
            for ...:
                tuner.tick(rows)   # before each step; rows: the batch this step runs
    """

    def __init__(self, choices: tuple[int, ...] | None = None, trial: int = 4, every: int = 32,
                 warmup: float = WARMUP, key: Hashable | None = None):
        if choices is None:
            choices = (1, min(usable_cores(), 4)) if _openblas() is not None and usable_cores() > 1 else (1,)
        self.choices = tuple(dict.fromkeys(choices))
        self.trial, self.every, self.warmup = trial, every, warmup
        self.key = (key, self.choices, trial, every, warmup) if key is not None and len(self.choices) > 1 else None
        kept = _recall(self.key)
        self.ran = kept.ran if kept else 0.0  # seconds of counted steps on the first count, until warmup is reached
        self.current = self.incumbent = kept.incumbent if kept else self.choices[0]
        # seconds per row: a moving average for the incumbent, the last trial's mean for the other count
        self.measured: dict[int, float] = dict(kept.measured) if kept else {}
        self.trying: list[float] | None = None  # per-row times of the running trial
        self.wait = kept.wait if kept else every
        self.countdown = kept.countdown if kept else trial  # steps before the next trial (the incumbent's own first)
        self.last: tuple[float, int] | None = None  # (time, rows) at the previous tick
        self.skip = True  # the step after a switch is not counted
        self.switches = 0  # thread count changes in this call (for tests and reports)
        self._blas = blas_threads(self.current)

    def __enter__(self) -> ThreadTuner:
        self._blas.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._blas.__exit__(*exc)
        if self.key is not None:
            # a trial the call's end cut off is taken up again at the next call's first chance
            countdown = 0 if self.trying is not None else self.countdown
            _remember(self.key, _Learned(self.ran, self.incumbent, dict(self.measured), self.wait, countdown))

    def _set(self, n: int) -> None:
        if n != self.current:
            self.current, self.skip = n, True
            self.switches += 1
            found = _openblas()
            if found is not None:
                found[0](n)

    def _other(self) -> int:
        return next(c for c in self.choices if c != self.incumbent)

    def tick(self, rows: int) -> None:
        """Call before each step with the rows it runs."""
        now = time.perf_counter()
        last, self.last = self.last, (now, rows)
        if len(self.choices) == 1 or last is None:
            return
        per_row = (now - last[0]) / max(last[1], 1)
        counted, self.skip = not self.skip, False
        if self.trying is not None:  # a trial of the other count is running
            if not counted:
                return
            self.trying.append(per_row)
            base = self.measured.get(self.incumbent, float("inf"))
            if per_row > 3 * base or len(self.trying) >= self.trial:
                mean = sum(self.trying) / len(self.trying)
                self.measured[self.current] = mean
                self.trying = None
                if mean < 0.95 * base:
                    self.incumbent, self.wait = self.current, self.every
                else:
                    self.wait = min(2 * self.wait, 64 * self.every)
                    self._set(self.incumbent)
                self.countdown = self.wait
            return
        if counted:
            old = self.measured.get(self.incumbent)
            self.measured[self.incumbent] = per_row if old is None else 0.8 * old + 0.2 * per_row
            if self.ran < self.warmup:
                self.ran += now - last[0]
        self.countdown -= 1
        other = self._other()
        slower = self.measured.get(self.incumbent, 0.0) > 1.5 * self.measured.get(other, float("inf"))
        if (self.countdown <= 0 and self.ran >= self.warmup) or slower:
            self.trying = []
            self._set(other)
