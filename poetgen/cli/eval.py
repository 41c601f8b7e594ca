"""`poetgen eval`: cross-entropy of models and metrics of poems (poetgen.evaluation)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from poetgen.cli.common import handles_errors, pct, print_json, progress, split_csv, stderr_console


@handles_errors
def eval_(
    checkpoints: Optional[List[str]] = typer.Argument(
        None, help="Checkpoint files, run directories or shipped model names (tang); several give one comparison "
        "table. None: the newest run in ./checkpoints, else the shipped model (unless --poems is given)."
    ),
    data: Optional[List[str]] = typer.Option(
        None, "--data", "-d",
        help="Text to score instead of the checkpoint's own validation split: a dataset directory, or text / JSON / "
        "JSONL / chinese-poetry files and directories (repeatable), encoded with the model's vocabulary.",
    ),
    split: str = typer.Option("val", "--split", help="val | train: which split of a dataset to score."),
    streams: int = typer.Option(32, "--streams", min=1, help="Parallel contiguous streams (speed only)."),
    warmup: int = typer.Option(
        1000, "--warmup", min=0,
        help="Characters before each stream that prime the warm figure (not scored); 0 = cold figure only.",
    ),
    no_loss: bool = typer.Option(False, "--no-loss", help="Skip the cross-entropy; only the poem metrics."),
    encoding: Optional[str] = typer.Option(None, "--encoding", help="Encoding of --data files. Default: detected."),
    doc_sep: str = typer.Option(
        "file", "--doc-sep", help="Documents in plain-text --data: file | blank (blank-line separated) | line."
    ),
    text_field: Optional[List[str]] = typer.Option(
        None, "--text-field", help="JSON field(s) holding the text of --data records (repeatable or a,b)."
    ),
    poems: Optional[Path] = typer.Option(
        None, "--poems", help="JSONL file of poems to measure: records with `paragraphs` or `text` (and `form`)."
    ),
    samples: int = typer.Option(0, "--samples", "-n", min=0, help="Generate N poems per checkpoint and measure them."),
    form: Optional[str] = typer.Option(
        None, "--form", "-f",
        help="Form of the generated poems (五绝 七绝 五律 七律); also the declared form they are judged by.",
    ),
    rhyme: bool = typer.Option(False, "--rhyme", help="Generate with the rhyme constraint (needs --form)."),
    rhyme_book: str = typer.Option(
        "pingshui", "--rhyme-book", metavar="pingshui|xinyun",
        help="The rhyme book the poems are measured by (and generated --rhyme poems rhyme by): pingshui, the 平水韵 "
        "of Tang verse; xinyun, 中华新韵 by modern Mandarin readings.",
    ),
    tones: bool = typer.Option(
        False, "--tones", help="Generate with the regulated tone patterns (格律), as `sample --tones` (needs --form)."
    ),
    prime: Optional[str] = typer.Option(None, "--prime", "-p", help="Text every generated sample starts from."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="Sampling temperature; 0 is greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k likeliest symbols only."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling threshold."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the samples. Default: random (reported)."),
    save_samples: Optional[Path] = typer.Option(
        None, "--save-samples", help="Also write the generated poems as JSONL (re-measure them with --poems)."
    ),
    beam: int = typer.Option(
        4, "--beam", min=0, metavar="K",
        help="对句 (encoder-decoder) models: answer the held-out first lines by beam search with K hypotheses for "
        "BLEU-4, exact match and the length and tone rates (0: greedy); with --tones, under the tone rules.",
    ),
    plot_attention: Optional[Path] = typer.Option(
        None, "--plot-attention", metavar="FILE.png",
        help="对句 models: the attention heat map of one pair (the --prime as a first line, else the split's first), "
        "as a PNG (needs matplotlib).",
    ),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:1, mps, or auto (cuda when available)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch. Default: torch's."),
    json_out: bool = typer.Option(False, "--json", help="Print every figure as one JSON object on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no notes on stderr."),
) -> None:
    """Measure models and poems with exact, labelled numbers.

    Model metrics: mean cross-entropy in nats per character, bits per character (nats / ln 2) and perplexity, over
    EVERY symbol of the checkpoint's validation split (or --data). Two figures: cold, every stream starting from the
    all-zero state, and warm, each stream's state first primed on the --warmup characters before it.

    Poem metrics (on --samples N generated poems or a --poems file): format compliance, rhyme rate, 平仄 agreement
    with the regulated-verse patterns (2-4-6 positions and all positions), copy rate of lines and 7-grams against
    the training split, distinct-1/-2 and repeated characters; also 粘对 violations, 孤平, 三平尾 and regulated
    verse. Tones and rhymes by --rhyme-book: the Tang-era 平水韵 (default) or the modern-Mandarin approximation
    (pypinyin, 中华新韵). Real poems are the reference: add --poems data/poems.jsonl to print them beside the samples.

    Example:

        poetgen eval checkpoints/tang-lstm --samples 50 --form 五绝 --seed 1
    """
    problem = _usage_problem(checkpoints, data, poems, samples, no_loss, split, form, rhyme, tones, rhyme_book)
    if problem:
        raise typer.BadParameter(problem)

    from poetgen.checkpoint.format import default_checkpoint
    from poetgen.evaluation.report import EvalRequest, run_eval, tone_note

    note = (lambda msg: None) if quiet else (lambda msg: typer.echo(msg, err=True))
    if not checkpoints and poems is None:  # the newest run, else the shipped model
        path, fallback = default_checkpoint()
        checkpoints = [str(path)]
        note(fallback or f"Checkpoint: {path}")
    request = EvalRequest(
        checkpoints or (), data, split, streams, warmup, encoding, doc_sep, split_csv(text_field) or None,
        not no_loss, poems, samples, form, rhyme, rhyme_book, tones, prime, temperature, top_k, top_p, seed, device,
        threads, beam, plot_attention,
    )
    with progress(stderr_console(quiet), "Scoring") as on_progress:
        outcome = run_eval(request, on_progress=on_progress)
    if save_samples is not None and outcome.generated:
        outcome.save_generated(save_samples)
        note(f"Wrote {len(outcome.generated)} poem(s) to {save_samples}")
    if json_out:
        print_json(outcome.to_dict())
        return
    for n in outcome.notes:
        note(f"Note: {n}")
    if outcome.couplets:
        _print_couplets(outcome.couplets)
    if outcome.models:
        _print_model_table(outcome.models)
    if outcome.poems:
        _print_poem_reports(outcome.poems, tone_note(rhyme_book))


def _usage_problem(checkpoints, data, poems, samples, no_loss, split, form, rhyme, tones, rhyme_book) -> str | None:
    """What makes this combination of flags meaningless (a usage error, exit 2), or None."""
    if samples and not checkpoints and poems is not None:
        return "--samples needs a CHECKPOINT to generate from"
    if data and not checkpoints and poems is not None:
        return "--data is scored by a model: give a CHECKPOINT"
    if no_loss and not samples and poems is None:
        return "--no-loss leaves nothing to measure: add --samples N or --poems FILE"
    if split not in ("val", "train"):
        return f"--split must be val or train, not {split!r}"
    if (rhyme or (tones and samples)) and not form:
        return f"--{'rhyme' if rhyme else 'tones'} needs --form"
    if rhyme_book not in ("pingshui", "xinyun"):
        return f"--rhyme-book must be pingshui or xinyun, not {rhyme_book!r}"
    return None


def _print_couplets(reports) -> None:
    """对句 models' figures, one "name: value" line each (poetgen.evaluation.couplets)."""
    def rates(label, r) -> list:
        return [(f"{label}same length", f"{pct(r.same_length_rate)} of {r.lines:,}"),
                (f"{label}tones opposed at the end", f"{pct(r.tone_end_rate)} of {r.tone_end_lines:,}"),
                (f"{label}tones opposed at 2-4-6", pct(r.tone_246_rate))]

    for r in reports:
        rows = [("checkpoint", r.checkpoint), ("data", r.data),
                ("cross-entropy", f"{r.nats_per_char:.4f} nats/char over {r.characters:,} answer characters of "
                                  f"{r.pairs:,} pairs (given the first lines)"),
                (f"BLEU-4 (characters, {r.decoding})", f"{r.bleu4:.2f}"), ("exact match", pct(r.exact_match)),
                *rates("", r.rates), *(rates("律诗 middle couplets: ", r.middle) if r.middle else [])]
        for k, v in rows:
            typer.echo(f"{k}: {v}")


