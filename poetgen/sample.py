"""Batched generation from a trained CharRNN: N samples as one batch, one forward step per symbol.

How one call runs (``generate``):

1. Texts are put in the model's script: when a prime (or style, or acrostic) has characters the vocabulary lacks
   and the model was trained on the other Chinese script, OpenCC converts it and a note says so. Characters still
   unknown raise SampleError naming them.
2. Each distinct prefix ``<eot> [style <eot>] prime`` is fed once (the leading <eot> is how every document in
   training began: it follows the previous one's end). The style text is a hidden prefix: it conditions the
   model, is never printed, and ends in <eot> so the poem starts afresh in its mood. Rows with the same prime
   share that work; their hidden states are then copied out to the batch.
3. Every step turns the last logits (B, V) into one symbol per row: repetition penalty, then the form mask
   (forbidden symbols get -inf, so even an untrained model keeps the structure), then temperature (0 = greedy),
   top-k, top-p, and a draw from a seeded torch.Generator. The chosen symbols are fed back with the carried hidden
   state; the prefix is never re-run. A row that draws <eot> is finished and dropped from the batch
   (``select_hidden``), so the others run on a smaller batch.

``mean_logprob`` is the mean natural-log probability the *model* gave each generated symbol (its raw softmax:
before temperature, penalty, masks and truncation), the final <eot> included. The same seed, settings and
batch give the same output; a sample depends on the other rows of its batch, since they share the generator.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from poetgen.errors import SampleError
from poetgen.model import select_hidden
from poetgen.poetry import ConstraintState, FormConstraint, is_han
from poetgen.vocab import EOT_ID, Vocab, format_symbols

DEFAULT_LENGTH = 500
MAX_CELLS = 2**28  # symbols in one call (12 bytes each in the output buffers: 3.2 GB)
SCRIPTS = ("simplified", "traditional")
NEG_INF = float("-inf")


@dataclass
class SampleOptions:
    temperature: float = 0.8  # 0 means greedy
    top_k: int | None = None  # keep the k most likely symbols; clamped to the vocabulary size
    top_p: float | None = None  # keep the smallest set of symbols whose probability reaches p
    repetition_penalty: float = 1.0  # > 1 discourages characters already in the prime or the sample (CTRL-style)
    length: int | None = None  # most symbols to generate; None: DEFAULT_LENGTH, or what the poem needs
    num_samples: int = 1  # per prime
    seed: int | None = None  # None: a fresh seed, reported in the result
    form: str | None = None  # 五绝 七绝 五律 七律 or an alias
    acrostic: str | None = None  # one character per line
    line_length: int | None = None  # 5 or 7, for an acrostic without a form (default 7)
    rhyme: bool = False
    style: str | None = None  # hidden prefix
    output_script: str | None = None  # None (as the model writes), "simplified" or "traditional"

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise SampleError(f"temperature must be 0 or more, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SampleError(f"top-k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SampleError(f"top-p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise SampleError(f"repetition penalty must be positive, got {self.repetition_penalty}")
        if self.length is not None and self.length < 1:
            raise SampleError(f"length must be at least 1, got {self.length}")
        if self.num_samples < 1:
            raise SampleError(f"number of samples must be at least 1, got {self.num_samples}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what torch.Generator accepts
            raise SampleError(f"seed must be from -2**63 to 2**64 - 1, got {self.seed}")
        if self.output_script not in (None, *SCRIPTS):
            raise SampleError(f"output script must be one of {', '.join(SCRIPTS)}, got {self.output_script!r}")
        if self.line_length is not None and self.line_length not in (5, 7):
            raise SampleError(f"line length must be 5 or 7, got {self.line_length}")
        if self.line_length is not None and not self.acrostic:
            raise SampleError("--line-length applies to --acrostic (a form fixes its own line length)")
        if self.rhyme and not (self.form or self.acrostic):
            raise SampleError("--rhyme needs --form or --acrostic: it rhymes the ends of the even lines of a poem")

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
    seed: int
    options: dict  # the settings used (top_k clamped, length resolved)
    notes: list[str] = field(default_factory=list)  # e.g. "converted the prime to traditional: ..."
    seconds: float = 0.0  # generation time, prefix included
    steps: int = 0  # forward steps after the prefix


# --- scripts ----------------------------------------------------------------------------------------------------


def vocab_script(vocab: Vocab) -> str | None:
    """"simplified" or "traditional" when the vocabulary's Han characters clearly lean one way, else None.

    Counts the characters OpenCC would change in each direction (a character only traditional texts use changes
    under t2s), weighted by their corpus counts when the vocabulary has them.
    """
    from poetgen.normalize import convert_script

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
        from poetgen.normalize import convert_script

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


class _Constraint:
    """FormConstraint's masks as tensors, stepped for a whole batch at once."""

    def __init__(self, c: FormConstraint, states: list[ConstraintState], device: torch.device):
        self.table = torch.from_numpy(c.table).to(device)  # (P + 2, V) bool
        self.rhyme_pos = torch.from_numpy(c.rhyme_pos).to(device)  # (P + 2,) bool
        self.char_groups = torch.from_numpy(c.char_groups).to(device)  # (V,) int64 bit sets
        self.rhyme = c.rhyme
        self.last = c.length + 1
        self.pos = torch.tensor([s.pos for s in states], dtype=torch.long, device=device)  # (B,)
        self.groups = torch.tensor([s.groups for s in states], dtype=torch.long, device=device)  # (B,)
        self.at_rhyme: torch.Tensor | None = None

    def allowed(self) -> torch.Tensor:
        allowed = self.table[self.pos]  # (B, V)
        self.at_rhyme = None
        if self.rhyme:
            at = self.rhyme_pos[self.pos]  # (B,)
            if at.any():
                rhyming = allowed & ((self.char_groups[None, :] & self.groups[:, None]) != 0)  # (B, V)
                at = at & rhyming.any(1)  # an empty rhyme mask falls back to the plain one
                allowed = torch.where(at[:, None], rhyming, allowed)
                self.at_rhyme = at
        return allowed

    def advance(self, token: torch.Tensor) -> None:
        if self.at_rhyme is not None:
            self.groups = torch.where(self.at_rhyme, self.groups & self.char_groups[token], self.groups)
        self.pos = (self.pos + 1).clamp_(max=self.last)

    def keep(self, index: torch.Tensor) -> None:
        self.pos, self.groups = self.pos[index], self.groups[index]


