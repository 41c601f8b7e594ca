"""Continuous batching: many requests decoded by one model, one batch per model step.

A ``Batcher`` owns a numpy Runtime and a thread that loops:

1. Requests waiting in the bounded queue join: each distinct prefix (``<eot> [style <eot>] prime``) is run once,
   rows of one length together, and its state appended to the running batch (``Runtime.append``), copied once per
   sample of each request that has it (``n`` rows).
2. One decoding step for every row. The model step is shared; the draw is generation's own
   (``poetgen.generation.sample.sample_step``, the step ``poetgen sample`` runs), called once per group of requests
   with the same sampling settings, each request drawing its uniform numbers from its own seeded Generator, and
   the form masks of all requests of one form computed at once (``BatchConstraint.joined``).
3. Rows that drew <eot> (or reached their length) leave the batch; a request whose rows have all left is answered,
   and the ones that waited join at the next step.

What holds: a request with a seed, decoded alone, is exactly what ``generate`` (and so ``poetgen sample --seed``)
writes with the same options: the same prefix run, the same step on the same rows, the same Generator. Decoded
beside other requests, its draws are still its own (its Generator, its masks), but the model's numbers come from a
larger matrix product whose float32 rounding may differ in the last bit, and a group of requests draws through the
many-row path of ``_draw``; so a draw that falls within rounding of a boundary between two symbols may go the other
way. best_of and beam requests do not join the batch: ``generate`` runs them whole on a fork of the Runtime (same
weights, a state of its own) in a worker thread.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from poetgen.data.vocab import EOT_ID, Vocab
from poetgen.errors import PoetgenError, SampleError
from poetgen.generation.constraints import BatchConstraint
from poetgen.generation.sample import (
    Plan,
    SampleOptions,
    SampleResult,
    _convert,
    _generator,
    _penalizable,
    constraint_key,
    generate,
    plan_samples,
    row_sample,
    sample_step,
    settings,
    start_seen,
    symbol_text,
)
from poetgen.generation.threads import ThreadTuner, blas_threads


log = logging.getLogger("poetgen.serve")


class Overloaded(PoetgenError):
    """The queue is full: the request was not taken (HTTP 503)."""


class TimedOut(PoetgenError):
    """The request ran past its time limit and was stopped (HTTP 503)."""


@dataclass
class Limits:
    """What one request may ask, and how much the server takes on at once (flags of `poetgen serve`)."""

    max_rows: int = 64  # rows (samples) decoded together in one step
    queue: int = 64  # requests waiting to join; one more is refused (Overloaded)
    max_n: int = 16  # samples per request (n; n x best_of and beam are held to max_rows)
    max_length: int = 1000  # symbols per sample
    timeout: float = 60.0  # seconds from arrival to the end of a request


@dataclass
class Stats:
    """Counters for /v1/stats: how much batching happened."""

    steps: int = 0  # model steps (one per batch)
    rows_stepped: int = 0  # rows over all steps: rows_stepped / steps is the mean batch
    max_batch: int = 0  # most rows in one step
    max_requests: int = 0  # most requests in one step
    requests: int = 0  # answered
    failed: int = 0  # timed out or failed
    rejected: int = 0  # refused: queue full
    searches: int = 0  # best_of / beam requests run by generate

    def to_dict(self) -> dict:
        mean = self.rows_stepped / self.steps if self.steps else 0.0
        return {**self.__dict__, "mean_batch": round(mean, 3)}


@dataclass(eq=False)  # a job is itself: compared by identity (its fields hold arrays)
class Job:
    """One request's sampling: its options, plan, Generator and per-row progress."""

    prime: str
    options: SampleOptions
    plan: Plan
    seed: int
    top_k: int
    deadline: float
    on_piece: Callable[[str], None] | None  # the first sample's text as it is written
    on_done: Callable[[SampleResult | None, Exception | None], None]
    started: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    answered: bool = False  # on_done was called
    # decoding state, set when the job joins the batch
    rng: Any = None
    constraint: BatchConstraint | None = None
    seen: np.ndarray | None = None  # (b, V) with a repetition penalty
    active: list[int] = field(default_factory=list)  # this job's rows still going, as sample numbers 0 .. n - 1
    ids: list[list[int]] = field(default_factory=list)  # per sample
    logps: list[list[float]] = field(default_factory=list)
    t: int = 0  # steps drawn

    @property
    def n(self) -> int:
        return self.options.num_samples

    @property
    def rows(self) -> int:
        return len(self.active)

    def key(self) -> tuple:
        """Jobs with equal keys draw in one sample_step call."""
        o = self.options
        return (o.temperature, self.top_k, o.top_p, o.repetition_penalty, self.constraint is not None)

    def cancel(self) -> None:
        """Stop at the next step (the client went away); on_done is not called."""
        self.cancelled = True


