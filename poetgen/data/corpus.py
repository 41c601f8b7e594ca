"""Reading corpora: files, directories, stdin; plain text, JSON, JSON Lines and the chinese-poetry format.

Sources are resolved to :class:`SourceFile` entries (with size, sha256 and encoding found in a first pass), then
read as a stream of :class:`Piece` and :class:`Batch` objects. A piece is a run of text belonging to one
document; ``end`` marks the document's last piece. Small documents (a poem, a JSON record) come as one piece;
a whole-file document of plain text comes in ~1 MB pieces cut at line breaks, so a corpus of any size streams
in bounded memory. Plain text split into many documents (``--doc-sep blank|line``) comes as batches of complete
documents, normalised a whole chunk at a time, so a corpus of millions of lines costs little per document.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from poetgen.errors import CorpusError

READ_BYTES = 1 << 20  # raw bytes read at a time
DEFAULT_GLOBS = ("*.txt", "*.json", "*.jsonl")
FORMATS = ("auto", "text", "json", "jsonl", "tsv")  # tsv: pair files (--pairs) only
PAIR_GLOBS = ("*.tsv",)  # what --pairs adds to the default globs
# A user pair (first line, answering line) travels through prepare as one document, its two lines joined by this
# control character (which no corpus holds; poem documents lose any in pair mode): poetgen.data.prepare splits it.
PAIR_SEP = "\x1f"
DOC_SEPS = ("file", "blank", "line")
# Encodings charset detection may choose when a file is not UTF-8: the ones Chinese corpora come in.
DETECTABLE = {
    "gb18030", "gbk", "gb2312", "big5", "big5hkscs", "cp950", "cp936",
    "utf_16", "utf_16_le", "utf_16_be", "utf_32", "utf_32_le", "utf_32_be",
}
TEXT_FIELDS_AUTO = ("text", "content", "body")


@dataclass
class SourceFile:
    """One input file, as found on disk (or spooled from stdin)."""

    path: Path  # where to read it
    name: str  # how to show it: the path as given, or "<stdin>"
    format: str  # text | json | jsonl (resolved from --format and the file name)
    size: int = 0
    sha256: str = ""
    encoding: str = ""  # codec name, resolved by inspect()
    kind: str = ""  # what was found inside: text | json | jsonl | chinese-poetry
    documents: int = 0  # documents read from it (before filters)


@dataclass
class Piece:
    text: str
    end: bool  # last piece of its document
    title: str | None = None
    author: str | None = None
    poem: bool = False  # from a chinese-poetry record
    normalized: bool = False  # the reader already applied the transform
    form: object = None  # a JSON record's `form` field as found (poem metrics judge by it; prepare ignores it)
    where: str = ""  # the file and record or line, for messages about this document


@dataclass
class Batch:
    """Complete, already normalised documents from one chunk of a plain text file."""

    texts: list[str]


@dataclass
class ReadOptions:
    encoding: str | None = None
    format: str = "auto"
    globs: Sequence[str] = DEFAULT_GLOBS
    text_fields: Sequence[str] | None = None
    doc_sep: str = "file"
    pairs: bool = False  # read pair files too: TSV, and JSON Lines records of two fields (read_pairs' docstring)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise CorpusError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.format == "tsv" and not self.pairs:
            raise CorpusError("--format tsv reads pair files: add --pairs")
        if self.doc_sep not in DOC_SEPS:
            raise CorpusError(f"unknown document separator {self.doc_sep!r}; choose one of {', '.join(DOC_SEPS)}")
        if self.encoding:
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise CorpusError(f"unknown encoding {self.encoding!r}") from None


# --- finding the files --------------------------------------------------------------------------------------------


def _format_for(path: Path, fmt: str, pairs: bool = False) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if pairs and suffix == ".tsv":
        return "tsv"
    if suffix == ".json":
        return "json"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    return "text"


def _matches(rel: str, globs: Sequence[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(rel if "/" in g else name, g) for g in globs)


def expand_sources(sources: Sequence[str], options: ReadOptions, spool_dir: Path) -> list[SourceFile]:
    """Resolve paths (files, directories searched recursively, ``-`` for stdin) to files, in a stable order."""
    files: list[SourceFile] = []
    for src in sources:
        if src == "-":
            spooled = spool_dir / f"stdin-{len(files)}"
            with open(spooled, "wb") as out:
                shutil.copyfileobj(sys.stdin.buffer, out)
            fmt = options.format
            if fmt == "auto":
                fmt = _sniff_format(spooled)
            files.append(SourceFile(spooled, "<stdin>", fmt))
            continue
        p = Path(src)
        if not p.exists():
            raise CorpusError(f"no such file or directory: {src}")
        if p.is_dir():
            found = []
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for n in names:
                    if n.startswith("."):
                        continue
                    full = Path(root) / n
                    rel = full.relative_to(p).as_posix()
                    if _matches(rel, options.globs) and full.is_file():
                        found.append((rel, full))
            if not found:
                raise CorpusError(f"directory {src} has no files matching {', '.join(options.globs)} (see --glob)")
            for rel, full in sorted(found):
                files.append(SourceFile(full, str(full), _format_for(full, options.format, options.pairs)))
        elif p.is_file():
            files.append(SourceFile(p, src, _format_for(p, options.format, options.pairs)))
        else:
            raise CorpusError(f"not a regular file: {src}")
    return files


def _sniff_format(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"{"):
        return "jsonl"
    return "text"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_BYTES), b""):
            h.update(block)
    return h.hexdigest()


# --- encodings ----------------------------------------------------------------------------------------------------


def _bom_encoding(head: bytes) -> str | None:
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith(codecs.BOM_UTF32_LE) or head.startswith(codecs.BOM_UTF32_BE):
        return "utf-32"
    if head.startswith(codecs.BOM_UTF16_LE) or head.startswith(codecs.BOM_UTF16_BE):
        return "utf-16"
    return None


def _utf16_without_bom(head: bytes) -> str | None:
    """Text in UTF-16 without a BOM: the byte order under which the sample decodes to printable text, if any."""
    sample = head[: len(head) - len(head) % 2]
    for codec in ("utf-16-le", "utf-16-be"):
        try:
            text = codecs.getincrementaldecoder(codec)().decode(sample)
        except UnicodeDecodeError:
            continue
        if not text or "\x00" in text:
            continue
        printable = sum(1 for ch in text if ch.isprintable() or ch in "\n\r\t")
        if printable >= 0.98 * len(text):
            return codec
    return None


def _position(path: Path, offset: int) -> tuple[int, bytes]:
    """Line number (1-based) of a byte offset, and the bytes found there."""
    line = 1
    done = 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(READ_BYTES, offset - done))
            if not block:
                break
            line += block.count(b"\n")
            done += len(block)
        bad = f.read(4)
    return line, bad


def decode_error(source: SourceFile, encoding: str, offset: int) -> CorpusError:
    line, bad = _position(source.path, offset)
    return CorpusError(
        f"{source.name}: cannot decode as {encoding} at line {line}, byte offset {offset} (bytes {bad!r}); "
        "if the file is in another encoding, name it with --encoding"
    )


def inspect(source: SourceFile, encoding: str | None = None) -> None:
    """First pass over a file: size, sha256, binary check, and the encoding (given, BOM, UTF-8, or detected)."""
    h = hashlib.sha256()
    size = 0
    head = b""
    utf8 = codecs.getincrementaldecoder("utf-8")()
    utf8_error: int | None = None
    with open(source.path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            if not block:
                break
            if size == 0:
                head = block[:65536]
            h.update(block)
            if utf8_error is None and not encoding:
                try:
                    utf8.decode(block)
                except UnicodeDecodeError as e:
                    utf8_error = size + e.start
            size += len(block)
    if utf8_error is None and not encoding and size:
        try:
            utf8.decode(b"", final=True)
        except UnicodeDecodeError:
            utf8_error = size - len(utf8.getstate()[0])
    source.size, source.sha256 = size, h.hexdigest()
    if encoding:
        source.encoding = encoding
        return
    bom = _bom_encoding(head)
    if bom:
        source.encoding = bom
        return
    if b"\x00" in head:
        utf16 = _utf16_without_bom(head)
        if utf16:
            source.encoding = utf16
            return
        raise CorpusError(f"{source.name}: looks like a binary file (it contains NUL bytes), not text")
    if utf8_error is None:
        source.encoding = "utf-8"
        return
    source.encoding = _detect(source, utf8_error)


def _detect(source: SourceFile, utf8_error: int) -> str:
    from charset_normalizer import from_bytes

    with open(source.path, "rb") as f:
        sample = f.read(READ_BYTES)
    for match in from_bytes(sample):
        if match.encoding in DETECTABLE:
            return match.encoding
    line, bad = _position(source.path, utf8_error)
    raise CorpusError(
        f"{source.name}: not valid UTF-8 at line {line}, byte offset {utf8_error} (bytes {bad!r}), and not "
        "recognisably GB18030, Big5 or UTF-16 either; if it is text, name its encoding with --encoding"
    )


# --- reading ------------------------------------------------------------------------------------------------------


def _decoded_blocks(source: SourceFile) -> Iterator[str]:
    """The file's text in blocks, strictly decoded; a decoding error names the line and byte offset."""
    decoder = codecs.getincrementaldecoder(source.encoding)(errors="strict")
    done = 0
    with open(source.path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            final = not block
            try:
                text = decoder.decode(block, final=final)
            except UnicodeDecodeError as e:
                # e.start counts from the start of what the decoder held: its buffered bytes, then this block.
                pending = len(decoder.getstate()[0]) if not final else 0
                raise decode_error(source, source.encoding, max(0, done - pending + e.start)) from None
            if text:
                yield text
            if final:
                return
            done += len(block)


def _lines_cut(blocks: Iterator[str], split_long: bool = True) -> Iterator[str]:
    """Re-cut decoded blocks at line breaks (normalised to \\n), so no line and no \\r\\n pair is split.

    A line longer than 8 MB is cut anyway when ``split_long`` (plain text), so memory stays bounded.
    """
    carry = ""
    for text in blocks:
        text = carry + text
        cut = text.rfind("\n") + 1
        if cut == 0 and (len(text) < 8 * READ_BYTES or not split_long):
            carry = text  # no line break yet: wait for more (bounded, see below)
            continue
        if cut == 0:
            cut = len(text)  # one giant line: cut anyway; normalisation copes with a split there
            if text[-1] == "\r":
                cut -= 1
        carry = text[cut:]
        yield text[:cut].replace("\r\n", "\n").replace("\r", "\n")
    if carry:
        yield carry.replace("\r\n", "\n").replace("\r", "\n")


def read_pieces(
    source: SourceFile, options: ReadOptions, transform: Callable[[str], str] | None = None
) -> Iterator[Piece | Batch]:
    """All documents of one file. Plain text is passed through ``transform`` (normalisation) chunk by chunk."""
    if source.format == "tsv":
        yield from _tsv_pairs(source)
    elif source.format == "text":
        yield from _text_pieces(source, options.doc_sep, transform or (lambda t: t))
    elif source.format == "jsonl":
        yield from _jsonl_pieces(source, options)
    else:
        yield from _json_pieces(source, options)


def _text_pieces(source: SourceFile, doc_sep: str, transform: Callable[[str], str]) -> Iterator[Piece | Batch]:
    source.kind = "text"
    chunks = (transform(c) for c in _lines_cut(_decoded_blocks(source)))
    if doc_sep == "file":
        prev = None
        for chunk in chunks:
            if prev is not None:
                yield Piece(prev, end=False, normalized=True)
            prev = chunk
        source.documents += 1
        yield Piece(prev or "", end=True, normalized=True)
        return
    splitter = re.compile(r"\n[ \t\u3000]*\n\s*") if doc_sep == "blank" else re.compile(r"\n")
    carry = ""
    for chunk in chunks:
        parts = splitter.split(carry + chunk)
        carry = parts.pop()
        docs = [p for p in parts if p.strip()]
        if docs:
            source.documents += len(docs)
            yield Batch(docs)
    if carry.strip():
        source.documents += 1
        yield Batch([carry])


def _record_piece(record: object, where: str, options: ReadOptions, source: SourceFile) -> Piece | None:
    """One JSON value -> one document, checked to be valid Unicode (JSON can escape a lone surrogate)."""
    piece = _record_piece_unchecked(record, where, options, source)
    if piece is not None:
        piece.where = where
        if isinstance(record, dict):
            piece.form = record.get("form")
        try:
            piece.text.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = piece.text[e.start]
            raise CorpusError(
                f"{where}: the text holds an unpaired surrogate (\\u{ord(bad):04x}), which is not a character"
            ) from None
    return piece


def _record_piece_unchecked(record: object, where: str, options: ReadOptions, source: SourceFile) -> Piece | None:
    """One JSON value -> one document. chinese-poetry records are recognised by their `paragraphs` list; with
    ``options.pairs``, a list of two strings or an object of two text fields (nothing else) is a pair."""
    if options.pairs and (isinstance(record, list) or (isinstance(record, dict) and "paragraphs" not in record
                                                      and not (options.text_fields or
                                                               any(f in record for f in TEXT_FIELDS_AUTO)))):
        values = list(record.values()) if isinstance(record, dict) else record
        if len(values) != 2 or not all(isinstance(v, str) for v in values):
            raise CorpusError(f"{where}: a pair has 2 text fields (first line, answering line), found "
                              f"{len(values)} field(s)" + ("" if len(values) != 2 else " not both text"))
        return _pair_piece(values[0], values[1], where)
    if isinstance(record, str):
        return Piece(record, end=True)
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected an object or a string, found {type(record).__name__}")
    fields = options.text_fields
    if not fields and isinstance(record.get("paragraphs"), list):
        source.kind = "chinese-poetry"
        paragraphs = record["paragraphs"]
        if not all(isinstance(p, str) for p in paragraphs):
            raise CorpusError(f"{where}: 'paragraphs' must be a list of strings")
        title, author = record.get("title"), record.get("author")
        return Piece(
            "".join(p.strip() for p in paragraphs),
            end=True,
            title=title if isinstance(title, str) else None,
            author=author if isinstance(author, str) else None,
            poem=True,
        )
    if not fields:
        fields = [f for f in TEXT_FIELDS_AUTO if f in record][:1]
        if not fields:
            keys = ", ".join(sorted(map(str, record))[:10])
            raise CorpusError(
                f"{where}: no text field found (looked for {', '.join(TEXT_FIELDS_AUTO)}, 'paragraphs'); "
                f"the record has: {keys}. Name the field(s) with --text-field"
            )
    values = []
    for name in fields:
        if name not in record:
            raise CorpusError(f"{where}: record has no field {name!r}")
        value = record[name]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = "\n".join(value)
        if not isinstance(value, str):
            raise CorpusError(f"{where}: field {name!r} is not text")
        values.append(value)
    return Piece("\n".join(values), end=True)


def _json_pieces(source: SourceFile, options: ReadOptions) -> Iterator[Piece]:
    text = "".join(_decoded_blocks(source))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{source.name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:  # e.g. [[[[...]]]] thousands deep: no corpus looks like that
        raise CorpusError(f"{source.name}: JSON nested too deeply to be a corpus") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise CorpusError(f"{source.name}: unreadable JSON: {e}") from None
    source.kind = source.kind or "json"
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise CorpusError(f"{source.name}: expected a JSON array of records, found {type(data).__name__}")
    for i, record in enumerate(data):
        piece = _record_piece(record, f"{source.name}: record {i}", options, source)
        if piece is not None:
            source.documents += 1
            yield piece


def _numbered_lines(source: SourceFile) -> Iterator[tuple[int, str]]:
    """(line number, line) for every line of a line-oriented file that is not blank."""
    lineno = 0
    for chunk in _lines_cut(_decoded_blocks(source), split_long=False):
        for line in chunk.split("\n"):
            lineno += 1
            if line.strip():
                yield lineno, line
        lineno -= 1  # the chunk ended with "\n": its last split part is empty, not a line


def _jsonl_pieces(source: SourceFile, options: ReadOptions) -> Iterator[Piece]:
    source.kind = "jsonl"
    for lineno, line in _numbered_lines(source):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{source.name}: invalid JSON on line {lineno}: {e.msg}") from None
        except RecursionError:
            raise CorpusError(f"{source.name}: JSON on line {lineno} is nested too deeply to be a corpus") from None
        except ValueError as e:
            raise CorpusError(f"{source.name}: unreadable JSON on line {lineno}: {e}") from None
        piece = _record_piece(record, f"{source.name}: line {lineno}", options, source)
        if piece is not None:
            source.documents += 1
            yield piece
    if source.kind == "chinese-poetry":
        source.kind = "chinese-poetry (jsonl)"


def _pair_piece(first: str, second: str, where: str) -> Piece:
    """A user pair as one document; the two lines must be of equal length (the answer is written in parallel)."""
    first, second = first.strip(), second.strip()
    if not first or not second:
        raise CorpusError(f"{where}: the {'first' if not first else 'answering'} line is empty")
    if PAIR_SEP in first + second:
        raise CorpusError(f"{where}: a line holds the control character U+001F")
    if len(first) != len(second):
        raise CorpusError(f"{where}: the first line has {len(first)} characters and the answering line "
                          f"{len(second)}: a couplet's lines are of equal length")
    return Piece(first + PAIR_SEP + second, end=True, where=where)


def _tsv_pairs(source: SourceFile) -> Iterator[Piece]:
    """A pair file: one pair a line, first line TAB answering line; blank lines are skipped."""
    source.kind = "pairs (tsv)"
    for lineno, line in _numbered_lines(source):
        fields = line.rstrip("\r").split("\t")
        if len(fields) != 2:
            raise CorpusError(f"{source.name}: line {lineno}: expected 2 tab-separated fields (first line, "
                              f"answering line), found {len(fields)}")
        source.documents += 1
        yield _pair_piece(fields[0], fields[1], f"{source.name}: line {lineno}")


@dataclass
class Spool:
    """A private temporary directory for stdin copies, removed on close."""

    path: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="poetgen-spool-")))

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
