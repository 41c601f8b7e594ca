"""Model metrics: the exact mean cross-entropy of a model over a whole text, cold and warmed.

Every symbol of the id stream is scored exactly once, the first included: position ``i`` predicts ``ids[i]`` from
the input ``ids[i - 1]`` (for ``i = 0`` the input is the end-of-text symbol, which is how every document begins in
training). For speed the N positions are cut into S contiguous streams of Ls = ceil(N / S) positions, fed in
parallel one window of T positions at a time, with the hidden state carried from window to window::

    positions  0 ........ Ls-1 | Ls ....... 2Ls-1 | ... | (S-1)Ls ...... N-1
               stream 0        | stream 1         | ... | stream S-1 (maybe shorter)

Only one window of logits, (2S, T, V), is ever in memory, and the ids are read from their (memory-mapped) array
window by window, so a text of any length is scored in bounded memory.

Two figures, each over the same N positions:

* cold: every stream starts from the all-zero state. A stream that starts mid-text has lost its context, and a
  recurrent model can be slow to recover from that state (or never recover), so this is a pessimistic figure.
* warm: stream s starts from the state reached by running the model, from zero, over the ``warmup`` positions just
  before it (not scored; fewer when less text precedes it). Stream 0 has nothing before it: like every document it
  starts from the end-of-text symbol. With ``warmup`` >= N the warm figure equals an unbroken single-stream pass.

Both are computed in one pass as a batch of 2S rows (S cold, S warm). Nothing here prints; progress goes to
``on_progress`` callbacks as ``{"stage": "cross-entropy", "done": positions, "total": N}``.

This is the one scorer: `poetgen eval` reports both figures, and training's validation loss is the cold figure
with the same default stream count (warmup 0), so a run's best val loss is the number `poetgen eval` prints for its
best checkpoint. Training shares the work between the processes of a distributed run (``rank``, ``world_size``):
the S streams are cut into blocks of ceil(S / world_size), rank r scores block r, and ``reduce`` (a sum over the
ranks) adds up the loss sums, so every rank returns what one process gets.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poetgen.checkpoint.torch_io import Checkpoint
from poetgen.data.batches import vocab_map
from poetgen.data.dataset import Dataset, is_dataset_dir, load_dataset, recorded_dataset
from poetgen.data.vocab import EOT_ID, UNK_ID, Vocab, format_symbols
from poetgen.errors import DatasetError
from poetgen.evaluation.units import LN2
from poetgen.model.devices import autocast
from poetgen.model.rnn import cat_hidden, select_hidden
DEFAULT_STREAMS = 32
DEFAULT_WARMUP = 1000
LOGIT_BUDGET = 1 << 23  # floats of logits per window (32 MB): sets the window length T from S and V
MAX_WINDOW = 256
COUNT_CHUNK = 1 << 22

ProgressFn = Callable[[dict], None]


# --- results ------------------------------------------------------------------------------------------------------


@dataclass
class Score:
    """Mean cross-entropy over ``symbols`` scored positions."""

    nats: float  # mean per symbol, natural log

    @property
    def bits(self) -> float:
        return self.nats / LN2

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats) if self.nats < 700 else math.inf

    def to_dict(self) -> dict:
        return {"nats_per_char": self.nats, "bits_per_char": self.bits, "perplexity": self.perplexity}


@dataclass
class CrossEntropy:
    symbols: int  # positions scored (characters + end-of-text symbols)
    cold: Score
    warm: Score | None  # None when warmup is 0
    streams: int
    window: int
    warmup: int


@dataclass
class EvalData:
    """An id stream in the model's vocabulary, and what it holds."""

    ids: np.ndarray  # (N,) model ids, possibly memory-mapped
    description: str  # e.g. "val split of datasets/tang"
    documents: int  # end-of-text symbols in the stream
    unknown: int  # symbols scored as <unk> that were not <unk> in their source
    unknown_chars: list[str] = field(default_factory=list)  # most frequent first (at most 20)
    notes: list[str] = field(default_factory=list)
    _tmp: object = None  # a TemporaryDirectory holding ``ids``, removed by close()

    @property
    def symbols(self) -> int:
        return int(len(self.ids))

    @property
    def characters(self) -> int:
        return self.symbols - self.documents

    def close(self) -> None:
        if self._tmp is not None:
            self.ids = np.zeros(0, dtype=np.int64)  # drop the memory map before its file goes
            self._tmp.cleanup()  # type: ignore[attr-defined]
            self._tmp = None