def answer_whole(job: Any, work: Callable[[], Any], release: Callable[[], None], stats: Stats) -> bool:
    """Run a request decoded whole in a worker thread (``work``), unless its client went away (``job.cancelled``),
    and answer it once through ``job.on_done``. ``release`` frees its place in the queue first, so that a client
    that asks again as soon as it has its answer (one at a time, --queue 1) is not refused by its own last request.
    -> whether it was answered with a result."""
    result, error = None, None
    try:
        if job.cancelled:
            return False
        result = work()
    except Exception as e:  # noqa: BLE001 - handed to the caller, who answers it
        error = e
    finally:
        release()
    if error is not None:
        stats.failed += 1
    else:
        stats.requests += 1
    job.on_done(result, error)
    return error is None


class _Streams:
    """The uniform numbers of one sample_step call over a group of jobs: each job's rows from its own Generator, in
    row order (what ``rng.random(b)`` would give each job alone)."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def random(self, size: int | None = None) -> Any:
        if size is None:  # one row in all: one job with one row
            return self.jobs[0].rng.random()
        return np.concatenate([j.rng.random(j.rows) for j in self.jobs])


LARGE_BATCH = 16  # rows from which a step's BLAS threads are chosen apart (_Tuners)


class _Tuners:
    """The BLAS threads of the batcher's model steps: one ThreadTuner for steps of fewer than LARGE_BATCH rows,
    another for the larger ones (``threads``: a fixed count for both; None: each tuner picks its own).

    One tuner over both compared times per row across batch sizes, which says nothing (a 64-row step of the
    shipped 2x768 model takes ~0.3 ms a row, a 1-row step ~2 ms): fed bench_serve's pattern (tests/test_serve.py)
    it tried two threads on one-row steps only (memory-bound products, little to share) and never on the 64-row
    steps of a burst, whose products are large enough to share."""

    def __init__(self, threads: int | None):
        choices = None if threads is None else (threads,)
        self.small, self.large = ThreadTuner(choices), ThreadTuner(choices)
        self.active = self.small
        self.first = self.small.current  # the count to start with (a fixed count: the one count)

    def idle(self) -> None:
        self.small.last = self.large.last = None

    @contextmanager
    def step(self, rows: int) -> Iterator[None]:
        """Around each model step of ``rows`` rows: its tuner's tick, then the step on the count it picked."""
        tuner = self.large if rows >= LARGE_BATCH else self.small
        if len(tuner.choices) == 1:  # a fixed count, set once for the whole loop (``first``)
            yield
            return
        if tuner is not self.active:  # the other tuner's last step ends here, uncounted; this one starts afresh
            self.active.last = tuner.last = None
            self.active = tuner
        tuner.tick(rows)
        with blas_threads(tuner.current):  # (the other tuner's count may be the one set)
            yield


