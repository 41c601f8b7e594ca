"""`poetgen prepare`: corpora in, a dataset directory out (see poetgen.data.dataset for the layout).

The pipeline streams, so peak memory does not grow with the corpus:

    pass 0  inspect each file: size, sha256, encoding (corpus.inspect)
    pass 1  read -> normalise -> filter; documents go to a temporary stream of code points (uint32,
            end-of-text = EOT_CP) and a table of document starts and 64-bit text digests (16 bytes a document)
    then    duplicates (equal digests) and the split (seeded scores from the digests) are decided with numpy
    pass 2  count symbols over the kept documents -> Vocab
    pass 3  map code points to ids and write train.npy / val.npy, then vocab.json and meta.json

Everything is written into a temporary directory beside the output and renamed at the end, so a failure never
leaves half a dataset. The same inputs and options give byte-identical output.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from poetgen import __version__
from poetgen.data.corpus import (
    DEFAULT_GLOBS, PAIR_GLOBS, PAIR_SEP, Batch, ReadOptions, SourceFile, Spool, expand_sources, file_sha256, inspect,
    read_pieces,
)
from poetgen.data.dataset import ACROSS, FORMAT, FORMAT_VERSION, MIDDLE, PAIRS, REVERSED, is_dataset_dir
from poetgen.errors import CorpusError, DatasetError
from poetgen.data.normalize import Normalizer, convert_script
from poetgen.data.vocab import EOT_ID, UNK_ID, Vocab

EOT_CP = 0x110000  # one past the last Unicode code point: the end-of-text marker in the temporary stream
SPILL_CHARS = 1 << 20  # a document longer than this is written out before it is complete
CHUNK = 1 << 20  # code points per chunk in passes 2 and 3
DROP, TRAIN, VAL = 0, 1, 2  # what becomes of a document in the stream
SPLITS = ("auto", "random", "tail")
NAMED_PREFIX = "corpus:"

ProgressFn = Callable[[dict], None]


@dataclass
class PrepareOptions:
    # reading
    encoding: str | None = None
    format: str = "auto"
    globs: tuple[str, ...] = DEFAULT_GLOBS
    text_fields: tuple[str, ...] | None = None
    doc_sep: str = "file"
    # normalisation
    script: str = "keep"
    punct: str = "auto"
    strip_notes: bool | None = None  # None: strip in chinese-poetry records only
    # filters
    forms: tuple[str, ...] = ()
    authors: tuple[str, ...] = ()
    min_length: int = 1
    max_length: int | None = None
    dedupe: bool = True
    # vocabulary and split
    min_count: int = 1
    val_fraction: float = 0.05
    split: str = "auto"
    seed: int = 1337
    # (first line, answering line) pairs instead of text: every couplet of each poem, and user pair files
    pairs: bool = False
    # more training pairs (the validation split keeps the couplets alone): AUGMENTS
    augment: tuple[str, ...] = ()

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise CorpusError(f"--val-fraction must be at least 0 and below 1, got {self.val_fraction}")
        if self.split not in SPLITS:
            raise CorpusError(f"unknown split {self.split!r}; choose one of {', '.join(SPLITS)}")
        if self.min_length < 0 or (self.max_length is not None and self.max_length < max(self.min_length, 1)):
            raise CorpusError(f"no document can satisfy --min-length {self.min_length} --max-length {self.max_length}")
        if self.min_count < 1:
            raise CorpusError(f"--min-count must be at least 1, got {self.min_count}")
        unknown = [a for a in self.augment if a not in AUGMENTS]
        if unknown:
            raise CorpusError(f"unknown --augment {unknown[0]!r}; choose from {', '.join(AUGMENTS)}")
        if self.augment and not self.pairs:
            raise CorpusError("--augment adds training pairs: it needs --pairs")
        if self.pairs and self.split == "tail":
            raise CorpusError("--pairs splits by poem (no poem has pairs on both sides): use --split random or auto")

    def read_options(self) -> ReadOptions:
        globs = (*self.globs, *PAIR_GLOBS) if self.pairs and tuple(self.globs) == DEFAULT_GLOBS else self.globs
        return ReadOptions(self.encoding, self.format, globs, self.text_fields, self.doc_sep, self.pairs)


@dataclass
class PrepareReport:
    output: Path
    sources: list[dict]
    counts: dict
    vocab_size: int
    coverage: float
    split: str
    fingerprint: str
    top_symbols: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "sources": self.sources,
            "counts": self.counts,
            "vocab_size": self.vocab_size,
            "coverage": self.coverage,
            "split": self.split,
            "fingerprint": self.fingerprint,
        }


# --- named sources ------------------------------------------------------------------------------------------------


def resolve_named(source: str) -> str:
    """``corpus:bundled`` is the project's own poems; ``corpus:tang`` the downloaded 全唐诗; other strings pass."""
    if not source.startswith(NAMED_PREFIX):
        return source
    name = source[len(NAMED_PREFIX):]
    if name == "bundled":
        return str(bundled_corpus_path())
    from poetgen.data.download import named_source  # only when asked for: it pulls in the network code

    return str(named_source(name))