def _cat_hidden(parts: list) -> object:
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(len(parts[0])))
    return torch.cat(parts, dim=1)


def _feed_prefixes(model: nn.Module, prefixes: list[list[int]], device: torch.device):
    """Run each distinct prefix once, batched by length. -> last logits (U, V), hidden (L, U, H) in input order."""
    by_length: dict[int, list[int]] = {}
    for u, ids in enumerate(prefixes):
        by_length.setdefault(len(ids), []).append(u)
    order: list[int] = []
    logits_parts, hidden_parts = [], []
    for _, members in sorted(by_length.items()):
        idx = torch.tensor([prefixes[u] for u in members], dtype=torch.long, device=device)  # (G, T)
        logits, hidden = model(idx)  # (G, T, V)
        logits_parts.append(logits[:, -1])
        hidden_parts.append(hidden)
        order.extend(members)
    inverse = torch.empty(len(order), dtype=torch.long, device=device)
    inverse[torch.tensor(order, device=device)] = torch.arange(len(order), device=device)
    logits = torch.cat(logits_parts).index_select(0, inverse)
    return logits, select_hidden(_cat_hidden(hidden_parts), inverse)


def _penalizable(vocab: Vocab, device: torch.device) -> torch.Tensor:
    """(V,) bool: symbols the repetition penalty applies to — characters, not <eot>, punctuation or spaces."""
    import unicodedata

    keep = [i >= 2 and unicodedata.category(s)[0] not in "PZC" for i, s in enumerate(vocab.symbols)]
    return torch.tensor(keep, dtype=torch.bool, device=device)