def _print_model_table(reports) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    warmups = sorted({r.result.warmup for r in reports})
    cold_label = "cold (all-zero state at each stream start)"
    warm_label = f"warm (state primed on up to {', '.join(f'{w:,}' for w in warmups)} preceding characters)"
    if not out.is_terminal:
        for r in reports:
            typer.echo(f"checkpoint: {r.checkpoint}")
            typer.echo(f"data: {r.data}")
            typer.echo(f"scored: {r.symbols:,} symbols ({r.characters:,} characters + {r.documents:,} end-of-text), "
                       f"{r.unknown:,} unknown, {r.result.streams} streams, {r.seconds:.1f} s")
            for label, score in (("cold", r.result.cold), ("warm", r.result.warm)):
                if score is not None:
                    text = cold_label if label == "cold" else warm_label
                    typer.echo(f"{text}: {score.nats:.4f} nats/char, {score.bits:.4f} bits/char, "
                               f"perplexity {score.perplexity:.3f}")
        return
    table = Table(title="Cross-entropy per character (every symbol scored once)")
    for col in ("checkpoint", "data", "scored", "cold nats", "cold bits", "cold ppl", "warm nats", "warm bits",
                "warm ppl"):
        table.add_column(col, justify="left" if col in ("checkpoint", "data") else "right")
    for r in reports:
        w = r.result.warm
        table.add_row(
            r.checkpoint, r.data, f"{r.symbols:,}" + (f" ({r.unknown:,} unk)" if r.unknown else ""),
            f"{r.result.cold.nats:.4f}", f"{r.result.cold.bits:.4f}", f"{r.result.cold.perplexity:.2f}",
            *((f"{w.nats:.4f}", f"{w.bits:.4f}", f"{w.perplexity:.2f}") if w is not None else ("-", "-", "-")),
        )
    out.print(table)
    out.print(f"{cold_label}; {warm_label}. Scored = characters + end-of-text symbols.")