def bundled_corpus_path() -> Path:
    from poetgen.paths import bundled_corpus

    path = bundled_corpus()
    if path is None:
        raise CorpusError(
            "the bundled corpus (data/poems.jsonl) is not installed; run poetgen from a checkout "
            "(pip install -e .) or give a corpus path"
        )
    return path


# --- the pipeline -------------------------------------------------------------------------------------------------


class _Stream:
    """The temporary stream of code points, with truncation for documents rejected after spilling."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "w+b")
        self.length = 0  # code points written

    def write(self, cps: np.ndarray) -> None:
        self.file.write(cps.astype("<u4", copy=False).tobytes())
        self.length += len(cps)

    def truncate(self, length: int) -> None:
        self.file.flush()
        self.file.truncate(length * 4)
        self.file.seek(length * 4)
        self.length = length

    def chunks(self, start: int = 0, stop: int | None = None):
        """(offset, array) over [start, stop) in CHUNK-sized reads (no memory map: bounded resident memory)."""
        self.file.flush()
        stop = self.length if stop is None else stop
        pos = start
        while pos < stop:
            n = min(CHUNK, stop - pos)
            self.file.seek(pos * 4)
            yield pos, np.fromfile(self.file, dtype="<u4", count=n)
            pos += n

    def close(self) -> None:
        self.file.close()


class _Doc:
    """The document being read: its code points so far (until spilled), hash and length."""

    __slots__ = ("start", "hasher", "length", "pending", "texts", "spilled", "title", "author", "poem")

    def __init__(self, start: int, piece) -> None:
        self.start = start
        self.hasher = hashlib.blake2b(digest_size=8)
        self.length = 0
        self.pending: list[np.ndarray] = []
        self.texts: list[str] = []
        self.spilled = False
        self.title, self.author, self.poem = piece.title, piece.author, piece.poem


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


class _Collector:
    """Pass 1: normalise, filter, de-duplicate, and append kept documents to the stream."""

    def __init__(self, options: PrepareOptions, stream: _Stream):
        self.o = options
        self.stream = stream
        self.normalize = Normalizer(options.script, options.punct, strip_notes=False)
        # One row per document written to the stream: where it starts and a 64-bit digest of its text.
        # Duplicates are resolved from the digests after pass 1 (numpy, 16 bytes a document), not in a Python set.
        self.starts = array("q")
        self.digests = array("Q")
        self.counts = {"documents_read": 0, "empty": 0, "duplicates": 0, "filtered_form": 0,
                       "filtered_author": 0, "filtered_length": 0}
        self.forms = _canonical_forms(options.forms)
        self.authors = {convert_script(a.strip(), "simplified") for a in options.authors}
        self.doc: _Doc | None = None

    def transform(self, text: str) -> str:
        """Normalisation of plain text, applied by the reader a chunk at a time."""
        return self.normalize(text, strip_notes=bool(self.o.strip_notes))

    def add(self, piece) -> None:
        if isinstance(piece, Batch):
            return self.add_batch(piece.texts)
        if piece.normalized:
            text = piece.text
        else:
            strip = self.o.strip_notes if self.o.strip_notes is not None else piece.poem
            text = self.normalize(piece.text, strip_notes=strip)
        doc = self.doc
        if doc is None:
            doc = self.doc = _Doc(self.stream.length, piece)
        if text:
            doc.hasher.update(text.encode("utf-8"))
            cps = _codepoints(text)
            doc.length += len(cps)
            if doc.spilled:
                self.stream.write(cps)
            else:
                doc.pending.append(cps)
                doc.texts.append(text)
                if doc.length > SPILL_CHARS:
                    for p in doc.pending:
                        self.stream.write(p)
                    doc.pending, doc.texts, doc.spilled = [], [], True
        if piece.end:
            self.doc = None
            self._finish(doc)

    def add_batch(self, texts: list[str]) -> None:
        """Many small complete documents at once: the same rules as _finish, with one array write for all."""
        o, counts = self.o, self.counts
        kept: list[str] = []
        for text in texts:
            counts["documents_read"] += 1
            n = len(text)
            if n == 0 or text.isspace():
                counts["empty"] += 1
            elif n < o.min_length or (o.max_length is not None and n > o.max_length):
                counts["filtered_length"] += 1
            elif self.authors:
                counts["filtered_author"] += 1  # plain text has no authors
            elif self.forms and _detect_form(text) not in self.forms:
                counts["filtered_form"] += 1
            else:
                kept.append(text)
        if not kept:
            return
        lengths = np.fromiter((len(t) for t in kept), dtype=np.int64, count=len(kept))
        ends = np.cumsum(lengths)
        cps = np.insert(_codepoints("".join(kept)), ends, EOT_CP)
        starts = self.stream.length + ends - lengths + np.arange(len(kept))
        self.stream.write(cps)
        self.starts.extend(starts.tolist())
        blake2b, from_bytes = hashlib.blake2b, int.from_bytes
        self.digests.extend([from_bytes(blake2b(t.encode(), digest_size=8).digest(), "little") for t in kept])

    def _reject(self, doc: _Doc, reason: str) -> None:
        self.counts[reason] += 1
        if doc.spilled:
            self.stream.truncate(doc.start)

    def _finish(self, doc: _Doc) -> None:
        o = self.o
        self.counts["documents_read"] += 1
        text = None if doc.spilled else "".join(doc.texts)
        if doc.length == 0 or (text is not None and not text.strip()):
            return self._reject(doc, "empty")
        if doc.length < o.min_length or (o.max_length is not None and doc.length > o.max_length):
            return self._reject(doc, "filtered_length")
        if self.authors and convert_script((doc.author or "").strip(), "simplified") not in self.authors:
            return self._reject(doc, "filtered_author")
        if self.forms and (text is None or _detect_form(text) not in self.forms):
            return self._reject(doc, "filtered_form")
        for p in doc.pending:
            self.stream.write(p)
        self.stream.write(np.array([EOT_CP], dtype="<u4"))
        self.starts.append(doc.start)
        self.digests.append(int.from_bytes(doc.hasher.digest(), "little"))


def _first_occurrences(digests: np.ndarray) -> np.ndarray:
    """True for each document whose text has not appeared before it (equal digests = equal texts)."""
    order = np.argsort(digests, kind="stable")
    ordered = digests[order]
    first_sorted = np.ones(len(digests), dtype=bool)
    first_sorted[1:] = ordered[1:] != ordered[:-1]
    del ordered
    first = np.empty(len(digests), dtype=bool)
    first[order] = first_sorted
    return first


def _split_scores(digests: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random score per document from its digest alone (splitmix64 finaliser), so identical
    documents always share a split and the same seed always gives the same split."""
    with np.errstate(over="ignore"):
        z = digests ^ np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _detect_form(text: str) -> str | None:
    from poetgen.poetry.forms import detect_form

    return detect_form(text)


