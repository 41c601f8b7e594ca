"""Checkpoint writes that pause half-way, so that a kill -9 lands inside one.

Used by benchmarks/crash_trials.py and tests/test_crash_safety.py in the child processes they kill: each puts this
directory on PYTHONPATH and calls ``install(pause)`` before running the CLI.
"""

from __future__ import annotations

import os
import time


def install(pause: float) -> None:
    """From now on poetgen.checkpoint.torch_io writes each block in two halves, ``pause`` seconds apart."""
    import poetgen.checkpoint.torch_io as ck

    real_fdopen = os.fdopen

    class Slow:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def fileno(self):
            return self.f.fileno()

        def flush(self):
            self.f.flush()

        def write(self, b):
            half = len(b) // 2
            self.f.write(b[:half])
            self.f.flush()
            time.sleep(pause)
            return self.f.write(b[half:])

    class SlowOS:
        def __getattr__(self, name):
            return getattr(os, name)

        def fdopen(self, *a, **k):
            return Slow(real_fdopen(*a, **k))

    ck.os = SlowOS()
