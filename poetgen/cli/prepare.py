"""`poetgen prepare`: corpora in, a dataset directory out (poetgen.data.prepare)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from poetgen.cli.common import handles_errors, print_json, progress, split_csv, stderr_console


def _default_dataset_name(sources: List[str]) -> str:
    if not sources:
        return "bundled"
    first = sources[0]
    if first == "-":
        return "stdin"
    if first.startswith("corpus:"):
        return first.split(":", 1)[1] or "corpus"
    return Path(first.rstrip("/\\")).stem or "corpus"


@handles_errors
def prepare(
    sources: Optional[List[str]] = typer.Argument(
        None, help="Files, directories, `-` for stdin, or `corpus:bundled` / `corpus:tang`. None: the bundled poems."
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Dataset directory to write. Default: datasets/<name of the first source>."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing dataset directory."),
    glob: Optional[List[str]] = typer.Option(
        None, "--glob", help="File patterns inside directories (repeatable). Default: *.txt, *.json, *.jsonl."
    ),
    encoding: Optional[str] = typer.Option(
        None, "--encoding", help="Input encoding (e.g. gb18030, big5, utf-16). Default: UTF-8, else detected."
    ),
    fmt: str = typer.Option("auto", "--format", help="auto | text | json | jsonl. auto: by file extension."),
    text_field: Optional[List[str]] = typer.Option(
        None, "--text-field", help="JSON field(s) holding the text, joined by newlines (repeatable or a,b)."
    ),
    doc_sep: str = typer.Option(
        "file", "--doc-sep", help="Plain text documents: file (one per file) | blank (blank-line separated) | line."
    ),
    script: str = typer.Option("keep", "--script", help="keep | simplified | traditional (Chinese, via OpenCC)."),
    punct: str = typer.Option(
        "auto", "--punct", help="auto (ASCII punctuation to full width in Chinese text) | fullwidth | keep."
    ),
    strip_notes: Optional[bool] = typer.Option(
        None, "--strip-notes/--keep-notes",
        help="Remove editorial notes such as （一作「萬里」）. Default: only in chinese-poetry records.",
    ),
    form: Optional[List[str]] = typer.Option(
        None, "--form", help="Keep only poems of these forms: 五绝 七绝 五律 七律 (or wujue qijue wulv qilv)."
    ),
    author: Optional[List[str]] = typer.Option(None, "--author", help="Keep only poems by these authors (repeatable)."),
    min_length: int = typer.Option(1, "--min-length", help="Drop documents shorter than this many characters."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Drop documents longer than this."),
    keep_duplicates: bool = typer.Option(False, "--keep-duplicates", help="Do not remove exact duplicates."),
    min_count: int = typer.Option(1, "--min-count", help="Symbols seen fewer times become <unk>."),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="Share of the data held out for validation."),
    split: str = typer.Option(
        "auto", "--split",
        help="random (by document, seeded) | tail (the last fraction of the text, as char-rnn and nanoGPT do) | "
        "auto (random with 20 or more documents, else tail).",
    ),
    seed: int = typer.Option(1337, "--seed", help="Seed of the random document split."),
    pairs: bool = typer.Option(
        False, "--pairs",
        help="对句 pairs for the encoder-decoder instead of text: every couplet of each poem (two lines of equal "
        "length, ，then 。; 律诗 middle couplets flagged), and pair files: *.tsv (first line TAB answering line) and "
        "JSONL records of two text fields. Split by poem.",
    ),
    augment: Optional[List[str]] = typer.Option(
        None, "--augment",
        help="With --pairs, more training pairs (validation keeps the couplets alone), comma-separated: reversed "
        "(each couplet backwards too) | across (a couplet's answering line and the next couplet's first line).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no summary table."),
) -> None:
    """Turn corpora into a dataset that training can stream.

    Reads plain text, JSON, JSON Lines and chinese-poetry files (recognised by their `paragraphs` field) in UTF-8,
    GB18030, Big5 or UTF-16; normalises; removes duplicates; builds the vocabulary; splits train/val; writes
    token ids (.npy), vocab.json and meta.json.

    Example:

        poetgen prepare ../shared/data/tang --script simplified -o datasets/tang
    """
    from poetgen.data.prepare import PrepareOptions
    from poetgen.data.prepare import prepare as run_prepare

    options = PrepareOptions(
        encoding=encoding, format=fmt, globs=split_csv(glob) or PrepareOptions.globs,
        text_fields=split_csv(text_field) or None, doc_sep=doc_sep, script=script, punct=punct,
        strip_notes=strip_notes, forms=split_csv(form), authors=split_csv(author), min_length=min_length,
        max_length=max_length, dedupe=not keep_duplicates, min_count=min_count, val_fraction=val_fraction,
        split=split, seed=seed, pairs=pairs, augment=split_csv(augment),
    )
    out = output or Path("datasets") / _default_dataset_name(sources or [])
    console = stderr_console(quiet)
    with progress(console, "Preparing") as on_progress:
        report = run_prepare(sources, out, options, force=force, on_progress=on_progress)
    if json_out:
        print_json(report.to_dict())
    elif not quiet:
        _print_prepare_summary(report)


def _print_prepare_summary(report) -> None:
    from rich.console import Console
    from rich.table import Table

    c = report.counts
    out = Console(highlight=False)
    plain = not out.is_terminal
    rows = [
        ("dataset", str(report.output)),
        ("sources", f"{len(report.sources)} file(s), " + ", ".join(sorted({s['kind'] for s in report.sources}))),
        ("documents read", f"{c['documents_read']:,}"),
        ("empty / duplicates", f"{c['empty']:,} / {c['duplicates']:,}"),
        ("filtered out", f"{c['filtered_form'] + c['filtered_author'] + c['filtered_length']:,}"),
        ("documents kept", f"{c['documents']:,}"),
        ("characters", f"{c['characters']:,} ({c['distinct_characters']:,} distinct)"),
        ("vocabulary", f"{report.vocab_size:,} symbols, coverage {report.coverage:.4%}"),
        ("split", report.split + (
            f": train {c['train_documents']:,} docs / val {c['val_documents']:,} docs"
            if c["train_documents"] is not None else ""
        )),
        ("tokens", f"train {c['train_tokens']:,} / val {c['val_tokens']:,}"),
    ]
    if "train_pairs" in c:
        rows.append(("pairs", f"train {c['train_pairs']:,} / val {c['val_pairs']:,} (律诗 middle couplets "
                              f"{c['train_middle_couplets']:,} / {c['val_middle_couplets']:,})"))
        added = [f"{c[f'train_{kind}_pairs']:,} {kind}" for kind in ("reversed", "across")
                 if f"train_{kind}_pairs" in c]
        if added:
            rows.append(("augmented", "training pairs among them: " + ", ".join(added)))
    if plain:
        for k, v in rows:
            typer.echo(f"{k}: {v}")
        return
    table = Table(title="Prepared", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)