def _canonical_forms(forms: Sequence[str]) -> set[str]:
    if not forms:
        return set()
    from poetgen.poetry.forms import parse_form

    return {parse_form(f).name for f in forms}


def _val_documents(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of validation documents: the ``fraction`` with the lowest scores (ties kept together)."""
    n = len(scores)
    k = int(round(n * fraction))
    if fraction > 0 and k == 0 and n >= 2:
        k = 1
    k = min(k, n - 1) if n >= 2 else 0
    if k == 0:
        return np.zeros(n, dtype=bool)
    threshold = np.partition(scores, k - 1)[k - 1]
    return scores <= threshold


def _script_of(vocab: Vocab) -> str:
    """Which Chinese script the text is in, judged by the characters that differ between the two."""
    counts = vocab.counts or [1] * len(vocab)
    trad = simp = 0
    for sym, n in zip(vocab.symbols[2:], counts[2:]):
        if convert_script(sym, "simplified") != sym:
            trad += n
        elif convert_script(sym, "traditional") != sym:
            simp += n
    if trad + simp == 0:
        return "none"
    if trad >= 0.9 * (trad + simp):
        return "traditional"
    if simp >= 0.9 * (trad + simp):
        return "simplified"
    return "mixed"


class _NpyWriter:
    """A .npy file written in chunks: the header needs the final length, which pass 1 told us."""

    def __init__(self, path: Path, dtype: np.dtype, length: int):
        self.file = open(path, "wb")
        self.dtype = dtype
        self.hasher = hashlib.sha256()
        np.lib.format.write_array_header_1_0(
            self.file, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (length,)}
        )

    def write(self, ids: np.ndarray) -> None:
        data = ids.astype(self.dtype, copy=False).tobytes()
        self.hasher.update(data)
        self.file.write(data)

    def close(self) -> None:
        if self.file.closed:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def prepare(
    sources: Sequence[str] | None,
    output: str | Path,
    options: PrepareOptions | None = None,
    *,
    force: bool = False,
    on_progress: ProgressFn | None = None,
) -> PrepareReport:
    """Prepare ``sources`` (paths, ``-``, ``corpus:NAME``; none = the bundled corpus) into dataset ``output``."""
    options = options or PrepareOptions()
    options.validate()
    output = Path(output)
    if output.exists() and not force:
        raise DatasetError(f"{output} already exists; use --force to replace it")
    if output.exists() and not output.is_dir():
        raise DatasetError(f"{output} exists and is not a directory")
    if output.is_dir() and not is_dataset_dir(output) and any(output.iterdir()):
        raise DatasetError(f"{output} is not a poetgen dataset; --force replaces a dataset (or an empty directory), "
                           "never other files: choose another --output")
    sources = [resolve_named(s) for s in sources] if sources else [str(bundled_corpus_path())]
    inside = [s for s in sources if s != "-" and output.exists() and Path(s).resolve().is_relative_to(output.resolve())]
    if inside:
        raise DatasetError(f"{inside[0]} is inside {output}, which --force would replace; keep sources elsewhere")
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    spool = Spool()
    try:
        report = _prepare_into(sources, work, output, options, spool, on_progress)
        _replace_dir(work, output)
        return report
    finally:
        spool.close()
        shutil.rmtree(work, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` into place; an old ``target`` is renamed aside first and removed only after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prepare_into(sources, work: Path, output: Path, o: PrepareOptions, spool: Spool, on_progress) -> PrepareReport:
    progress = on_progress or (lambda event: None)
    read_options = o.read_options()
    files = expand_sources(sources, read_options, spool.path)
    for f in files:
        inspect(f, o.encoding)
    total_bytes = sum(f.size for f in files)

    # pass 1
    stream = _Stream(work / "stream.u32")
    collector = _Collector(o, stream)
    done_bytes = 0
    try:
        for f in files:
            progress({"stage": "read", "file": f.name, "done": done_bytes, "total": total_bytes})
            for piece in read_pieces(f, read_options, collector.transform):
                collector.add(piece)
            done_bytes += f.size
            progress({"stage": "read", "file": f.name, "done": done_bytes, "total": total_bytes})
        counts = collector.counts
        # zero-copy views of the table (it is not appended to any more)
        starts = np.frombuffer(collector.starts, dtype=np.int64) if collector.starts else np.zeros(0, np.int64)
        digests = np.frombuffer(collector.digests, dtype=np.uint64) if collector.digests else np.zeros(0, np.uint64)
        total = stream.length
        lengths = np.diff(np.append(starts, total))  # code points per document, end-of-text included
        keep = _first_occurrences(digests) if o.dedupe else np.ones(len(digests), dtype=bool)
        counts["duplicates"] = int(len(keep) - keep.sum())
        n_docs = int(keep.sum())
        if n_docs == 0:
            raise CorpusError(_nothing_left_message(counts, files))
        kept_total = int(lengths[keep].sum())

        # the split, per document: DROP (a duplicate), TRAIN or VAL
        split = o.split if o.split != "auto" else ("random" if n_docs >= 20 or o.pairs else "tail")
        doc_class = np.where(keep, TRAIN, DROP).astype(np.uint8)
        n_val_docs = None
        if split == "random":
            kept_idx = np.flatnonzero(keep)
            is_val = _val_documents(_split_scores(digests[kept_idx], o.seed), o.val_fraction)
            doc_class[kept_idx[is_val]] = VAL
            n_val = int(lengths[doc_class == VAL].sum())
            n_val_docs = int(is_val.sum())
        else:
            n_val = int(round(kept_total * o.val_fraction))
        n_train = kept_total - n_val
        if n_train == 0:
            raise CorpusError("nothing left for training after the validation split; lower --val-fraction")

        def classes(pos: int, n: int) -> np.ndarray:
            """The class of each position in stream[pos:pos + n]: the documents overlapping it, repeated."""
            first = int(np.searchsorted(starts, pos, side="right")) - 1
            last = int(np.searchsorted(starts, pos + n, side="left"))
            bounds = np.clip(np.append(starts[first:last], total), pos, pos + n)
            bounds[0] = pos
            return np.repeat(doc_class[first:last], np.diff(bounds))

        # pass 2: counts over the kept documents (EOT_CP counts them)
        hist = np.zeros(EOT_CP + 1, dtype=np.int64)
        for pos, cps in stream.chunks():
            if n_docs < len(starts):
                cps = cps[classes(pos, len(cps)) != DROP]
            hist += np.bincount(cps, minlength=EOT_CP + 1)
        hist[ord(PAIR_SEP)] = 0  # joins a user pair's two lines; never a symbol
        present = np.flatnonzero(hist[:EOT_CP])
        vocab = Vocab.from_counts({chr(c): int(hist[c]) for c in present}, o.min_count, eot_count=int(hist[EOT_CP]))
        characters = kept_total - n_docs

        # pass 3: ids, written to their split
        lut = vocab.lookup_table(EOT_CP)
        lut[EOT_CP] = EOT_ID
        dtype = vocab.dtype()
        if o.pairs:
            pair_counts, train_w, val_w, unk, characters = _write_pairs(stream, doc_class, lut, dtype, work,
                                                                       o.augment)
            counts.update(pair_counts)
            n_train, n_val = pair_counts["train_tokens"], pair_counts["val_tokens"]
        else:
            train_w = _NpyWriter(work / "train.npy", dtype, n_train)
            val_w = _NpyWriter(work / "val.npy", dtype, n_val)
            unk = 0
        kept_so_far = 0
        for pos, cps in ([] if o.pairs else stream.chunks()):
            cls = classes(pos, len(cps))
            ids = lut[cps]
            if split == "tail":
                ids = ids[cls != DROP]
                cut = min(max(n_train - kept_so_far, 0), len(ids))
                kept_so_far += len(ids)
                train_w.write(ids[:cut])
                val_w.write(ids[cut:])
                unk += int(np.count_nonzero(ids == UNK_ID))
            else:
                train_w.write(ids[cls == TRAIN])
                val_w.write(ids[cls == VAL])
                unk += int(np.count_nonzero(ids[cls != DROP] == UNK_ID))
            progress({"stage": "write", "done": pos + len(ids), "total": total})
        train_w.close()
        val_w.close()
    finally:
        stream.close()
    os.remove(stream.path)

    vocab_json = vocab.to_json()
    (work / "vocab.json").write_text(vocab_json, encoding="utf-8")
    digests = train_w.hasher.hexdigest() + val_w.hasher.hexdigest() + hashlib.sha256(vocab_json.encode()).hexdigest()
    if o.pairs:  # the pair tables too (older fingerprints are unchanged: text datasets add nothing)
        digests += "".join(hashlib.sha256((work / f).read_bytes()).hexdigest() for f in PAIRS.values())
    fingerprint = hashlib.sha256(digests.encode()).hexdigest()
    counts = dict(counts)
    counts.update(
        documents=n_docs,
        train_documents=n_docs - n_val_docs if n_val_docs is not None else None,
        val_documents=n_val_docs,
        characters=characters,
        distinct_characters=len(present),
        train_tokens=n_train,
        val_tokens=n_val,
        unk_tokens=unk,
    )
    coverage = 1.0 - unk / characters if characters else 1.0
    source_info = [
        {"name": f.name, "sha256": f.sha256, "bytes": f.size, "encoding": f.encoding, "kind": f.kind,
         "documents": f.documents}
        for f in files
    ]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "poetgen_version": __version__,
        "kind": "pairs" if o.pairs else "text",
        "name": output.name,
        "sources": source_info,
        "options": _options_dict(o),
        "split": split,
        "counts": counts,
        "vocab_size": len(vocab),
        "coverage": coverage,
        "script": _script_of(vocab),
        "fingerprint": fingerprint,
    }
    (work / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return PrepareReport(
        output=output, sources=source_info, counts=counts, vocab_size=len(vocab), coverage=coverage, split=split,
        fingerprint=fingerprint, top_symbols=vocab.symbols[2:12],
    )


# --- pairs (--pairs) ---------------------------------------------------------------------------------------------

# A line and the mark that ends it; a couplet is a line ending in ，；： followed by one ending in 。？！.
_CLAUSE = re.compile(r"([^，。？！；：、\s]+)([，。？！；：、])")
_FIRST_MARKS, _ANSWER_MARKS = "，；：", "。？！"


# --augment: training pairs beyond the couplets (flags beside MIDDLE; validation never holds them)
AUGMENTS = {
    "reversed": "each couplet backwards too (the answering line answered by the first: the same antithesis)",
    "across": "a couplet's answering line and the next couplet's first line (consecutive lines across couplets)",
}


def couplets(text: str) -> list[tuple[str, str, bool]]:
    """The (first line, answering line, middle) pairs of one document: a user pair (its two lines joined by
    PAIR_SEP) as it is; in a poem, every couplet whose two lines are of equal length and all Han characters,
    ``middle`` for the 颔联 and 颈联 (second and third couplets) of a 五律 or 七律."""
    return [(a, b, bool(flags & MIDDLE)) for a, b, flags in line_pairs(text)]


def line_pairs(text: str, augment: Sequence[str] = ()) -> list[tuple[str, str, int]]:
    """couplets() with the table's flags, plus the ``augment`` pairs of AUGMENTS: ``reversed`` adds (answering
    line, first line) for each couplet, ``across`` (answering line, next couplet's first line) for two couplets in
    a row of the same line length. A user pair file's pair is one couplet: ``reversed`` applies, ``across`` cannot."""
    if PAIR_SEP in text:
        first, second = text.split(PAIR_SEP, 1)
        return [(first, second, 0)] + ([(second, first, REVERSED)] if "reversed" in augment else [])
    from poetgen.poetry.forms import detect_form, is_han

    clauses = _CLAUSE.findall(text)
    lushi = detect_form(text) in ("五律", "七律")
    found, extra, i, k = [], [], 0, 0
    previous = None  # the answering line of the couplet just before, when it was kept
    while i + 1 < len(clauses):
        (a, ma), (b, mb) = clauses[i], clauses[i + 1]
        if ma in _FIRST_MARKS and mb in _ANSWER_MARKS:
            kept = len(a) == len(b) and all(is_han(c) for c in a + b)
            if kept:
                found.append((a, b, MIDDLE if lushi and k in (1, 2) else 0))
                if "reversed" in augment:
                    extra.append((b, a, REVERSED))
                if "across" in augment and previous is not None and len(previous) == len(a):
                    extra.append((previous, a, ACROSS))
            previous = b if kept else None
            k += 1
            i += 2
        else:
            previous = None
            i += 1
    return found + extra


def _documents(stream: _Stream):
    """Each document of the stream in order, as text (the stream holds them whole: EOT_CP ends each)."""
    carry = np.zeros(0, dtype="<u4")
    for _, cps in stream.chunks():
        cps = np.concatenate([carry, cps]) if len(carry) else cps
        ends = np.flatnonzero(cps == EOT_CP)
        start = 0
        for end in ends:
            yield cps[start:end].tobytes().decode("utf-32-le")
            start = end + 1
        carry = cps[start:]


def _write_pairs(stream: _Stream, doc_class: np.ndarray, lut: np.ndarray, dtype, work: Path,
                 augment: Sequence[str] = ()):
    """Pass 3 of --pairs: the couplets of each kept document to its split (and ``augment``'s pairs to training). A
    split's ids are first line, <eot>, answering line, <eot>, pair after pair; its table (poetgen.data.dataset.PAIRS)
    has a row (start, length, flags) per pair. Unlike text, the ids are gathered in memory (4 bytes a character)
    before they are written."""
    ids = {TRAIN: array("I"), VAL: array("I")}
    rows: dict[int, list] = {TRAIN: [], VAL: []}
    counts = {"pair_documents_without_pairs": 0}
    for cls, text in zip(doc_class, _documents(stream)):
        if cls == DROP:
            continue
        found = line_pairs(text, augment if cls == TRAIN else ())
        counts["pair_documents_without_pairs"] += not found
        out = ids[int(cls)]
        for first, second, flags in found:
            rows[int(cls)].append((len(out), len(first), flags))
            out.extend(_codepoints(first).tolist())
            out.append(EOT_CP)
            out.extend(_codepoints(second).tolist())
            out.append(EOT_CP)
    writers, unk, characters = [], 0, 0
    for cls, name in ((TRAIN, "train"), (VAL, "val")):
        cps = np.frombuffer(ids[cls], dtype=np.uint32) if ids[cls] else np.zeros(0, np.uint32)
        mapped = lut[cps]
        w = _NpyWriter(work / f"{name}.npy", dtype, len(mapped))
        w.write(mapped)
        w.close()
        writers.append(w)
        table = np.array(rows[cls], dtype=np.int64).reshape(-1, 3)
        np.save(work / PAIRS[name], table, allow_pickle=False)
        unk += int(np.count_nonzero(mapped == UNK_ID))
        characters += int(table[:, 1].sum() * 2)
        counts[f"{name}_pairs"] = len(table)
        counts[f"{name}_middle_couplets"] = int(np.count_nonzero(table[:, 2] & MIDDLE))
        for flag, kind in ((REVERSED, "reversed"), (ACROSS, "across")):
            if kind in augment and cls == TRAIN:
                counts[f"train_{kind}_pairs"] = int(np.count_nonzero(table[:, 2] & flag))
        counts[f"{name}_tokens"] = len(mapped)
    if counts["train_pairs"] == 0:
        raise CorpusError("no pairs for training: no couplet of two equal lines of Han characters (ending in ，；： "
                          "then 。？！) was found; give poems or pair files (TSV, JSONL of two fields)")
    return counts, writers[0], writers[1], unk, characters


def _options_dict(o: PrepareOptions) -> dict:
    d = asdict(o)
    for k, v in d.items():
        if isinstance(v, tuple):
            d[k] = list(v)
    if not d["augment"]:  # recorded where used: the options of datasets (and the cache's keys) from before it stay
        del d["augment"]
    return d


def _nothing_left_message(counts: dict, files: list[SourceFile]) -> str:
    read = counts["documents_read"]
    if read == 0 or read == counts["empty"]:
        names = ", ".join(f.name for f in files[:3]) + (" ..." if len(files) > 3 else "")
        return f"the corpus is empty: no text found in {names}"
    parts = [f"{counts[k]} {label}" for k, label in (
        ("empty", "empty"), ("duplicates", "duplicates"), ("filtered_form", "not of the requested form"),
        ("filtered_author", "by other authors"), ("filtered_length", "outside the length limits"),
    ) if counts[k]]
    return f"no documents left: {read} read, " + ", ".join(parts) + "; loosen the filters"


# --- for `train DATA`: raw corpora prepared on the fly and cached -------------------------------------------------


def resolve_training_data(source: str | None, *, on_progress: ProgressFn | None = None) -> Path:
    """A dataset directory for training: ``source`` itself when it is one; otherwise ``source`` (or the bundled
    corpus when None) prepared with the default options into the user cache, reused while the inputs are unchanged.
    """
    if source is not None and is_dataset_dir(source):
        return Path(source)
    from poetgen.paths import cache_dir

    raw = resolve_named(source) if source is not None else str(bundled_corpus_path())
    if raw == "-":
        raise CorpusError("training data cannot come from stdin; prepare it first with `poetgen prepare -`")
    spool = Spool()
    try:
        files = expand_sources([raw], ReadOptions(), spool.path)
    finally:
        spool.close()
    key = hashlib.sha256()
    key.update(f"{FORMAT_VERSION}:{json.dumps(_options_dict(PrepareOptions()), sort_keys=True)}".encode())
    for f in files:
        key.update(f.name.encode() + b"\0" + file_sha256(f.path).encode())
    stem = Path(raw.rstrip("/")).stem or "corpus"
    target = cache_dir() / "datasets" / f"{stem}-{key.hexdigest()[:16]}"
    if is_dataset_dir(target):
        return target
    prepare([raw], target, PrepareOptions(), force=True, on_progress=on_progress)
    return target