def _choose(scores: torch.Tensor, o: SampleOptions, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """scores (B, V) with -inf for forbidden symbols -> (B,) chosen ids."""
    if o.temperature == 0:
        return scores.argmax(-1)
    scores = scores / o.temperature
    if top_k < scores.size(-1):
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, NEG_INF)
    if o.top_p is not None and o.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        # Drop a symbol when the ones before it already reach top_p; the most likely one always stays.
        drop = (probs.cumsum(-1) - probs) >= o.top_p
        sorted_scores = sorted_scores.masked_fill(drop, NEG_INF)
        scores = torch.full_like(scores, NEG_INF).scatter_(-1, order, sorted_scores)
    # Inverse-CDF draw: one uniform number per row. torch.multinomial draws one exponential per symbol instead,
    # which made it 70% of the step time for 64 rows x 6,000 symbols. (In float32 a symbol below ~1e-7 of the
    # running total loses its share: a bias far below anything a sample could show.)
    weights = (scores - scores.amax(-1, keepdim=True)).exp_()  # (B, V), 0 where forbidden
    cdf = weights.cumsum_(-1)  # (B, V)
    u = (1.0 - torch.rand(cdf.size(0), 1, generator=gen, device=cdf.device)) * cdf[:, -1:]
    # u in (0, total]: the first index whose cdf reaches u has a positive weight, so a masked symbol never comes.
    return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=cdf.size(1) - 1)


def generate(
    model: nn.Module,
    vocab: Vocab,
    primes: Sequence[str] = ("",),
    options: SampleOptions | None = None,
    on_text: Callable[[str], None] | None = None,
) -> SampleResult:
    """``options.num_samples`` samples for each prime, all in one batch (prime-major order).

    ``on_text`` receives the first sample as it is written: its prime, then each new character (converted to the
    output script one character at a time). A model in training mode is switched to eval mode for the call.
    """
    o = options or SampleOptions()
    o.validate()
    primes = list(primes) or [""]
    notes: list[str] = []
    script = vocab_script(vocab) if any(vocab.unknown(t) for t in (*primes, o.style or "", o.acrostic or "")) else None

    primes_model = [to_model_script(vocab, p, "prime", script, notes) for p in primes]
    style = to_model_script(vocab, o.style or "", "style text", script, notes)
    acrostic = to_model_script(vocab, o.acrostic or "", "acrostic", script, notes) or None

    constraint = None
    starts: list[ConstraintState] = []
    if o.form or acrostic:
        constraint = FormConstraint(vocab, o.form, acrostic, o.rhyme, o.line_length)
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
    rows = len(primes) * o.num_samples
    if rows * max_new > MAX_CELLS:  # the (rows, max_new) output buffers are allocated up front
        raise SampleError(f"{rows:,} sample(s) of up to {max_new:,} symbols are too many to hold at once (at most "
                          f"{MAX_CELLS:,} symbols in all); lower --length or --num-samples")

    was_training = model.training
    model.eval()  # dropout would draw from the global RNG: no longer the seed alone decides the output
    try:
        with torch.inference_mode():
            return _decode(model, vocab, primes, primes_model, style, constraint, starts, o, max_new, notes, on_text)
    finally:
        model.train(was_training)


