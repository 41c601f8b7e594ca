"""Batched generation from a trained CharRNN: N samples as one batch, one forward step per symbol.

How one call runs (``generate``):

1. Texts are put in the model's script: when a prime (or style, or acrostic) has characters the vocabulary lacks
   and the model was trained on the other Chinese script, OpenCC converts it and a note says so. Characters still
   unknown raise SampleError naming them.
2. Each distinct prefix ``<eot> [style <eot>] prime`` is fed once (the leading <eot> is how every document in
   training began: it follows the previous one's end). The style text is a hidden prefix: it conditions the
   model, is never printed, and ends in <eot> so the poem starts afresh in its mood. Rows with the same prime
   share that work; their states are then copied out to the batch.
3. Every step turns the last scores (B, V) into one symbol per row: repetition penalty, then the form mask
   (forbidden symbols get -inf, so even an untrained model keeps the structure), then temperature (0 = greedy),
   top-k, top-p, and a draw from a seeded numpy Generator. The chosen symbols are fed back with the carried
   state; the prefix is never re-run. A row that draws <eot> is finished and dropped from the batch, so the others
   run on a smaller batch.

The model behind the steps (an *engine*, poetgen.generation.engines) is either the numpy Runtime (the CPU: a CharRNN on the CPU
is converted to one) or a torch module on its device (CUDA, MPS, or any module with ``forward(idx, hidden)``),
whose scores are copied to numpy each step. Decoding is the same numpy code for both.

``mean_logprob`` is the mean natural-log probability the *model* gave each generated symbol (its raw softmax:
before temperature, penalty, masks and truncation), the final <eot> included. The same seed, settings, batch and
engine give the same output; a sample depends on the other rows of its batch, since they share the generator.
"""

from __future__ import annotations

import random
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

from typing import Any

import numpy as np

from poetgen.data.vocab import EOT_ID, Vocab, format_symbols
from poetgen.errors import SampleError
from poetgen.generation.constraints import BatchConstraint, ConstraintState, FormConstraint
from poetgen.generation.engines import engine_for
from poetgen.generation.threads import ThreadTuner, sampling_key
from poetgen.poetry.forms import is_han

DEFAULT_LENGTH = 500
MAX_CELLS = 2**28  # symbols in one call (12 bytes each in the output buffers: 3.2 GB)
SCRIPTS = ("simplified", "traditional")
NEG_INF = float("-inf")