def _poem_rows(r) -> list:
    forms = ", ".join(f"{k} {v}" for k, v in r.forms.items())
    return [
        ("poems", f"{r.poems:,} ({forms})"),
        ("format compliance", pct(r.format_rate)),
        ("regular poems", f"{r.regular:,} (rhyme and 平仄 measured on these)"),
        ("rhyme rate", pct(r.rhyme_rate)),
        ("平仄 agreement 2-4-6", pct(r.tone_246)),
        ("平仄 agreement all positions", pct(r.tone_full)),
        ("2-4-6 all right", pct(r.tone_perfect_rate)),
        ("all positions right", pct(r.tone_full_perfect_rate)),
        ("粘对 violations", pct(r.nian_dui_rate)),
        ("孤平", pct(r.gu_ping_rate)),
        ("三平尾", pct(r.san_ping_wei_rate)),
        ("regulated (律绝 / 律诗)", pct(r.regulated_rate)),
        ("copied lines", f"{pct(r.copy_line_rate)} of {r.copy_lines_checked:,}" if r.copy_line_rate is not None
         else "- (no training text to compare with)"),
        ("copied 7-grams", f"{pct(r.copy_ngram_rate)} of {r.copy_ngrams_checked:,}" if r.copy_ngram_rate is not None
         else "- (no training text to compare with)"),
        ("distinct-1 / distinct-2", " / ".join("-" if x is None else f"{x:.3f}" for x in (r.distinct_1, r.distinct_2))),
        ("repeated characters", pct(r.repeated_char_rate)),
    ]


def _print_poem_reports(reports, note: str) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    if not out.is_terminal:
        for label, r in reports:
            typer.echo(f"source: {label}")
            for k, v in _poem_rows(r):
                typer.echo(f"{k}: {v}")
        typer.echo(f"note: {note}")
        return
    table = Table(title="Poem metrics")
    table.add_column("")
    for label, _ in reports:
        table.add_column(label, justify="right")
    rows = [_poem_rows(r) for _, r in reports]
    for i, (k, _) in enumerate(rows[0]):
        table.add_row(k, *(row[i][1] for row in rows))
    out.print(table)
    out.print(f"Note: {note}.")
