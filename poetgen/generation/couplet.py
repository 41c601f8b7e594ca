"""对句: the answering line an encoder-decoder (poetgen.model.seq2seq) writes to a first line.

Every rule is a mask on the scores of each step (Jiuge's way), so greedy, sampling and beam search obey the same:

* length and punctuation: the answer has exactly the first line's length; where the first line has a mark
  (punctuation, anything not Han) the answer has the same mark, elsewhere a Han character;
* no character of the first line at the same position of the answer (天对地, never 天对天);
* ``tones`` (with a rhyme book, 平水韵 by default): at positions 2, 4, 6 and at the end, a first-line character of
  one definite tone is answered by a character of only the other tone; at the end the answer is level (平) when
  the first line's tone there is not definite, as a couplet's answering line ends.

Decoding runs the torch model, on the CPU too: the numpy runtime (poetgen.model.runtime) does not run the
encoder-decoder yet. Measured (README, 对句): answering one line takes 10-25 ms in torch, while importing torch
takes seconds, so a numpy port would make `sample` start much faster for pair models; it is left for later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from poetgen.data.vocab import EOT_ID, UNK_ID, Vocab
from poetgen.errors import SampleError
from poetgen.generation.sample import check_truncation
from poetgen.poetry.forms import is_han

TONE_POSITIONS = (2, 4, 6)  # 1-based: the positions whose tones a couplet opposes, besides the last


@dataclass
class CoupletOptions:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    num_samples: int = 1  # answers per first line (with beam: the best n of the K)
    seed: int | None = None
    beam: int = 0  # beam search with K hypotheses; 0 = greedy or sampling
    tones: bool = False
    rhyme_book: str = "pingshui"

    def validate(self) -> None:
        check_truncation(self.temperature, self.top_k, self.top_p)
        if self.num_samples < 1:
            raise SampleError(f"number of answers must be at least 1, got {self.num_samples}")
        if self.beam < 0:
            raise SampleError(f"--beam must be 0 (off) or more, got {self.beam}")
        if self.beam and self.num_samples > self.beam:
            raise SampleError(f"-n {self.num_samples} asks for more answers than the beam's {self.beam} hypotheses")


@dataclass
class Answer:
    first: str
    text: str
    logprob: float  # sum of the log-probabilities of the answer's characters (masked distribution)
    attention: list = field(default_factory=list)  # (T, S) weights, one row per answer character

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(1, len(self.text))

    def record(self) -> dict:
        d = asdict(self)
        del d["attention"]
        return {**d, "mean_logprob": self.mean_logprob}


# --- tones --------------------------------------------------------------------------------------------------------


def tone_of(ch: str, book) -> str | None:
    """平 or 仄 when ``ch`` has that tone only in ``book``; None when it can take both or the book does not know it."""
    level, oblique = book.can_be_level(ch), book.can_be_oblique(ch)
    return "平" if level and not oblique else "仄" if oblique and not level else None


def opposed_at_end(first: str, answer: str, book) -> bool | None:
    """Whether the answer's last character has the definite tone opposite to the first line's; None when the first
    line's last tone is not definite (nothing to oppose)."""
    want = tone_of(first[-1], book)
    if want is None or not answer:
        return None
    return tone_of(answer[-1], book) == ("仄" if want == "平" else "平")


# --- masks --------------------------------------------------------------------------------------------------------


class Masks:
    """Per vocabulary: which symbols are Han characters, and the definite tone of each."""

    def __init__(self, vocab: Vocab, rhyme_book: str = "pingshui", tones: bool = False):
        symbols = vocab.symbols
        self.vocab, self.tones = vocab, tones
        self.han = np.array([i not in (EOT_ID, UNK_ID) and len(s) == 1 and is_han(s) for i, s in enumerate(symbols)])
        if tones:
            from poetgen.poetry.prosody import rhyme_book as book_named

            self.book = book_named(rhyme_book)
            kinds = [tone_of(s, self.book) if self.han[i] else None for i, s in enumerate(symbols)]
            self.level = np.array([k == "平" for k in kinds])
            self.oblique = np.array([k == "仄" for k in kinds])

    def line(self, first: str) -> np.ndarray:
        """(T, V) bool: what the answer may have at each position."""
        T, V = len(first), len(self.vocab)
        allowed = np.zeros((T, V), dtype=bool)
        for t, ch in enumerate(first):
            if not is_han(ch):
                allowed[t, self.vocab.id(ch)] = True
                continue
            allowed[t] = self.han
            allowed[t, self.vocab.id(ch)] = False
            if self.tones and (t + 1 in TONE_POSITIONS or t == T - 1):
                tone = tone_of(ch, self.book)
                if tone == "平":
                    allowed[t] &= self.oblique
                elif tone == "仄" or t == T - 1:
                    allowed[t] &= self.level
            if not allowed[t].any():
                raise SampleError(f"the model's vocabulary has no character that may answer {ch!r} at position "
                                  f"{t + 1} of {first}" + (" under --tones" if self.tones else ""))
        return allowed


# --- decoding -----------------------------------------------------------------------------------------------------


def _prepare(vocab: Vocab, firsts: Sequence[str], notes: list[str]) -> list[str]:
    from poetgen.generation.sample import to_model_script, vocab_script

    script = vocab_script(vocab) if any(vocab.unknown(f) for f in firsts) else None
    out = []
    for f in firsts:
        f = f.strip()
        if not f:
            raise SampleError("a first line to answer is empty")
        out.append(to_model_script(vocab, f, "first line", script, notes))
    return out