@dataclass
class EvalReport:
    checkpoint: str
    data: str
    symbols: int
    characters: int
    documents: int
    unknown: int
    unknown_chars: list[str]
    result: CrossEntropy
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        r = self.result
        return {
            "checkpoint": self.checkpoint,
            "data": self.data,
            "symbols": self.symbols,
            "characters": self.characters,
            "documents": self.documents,
            "unknown": self.unknown,
            "unknown_chars": self.unknown_chars,
            "cold": r.cold.to_dict(),
            "warm": r.warm.to_dict() if r.warm is not None else None,
            "streams": r.streams,
            "window": r.window,
            "warmup": r.warmup,
            "seconds": self.seconds,
            "notes": self.notes,
        }


# --- the scorer -----------------------------------------------------------------------------------------------------


def _inputs(ids: np.ndarray, pos: np.ndarray, id_map: np.ndarray | None) -> np.ndarray:
    """Input ids for positions ``pos`` (any shape): ids[pos - 1], and <eot> at position 0 (positions past the end,
    padding of the last stream, read the last id; their loss is masked out)."""
    x = np.asarray(ids[np.clip(pos - 1, 0, len(ids) - 1)], dtype=np.int64)
    if id_map is not None:
        x = id_map[x]
    return np.where(pos > 0, x, EOT_ID)


def _targets(ids: np.ndarray, pos: np.ndarray, id_map: np.ndarray | None) -> np.ndarray:
    y = np.asarray(ids[np.minimum(pos, len(ids) - 1)], dtype=np.int64)
    return id_map[y] if id_map is not None else y


@torch.no_grad()
def _run(model: nn.Module, x: np.ndarray, hidden: object, window: int, device: torch.device) -> object:
    """Feed inputs x (B, L) through the model in windows; return the final state (B rows)."""
    for k in range(0, x.shape[1], window):
        _, hidden = model(torch.from_numpy(x[:, k : k + window]).to(device), hidden)
    return hidden


@torch.no_grad()
def _warm_states(
    model: nn.Module, ids: np.ndarray, starts: np.ndarray, warmup: int, window: int, device: torch.device,
    id_map: np.ndarray | None,
) -> object:
    """The state at each stream start after running over up to ``warmup`` preceding inputs, from zero."""
    S = len(starts)
    lengths = np.minimum(starts, warmup)  # inputs available before each start
    states: list = [None] * S
    full = np.flatnonzero(lengths == warmup) if warmup > 0 else np.zeros(0, dtype=np.int64)
    if len(full):
        # Streams with the whole warm-up before them share one batch: (K, warmup) inputs.
        pos = starts[full, None] - warmup + np.arange(warmup)[None, :]
        h = _run(model, _inputs(ids, pos, id_map), model.init_hidden(len(full), device), window, device)
        for j, s in enumerate(full):
            states[s] = select_hidden(h, torch.tensor([j], device=device))
    # The others have less than the whole warm-up before them, so theirs is all the text from position 0: the
    # prefixes of one sequential pass, whose state is taken at each of their starts (stream 0: the zero state).
    h = model.init_hidden(1, device)
    prev = 0
    for s in range(S):
        if states[s] is not None:
            continue
        pos = np.arange(prev, starts[s])[None, :]
        if pos.size:
            h = _run(model, _inputs(ids, pos, id_map), h, window, device)
        states[s], prev = h, int(starts[s])
    return cat_hidden(states)


