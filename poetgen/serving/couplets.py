"""对句 requests for a pair (encoder-decoder) model: each one decoded whole by poetgen.generation.couplet.answer_lines
(what `poetgen sample -c PAIR --prime ...` runs) in one worker thread, as the Batcher runs best_of and beam requests.

No continuous batching here: the encoder-decoder runs in torch (the numpy runtime does not run it), and one request
is already a batch (its first lines x n or beam rows, one step per character). The worker holds a request's time and
place in line to the server's Limits: at most ``queue`` requests taken at once (the one decoding among them), more
are refused (Overloaded, 503); a request that waited past its ``timeout`` is not started (TimedOut, 503).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from poetgen.data.vocab import Vocab
from poetgen.errors import SampleError
from poetgen.generation.couplet import Answer, CoupletOptions, answer_lines
from poetgen.serving.batcher import Limits, Overloaded, Stats, TimedOut, answer_whole


@dataclass
class CoupletResult:
    answers: list[list[Answer]]  # per first line, the best first (beam) or in the order drawn
    seed: int | None  # None: nothing was drawn (greedy or beam)
    notes: list[str]
    seconds: float


@dataclass(eq=False)
class CoupletJob:
    primes: list[str]
    options: CoupletOptions
    deadline: float
    on_done: Callable[[CoupletResult | None, Exception | None], None]
    started: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    @property
    def seed(self) -> int | None:
        return self.options.seed

    def cancel(self) -> None:
        """Not started yet: never will be (the client went away). Decoding already begun runs to its end."""
        self.cancelled = True


class CoupletWorker:
    """Answers the 对句 requests of one pair model. The server's side of it reads like a Batcher's (``limits``,
    ``stats``, ``waiting``, ``active_rows``, ``submit``, ``stop``). ``model``: a poetgen.model.seq2seq.Seq2Seq."""

    def __init__(self, model: Any, vocab: Vocab, limits: Limits | None = None):
        self.model, self.vocab = model, vocab
        self.limits = limits or Limits()
        self.stats = Stats()
        self._lock = threading.Lock()
        self._taken = 0  # requests taken and not yet answered (the one decoding included)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="poetgen-couplets")

    def start(self) -> CoupletWorker:
        return self

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def waiting(self) -> int:
        with self._lock:
            return self._taken

    def active_rows(self) -> int:
        return 0

    def check(self, primes: list[str], options: CoupletOptions) -> None:
        """CoupletOptions.validate (the CLI's words), then the server's limits. SampleError for a bad request."""
        options.validate()
        lim = self.limits
        if not primes:
            raise SampleError("give the first line to answer: prime, or primes (a list)")
        if options.num_samples > lim.max_n:
            raise SampleError(f"n must be at most {lim.max_n} on this server (--max-n), got {options.num_samples}")
        if options.beam > lim.max_rows:
            raise SampleError(f"beam must be at most {lim.max_rows} on this server (--max-batch), got {options.beam}")
        rows = len(primes) * (options.beam or options.num_samples)
        if rows > lim.max_rows:
            raise SampleError(f"primes x {'beam' if options.beam else 'n'} must be at most {lim.max_rows} on this "
                              f"server (--max-batch), got {rows}")
        longest = max(len(p) for p in primes)
        if longest > lim.max_length:
            raise SampleError(f"a first line may have at most {lim.max_length} characters on this server "
                              f"(--max-length), got {longest}")

    def submit(self, primes: list[str], options: CoupletOptions,
               on_done: Callable[[CoupletResult | None, Exception | None], None]) -> CoupletJob:
        """Check the request and queue it (Overloaded when ``queue`` requests are already taken). ``on_done(result,
        None)`` or ``on_done(None, error)`` is called once, from the worker thread. Sampling without a seed gets a
        random one, reported (as `poetgen sample` does); greedy and beam draw nothing and keep None."""
        self.check(primes, options)
        if options.seed is None and not options.beam and options.temperature > 0:
            options = replace(options, seed=random.SystemRandom().randrange(2**31))
        job = CoupletJob(list(primes), options, time.perf_counter() + self.limits.timeout, on_done)
        with self._lock:
            if self._taken >= self.limits.queue:
                self.stats.rejected += 1
                raise Overloaded(f"the server is busy: {self.limits.queue} request(s) already wait for this model "
                                 f"(--queue); try again shortly")
            self._taken += 1
        self._pool.submit(self._answer, job)
        return job

    def _answer(self, job: CoupletJob) -> None:
        def work() -> CoupletResult:
            if time.perf_counter() > job.deadline:
                raise TimedOut(f"the request took longer than {self.limits.timeout:g} s (--timeout) and was stopped")
            notes: list[str] = []
            answers = answer_lines(self.model, self.vocab, job.primes, job.options, notes)
            return CoupletResult(answers, job.seed, notes, time.perf_counter() - job.started)

        answer_whole(job, work, self._release, self.stats)

    def _release(self) -> None:
        with self._lock:
            self._taken -= 1