def _filter(logp: np.ndarray, o: CoupletOptions) -> np.ndarray:
    """Temperature, top-k and top-p on (R, V) masked log-probabilities -> sampling weights (R, V)."""
    z = logp / o.temperature
    z = z - z.max(axis=1, keepdims=True)
    w = np.exp(z)
    if o.top_k is not None and o.top_k < w.shape[1]:
        kth = -np.partition(-w, o.top_k - 1, axis=1)[:, o.top_k - 1 : o.top_k]
        w = np.where(w >= kth, w, 0.0)
    if o.top_p is not None and o.top_p < 1:
        order = np.argsort(-w, axis=1)
        sorted_w = np.take_along_axis(w, order, axis=1)
        cum = np.cumsum(sorted_w, axis=1) / sorted_w.sum(axis=1, keepdims=True)
        keep_sorted = cum - sorted_w / sorted_w.sum(axis=1, keepdims=True) < o.top_p  # the first always stays
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        w = np.where(keep, w, 0.0)
    return w / w.sum(axis=1, keepdims=True)


def _chunks(firsts: Sequence[str], size: int) -> list[list[int]]:
    """Indexes of the first lines, grouped by length, at most ``size`` a group."""
    out = []
    for n in sorted({len(f) for f in firsts}):
        which = [i for i, f in enumerate(firsts) if len(f) == n]
        out += [which[i:i + size] for i in range(0, len(which), size)]
    return out


def answer_lines(model, vocab: Vocab, firsts: Sequence[str], options: CoupletOptions | None = None,
                 notes: list[str] | None = None, batch: int = 512) -> list[list[Answer]]:
    """For each first line, ``num_samples`` answers (beam: the best first), decoded in batches of lines of one
    length (at most ``batch`` rows, hypotheses counted). ``model``: a poetgen.model.seq2seq.Seq2Seq (used in eval
    mode, then put back)."""
    import torch

    from poetgen.model.seq2seq import select_state

    o = options or CoupletOptions()
    o.validate()
    notes = notes if notes is not None else []
    firsts = _prepare(vocab, firsts, notes)
    masks = Masks(vocab, o.rhyme_book, o.tones)
    seed = o.seed if o.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
    rng = np.random.default_rng(seed % 2**64)
    width = o.beam or o.num_samples
    results: list[list[Answer]] = [[] for _ in firsts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for which in _chunks(firsts, max(1, batch // width)):
                n, P = len(firsts[which[0]]), len(which)
                src = torch.tensor([vocab.encode(firsts[i]) for i in which], device=device)  # (P, n)
                allowed = np.stack([masks.line(firsts[i]) for i in which])  # (P, n, V)
                rows = torch.arange(P, device=device).repeat_interleave(width)  # (P·W,) prime of each row
                values, keys, state = model.encode(src)
                values, keys, state = values[rows], keys[rows], select_state(state, rows)
                R = P * width
                tokens = torch.zeros(R, dtype=torch.long, device=device)
                hist = np.zeros((R, 0), dtype=np.int64)
                attn = np.zeros((R, 0, n), dtype=np.float32)
                score = np.zeros(R)
                if o.beam:  # only the first hypothesis of each beam is alive at the start
                    score[np.arange(R) % width != 0] = -np.inf
                for t in range(n):
                    logp, state, weights = model.step(tokens, state, values, keys)
                    logp = logp.cpu().numpy().astype(np.float64)
                    logp = np.where(allowed[np.arange(R) // width, t], logp, -np.inf)  # (R, V)
                    # Renormalised over what the rules allow: the scores are the masked model's probabilities.
                    logp -= np.logaddexp.reduce(logp, axis=1, keepdims=True)
                    if o.beam:
                        total = (score[:, None] + logp).reshape(P, width * logp.shape[1])
                        best = np.argsort(-total, axis=1, kind="stable")[:, :width]  # (P, W)
                        parent = (best // logp.shape[1] + np.arange(P)[:, None] * width).reshape(-1)
                        chosen = (best % logp.shape[1]).reshape(-1)
                        score = np.take_along_axis(total, best, axis=1).reshape(-1)
                        index = torch.from_numpy(parent).to(device)
                        state = select_state(state, index)
                        hist, attn = hist[parent], attn[parent]
                        weights = weights[index]
                    else:
                        if o.temperature == 0:
                            chosen = logp.argmax(axis=1)
                        else:
                            w = _filter(logp, o)
                            chosen = (w.cumsum(axis=1) > rng.random((R, 1))).argmax(axis=1)
                        score = score + logp[np.arange(R), chosen]
                    hist = np.concatenate([hist, chosen[:, None]], axis=1)
                    attn = np.concatenate([attn, weights.float().cpu().numpy()[:, None, :]], axis=1)
                    tokens = torch.from_numpy(chosen).to(device)
                for p, i in enumerate(which):
                    block = range(p * width, (p + 1) * width)
                    found = [Answer(firsts[i], vocab.decode(hist[r].tolist()), float(score[r]), attn[r].tolist())
                             for r in block]
                    if o.beam:
                        found = sorted(found, key=lambda a: -a.logprob)[: o.num_samples]
                    results[i] = found
    finally:
        model.train(was_training)
    return results