def choose_window(streams: int, vocab_size: int, rows_per_stream: int = 2) -> int:
    """Positions per window so that one window's logits stay within LOGIT_BUDGET floats."""
    return max(1, min(MAX_WINDOW, LOGIT_BUDGET // max(1, rows_per_stream * streams * vocab_size)))


@torch.no_grad()
def cross_entropy(
    model: nn.Module,
    ids: np.ndarray,
    *,
    streams: int = DEFAULT_STREAMS,
    warmup: int = DEFAULT_WARMUP,
    window: int | None = None,
    id_map: np.ndarray | None = None,
    amp: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[list[float]], list[float]] | None = None,
    on_progress: ProgressFn | None = None,
) -> CrossEntropy:
    """Exact mean cross-entropy (nats per symbol) of ``model`` over every position of ``ids`` (see module doc).

    ``ids`` may be any 1-D integer array (a memory map is read window by window, never copied whole); ``id_map``
    translates its ids to the model's (a lookup table). ``amp``: an autocast dtype (bf16) for the forward passes.
    The model (unwrapped: it needs ``init_hidden``) is used in eval mode and left as it was. With ``world_size`` >
    1 this rank scores its block of the streams and ``reduce`` must sum [cold, warm] loss sums over the ranks (every
    rank calls it, also one left without streams); every rank then returns the figures of a single process.
    """
    N = len(ids)
    if N == 0:
        raise DatasetError("nothing to evaluate: the text is empty")
    if streams < 1:
        raise DatasetError(f"streams must be at least 1, got {streams}")
    if warmup < 0:
        raise DatasetError(f"warmup must be 0 or more, got {warmup}")
    device = next(model.parameters()).device
    V = int(getattr(getattr(model, "config", None), "vocab_size", 0)) or 1
    Ls = -(-N // min(streams, N))
    S = -(-N // Ls)  # streams that actually hold positions
    rows = 2 if warmup > 0 else 1
    per_rank = -(-S // world_size)
    lo, hi = min(rank * per_rank, S), min((rank + 1) * per_rank, S)  # this rank's streams [lo, hi)
    R = hi - lo
    T = window or choose_window(per_rank, V, rows)
    starts = np.arange(lo, hi, dtype=np.int64) * Ls  # (R,)
    progress = on_progress or (lambda event: None)

    was_training = model.training
    model.eval()
    sums = np.zeros(rows, dtype=np.float64)
    try:
        with autocast(device, amp):
            hidden = model.init_hidden(R, device) if R else None
            if rows == 2 and R:
                hidden = cat_hidden([hidden, _warm_states(model, ids, starts, warmup, T, device, id_map)])
            for j in range(0, Ls if R else 0, T):
                t = min(T, Ls - j)
                pos = starts[:, None] + j + np.arange(t)[None, :]  # (R, t)
                valid = torch.from_numpy(pos < N).to(device)  # the last stream may end early
                x = torch.from_numpy(_inputs(ids, pos, id_map)).to(device)
                y = torch.from_numpy(_targets(ids, pos, id_map)).to(device)
                if rows == 2:
                    x, y, valid = x.repeat(2, 1), y.repeat(2, 1), valid.repeat(2, 1)  # (2R, t)
                logits, hidden = model(x, hidden)  # (rows*R, t, V)
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
                loss = (loss.view(rows, R, t).double() * valid.view(rows, R, t)).sum(dim=(1, 2))
                sums += loss.cpu().numpy()
                progress({"stage": "cross-entropy", "done": int(min(N, Ls * lo + R * (j + t))), "total": N})
    finally:
        model.train(was_training)
    if reduce is not None:
        sums = np.array(reduce(sums.tolist()), dtype=np.float64)
    mean = sums / N
    return CrossEntropy(
        symbols=N, cold=Score(float(mean[0])), warm=Score(float(mean[1])) if rows == 2 else None,
        streams=S, window=T, warmup=warmup,
    )


# --- data in the model's vocabulary ---------------------------------------------------------------------------------


def dataset_data(dataset: Dataset, model_vocab: Vocab, split: str = "val") -> EvalData:
    """One split of a prepared dataset, mapped into the model's vocabulary."""
    if split not in ("train", "val"):
        raise DatasetError(f"split must be train or val, not {split!r}")
    ids = dataset.train if split == "train" else dataset.val
    if len(ids) == 0:
        raise DatasetError(f"the {split} split of {dataset.path} is empty; give other text with --data")
    id_map = vocab_map(dataset.vocab, model_vocab, map_unknown=True)
    documents = unknown = 0
    unk_counts: Counter = Counter()
    for a in range(0, len(ids), COUNT_CHUNK):
        chunk = np.asarray(ids[a : a + COUNT_CHUNK])
        documents += int(np.count_nonzero(chunk == EOT_ID))
        if id_map is not None:
            lost = chunk[(id_map[chunk] == UNK_ID) & (chunk != UNK_ID)]
            unknown += len(lost)
            if len(lost):
                counts = np.bincount(lost)
                unk_counts.update({int(i): int(counts[i]) for i in np.flatnonzero(counts)})
    notes = []
    if id_map is not None:
        notes.append("the dataset's vocabulary differs from the model's; its ids were mapped by symbol")
    data = EvalData(
        ids=ids, description=f"{split} split of {dataset.path}", documents=documents, unknown=unknown,
        unknown_chars=[dataset.vocab.symbols[i] for i, _ in unk_counts.most_common(20)], notes=notes,
    )
    if id_map is not None:  # mapped window by window as the scorer reads it, so nothing is copied
        data.ids = _MappedIds(ids, id_map)  # type: ignore[assignment]
    return data


class _MappedIds:
    """A read-only view of an id array through a lookup table, indexed like a numpy array."""

    def __init__(self, ids: np.ndarray, table: np.ndarray):
        self.ids, self.table = ids, table

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index):
        return self.table[np.asarray(self.ids[index], dtype=np.int64)]


def source_data(
    sources: Sequence[str],
    model_vocab: Vocab,
    *,
    normalize: dict | None = None,
    encoding: str | None = None,
    doc_sep: str = "file",
    text_fields: Sequence[str] | None = None,
) -> EvalData:
    """Text / JSON / JSON Lines / chinese-poetry sources read as documents (as `prepare` reads them), normalised
    with ``normalize`` (script, punct, strip_notes: the options the model's dataset was prepared with), and
    encoded with the model's vocabulary into a temporary id file, each document followed by <eot>. Characters
    the vocabulary lacks are counted and scored as <unk>."""
    from poetgen.data.corpus import Batch, ReadOptions, Spool, expand_sources, inspect, read_pieces
    from poetgen.data.normalize import Normalizer
    from poetgen.data.prepare import resolve_named

    opts = normalize or {}
    normalizer = Normalizer(opts.get("script", "keep"), opts.get("punct", "auto"), strip_notes=False)
    strip_notes = opts.get("strip_notes")
    read_options = ReadOptions(encoding=encoding, doc_sep=doc_sep, text_fields=tuple(text_fields or ()) or None)
    lut = model_vocab.lookup_table()
    dtype = model_vocab.dtype()
    tmp = tempfile.TemporaryDirectory(prefix="poetgen-eval-")
    path = Path(tmp.name) / "ids.bin"
    documents = unknown = 0
    unk_counts: Counter = Counter()
    spool = Spool()

    def write(out, text: str) -> None:
        nonlocal documents, unknown
        if not text.strip():
            return
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        ids = lut[cps]
        miss = ids == UNK_ID
        if miss.any():
            unknown += int(miss.sum())
            unk_counts.update(chr(c) for c in cps[miss].tolist())
        out.write(np.append(ids, EOT_ID).astype(dtype).tobytes())
        documents += 1

    try:
        files = expand_sources([resolve_named(s) for s in sources], read_options, spool.path)
        with open(path, "wb") as out:
            for f in files:
                inspect(f, encoding)
                parts: list[str] = []
                for piece in read_pieces(f, read_options, lambda t: normalizer(t, strip_notes=bool(strip_notes))):
                    if isinstance(piece, Batch):
                        for text in piece.texts:
                            write(out, text)
                        continue
                    if piece.normalized:
                        text = piece.text
                    else:
                        strip = strip_notes if strip_notes is not None else piece.poem
                        text = normalizer(piece.text, strip_notes=strip)
                    parts.append(text)
                    if piece.end:  # a long plain-text document comes in ~1 MB pieces; it is written whole
                        write(out, "".join(parts))
                        parts = []
    except BaseException:
        tmp.cleanup()
        raise
    finally:
        spool.close()
    if documents == 0:
        tmp.cleanup()
        raise DatasetError(f"no text found in {', '.join(sources)}")
    ids = np.memmap(path, dtype=dtype, mode="r")
    names = ", ".join(f.name for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return EvalData(
        ids=ids, description=names, documents=documents, unknown=unknown,
        unknown_chars=[c for c, _ in unk_counts.most_common(20)], _tmp=tmp,
    )


def open_data(
    data: Sequence[str] | None,
    model_vocab: Vocab,
    dataset_meta: dict,
    *,
    split: str = "val",
    encoding: str | None = None,
    doc_sep: str = "file",
    text_fields: Sequence[str] | None = None,
) -> EvalData:
    """What `eval` scores: the checkpoint's own dataset split (no ``data``), a dataset directory's split, or raw
    sources normalised as the checkpoint's dataset was."""
    if not data:
        dataset = recorded_dataset(dataset_meta)
        result = dataset_data(dataset, model_vocab, split)
        fp = dataset_meta.get("fingerprint")
        if fp and dataset.fingerprint and fp != dataset.fingerprint:
            result.notes.append(f"{dataset.path} has changed since training (its fingerprint differs)")
        return result
    if len(data) == 1 and is_dataset_dir(data[0]):
        return dataset_data(load_dataset(data[0]), model_vocab, split)
    options = dataset_meta.get("options") if isinstance(dataset_meta.get("options"), dict) else {}
    return source_data(data, model_vocab, normalize=options, encoding=encoding, doc_sep=doc_sep,
                       text_fields=text_fields)


def evaluate_model(
    model: nn.Module,
    ckpt: Checkpoint,
    data: Sequence[str] | None = None,
    *,
    split: str = "val",
    streams: int = DEFAULT_STREAMS,
    warmup: int = DEFAULT_WARMUP,
    encoding: str | None = None,
    doc_sep: str = "file",
    text_fields: Sequence[str] | None = None,
    on_progress: ProgressFn | None = None,
) -> EvalReport:
    """The `poetgen eval` model metrics of a loaded checkpoint: open its data (see ``open_data``) and score it."""
    ev = open_data(data, ckpt.vocab, ckpt.dataset_meta, split=split, encoding=encoding, doc_sep=doc_sep,
                   text_fields=text_fields)
    try:
        t0 = time.perf_counter()
        result = cross_entropy(model, ev.ids, streams=streams, warmup=warmup, on_progress=on_progress)
        seconds = time.perf_counter() - t0
        notes = list(ev.notes)
        if ev.unknown:
            notes.append(f"{ev.unknown:,} symbol(s) not in the model's vocabulary were scored as <unk>: "
                         f"{format_symbols(ev.unknown_chars, 10)}")
        return EvalReport(
            checkpoint=str(ckpt.path), data=ev.description, symbols=ev.symbols, characters=ev.characters,
            documents=ev.documents, unknown=ev.unknown, unknown_chars=ev.unknown_chars, result=result,
            seconds=seconds, notes=notes,
        )
    finally:
        ev.close()


def evaluate_checkpoint(
    path: str | Path, data: Sequence[str] | None = None, *, device: str | torch.device = "cpu", **options
) -> EvalReport:
    """``evaluate_model`` for a checkpoint file or run directory (``find_checkpoint`` rules)."""
    from poetgen.checkpoint.torch_io import find_checkpoint, load_model

    model, ckpt = load_model(find_checkpoint(path), device)
    return evaluate_model(model, ckpt, data, **options)


# --- pairs: answering lines given first lines ---------------------------------------------------------------------

PAIR_BATCH = 256


@dataclass
class PairScore:
    """Exact mean cross-entropy of the answering lines of ``pairs`` pairs given their first lines."""

    pairs: int
    characters: int  # answer characters scored (the answer has no end symbol: its length is the first line's)
    score: Score


def pair_cross_entropy(
    model: nn.Module,
    ids: np.ndarray,
    table: np.ndarray,
    *,
    batch: int = PAIR_BATCH,
    amp: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[list[float]], list[float]] | None = None,
) -> PairScore:
    """The encoder-decoder's figure beside ``cross_entropy``: every answer character of every pair of ``table``
    (a pair dataset's split: poetgen.data.dataset) scored once, teacher-forced, in nats per character. Pairs of one
    length are scored together, ``batch`` at a time; with ``world_size`` > 1 rank r scores batches r, r + N, ...
    and ``reduce`` sums [nats, characters] over the ranks. The model is used in eval mode and left as it was."""
    from poetgen.data.pairs import line_ids, teacher_inputs

    if len(table) == 0:
        raise DatasetError("nothing to evaluate: no pairs")
    device = next(model.parameters()).device
    chunks = [rows[i:i + batch] for n in np.unique(table[:, 1]) for rows in [np.flatnonzero(table[:, 1] == n)]
              for i in range(0, len(rows), batch)]
    sums = [0.0, 0.0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, amp):
            for rows in chunks[rank::world_size]:
                src, tgt = (torch.from_numpy(a).to(device) for a in line_ids(ids, table[rows]))
                # (b, n, V) logits, or the adaptive head's log-probabilities (their log-softmax is themselves)
                scores, _ = model(src, teacher_inputs(tgt))
                loss = F.cross_entropy(scores.float().reshape(-1, scores.size(-1)), tgt.reshape(-1), reduction="sum")
                sums[0] += float(loss)
                sums[1] += tgt.numel()
    finally:
        model.train(was_training)
    if reduce is not None:
        sums = list(reduce(sums))
    return PairScore(len(table), int(sums[1]), Score(sums[0] / sums[1]))