def check_truncation(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """The sampling knobs every decoder shares (poems here, couplets in poetgen.generation.couplet)."""
    if not temperature >= 0:
        raise SampleError(f"temperature must be 0 or more, got {temperature}")
    if top_k is not None and top_k < 1:
        raise SampleError(f"top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise SampleError(f"top-p must be in (0, 1], got {top_p}")


@dataclass
class SampleOptions:
    temperature: float = 0.8  # 0 means greedy
    top_k: int | None = None  # keep the k most likely symbols; clamped to the vocabulary size
    top_p: float | None = None  # keep the smallest set of symbols whose probability reaches p
    repetition_penalty: float = 1.0  # divides the probability of characters already in the prime or the sample
    length: int | None = None  # most symbols to generate; None: DEFAULT_LENGTH, or what the poem needs
    num_samples: int = 1  # per prime
    seed: int | None = None  # None: a fresh seed, reported in the result
    form: str | None = None  # 五绝 七绝 五律 七律 or an alias
    acrostic: str | None = None  # one character per line
    line_length: int | None = None  # 5 or 7, for an acrostic without a form (default 7)
    rhyme: bool = False  # even-line ends level and in one rhyme group of rhyme_book
    rhyme_book: str = "pingshui"  # pingshui (平水韵, of Tang verse) or xinyun (中华新韵, modern Mandarin)
    rhyme_group: str | None = None  # the rhyme group (东 or 上平一东); None: the first rhyme drawn fixes it
    tones: bool = False  # follow one of the form's four regulated tone patterns (格律)
    pattern: str | None = None  # that pattern by name (仄起首句入韵 ...); None: the model's first choices pick it
    style: str | None = None  # hidden prefix
    output_script: str | None = None  # None (as the model writes), "simplified" or "traditional"
    best_of: int = 1  # draw this many candidates per sample, keep the best (poetgen.generation.search)
    beam: int = 0  # beam search with this many hypotheses per prime instead of sampling; 0 = off

    def validate(self) -> None:
        check_truncation(self.temperature, self.top_k, self.top_p)
        if not self.repetition_penalty > 0:
            raise SampleError(f"repetition penalty must be positive, got {self.repetition_penalty}")
        if self.length is not None and self.length < 1:
            raise SampleError(f"length must be at least 1, got {self.length}")
        if self.num_samples < 1:
            raise SampleError(f"number of samples must be at least 1, got {self.num_samples}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what torch.Generator accepted
            raise SampleError(f"seed must be from -2**63 to 2**64 - 1, got {self.seed}")
        if self.output_script not in (None, *SCRIPTS):
            raise SampleError(f"output script must be one of {', '.join(SCRIPTS)}, got {self.output_script!r}")
        if self.line_length is not None and self.line_length not in (5, 7):
            raise SampleError(f"line length must be 5 or 7, got {self.line_length}")
        if self.line_length is not None and not self.acrostic:
            raise SampleError("--line-length applies to --acrostic (a form fixes its own line length)")
        if self.best_of < 1:
            raise SampleError(f"--best-of must be at least 1, got {self.best_of}")
        if self.beam < 0:
            raise SampleError(f"--beam must be 0 (off) or more, got {self.beam}")
        if self.beam and self.best_of > 1:
            raise SampleError("--beam and --best-of are two ways to choose: give one of them")
        if self.beam and self.num_samples > self.beam:
            raise SampleError(f"--beam {self.beam} keeps {self.beam} poems per prime: ask for at most that many (-n)")
        if self.beam and (self.top_k is not None or self.top_p is not None or self.repetition_penalty != 1.0):
            raise SampleError("--top-k, --top-p and --repetition-penalty shape sampling; --beam does not sample "
                              "(it has its own repetition rules)")
        if self.rhyme and not (self.form or self.acrostic):
            raise SampleError("--rhyme needs --form or --acrostic: it rhymes the ends of the even lines of a poem")
        self._validate_prosody()

    def _validate_prosody(self) -> None:
        from poetgen.poetry.prosody import BOOK_NAMES, rhyme_book, tone_pattern

        if self.rhyme_book not in BOOK_NAMES:
            raise SampleError(f"rhyme book must be one of {', '.join(BOOK_NAMES)}, got {self.rhyme_book!r}")
        if self.rhyme_group is not None:
            if not self.rhyme:
                raise SampleError("--rhyme-group applies to --rhyme")
            book = rhyme_book(self.rhyme_book)
            if not book.group(self.rhyme_group).level:
                raise SampleError(f"--rhyme-group {self.rhyme_group} is an oblique group of the {book.name} book; "
                                  f"level groups: {' '.join(book.level_group_names())}")
        if self.tones and not (self.form or self.acrostic):
            raise SampleError("--tones needs --form (五绝 七绝 五律 七律), or an --acrostic of 4 or 8 characters")
        if self.pattern is not None:
            if not self.tones:
                raise SampleError("--pattern applies to --tones")
            if self.form:
                from poetgen.poetry.forms import parse_form

                tone_pattern(parse_form(self.form), self.pattern)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sample:
    prime: str  # as given
    text: str  # prime + generated, in the output script
    generated: str  # the generated part alone
    mean_logprob: float
    tokens: int  # generated symbols, the final <eot> included
    ended: bool  # stopped at <eot> (False: hit the length limit)


@dataclass
class SampleResult:
    samples: list[Sample]
    seed: int | None  # None: beam search, which draws nothing
    options: dict  # the settings used (top_k clamped, length resolved)
    notes: list[str] = field(default_factory=list)  # e.g. "converted the prime to traditional: ..."
    seconds: float = 0.0  # generation time, prefix included
    steps: int = 0  # forward steps after the prefix
    threads: int = 1  # numpy's BLAS threads at the end of the call (see poetgen.generation.threads.ThreadTuner)

    def records(self, checkpoint: str | None = None) -> list[dict]:
        """One JSON-ready record per sample (what `poetgen sample --json` prints, a line each): the prime, the text,
        the settings (and the checkpoint) shared by all, the seed, the mean log-probability, tokens, ended."""
        settings = {k: v for k, v in self.options.items() if k != "seed"}
        if checkpoint is not None:
            settings["checkpoint"] = checkpoint
        return [{"prime": s.prime, "text": s.text, "settings": settings, "seed": self.seed,
                 "mean_logprob": round(s.mean_logprob, 6), "tokens": s.tokens, "ended": s.ended}
                for s in self.samples]


# --- scripts ----------------------------------------------------------------------------------------------------


def vocab_script(vocab: Vocab) -> str | None:
    """"simplified" or "traditional" when the vocabulary's Han characters clearly lean one way, else None.

    Counts the characters OpenCC would change in each direction (a character only traditional texts use changes
    under t2s), weighted by their corpus counts when the vocabulary has them.
    """
    from poetgen.data.normalize import convert_script

    han = [(i, s) for i, s in enumerate(vocab.symbols) if i >= 2 and is_han(s)]
    if not han:
        return None
    chars = "".join(s for _, s in han)
    # OpenCC keeps length for single characters; converting them all at once is ~100x faster than one by one.
    to_simp, to_trad = convert_script(chars, "simplified"), convert_script(chars, "traditional")
    if len(to_simp) != len(chars) or len(to_trad) != len(chars):
        return None
    weight = vocab.counts or [1] * len(vocab)
    trad = sum(weight[i] for (i, s), t in zip(han, to_simp) if t != s)
    simp = sum(weight[i] for (i, s), t in zip(han, to_trad) if t != s)
    if trad + simp == 0:
        return None
    if trad >= 0.8 * (trad + simp):
        return "traditional"
    if simp >= 0.8 * (trad + simp):
        return "simplified"
    return None


def to_model_script(vocab: Vocab, text: str, what: str, script: str | None, notes: list[str]) -> str:
    """``text`` with every character the vocabulary knows; SampleError naming the others.

    When some characters are unknown and the model has a clear script, the text is converted to it (OpenCC) and a
    note is added. Characters the vocabulary knows as given are kept as given (OpenCC may map 床 to 牀 even when the
    model knows 床).
    """
    if not text or not vocab.unknown(text):
        return text
    if script is not None:
        from poetgen.data.normalize import convert_script

        converted = convert_script(text, script)
        if len(converted) == len(text):
            converted = "".join(c if c in vocab else k for c, k in zip(text, converted))
        if converted != text:
            notes.append(f"converted the {what} to {script} characters to match the model: {text} -> {converted}")
            text = converted
    unknown = vocab.unknown(text)
    if unknown:
        raise SampleError(f"the {what} has character(s) not in the model's vocabulary: {format_symbols(unknown)}")
    return text


# --- decoding ---------------------------------------------------------------------------------------------------


def _penalizable(vocab: Vocab) -> np.ndarray:
    """(V,) bool: symbols the repetition penalty applies to — characters, not <eot>, punctuation or spaces."""
    return np.array([i >= 2 and unicodedata.category(s)[0] not in "PZC" for i, s in enumerate(vocab.symbols)])


def _generator(seed: int) -> np.random.Generator:
    """A numpy Generator for any seed SampleOptions accepts (-2**63 .. 2**64 - 1); negative seeds get streams of
    their own."""
    return np.random.default_rng(np.random.SeedSequence(abs(seed), spawn_key=(1,) if seed < 0 else ()))


BLOCK = 64  # symbols per block of the two-level draw
PAD_CELLS = 2**16  # up to this many weights, _draw pads a copy of them all (fewer numpy calls)


def _draw(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """weights (B, V) >= 0, each row with a positive one -> (B,) ids drawn in proportion, a zero weight never.

    Inverse CDF with one uniform number u per row (one exponential per symbol, as torch.multinomial draws, was
    most of the step time at 64 x 6,000), in two levels: a running sum over the blocks of BLOCK symbols picks the
    block where u falls, then a running sum inside that block picks the symbol. numpy's running sum (cumsum) is a
    sequential loop, 3-4x slower than exp over a (64, 6,000) array, while block totals are vectorised sums."""
    B, V = weights.shape
    if B == 1 and V <= 32 * BLOCK:  # one row: numpy's per-call overhead is the cost, so the fewest calls
        cdf = np.cumsum(weights[0])
        u = max(np.float32((1.0 - rng.random()) * float(cdf[-1])), np.float32(1e-45))
        return np.array([cdf.searchsorted(u)])
    if V <= 4 * BLOCK:
        return _pick(np.cumsum(weights, axis=1), rng.random(B))
    full, nb = V // BLOCK, -(-V // BLOCK)  # whole blocks, all blocks
    if nb == full or B * V <= PAD_CELLS:
        if nb != full:  # a last block padded with zero weights
            padded = np.zeros((B, nb * BLOCK), dtype=weights.dtype)
            padded[:, :V] = weights
            weights = padded
        blocks, last = weights.reshape(B, nb, BLOCK), None
        block_sums = blocks.sum(axis=2)
    else:  # many rows: no padded copy of them all (0.3 ms at 64 x 8,800), only of the last block
        blocks = weights[:, : full * BLOCK].reshape(B, full, BLOCK)  # a view
        last = np.zeros((B, BLOCK), dtype=weights.dtype)
        last[:, : V - full * BLOCK] = weights[:, full * BLOCK :]
        block_sums = np.concatenate([blocks.sum(axis=2), last.sum(axis=1, keepdims=True)], axis=1)
    block_cdf = np.cumsum(block_sums, axis=1)  # (B, nb)
    r = rng.random(B)
    block = _pick(block_cdf, r)  # (B,) a block with a positive total
    rows = np.arange(B)
    # u's place inside the chosen block, as a fraction of the block's own total (rounding cannot push it past).
    below = np.where(block > 0, block_cdf[rows, block - 1], 0.0)
    inside = block_cdf[rows, block] - below  # (B,) > 0
    u = (1.0 - r) * block_cdf[:, -1]
    frac = np.clip((u - below) / inside, 0.0, 1.0)
    if last is None:
        chosen = blocks[rows, block]  # (B, BLOCK)
    else:
        chosen = np.where((block < full)[:, None], blocks[rows, np.minimum(block, full - 1)], last)
    return block * BLOCK + _pick(np.cumsum(chosen, axis=1), 1.0 - frac)


def _pick(cdf: np.ndarray, r: np.ndarray) -> np.ndarray:
    """cdf (B, N) running sums, r (B,) uniform in [0, 1) -> (B,) the first index whose cdf reaches (1 - r) * total.

    u = (1 - r) * total is in (0, total] (rounding to the cdf's float32 keeps it there), so that index exists and
    its weight (cdf step) is positive: a masked symbol never comes."""
    u = ((1.0 - r) * cdf[:, -1]).astype(cdf.dtype)
    u = np.maximum(u, np.nextafter(np.zeros_like(u), 1))  # a tiny total times a tiny (1 - r) must not reach 0
    if len(cdf) == 1:
        return np.array([np.searchsorted(cdf[0], u[0])])
    return (cdf < u[:, None]).sum(axis=1)


def _choose(scores: np.ndarray, o: SampleOptions, top_k: int, rng: np.random.Generator,
            own: bool = False) -> np.ndarray:
    """scores (B, V) with -inf for forbidden symbols -> (B,) chosen ids. ``own``: scores is a scratch array that
    may be overwritten (sample_step's), which spares two (B, V) arrays."""
    if o.temperature == 0:
        return scores.argmax(axis=1)
    at_zero = False  # each row's maximum is exactly 0, so subtracting it would change no number
    if o.temperature != 1:
        # Shift first, and never divide by less than float32's smallest normal number: a temperature such as 1e-50
        # (0 in float32) then behaves as the near-greedy choice it asks for instead of dividing by zero.
        t = np.float32(max(o.temperature, float(np.finfo(np.float32).tiny)))
        with np.errstate(over="ignore"):
            if own:
                np.subtract(scores, scores.max(axis=1, keepdims=True), out=scores)
                np.divide(scores, t, out=scores)
            else:
                scores = (scores - scores.max(axis=1, keepdims=True)) / t
        at_zero = own = True  # a row's maximum m is now (m - m) / t = 0; top-k and top-p keep it
    V = scores.shape[1]
    if top_k < V:
        kth = np.partition(scores, V - top_k, axis=1)[:, V - top_k, None]  # (B, 1) the k-th largest
        scores = np.where(scores < kth, np.float32(NEG_INF), scores)
        own = True
    if o.top_p is not None and o.top_p < 1:
        order = np.argsort(-scores, axis=1, kind="stable")  # (B, V) most likely first
        ranked = np.take_along_axis(scores, order, axis=1)
        probs = np.exp(ranked - ranked[:, :1])
        probs /= probs.sum(axis=1, keepdims=True)
        # Drop a symbol when the ones before it already reach top_p; the most likely one always stays.
        ranked[(np.cumsum(probs, axis=1) - probs) >= o.top_p] = NEG_INF
        scores = np.empty_like(ranked)
        np.put_along_axis(scores, order, ranked, axis=1)
        own = True
    if at_zero:
        weights = scores
    elif own:
        weights = np.subtract(scores, scores.max(axis=1, keepdims=True), out=scores)
    else:
        weights = scores - scores.max(axis=1, keepdims=True)
    np.exp(weights, out=weights)  # (B, V), 0 where forbidden
    return _draw(weights, rng)


@dataclass
class Plan:
    """What ``generate`` settles before the model runs (``plan_samples``): the texts in the model's script, the
    form constraint and each prime's state in it, and the most symbols a sample may take."""

    primes_model: list[str]  # each prime in the model's script
    style: str  # the hidden prefix in the model's script ("" for none)
    constraint: FormConstraint | None
    starts: list[ConstraintState]  # per prime: its state after the prime (empty without a constraint)
    max_new: int
    notes: list[str]


def constraint_key(o: SampleOptions, acrostic: str | None) -> tuple:
    """What a FormConstraint is built from: ``plan_samples`` keeps them by it (``acrostic`` in the model's script)."""
    return (o.form, acrostic, o.rhyme, o.line_length, o.rhyme_book, o.rhyme_group, o.tones, o.pattern)


def plan_samples(vocab: Vocab, primes: Sequence[str], o: SampleOptions, constraints: Any = None) -> Plan:
    """Scripts, constraint and length for ``primes`` under validated options ``o``; SampleError for a prime,
    style or acrostic the model cannot write, or a length too short for the form. Shared by ``generate`` and the
    server's batcher (poetgen.serving), so that both refuse the same requests with the same words.
    ``constraints``: FormConstraints kept by their arguments between calls, a dict or anything with its ``get`` and
    item assignment (the server's bounded poetgen.serving.batcher.ConstraintCache; one is never changed once built;
    building a 五绝's takes ~2 ms at 8,800 symbols, a server's many like requests need it once)."""
    notes: list[str] = []
    script = vocab_script(vocab) if any(vocab.unknown(t) for t in (*primes, o.style or "", o.acrostic or "")) else None

    primes_model = [to_model_script(vocab, p, "prime", script, notes) for p in primes]
    style = to_model_script(vocab, o.style or "", "style text", script, notes)
    acrostic = to_model_script(vocab, o.acrostic or "", "acrostic", script, notes) or None

    constraint = None
    starts: list[ConstraintState] = []
    if o.form or acrostic:
        key = constraint_key(o, acrostic)
        constraint = constraints.get(key) if constraints is not None else None
        if constraint is None:
            constraint = FormConstraint(vocab, o.form, acrostic, o.rhyme, o.line_length, rhyme_book=o.rhyme_book,
                                        rhyme_group=o.rhyme_group, tones=o.tones, pattern=o.pattern)
            if constraints is not None:
                constraints[key] = constraint
        for p in primes_model:
            state = constraint.start()
            for ch in p:
                try:
                    state = constraint.advance(state, vocab.id(ch))
                except SampleError as e:
                    raise SampleError(f"the prime {p!r} does not fit {constraint.describe()}: {e}") from None
            starts.append(state)
        need = max(constraint.length + 1 - s.pos for s in starts)  # the rest of the poem, then <eot>
        if o.length is not None and o.length < need:
            raise SampleError(f"--length {o.length} is too short for {constraint.describe()}: it needs {need}")
        max_new = need
    else:
        max_new = o.length or DEFAULT_LENGTH
    return Plan(primes_model, style, constraint, starts, max_new, notes)


def generate(
    model: Any,
    vocab: Vocab,
    primes: Sequence[str] = ("",),
    options: SampleOptions | None = None,
    on_text: Callable[[str], None] | None = None,
    threads: int | None = None,
    copies: Any = None,
) -> SampleResult:
    """``options.num_samples`` samples for each prime, all in one batch (prime-major order).

    ``model``: a poetgen.model.runtime.Runtime, a CharRNN (on the CPU it is run by a Runtime made from its weights), or any
    torch module with ``forward(idx, hidden) -> (scores, hidden)`` (run on its device in eval mode, then put back
    in the mode it was in). ``on_text`` receives the first sample as it is written: its prime, then each new
    character (converted to the output script one character at a time). ``threads``: numpy's BLAS threads for the
    call; None (the default) lets poetgen.generation.threads.ThreadTuner pick between one and more by timing the steps, since
    which is faster depends on the batch and on what else the machine is doing. ``copies``: the training text's
    poetgen.data.copies.TrainingIndex, with which ``best_of`` drops candidates that copy a line (None: no check).
    ``beam`` and ``best_of``: see poetgen.generation.search; ``on_text`` streams plain sampling only.
    """
    o = options or SampleOptions()
    o.validate()
    primes = list(primes) or [""]
    plan = plan_samples(vocab, primes, o)
    primes_model, style, constraint, starts, max_new, notes = (plan.primes_model, plan.style, plan.constraint,
                                                               plan.starts, plan.max_new, plan.notes)
    rows = len(primes) * (o.beam or o.num_samples * o.best_of)
    if rows * max_new > MAX_CELLS:  # the (rows, max_new) output buffers are allocated up front
        raise SampleError(f"{rows:,} sample(s) of up to {max_new:,} symbols are too many to hold at once (at most "
                          f"{MAX_CELLS:,} symbols in all); lower --length or --num-samples")

    engine, context = engine_for(model)
    if hasattr(engine, "use_table") and rows * max_new >= len(vocab):
        engine.use_table()  # a gather instead of layer 0's input matmul; its build pays off from ~V row-steps
    tuner = ThreadTuner(choices=None if threads is None else (threads,), key=sampling_key(engine, rows))
    with context(), tuner:
        if copies is None and (o.beam or o.best_of > 1):
            notes.append("the model's training text is not on this machine, so copied lines are not refused")
        if o.beam:
            from poetgen.generation.search import beam_generate

            return beam_generate(engine, vocab, primes, primes_model, style, constraint, starts, o, max_new, notes,
                                 tuner, copies)
        if o.best_of == 1:
            return _decode(engine, vocab, primes, primes_model, style, constraint, starts, o, max_new, notes,
                           on_text, tuner)
        from poetgen.generation.search import pick_best

        wide = replace(o, num_samples=o.num_samples * o.best_of)
        result = _decode(engine, vocab, primes, primes_model, style, constraint, starts, wide, max_new, notes, None,
                         tuner)
        result.samples, more = pick_best(result.samples, len(primes), o.num_samples, copies)
        result.notes.extend(more)
        result.options["num_samples"] = o.num_samples
        return result


def _decode(engine, vocab, primes, primes_model, style, constraint, starts, o, max_new, notes, on_text, tuner):
    """The batched loop of ``generate``."""
    V = len(vocab)
    seed = o.seed if o.seed is not None else random.SystemRandom().randrange(2**31)
    top_k = min(o.top_k or V, V)
    n = o.num_samples
    B = len(primes) * n
    t0 = time.perf_counter()
    rng = _generator(seed)
    style_ids = vocab.encode(style) + [EOT_ID] if style else []
    distinct = list(dict.fromkeys(primes_model))
    scores = engine.prefix([[EOT_ID] + style_ids + vocab.encode(p) for p in distinct])  # (U, V)
    row_prefix = np.array([distinct.index(p) for p in primes_model for _ in range(n)])  # (B,) prefix of each row
    engine.select(row_prefix)
    scores = scores[row_prefix]  # (B, V)

    batch_constraint = None
    if constraint is not None:
        batch_constraint = BatchConstraint(constraint, [s for s in starts for _ in range(n)])
    penalize = o.repetition_penalty != 1.0
    seen = None
    if penalize:
        penalizable = _penalizable(vocab)  # (V,)
        seen = start_seen(vocab, primes_model, n, penalizable)  # (B, V) symbols used so far

    out = np.full((B, max_new), -1, dtype=np.int64)  # (B, max_new); -1 after the end
    logps = np.zeros((B, max_new))  # (B, max_new) model log-probabilities
    rows = np.arange(B)  # (b,) original row of each active row
    streaming = on_text is not None
    if streaming:
        on_text(_convert(primes_model[0], o.output_script))

    steps = 0
    active = np.arange(B)  # (b,) 0 .. b - 1
    for t in range(max_new):
        allowed = batch_constraint.allowed() if batch_constraint is not None else None
        token, logp = sample_step(scores, o, top_k, rng, allowed, seen)  # (b,), (b,)
        out[rows, t] = token
        logps[rows, t] = logp
        if streaming:
            first = int(token[0]) if rows[0] == 0 else EOT_ID
            if first == EOT_ID:
                streaming = False
            else:
                on_text(symbol_text(vocab, first, o.output_script))
        if batch_constraint is not None:
            batch_constraint.advance(token)
        if seen is not None:
            seen[active, token] |= penalizable[token]
        done = token == EOT_ID
        if done.any():
            keep = np.flatnonzero(~done)
            if len(keep) == 0:
                break
            rows, token, active = rows[keep], token[keep], active[: len(keep)]
            engine.select(keep)
            if batch_constraint is not None:
                batch_constraint.keep(keep)
            if seen is not None:
                seen = seen[keep]
        if t == max_new - 1:
            break
        tuner.tick(len(token))
        scores = engine.step(token)  # (b, V)
        steps += 1

    seconds = time.perf_counter() - t0
    samples = []
    out_list, logps_list = out.tolist(), logps.tolist()
    for r in range(B):
        ids = [i for i in out_list[r] if i >= 0]
        samples.append(row_sample(vocab, primes[r // n], primes_model[r // n], ids, logps_list[r][: len(ids)],
                                  o.output_script))
    return SampleResult(samples, seed, settings(o, top_k, max_new, seed), notes, seconds, steps, tuner.current)


# --- one step, shared by generate and the server (poetgen.serving) ----------------------------------------------


def start_seen(vocab: Vocab, primes_model: Sequence[str], n: int, penalizable: np.ndarray) -> np.ndarray:
    """(len(primes) * n, V) bool: the characters each row has used before its first step (its prime's), for the
    repetition penalty; ``penalizable`` is ``_penalizable(vocab)``."""
    seen = np.zeros((len(primes_model) * n, len(vocab)), dtype=bool)
    for r, p in enumerate(primes_model):
        if p:
            seen[r * n : (r + 1) * n, vocab.encode(p)] = True
    seen &= penalizable[None, :]
    return seen


_SCRATCH = threading.local()
SCRATCH_CELLS = 2**22  # the most a thread keeps between steps (16 MiB of float32)


def _scratch(shape: tuple[int, int], dtype: Any) -> np.ndarray:
    """A (b, V) array for one step's temporary numbers, this thread's own and reused from step to step (up to
    SCRATCH_CELLS). A fresh array of 64 x 8,800 each step costs ~550 page faults: glibc hands freed memory of that
    size straight back to the OS (measured: 1,100 faults a step, 5-10% of the server's 64-row step)."""
    need = shape[0] * shape[1]
    if need > SCRATCH_CELLS:
        return np.empty(shape, dtype)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < need or buf.dtype != dtype:
        buf = _SCRATCH.buf = np.empty(max(need, 0 if buf is None else buf.size), dtype)
    return buf[:need].reshape(shape)


def sample_step(scores: np.ndarray, o: SampleOptions, top_k: int, rng: Any, allowed: np.ndarray | None = None,
                seen: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One decoding step for rows that share the options ``o``: scores (b, V) -> (chosen ids (b,), the model's
    log-probability of each (b,)).

    ``rng`` gives the uniform numbers of the draw (``random()`` for one row, ``random(b)`` for b; none at
    temperature 0): a numpy Generator, or anything that answers the same, e.g. one Generator per request. ``allowed``
    (b, V) bool: the constraint's mask. ``seen`` (b, V) bool: the characters used so far, with
    ``o.repetition_penalty`` != 1 (None otherwise)."""
    top = scores.max(axis=1, keepdims=True)  # (b, 1)
    weights = np.subtract(scores, top, out=_scratch(scores.shape, scores.dtype))  # (b, V) shifted, then exp
    np.exp(weights, out=weights)
    log_norm = np.log(weights.sum(axis=1))  # (b,) for the model's log-probability of the choice
    raw = scores
    # Temperature 1 with nothing to mask or truncate draws from the model's own softmax: one exp serves both.
    plain = o.temperature == 1 and seen is None and allowed is None and top_k == scores.shape[1] and not (
        o.top_p is not None and o.top_p < 1)
    if plain:
        token = _draw(weights, rng)
    else:
        if seen is not None:
            # A used character's probability is divided by the penalty (before renormalising): the same rule
            # whether the scores are the full head's logits or the adaptive head's log-probabilities.
            scores = scores - np.array([0, np.log(o.repetition_penalty)], dtype=np.float32).take(seen.view(np.uint8))
        if allowed is not None:  # forbidden symbols -inf, written over the weights (only their sum was needed)
            if scores is raw:
                np.copyto(weights, NEG_INF)
                np.copyto(weights, scores, where=allowed)
                scores = weights
            else:
                np.putmask(scores, ~allowed, NEG_INF)
        token = _choose(scores, o, top_k, rng, own=scores is not raw)  # (b,)
    # The chosen symbols' shifted scores, for them alone: the same float32 numbers as over whole rows.
    rows = np.arange(len(token))
    return token, (raw[rows, token] - top[:, 0]) - log_norm


def row_sample(vocab: Vocab, prime: str, prime_model: str, ids: list[int], logps: list[float],
               script: str | None) -> Sample:
    """A Sample from a row's generated ids (its final <eot> included when it ended) and their log-probabilities."""
    ended = bool(ids) and ids[-1] == EOT_ID
    k = len(ids)
    return make_sample(vocab, prime, prime_model, ids[:-1] if ended else ids, sum(logps[:k]) / k if k else 0.0, k,
                       ended, script)


def settings(o: SampleOptions, top_k: int, max_new: int, seed: int) -> dict:
    """SampleResult.options: the options with top_k clamped (when given), the length resolved and the seed."""
    return o.to_dict() | {"top_k": top_k if o.top_k is not None else None, "length": max_new, "seed": seed}


def symbol_text(vocab: Vocab, token: int, script: str | None) -> str:
    """One generated symbol as streamed text (<unk> as U+FFFD), in the output script."""
    return _convert(vocab.symbols[token] if token != 1 else "\ufffd", script)


def make_sample(vocab: Vocab, prime: str, prime_model: str, body: list[int], mean_logprob: float, tokens: int,
                ended: bool, script: str | None) -> Sample:
    """A Sample from the generated ids (``body``: without the final <eot>), in the output ``script``."""
    generated = vocab.decode(body, eot="\n")
    text = _convert(prime_model + generated, script)
    return Sample(prime=prime, text=text,
                  generated=text[len(prime_model):] if len(text) == len(prime_model + generated) else generated,
                  mean_logprob=mean_logprob, tokens=tokens, ended=ended)


def _convert(text: str, script: str | None) -> str:
    if not script or not text:
        return text
    from poetgen.data.normalize import convert_script

    return convert_script(text, script)
