"""Decoding that picks good poems, since one sample of a character model is a lottery: best-of-N and beam search.

**Best-of-N** (``pick_best``): N candidates per requested sample are drawn in the same batch (by
poetgen.generation.sample's sampler, so every constraint applies), then the best by the model's mean log-probability
per symbol is kept — after dropping candidates that copy a whole line of the training text (when the model's
training text is at hand: poetgen.data.copies) or that repeat a Han character within a line more often than Tang
verse does (``REPEAT_LIMITS``). When every candidate of a sample is dropped, the best of all is kept and a note says
so.

**Beam search** (``beam_search``, Jiuge's decoding): K hypotheses per prime advance together; at each step every
hypothesis is extended by every symbol the constraints allow (the same masks as sampling: form, acrostic, rhyme,
tones), scored by the model's log-probabilities, and the K best of the K x V extensions are kept. A hypothesis that
draws <eot> is finished; the result is the finished ones by mean log-probability per symbol (the length-normalised
score), best first. Deterministic: no random draw, the same input gives the same poems.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from poetgen.data.copies import MIN_COPY_LINE
from poetgen.data.vocab import EOT_ID, Vocab
from poetgen.errors import SampleError
from poetgen.model.runtime import log_softmax
from poetgen.poetry.forms import is_han, split_lines

# The most repeated Han characters a line of each length may have (len(line) - distinct characters), from the lines
# of the shipped 全唐诗 training split: 99.5% of its 5-character lines repeat at most 1 character (0.14% more), and
# 99.5% of its 7-character lines at most 2 (0.09% more). Other lengths: a third of the line.
REPEAT_LIMITS = {5: 1, 7: 2}
REPEAT_COST = float(np.log(2.0))  # beam search: a character's second use in a poem halves its probability
MAX_BEAM_CELLS = 2**25  # beam search: prefixes x width x vocabulary (about 1.5 GB of per-step arrays)


def repeat_limit(length: int) -> int:
    return REPEAT_LIMITS.get(length, max(1, length // 3))


def too_repetitive(text: str) -> bool:
    """True when a line of ``text`` (text between punctuation) repeats more Han characters than REPEAT_LIMITS allow."""
    for line in split_lines(text):
        han = [c for c in line if is_han(c)]
        if han and len(han) - len(set(han)) > repeat_limit(len(han)):
            return True
    return False


def copies_a_line(sample: Any, copies: Any) -> bool:
    """True when a line the sampler wrote (one that ends in the generated part: a prime that is itself a famous line
    is the user's, not a copy) is a whole line of the training text."""
    text, start, pos = sample.text, len(sample.text) - len(sample.generated), 0
    for line in split_lines(text):
        pos = text.index(line, pos) + len(line)
        if pos > start and len(line) >= MIN_COPY_LINE and line in copies.lines:
            return True
    return False


def pick_best(samples: Sequence[Any], groups: int, keep: int, copies: Any = None) -> tuple[list[Any], list[str]]:
    """``samples``: ``groups`` runs of candidates (prime-major, as the sampler returns them), each run holding
    ``keep`` x N candidates. -> (the ``keep`` best of each run, best first, no text twice; notes). ``copies``: a
    poetgen.data.copies.TrainingIndex (or None: no copy check)."""
    per = len(samples) // groups
    chosen, notes = [], []
    fell_back = short = 0
    for g in range(groups):
        run = list({s.text: s for s in sorted(samples[g * per : (g + 1) * per],
                                                key=lambda s: s.mean_logprob)}.values())  # distinct, best kept
        run.sort(key=lambda s: -s.mean_logprob)
        good = [s for s in run if not too_repetitive(s.generated)
                and not (copies is not None and copies_a_line(s, copies))]
        if len(good) < keep:  # too few survived: fill with the best of the rest
            fell_back += min(keep, len(run)) - len(good)
            good += [s for s in run if s not in good][: keep - len(good)]
        chosen.extend(good[:keep])
        short += max(keep - len(good), 0)
    if short:
        notes.append(f"{short} sample(s) fewer than asked: the candidates were not all different (at temperature 0 "
                     "they are one)")
    if fell_back:
        notes.append(f"{fell_back} sample(s) kept although they copy a training line or repeat characters (every "
                     "other candidate did too): raise --best-of for more candidates")
    return chosen, notes


def beam_search(engine: Any, vocab: Vocab, prefixes: list[list[int]], constraint: Any, width: int, max_new: int,
                keep: int, tuner: Any = None, copies: Any = None, line_chars: int | None = None,
                primes: list[list[int]] | None = None) -> list[list[tuple[list[int], float, bool]]]:
    """Beam search of ``width`` hypotheses for each prefix, all prefixes in one batch of P x width rows.

    ``constraint``: None, or a BatchConstraint for the P x width rows (each prefix's state repeated ``width``
    times), used only through ``allowed()``, ``keep(index)`` and ``advance(tokens)``. ``primes``: the part of each
    prefix that belongs to the poem (its ids; the rules below count it, and it is not returned). Rules of its own,
    since a beam finds the model's favourite strings, and those are a character said again and again, or a famous
    line: no line repeats more Han characters than ``repeat_limit(line_chars)`` (Tang verse's own rate; 7 when the
    line length is not fixed); a character's second use in the poem costs REPEAT_COST and a third is refused; no line
    is said twice; and with ``copies`` (a TrainingIndex) no line of the training text is written. A step where these
    rules leave a prefix no hypothesis takes the best extensions the constraint allows after all (they are
    preferences; the constraint is the guarantee). -> for each prefix, the ``keep`` best hypotheses (generated ids
    without the final <eot>, the model's mean log-probability per symbol with the <eot> counted, whether it ended),
    best by the search score (that mean with the repetition costs) first."""
    P, K, V = len(prefixes), width, len(vocab)
    primes = primes if primes is not None else [[] for _ in range(P)]
    han = np.array([i >= 2 and is_han(s) for i, s in enumerate(vocab.symbols)])  # (V,)
    form = line_chars is not None  # lines of a known length (a form or an acrostic)
    limit = repeat_limit(line_chars or 7)
    counts = np.zeros((P * K, V), dtype=np.int16)  # (P*K, V) Han characters in each row's current line
    repeats = np.zeros(P * K, dtype=np.int64)  # (P*K,) repeated characters in it so far
    line_len = np.zeros(P * K, dtype=np.int64)  # (P*K,) Han characters in it so far
    used = np.zeros((P * K, V), dtype=np.int16)  # (P*K, V) Han characters in the whole poem, prime included
    for p, prime in enumerate(primes):  # the prime's characters count: its last line is the one being written
        rows_p = slice(p * K, (p + 1) * K)
        for i in prime:
            if han[i]:
                repeats[rows_p] += counts[p * K, i] > 0
                counts[rows_p, i] += 1
                line_len[rows_p] += 1
                used[rows_p, i] += 1
            else:
                counts[rows_p], repeats[rows_p], line_len[rows_p] = 0, 0, 0
    hist = [list(primes[r // K]) for r in range(P * K)]  # each row's poem so far, prime first
    model_lp = np.zeros((P, K))  # the model's own log-probability of each hypothesis (the search score adds penalties)
    scores = engine.prefix(prefixes)  # (P, V)
    rows = np.repeat(np.arange(P), K)
    engine.select(rows)
    scores = scores[rows]  # (P*K, V)
    cum = np.full((P, K), -np.inf)
    cum[:, 0] = 0.0  # the K copies of a prefix are one hypothesis until the first step spreads them
    finished: list[list[tuple[list[int], float, float, bool]]] = [[] for _ in range(P)]
    done = np.zeros(P, dtype=bool)
    M = min(2 * K, K * V)  # candidates looked at per prefix: K continuing ones survive even if K end here
    for t in range(max_new):
        raw = log_softmax(scores.astype(np.float64))  # (P*K, V) the model's log-probabilities
        allowed = constraint.allowed() if constraint is not None else None  # (P*K, V)
        # A character's second use in the poem costs half its probability, a third is refused: Tang quatrains
        # repeat 2.7% of their characters and 97.7% never use one three times; a beam left alone repeats its
        # favourite function words line after line.
        logp = np.where(han & (used >= 2), -np.inf, raw - REPEAT_COST * (han & (used == 1)))
        if allowed is not None:
            logp = np.where(allowed, logp, -np.inf)
        full = repeats >= limit  # (P*K,) rows whose line may not repeat another character
        if full.any():
            logp[full] = np.where((counts[full] > 0) & han, -np.inf, logp[full])
        total = (cum.reshape(P * K, 1) + logp).reshape(P, K * V)  # (P, K*V)
        top = np.argpartition(-total, M - 1, axis=1)[:, :M]  # (P, M) unordered
        order = np.take_along_axis(total, top, axis=1).argsort(axis=1, kind="stable")[:, ::-1]
        top = np.take_along_axis(top, order, axis=1)  # (P, M) best first
        parents = np.zeros((P, K), dtype=np.int64)
        tokens = np.full((P, K), EOT_ID, dtype=np.int64)
        new_cum = np.full((P, K), -np.inf)
        new_lp = np.zeros((P, K))
        last = t == max_new - 1
        for p in range(P):
            if done[p]:
                continue
            live = 0
            for strict in (True, False):
                if strict:
                    scored, candidates = total[p], _best_first(total[p], top[p])
                else:  # every extension broke one of the beam's own rules: the constraint alone decides
                    relaxed = raw[p * K : (p + 1) * K] if allowed is None else np.where(
                        allowed[p * K : (p + 1) * K], raw[p * K : (p + 1) * K], -np.inf)
                    scored = (cum[p][:, None] + relaxed).reshape(-1)  # (K*V,)
                    candidates = iter(np.argsort(-scored, kind="stable").tolist())
                for flat in candidates:
                    value = scored[flat]
                    if not np.isfinite(value) or live == K:
                        break
                    k, token = divmod(int(flat), V)
                    row = p * K + k
                    # A line is judged when its last character comes, while other characters can still take that
                    # place (a form's line length is known); without a form, when punctuation would close it.
                    closing = (han[token] and line_len[row] + 1 == line_chars) if form else not han[token]
                    if strict and closing and _bad_close(vocab, hist[row], token if form else None, copies):
                        continue
                    lp = model_lp[p, k] + raw[row, token]
                    if token == EOT_ID or last:
                        ids = hist[row][len(primes[p]):] + ([] if token == EOT_ID else [token])
                        finished[p].append((ids, float(value) / (t + 1), float(lp) / (t + 1), token == EOT_ID))
                        continue
                    parents[p, live], tokens[p, live], new_cum[p, live], new_lp[p, live] = k, token, value, lp
                    live += 1
                if live or finished[p]:
                    break
            for j in range(live, K):  # fewer than K continuing: pad with dead copies (their score is -inf)
                parents[p, j], tokens[p, j] = (parents[p, 0], tokens[p, 0]) if live else (0, EOT_ID)
            if live == 0 or len(finished[p]) >= K:
                done[p] = True
        if done.all() or last:
            break
        index = (np.arange(P)[:, None] * K + parents).reshape(-1)  # (P*K,) rows of the parents
        cum, model_lp = new_cum, new_lp
        flat_tokens = tokens.reshape(-1)
        hist = [hist[i] + [tok] for i, tok in zip(index.tolist(), flat_tokens.tolist())]
        counts, repeats, line_len, used = counts[index], repeats[index], line_len[index], used[index]
        is_han_token = han[flat_tokens]
        r = np.flatnonzero(is_han_token)
        repeats[r] += counts[r, flat_tokens[r]] > 0
        counts[r, flat_tokens[r]] += 1
        line_len[r] += 1
        used[r, flat_tokens[r]] += 1
        counts[~is_han_token], repeats[~is_han_token], line_len[~is_han_token] = 0, 0, 0  # the line ended
        engine.select(index)
        if constraint is not None:
            constraint.keep(index)
            constraint.advance(flat_tokens)
        if tuner is not None:
            tuner.tick(P * K)
        scores = engine.step(flat_tokens)
    return [[(ids, lp, ended) for ids, _, lp, ended in sorted(f, key=lambda h: -h[1])[:keep]] for f in finished]


def _best_first(row: np.ndarray, top: np.ndarray):
    """Indexes of ``row`` best first: the precomputed ``top`` ones, then (rarely needed) all the others."""
    yield from top.tolist()
    seen = set(top.tolist())
    for i in np.argsort(-row, kind="stable").tolist():
        if i not in seen:
            yield i


def _bad_close(vocab: Vocab, hist: list[int], token: int | None, copies: Any) -> bool:
    """True when the line that ``hist`` (plus ``token``, if given) ends with — its Han characters since the last
    other symbol — must not be completed: it says an earlier line of the same poem again, or it is a line of the
    training text (``copies``, a TrainingIndex, or None)."""
    ids = hist + ([token] if token is not None else [])
    text = "".join(vocab.symbols[i] if i >= 2 else "\n" for i in ids)
    lines = split_lines(text)
    if not lines or not is_han(text[-1]):
        return False
    line = lines[-1]
    return line in lines[:-1] or (copies is not None and len(line) >= 4 and line in copies.lines)


def beam_generate(engine: Any, vocab: Vocab, primes: list[str], primes_model: list[str], style: str, constraint: Any,
                  starts: list, o: Any, max_new: int, notes: list[str], tuner: Any, copies: Any = None) -> Any:
    """`generate`'s beam branch: ``o.beam`` hypotheses per prime, the ``o.num_samples`` best returned for each
    (prime-major), as a SampleResult whose samples carry their mean log-probability per symbol."""
    import time

    from poetgen.generation.constraints import BatchConstraint
    from poetgen.generation.sample import SampleResult, make_sample

    rows = len(primes) * o.beam * len(vocab)
    if rows > MAX_BEAM_CELLS:  # several (rows, V) arrays are held per step
        raise SampleError(f"--beam {o.beam} over {len(primes)} prime(s) and {len(vocab):,} symbols holds {rows:,} "
                          f"scores per step (at most {MAX_BEAM_CELLS:,}): lower --beam or give fewer primes")
    t0 = time.perf_counter()
    style_ids = vocab.encode(style) + [EOT_ID] if style else []
    prefixes = [[EOT_ID] + style_ids + vocab.encode(p) for p in primes_model]
    batch = None
    if constraint is not None:
        batch = BatchConstraint(constraint, [s for s in starts for _ in range(o.beam)])
    found = beam_search(engine, vocab, prefixes, batch, o.beam, max_new, o.num_samples, tuner, copies,
                        constraint.chars if constraint is not None else None, [vocab.encode(p) for p in primes_model])
    samples = []
    for prime, prime_model, hyps in zip(primes, primes_model, found):
        if not hyps:  # the constraint guarantees a way, so this is a bug or a length too short to end in
            raise SampleError(f"beam search found no text for the prime {prime!r} within {max_new} symbols")
        if len(hyps) < o.num_samples:
            notes.append(f"the beam found {len(hyps)} poem(s) for the prime {prime!r}, not {o.num_samples}")
        for ids, score, ended in hyps:
            samples.append(make_sample(vocab, prime, prime_model, ids, score, len(ids) + ended, ended,
                                       o.output_script))
    settings = o.to_dict() | {"length": max_new, "seed": None}
    return SampleResult(samples, None, settings, notes, time.perf_counter() - t0, max_new, tuner.current)