def _decode(model, vocab, primes, primes_model, style, constraint, starts, o, max_new, notes, on_text):
    """The batched loop of ``generate`` (inside inference mode)."""
    device = next(model.parameters()).device
    V = len(vocab)
    seed = o.seed if o.seed is not None else random.SystemRandom().randrange(2**31)
    top_k = min(o.top_k or V, V)
    n = o.num_samples
    B = len(primes) * n
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(seed)
    style_ids = vocab.encode(style) + [EOT_ID] if style else []
    distinct = list(dict.fromkeys(primes_model))
    prefixes = [[EOT_ID] + style_ids + vocab.encode(p) for p in distinct]
    logits, hidden = _feed_prefixes(model, prefixes, device)
    row_prefix = torch.tensor(
        [distinct.index(p) for p in primes_model for _ in range(n)], dtype=torch.long, device=device
    )  # (B,) which distinct prefix each row continues
    logits = logits.index_select(0, row_prefix)  # (B, V)
    hidden = select_hidden(hidden, row_prefix)

    batch_constraint = None
    if constraint is not None:
        batch_constraint = _Constraint(constraint, [s for s in starts for _ in range(n)], device)
    penalize = o.repetition_penalty != 1.0
    if penalize:
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)  # (B, V) symbols used so far
        for r, p in enumerate(primes_model):
            if p:
                seen[r * n : (r + 1) * n, torch.tensor(vocab.encode(p), device=device)] = True
        penalizable = _penalizable(vocab, device)  # (V,)
        seen &= penalizable[None, :]

    out = torch.full((B, max_new), -1, dtype=torch.long, device=device)  # (B, max_new); -1 after the end
    logps = torch.zeros(B, max_new, device=device)  # (B, max_new) model log-probabilities
    rows = torch.arange(B, device=device)  # (b,) original row of each active row
    streaming = on_text is not None
    if streaming:
        on_text(_convert(primes_model[0], o.output_script))

    steps = 0
    for t in range(max_new):
        logits = scores = logits.float()  # (b, V)
        log_norm = torch.logsumexp(logits, dim=-1)  # (b,) for the model's log-probability of the choice
        if penalize:
            penalized = torch.where(scores > 0, scores / o.repetition_penalty, scores * o.repetition_penalty)
            scores = torch.where(seen, penalized, scores)
        if batch_constraint is not None:
            scores = scores.masked_fill(~batch_constraint.allowed(), NEG_INF)
        token = _choose(scores, o, top_k, gen)  # (b,)
        out[rows, t] = token
        logps[rows, t] = logits.gather(1, token[:, None]).squeeze(1) - log_norm
        if streaming:
            first = int(token[0]) if int(rows[0]) == 0 else EOT_ID
            if first == EOT_ID:
                streaming = False
            else:
                on_text(_convert(vocab.symbols[first] if first != 1 else "\ufffd", o.output_script))
        if batch_constraint is not None:
            batch_constraint.advance(token)
        if penalize:
            seen[torch.arange(len(token), device=device), token] |= penalizable[token]
        done = token == EOT_ID
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            rows, token = rows[keep], token[keep]
            hidden = select_hidden(hidden, keep)
            if batch_constraint is not None:
                batch_constraint.keep(keep)
            if penalize:
                seen = seen[keep]
        if t == max_new - 1:
            break
        logits, hidden = model(token[:, None], hidden)  # (b, 1, V)
        logits = logits[:, -1]
        steps += 1

    seconds = time.perf_counter() - t0
    samples = []
    out_list, logps_list = out.tolist(), logps.tolist()
    for r in range(B):
        ids = [i for i in out_list[r] if i >= 0]
        ended = bool(ids) and ids[-1] == EOT_ID
        body = ids[:-1] if ended else ids
        k = len(ids)
        prime_given = primes[r // n]
        generated = vocab.decode(body, eot="\n")
        prime_text = primes_model[r // n]
        text = _convert(prime_text + generated, o.output_script)
        samples.append(
            Sample(
                prime=prime_given,
                text=text,
                generated=text[len(prime_text):] if len(text) == len(prime_text + generated) else generated,
                mean_logprob=sum(logps_list[r][:k]) / k if k else 0.0,
                tokens=k,
                ended=ended,
            )
        )
    settings = o.to_dict() | {"top_k": top_k if o.top_k is not None else None, "length": max_new, "seed": seed}
    return SampleResult(samples, seed, settings, notes, seconds, steps)


def _convert(text: str, script: str | None) -> str:
    if not script or not text:
        return text
    from poetgen.normalize import convert_script

    return convert_script(text, script)
