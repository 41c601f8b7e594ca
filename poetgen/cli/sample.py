"""`poetgen sample`: poems and text from a model (poetgen.generation)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from poetgen.cli import couplet
from poetgen.cli.common import handles_errors


def _read_primes(prime: Optional[str], primes_file: Optional[Path]) -> list:
    from poetgen.errors import SampleError

    if prime is not None and primes_file is not None:
        raise typer.BadParameter("give --prime or --primes-file, not both")
    if primes_file is not None:
        try:
            lines = primes_file.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SampleError(f"cannot read primes file {primes_file}: {e}") from None
        primes = [line for line in lines if line.strip()]
        if not primes:
            raise SampleError(f"primes file {primes_file} has no primes (one per line)")
        return primes
    if prime == "-":
        return [sys.stdin.read().rstrip("\r\n")]
    return [prime or ""]


def poem_display(text: str) -> str:
    """Break the line after each 。？！ (one couplet per line); other text is left as it is."""
    return re.sub(r"([。？！])(?!\n|$)", "\\1\n", text).rstrip()


@handles_errors
def sample(
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c",
        help="Checkpoint file, run directory, or the name of a shipped model (tang). Default: the best checkpoint of "
        "the newest run in ./checkpoints, else the shipped model.",
    ),
    prime: Optional[str] = typer.Option(None, "--prime", "-p", help="Text to start from; `-` reads it from stdin."),
    primes_file: Optional[Path] = typer.Option(
        None, "--primes-file", help="A file of primes, one per line, all sampled in one batch."
    ),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="Higher is bolder; 0 is greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k likeliest symbols only."),
    top_p: Optional[float] = typer.Option(
        None, "--top-p", help="Sample among the likeliest symbols whose probabilities add up to p (nucleus)."
    ),
    repetition_penalty: float = typer.Option(
        1.0, "--repetition-penalty",
        help="Divide the probability of characters already used by this (punctuation exempt).",
    ),
    length: Optional[int] = typer.Option(
        None, "--length", "-l", help="Most characters to generate per sample (default 500; a poem form sets its own)."
    ),
    num_samples: int = typer.Option(1, "--num-samples", "-n", help="Samples per prime (one batch in all)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Same seed and settings, same output. Default: random."),
    stream: bool = typer.Option(False, "--stream", help="Print the sample character by character as it is written."),
    form: Optional[str] = typer.Option(
        None, "--form", "-f", help="Poem form, guaranteed: 五绝 七绝 五律 七律 (or wujue qijue wulv qilv, 5jue ... 7lv)."
    ),
    acrostic: Optional[str] = typer.Option(
        None, "--acrostic", "-a",
        help="藏头诗: line i starts with the i-th character. Without --form there is one line per character.",
    ),
    line_length: Optional[int] = typer.Option(
        None, "--line-length", help="5 or 7 characters per line for --acrostic without --form (default 7)."
    ),
    style: Optional[str] = typer.Option(
        None, "--style", help="Hidden prefix, e.g. a line of verse: sets the mood, is not printed."
    ),
    rhyme: bool = typer.Option(
        False, "--rhyme",
        help="Even lines end in level-toned (平) characters of one rhyme group of the rhyme book (with --tones, the "
        "first line too when its pattern rhymes it); the first rhyme drawn fixes the group.",
    ),
    rhyme_book: str = typer.Option(
        "pingshui", "--rhyme-book", metavar="pingshui|xinyun",
        help="pingshui: the 平水韵 of Tang verse (106 groups; 上, 去 and the entering 入 tone oblique). xinyun: today's "
        "rule, 中华新韵 (modern Mandarin readings from pypinyin, tones 1-2 level, 14 groups).",
    ),
    rhyme_group: Optional[str] = typer.Option(
        None, "--rhyme-group", metavar="G", help="Rhyme in this level group: 东 or 上平一东 (pingshui), 唐 (xinyun)."
    ),
    tones: bool = typer.Option(
        False, "--tones",
        help="格律: follow one of the four regulated tone patterns of 五绝 七绝 五律 七律 (2-4-6 fixed, 粘对, no 孤平, "
        "no 三平尾), the one the model's first choices lead to.",
    ),
    pattern: Optional[str] = typer.Option(
        None, "--pattern", metavar="NAME",
        help="With --tones, this pattern: 仄起首句不入韵, 仄起首句入韵, 平起首句不入韵 or 平起首句入韵.",
    ),
    best_of: int = typer.Option(
        1, "--best-of", metavar="N",
        help="Draw N candidates per sample (one batch) and keep the likeliest (mean log-probability per character), "
        "after dropping those that copy a line of the training text (when it is on this machine) or repeat "
        "characters within a line more than Tang verse does.",
    ),
    beam: int = typer.Option(
        0, "--beam", metavar="K",
        help="Beam search with K hypotheses per prime under the same constraints (deterministic; -n up to K best, "
        "by mean log-probability per character); 0 = sample.",
    ),
    output_script: Optional[str] = typer.Option(
        None, "--output-script", help="Print in simplified or traditional characters (OpenCC)."
    ),
    json_out: bool = typer.Option(
        False, "--json", help="JSON Lines: prime, text, settings, seed, mean_logprob (and tokens, ended)."
    ),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the samples to this file."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:1, mps, or auto (cuda when available)."),
    threads: Optional[int] = typer.Option(
        None, "--threads",
        help="CPU threads for the matrix products. Default: chosen while sampling by timing the steps on 1 thread "
        "and, after half a second of them, on more (more help big batches on idle cores; 1 is faster for one "
        "stream or on a busy machine).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Say nothing on stderr but errors."),
) -> None:
    """Generate text from a trained model: many samples in one batch, or Tang poems in guaranteed form.

    Samples are separated by blank lines, poems shown one couplet per line. Prime characters the model does not
    know are an error, unless converting between simplified and traditional (the model's script) fixes them.

    Example:

        poetgen sample --form 七绝 --acrostic 春夏秋冬 --tones --rhyme -n 5 --seed 1
    """
    if stream and (json_out or num_samples != 1 or primes_file is not None or best_of > 1 or beam):
        raise typer.BadParameter("--stream prints one sample as it is drawn: use it without --json, -n, "
                                 "--primes-file, --best-of or --beam")
    if output_script is not None and output_script not in ("simplified", "traditional"):
        raise typer.BadParameter(f"--output-script must be simplified or traditional, not {output_script!r}")
    if threads is not None and threads < 1:
        raise typer.BadParameter(f"--threads must be at least 1, got {threads}")
    primes = _read_primes(prime, primes_file)
    # On the CPU, sampling runs on numpy (poetgen.generation.engines), never importing torch (seconds by itself).
    from poetgen.checkpoint.format import checkpoint_kind, default_checkpoint, find_checkpoint
    from poetgen.generation.engines import open_model
    from poetgen.generation.sample import SampleOptions, generate

    note = (lambda msg: None) if quiet else (lambda msg: typer.echo(msg, err=True))
    path, fallback = (find_checkpoint(checkpoint), None) if checkpoint is not None else default_checkpoint()
    note(fallback or f"Checkpoint: {path}")
    if checkpoint_kind(path) == "seq2seq":  # 对句: an encoder-decoder answers each prime (poetgen.cli.couplet)
        return couplet.answer_command(path, primes, locals(), note)
    options = SampleOptions(
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, length=length,
        num_samples=num_samples, seed=seed, form=form, acrostic=acrostic, line_length=line_length, rhyme=rhyme,
        rhyme_book=rhyme_book, rhyme_group=rhyme_group, tones=tones, pattern=pattern, style=style,
        output_script=output_script, best_of=best_of, beam=beam,
    )
    options.validate()  # before the load: a bad value is reported at once
    opened = open_model(path, device, threads)
    copies = opened.training_copies() if best_of > 1 or beam else None
    with _Writer(output, stream) as writer:
        result = generate(opened.model, opened.vocab, primes, options, on_text=writer.piece if stream else None,
                          threads=threads, copies=copies)
        for n in result.notes:
            note(f"Note: {n}")
        writer.finish(result.records(str(path)) if json_out else None,
                      None if stream or json_out else [s.text for s in result.samples])
    if output is not None:
        note(f"Wrote {len(result.samples)} sample(s) to {output}")
    if seed is None and not beam:
        note(f"Seed: {result.seed}")


class _Writer:
    """Where samples go: stdout or ``--output``; streamed piece by piece, or written whole at the end."""

    def __init__(self, output: Optional[Path], stream: bool):
        self.output, self.stream = output, stream
        self.file = None
        self.last = ""

    def __enter__(self) -> "_Writer":
        if self.stream and self.output is not None:  # the only case where the file must be open before generation
            self.file = self.output.open("w", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> bool:
        if self.file is not None:
            self.file.close()
        return False

    def _write(self, text: str) -> None:
        if self.file is not None:
            self.file.write(text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    def piece(self, piece: str) -> None:
        piece = re.sub(r"([。？！])", "\\1\n", piece)
        self._write(piece)
        self.last = piece or self.last

    def finish(self, records: Optional[list], texts: Optional[list]) -> None:
        if self.stream:
            if not self.last.endswith("\n"):
                self._write("\n")
            return
        if records is not None:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            text = "\n\n".join(poem_display(t) for t in texts) + "\n"
        if self.output is not None:
            self.output.write_text(text, encoding="utf-8")
        else:
            typer.echo(text, nl=False)