class ConstraintCache:
    """FormConstraints by their arguments (plan_samples' ``constraints``), the ``size`` most recently used, for
    any thread: a server keeping one for every acrostic a client invents would grow for ever (a 七律's masks are
    a few hundred kilobytes at 8,800 symbols)."""

    def __init__(self, size: int = 64):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, default: Any = None) -> Any:
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def __setitem__(self, key: tuple, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class Batcher:
    """Decodes the requests for one model: ``submit`` from any thread; answers come through each job's callbacks,
    from the batcher's thread. ``model``: a poetgen.model.runtime.Runtime (the CPU engine)."""

    def __init__(self, model: Any, vocab: Vocab, limits: Limits | None = None, threads: int | None = None,
                 copies: Callable[[], Any] | None = None):
        self.model, self.vocab = model, vocab
        self.limits = limits or Limits()
        self.threads = threads
        self.copies = copies  # -> the training text's index, for best_of / beam (None: no check)
        self.stats = Stats()
        self.penalizable = _penalizable(vocab)
        self._waiting: deque[Job] = deque()
        self._jobs: list[Job] = []  # in the order of their rows in the model's state
        self._scores: np.ndarray | None = None  # (B, V) the scores the next draw uses
        self._cond = threading.Condition()
        self._stop = False
        self._searching = 0  # best_of / beam requests taken and not yet answered
        self._thread = threading.Thread(target=self._run, name="poetgen-batcher", daemon=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="poetgen-search")
        self._fork: Any = None
        self._constraints = ConstraintCache()  # FormConstraints by their arguments (plan_samples)

    # --- the caller's side ----------------------------------------------------------------------------------

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting) + self._searching

    def active_rows(self) -> int:
        return sum(j.rows for j in list(self._jobs))

    def check(self, options: SampleOptions) -> SampleOptions:
        """Validate ``options`` (SampleOptions.validate: the CLI's words) and hold them to the limits; with no
        length and no form, the length is at most the limit. SampleError for a bad one."""
        options.validate()
        lim = self.limits
        if options.num_samples > lim.max_n:
            raise SampleError(f"n must be at most {lim.max_n} on this server (--max-n), got {options.num_samples}")
        if options.num_samples * options.best_of > lim.max_rows:
            raise SampleError(f"n x best_of must be at most {lim.max_rows} on this server (--max-batch), got "
                              f"{options.num_samples * options.best_of}")
        if options.beam > lim.max_rows:
            raise SampleError(f"beam must be at most {lim.max_rows} on this server (--max-batch), got {options.beam}")
        if options.length is not None and options.length > lim.max_length:
            raise SampleError(f"length must be at most {lim.max_length} on this server (--max-length), got "
                              f"{options.length}")
        if options.length is None and not (options.form or options.acrostic):
            options = replace(options, length=min(lim.max_length, 500))
        return options

    def plans_quickly(self, prime: str, options: SampleOptions) -> bool:
        """Whether ``submit`` takes microseconds: texts the vocabulary knows as given (no script conversion) and no
        form, or one whose masks an earlier request built. Else it may take milliseconds (a form's masks) or more (a
        first rhyme book, OpenCC): a server's event loop then calls it from a worker thread."""
        if any(self.vocab.unknown(t) for t in (prime, options.style or "", options.acrostic or "")):
            return False
        # get, not `in`: a lookup marks the constraint recently used, so submit finds it still there
        planned = self._constraints.get(constraint_key(options, options.acrostic or None)) is not None
        return planned or not (options.form or options.acrostic)

    def submit(self, prime: str, options: SampleOptions,
               on_done: Callable[[SampleResult | None, Exception | None], None],
               on_piece: Callable[[str], None] | None = None) -> Job:
        """Plan the request (SampleError for options or texts the model cannot take, as ``generate`` says it) and
        queue it (Overloaded when the queue is full). ``on_done(result, None)`` or ``on_done(None, error)`` is
        called once, from another thread; ``on_piece`` (one sample, no best_of or beam) gets the text as written."""
        options = self.check(options)
        seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
        options = replace(options, seed=seed)
        plan = plan_samples(self.vocab, [prime], options, self._constraints)
        if plan.max_new > self.limits.max_length:  # a long acrostic sets a long poem
            raise SampleError(f"the poem needs {plan.max_new} symbols, more than this server allows (--max-length "
                              f"{self.limits.max_length})")
        V = len(self.vocab)
        job = Job(prime, options, plan, seed, min(options.top_k or V, V), time.perf_counter() + self.limits.timeout,
                  on_piece, on_done)
        with self._cond:
            if len(self._waiting) + self._searching >= self.limits.queue:
                self.stats.rejected += 1
                raise Overloaded(f"the server is busy: {self.limits.queue} request(s) already wait for this model "
                                 f"(--queue); try again shortly")
            if options.best_of > 1 or options.beam:
                self._searching += 1
                self._pool.submit(self._search, job)
            else:
                self._waiting.append(job)
                self._cond.notify()
        return job

    # --- best_of and beam: generate, whole, in a worker thread -------------------------------------------

    def _search(self, job: Job) -> None:
        def work() -> SampleResult:
            if self._fork is None:
                self._fork = self.model.fork()
            copies = self.copies() if self.copies is not None else None
            return generate(self._fork, self.vocab, [job.prime], job.options, threads=self.threads, copies=copies)

        if answer_whole(job, work, self._searched, self.stats):
            self.stats.searches += 1

    def _searched(self) -> None:
        with self._cond:
            self._searching -= 1

    # --- the batcher's thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        tuners = _Tuners(self.threads)
        with blas_threads(tuners.first):
            while True:
                with self._cond:
                    if not self._waiting and not self._jobs:
                        tuners.idle()  # the idle wait is no step's time: the next tick starts afresh
                    while not self._stop and not self._waiting and not self._jobs:
                        self._cond.wait()
                    if self._stop:
                        return
                    joining = self._admit()
                try:
                    self._join(joining)
                    self._step(tuners)
                except Exception as e:  # noqa: BLE001 - a bug must not leave callers waiting forever
                    log.exception("the batcher failed; its requests are answered with the error")
                    self._fail_all(e, [j for j in joining if j not in self._jobs])  # (by identity)

    def _admit(self) -> list[Job]:
        """Waiting jobs that fit in the batch now (under the lock)."""
        rows = sum(j.n for j in self._jobs)
        joining = []
        while self._waiting and (rows + self._waiting[0].n <= self.limits.max_rows or rows == 0):
            job = self._waiting.popleft()
            if job.cancelled:
                continue
            joining.append(job)
            rows += job.n
        return joining

    def _join(self, jobs: list[Job]) -> None:
        """The joining jobs' distinct prefixes, run together (one batched run per prefix length) and appended to the
        batch, each job's row then copied out to its n samples (as generate does). Jobs with the same prefix share
        its run: 64 requests for a poem without a prime run one row, not 64 (and each gets the numbers it would
        get alone)."""
        if not jobs:
            return
        vocab = self.vocab
        distinct: dict[tuple[str, str], int] = {}  # (style, prime) -> row of the prefix run
        which = []  # per job
        for job in jobs:
            which.append(distinct.setdefault((job.plan.style, job.plan.primes_model[0]), len(distinct)))
        prefixes = [[EOT_ID] + (vocab.encode(style) + [EOT_ID] if style else []) + vocab.encode(prime)
                    for style, prime in distinct]
        B0 = sum(j.rows for j in self._jobs)
        first = self.model.append(prefixes)  # (U, V)
        copies = np.repeat(np.array(which), [j.n for j in jobs])  # each job's prefix row, n times
        self.model.select(np.concatenate([np.arange(B0), B0 + copies]))
        rows = first[copies]
        self._scores = rows if self._scores is None or B0 == 0 else np.concatenate([self._scores, rows])
        for job in jobs:
            plan, o, n = job.plan, job.options, job.n
            job.rng = _generator(job.seed)
            if plan.constraint is not None:
                job.constraint = BatchConstraint(plan.constraint, [plan.starts[0]] * n)
            if o.repetition_penalty != 1.0:
                job.seen = start_seen(vocab, plan.primes_model, n, self.penalizable)
            job.active = list(range(n))
            job.ids = [[] for _ in range(n)]
            job.logps = [[] for _ in range(n)]
            if job.on_piece is not None:
                job.on_piece(_convert(plan.primes_model[0], o.output_script))  # as generate's on_text
            self._jobs.append(job)

    def _step(self, tuners: _Tuners) -> None:
        """One draw for every row, then one model step for the rows that go on.

        Per request, only a few list operations: with 64 one-row requests in the batch, anything done per request
        is done 64 times a step, beside a model step of ~20 ms (2x768). The constraints of requests of one form
        step as one (BatchConstraint.joined)."""
        self._drop_stopped()
        jobs = self._jobs
        if not jobs:
            return
        scores = self._scores
        assert scores is not None
        starts = [0]  # row range of each job: starts[i] .. starts[i + 1]
        for j in jobs:
            starts.append(starts[-1] + len(j.active))
        B = starts[-1]
        groups: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault(j.key(), []).append(i)
        joined = self._joined_constraints(jobs, starts)
        allowed = None  # (B, V) for the rows with a constraint
        if len(joined) == 1 and len(joined[0][0]) == B:
            allowed = joined[0][1].allowed()
        elif joined:
            allowed = np.zeros(scores.shape, dtype=bool)
            for rows, constraint, _ in joined:
                allowed[rows] = constraint.allowed()
        if len(groups) == 1:  # the whole batch draws at once
            tokens, logps = self._draw(jobs, scores, allowed)
        else:
            tokens, logps = np.empty(B, dtype=np.int64), np.empty(B, dtype=scores.dtype)
            for members in groups.values():
                idx = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in members])
                group = [jobs[i] for i in members]
                masks = allowed[idx] if group[0].constraint is not None else None  # type: ignore[index]
                tokens[idx], logps[idx] = self._draw(group, scores[idx], masks)
        for rows, constraint, parts in joined:
            constraint.advance(tokens[rows])
            constraint.split(parts)
        toks, lps = tokens.tolist(), logps.tolist()
        keep: list[int] = []  # rows that go on
        finished = []
        for i, job in enumerate(jobs):
            at = starts[i]
            job.t += 1
            last = job.t >= job.plan.max_new
            going = []  # this job's rows that go on, as its own row numbers
            for k, r in enumerate(job.active):
                tok = toks[at + k]
                job.ids[r].append(tok)
                job.logps[r].append(lps[at + k])
                if tok != EOT_ID and not last:
                    going.append(k)
            if job.on_piece is not None and job.active[0] == 0 and toks[at] != EOT_ID:
                job.on_piece(symbol_text(self.vocab, toks[at], job.options.output_script))
            if job.seen is not None:
                mine = tokens[at : starts[i + 1]]
                job.seen[np.arange(len(mine)), mine] |= self.penalizable[mine]
            if len(going) != len(job.active):
                job.active = [job.active[k] for k in going]
                if job.constraint is not None:
                    job.constraint.keep(np.array(going, dtype=np.intp))
                if job.seen is not None:
                    job.seen = job.seen[going]
                if not going:
                    finished.append(job)
            keep.extend(at + k for k in going)
        if finished:
            self._jobs = [j for j in jobs if j.active]
            for job in finished:
                self._finish(job)
        index = np.array(keep, dtype=np.intp)
        if len(index) == 0:
            self.model.select(index)
            self._scores = None
            return
        if len(index) != B:
            self.model.select(index)
        with tuners.step(len(index)):
            self._scores = self.model.step(tokens[index])  # the Runtime's buffer: replaced, never reused, below
        s = self.stats
        s.steps += 1
        s.rows_stepped += len(index)
        s.max_batch = max(s.max_batch, len(index))
        s.max_requests = max(s.max_requests, len(self._jobs))

    @staticmethod
    def _joined_constraints(jobs: list[Job], starts: list[int]) -> list[tuple[np.ndarray, BatchConstraint, list]]:
        """The jobs' constraints joined, one BatchConstraint per FormConstraint: -> (its rows in the batch, it, the
        jobs' own BatchConstraints it was joined from, for ``split``)."""
        by_form: dict[int, tuple[list[int], list[BatchConstraint]]] = {}
        for i, j in enumerate(jobs):
            if j.constraint is not None:
                rows, parts = by_form.setdefault(id(j.constraint.rows), ([], []))
                rows.extend(range(starts[i], starts[i + 1]))
                parts.append(j.constraint)
        return [(np.array(rows, dtype=np.intp), BatchConstraint.joined(parts), parts)
                for rows, parts in by_form.values()]

    @staticmethod
    def _draw(group: list[Job], scores: np.ndarray, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """sample_step for the rows of jobs of one key (``scores`` and ``allowed`` theirs, in order), each job
        drawing from its own Generator."""
        first = group[0]
        seen = np.concatenate([j.seen for j in group]) if first.seen is not None else None
        rng = first.rng if len(group) == 1 else _Streams(group)
        return sample_step(scores, first.options, first.top_k, rng, allowed, seen)

    def _drop_stopped(self) -> None:
        """Jobs cancelled by their client or past their time limit leave the batch."""
        now = time.perf_counter()
        stopped = [j for j in self._jobs if j.cancelled or now > j.deadline]
        if not stopped:
            return
        starts = np.cumsum([0] + [j.rows for j in self._jobs])
        keep = [np.arange(starts[i], starts[i + 1]) for i, j in enumerate(self._jobs) if j not in stopped]
        index = np.concatenate(keep) if keep else np.arange(0)
        self.model.select(index)
        self._scores = self._scores[index] if len(index) else None  # type: ignore[index]
        self._jobs = [j for j in self._jobs if j not in stopped]
        for job in stopped:
            if not job.cancelled:
                self.stats.failed += 1
                job.on_done(None, TimedOut(f"the request took longer than {self.limits.timeout:g} s (--timeout) "
                                           f"and was stopped"))

    def _finish(self, job: Job) -> None:
        o, plan = job.options, job.plan
        samples = [row_sample(self.vocab, job.prime, plan.primes_model[0], ids, lps, o.output_script)
                   for ids, lps in zip(job.ids, job.logps)]
        result = SampleResult(samples, job.seed, settings(o, job.top_k, plan.max_new, job.seed), plan.notes,
                              time.perf_counter() - job.started, job.t)
        self.stats.requests += 1
        job.answered = True
        job.on_done(result, None)

    def _fail_all(self, error: Exception, joining: list[Job]) -> None:
        """Answer every job in the batch, and those that were joining it, with ``error``; start afresh."""
        jobs, self._jobs, self._scores = self._jobs + joining, [], None
        self.model.reset(0)
        for job in jobs:
            if not job.answered:
                self.stats.failed += 1
                job.answered = True
                job.on_done(None, error)

