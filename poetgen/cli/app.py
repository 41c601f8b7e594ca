"""The `poetgen` command line: parses flags, calls the library, renders progress. Nothing else lives here.

Heavy modules (torch, numpy, opencc) are imported inside the commands, so `poetgen --help` stays instant.
Every PoetgenError becomes `Error: ...` on stderr and exit code 1; usage errors keep click's exit code 2.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

# PyTorch's CPU kernels run on OpenMP threads that, by default, spin while they wait. On a machine where anything
# else is running, that turns a training step into a 10-30x slowdown (measured on 2 cores with one other busy
# process: 30 steps in 177 s spinning, 7.3 s waiting passively, 5.2 s on one thread). It must be set before torch
# loads its OpenMP runtime, hence here, at import; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's OpenBLAS (what `sample` runs on) spins too: about 0.1 s after each multi-threaded product by default, which
# beside one other busy process made 2-thread sampling 1.6-2x slower than 1 thread and poisoned the steps after it.
# 2**4 cycles instead (measured: the thread tuner of poetgen.model.runtime then lost at most 15% to 1 thread on a busy
# machine and kept its 1.4x gain for 64 streams on idle cores). Read when numpy loads, hence here as well.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

app = typer.Typer(
    name="poetgen",
    help="Train and sample character-level RNN / LSTM / GRU language models, above all for Tang poetry.\n\n"
    "Example:\n\n    poetgen prepare && poetgen train && poetgen sample --form 五绝",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# --- shared plumbing --------------------------------------------------------------------------------------------


def _stderr_console(quiet: bool = False):
    from rich.console import Console

    return Console(stderr=True, quiet=quiet, highlight=False)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `Error: message` on stderr; return the Exit to raise."""
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code)


def handles_errors(func: Callable) -> Callable:
    """Turn the library's own errors into `Error: ...` / exit 1, and Ctrl-C into exit 130, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from poetgen.errors import PoetgenError

        try:
            return func(*args, **kwargs)
        except PoetgenError as e:
            raise fail(str(e)) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted.", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # `poetgen sample | head`: the reader went away; that is not an error of ours.
            try:
                sys.stdout = None  # type: ignore[assignment]
            finally:
                raise typer.Exit(0) from None
        except UnicodeError as e:
            # Text that cannot be text: a lone surrogate from a JSON escape or a command-line argument in no
            # encoding. The readers name the file where they can; this is the backstop.
            raise fail(f"text that is not valid Unicode: {e}") from None
        except OSError as e:
            # A full disk, a read-only or missing directory, an I/O error: the environment's, told plainly.
            raise fail(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")) from None

    return wrapper


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False))


def version_callback(value: bool) -> None:
    if value:
        from poetgen import __version__

        typer.echo(f"poetgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Show the version."),
) -> None:
    """Train and sample character-level RNN / LSTM / GRU language models, above all for Tang poetry."""


# --- prepare ----------------------------------------------------------------------------------------------------


def _split_csv(values: Optional[List[str]]) -> tuple:
    """Options given several times or comma-separated: `--form 五绝 --form 七绝` or `--form 五绝,七绝`."""
    out: list[str] = []
    for v in values or []:
        out.extend(x.strip() for x in v.replace("，", ",").split(",") if x.strip())
    return tuple(out)


def _default_dataset_name(sources: List[str]) -> str:
    if not sources:
        return "bundled"
    first = sources[0]
    if first == "-":
        return "stdin"
    if first.startswith("corpus:"):
        return first.split(":", 1)[1] or "corpus"
    return Path(first.rstrip("/\\")).stem or "corpus"


@app.command()
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
        encoding=encoding, format=fmt, globs=_split_csv(glob) or PrepareOptions.globs,
        text_fields=_split_csv(text_field) or None, doc_sep=doc_sep, script=script, punct=punct,
        strip_notes=strip_notes, forms=_split_csv(form), authors=_split_csv(author), min_length=min_length,
        max_length=max_length, dedupe=not keep_duplicates, min_count=min_count, val_fraction=val_fraction,
        split=split, seed=seed,
    )
    out = output or Path("datasets") / _default_dataset_name(sources or [])
    console = _stderr_console(quiet)
    with _progress(console, "Preparing") as on_progress:
        report = run_prepare(sources, out, options, force=force, on_progress=on_progress)
    if json_out:
        print_json(report.to_dict())
    elif not quiet:
        _print_prepare_summary(report)


class _progress:
    """A Rich progress bar on stderr fed by the library's progress events; nothing when stderr is not a terminal."""

    def __init__(self, console, label: str):
        self.console, self.label = console, label
        self.bar = None

    def __enter__(self):
        if not self.console.is_terminal or self.console.quiet:
            return lambda event: None
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TimeRemainingColumn(), console=self.console, transient=True,
        )
        self.bar.start()
        tasks: dict = {}

        def on_progress(event: dict) -> None:
            stage = event.get("stage", self.label)
            if stage not in tasks:
                tasks[stage] = self.bar.add_task(f"{self.label}: {stage}", total=event.get("total") or None)
            self.bar.update(tasks[stage], completed=event.get("done", 0), total=event.get("total") or None)

        return on_progress

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


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


# --- train ------------------------------------------------------------------------------------------------------

_TRAIN_FLAGS = (  # CLI parameter -> TrainConfig field; only flags actually given override preset and config file
    "cell", "layers", "hidden", "embed", "dropout", "tie_weights", "head", "cutoffs", "div_value", "batch_size",
    "seq_len", "lr", "min_lr_ratio",
    "warmup_steps", "weight_decay", "grad_clip", "max_steps", "max_epochs", "max_time", "eval_every", "patience",
    "save_every", "keep", "sample_every", "log_every", "seed", "device", "precision", "compile", "threads",
)


@app.command()
@handles_errors
def train(
    data: Optional[str] = typer.Argument(
        None, help="A prepared dataset directory, or a raw corpus (prepared on the fly and cached). "
        "None: the bundled corpus (or, with --resume, the run's own dataset).",
    ),
    preset: Optional[str] = typer.Option(
        None, "--preset", "-p",
        help="auto (the default: by --max-time in the reference machine's seconds, scaled by a one-second speed "
        "probe: quick under 100 s, short under 7 min, else small; small for a corpus under 500,000 characters) | "
        "tiny (LSTM 1×128, batch 32×64) | quick (2×128, embed 64, batch 50×50, lr 0.02) | "
        "short (2×256, embed 64, batch 32×64, lr 0.015) | small (2×384, embed 64, batch 64×64, lr 0.01) | "
        "medium (2×512, embed 256, 64×128) | large (3×1024, embed 512, seq 256).",
    ),
    config_file: Optional[Path] = typer.Option(
        None, "--config", "-c", help="TOML file of settings (flat keys named like the flags: batch_size = 32)."
    ),
    name: Optional[str] = typer.Option(None, "--name", help="Run name. Default: <dataset>-<cell>-<date-time>."),
    runs_dir: Path = typer.Option(Path("checkpoints"), "--runs-dir", help="Where run directories are created."),
    resume: Optional[str] = typer.Option(
        None, "--resume", metavar="RUN", help="Continue a run exactly: its directory, its name, or a checkpoint in it."
    ),
    init_from: Optional[str] = typer.Option(
        None, "--init-from", metavar="CKPT", help="Fine-tune from a checkpoint (or run directory) on DATA."
    ),
    map_unknown: bool = typer.Option(
        False, "--map-unknown", help="With --init-from: train characters the checkpoint does not know as <unk>."
    ),
    cell: Optional[str] = typer.Option(None, "--cell", help="rnn (tanh) | lstm | gru."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Stacked recurrent layers."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="Hidden units per layer."),
    embed: Optional[int] = typer.Option(None, "--embed", help="Embedding size."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout on embeddings, between layers, output."),
    tie_weights: Optional[bool] = typer.Option(
        None, "--tie-weights/--no-tie-weights", help="Share the embedding and output matrices (needs embed == hidden)."
    ),
    head: Optional[str] = typer.Option(
        None, "--head", help="Output layer: full softmax | adaptive softmax (cheaper for large vocabularies, "
        "such as Chinese) | auto (adaptive from 4,096 symbols). Default: full.",
    ),
    cutoffs: Optional[str] = typer.Option(
        None, "--cutoffs", metavar="N,N,...", help="Adaptive head: the shortlist size, then the first id of each "
        "further cluster (ids are sorted by frequency), e.g. 1000,4000. Default: from the vocabulary size.",
    ),
    div_value: Optional[float] = typer.Option(
        None, "--div-value", help="Adaptive head: cluster i projects the hidden state to hidden / div^(i+1) (4)."
    ),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Parallel contiguous streams."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Characters per backpropagation window."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak AdamW learning rate."),
    min_lr_ratio: Optional[float] = typer.Option(
        None, "--min-lr-ratio", help="The cosine decay ends at lr × this (default 0.1)."
    ),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup", help="Steps of linear learning-rate warmup."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (not on biases)."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Max global gradient norm; 0 = off."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps; 0 = no limit."),
    max_epochs: Optional[int] = typer.Option(None, "--max-epochs", help="Stop after this many epochs; 0 = no limit."),
    max_time: Optional[str] = typer.Option(
        None, "--max-time", help="Wall-clock budget: seconds or 90s / 10m / 1h30m; the learning rate decays to it."
    ),
    eval_every: Optional[int] = typer.Option(
        None, "--eval-every", help="Steps between evaluations of the whole validation split."
    ),
    patience: Optional[int] = typer.Option(
        None, "--patience", help="Stop after this many evaluations without improvement; 0 = never."
    ),
    save_every: Optional[int] = typer.Option(
        None, "--save-every", help="Steps between saves of last.ckpt; 0 = at every evaluation."
    ),
    keep: Optional[int] = typer.Option(None, "--keep", help="Also keep the N newest step-<k>.ckpt snapshots."),
    sample_every: Optional[int] = typer.Option(
        None, "--sample-every", help="Show a sample line every N evaluations; 0 = never."
    ),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Steps between metrics lines and log lines."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed; a CPU run repeats step for step."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (cuda, mps, cpu) | cpu | cuda | cuda:N | mps."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="auto (bf16 autocast on CUDA, else fp32) | fp32 | bf16 (CUDA, or a CPU with "
        "native bf16: AVX512-BF16 or AMX; there about 1.4x the steps per second for 2x384 and up, each a little "
        "less exact: see the README)."
    ),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch; 0 = torch's default."),
    nproc: Optional[int] = typer.Option(
        None, "--nproc", min=1, metavar="N",
        help="Train with N processes on this machine (one per GPU, or N on the CPU), each reading --batch-size "
        "streams: starts torchrun --standalone --nproc-per-node N with the other arguments.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print parameters, tokens and batches per epoch, estimated memory; then exit."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the final summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Train a character-level RNN / LSTM / GRU language model.

    Truncated backpropagation through time over --batch-size contiguous streams; AdamW with warmup and cosine
    decay; evaluation on the whole validation split; last.ckpt, best.ckpt and metrics.jsonl in
    checkpoints/<run-name>/. Ctrl-C saves and tells you how to resume (exit 130; SIGTERM 143).

    Several processes: `poetgen train --nproc N ...` on one machine, or `torchrun ... -m poetgen train ...`
    (see the README); rank 0 writes the run, and a run resumes with the number of processes it was made with.

    Example:

        poetgen train datasets/tang --preset small --max-time 10m
    """
    from poetgen.training.config import parse_duration

    given = {k: v for k, v in locals().items() if k in _TRAIN_FLAGS and v is not None}
    measured: list[float] = []

    def speed(settings: dict) -> float:
        """Preset auto's view of this machine: a second of the `short` model's training step (poetgen.training.loop)."""
        from poetgen.training.loop import machine_speed

        measured.append(machine_speed(settings.get("device", "auto"), settings.get("threads")))
        return measured[-1]

    def setup_this_run(probe: bool):
        """``probe``: let auto measure this machine's speed. Not with several processes: the ranks could measure
        different speeds and build different models, so auto takes the budget as it is there (speed 1)."""
        from poetgen.training.runs import setup_run

        if isinstance(given.get("max_time"), str):
            given["max_time"] = parse_duration(given["max_time"])
        return setup_run(
            data, preset=preset, config_file=config_file, overrides=given, resume=resume, init_from=init_from,
            runs_dir=runs_dir, name=name, speed=speed if probe else None,
        )

    def plan_for(setup, world: int, local_rank: int | None = None):
        from poetgen.training.loop import make_plan

        source = setup.resume or setup.init_from
        vocab = source.vocab if source else setup.dataset.vocab
        return make_plan(setup.config, setup.dataset, len(vocab), world_size=world, local_rank=local_rank)

    if nproc is not None and nproc > 1 and not dry_run:
        from poetgen.training.distributed import launch, strip_option, under_torchrun

        if under_torchrun():
            raise fail("--nproc starts torchrun itself; leave it out when poetgen is started by torchrun", 2)
        args = sys.argv[1:]
        if "train" not in args:
            raise fail("--nproc needs `poetgen train ...` on the command line", 2)
        # A mistake (a missing corpus, a bad value, a batch the split cannot fill) is told here, once, before
        # torchrun starts: from the workers it would come with torchrun's own failure report after it. A raw
        # corpus is prepared here too, into the cache the workers then read.
        plan_for(setup_this_run(probe=False), nproc)
        raise typer.Exit(launch(nproc, strip_option(args, "--nproc")))

    from poetgen.training.distributed import init_from_env, reported_by_rank0
    from poetgen.errors import PoetgenError

    ctx = init_from_env()  # torchrun's process group; a plain single process otherwise
    console = _stderr_console(quiet or not ctx.is_main)  # only rank 0 shows progress
    world = nproc if dry_run and nproc and not ctx.distributed else ctx.world_size
    try:
        with console.status("Preparing data…") if console.is_terminal and not console.quiet else _nullcontext():
            # Under torchrun every rank sets up (local rank 0 first: it may prepare a raw corpus into the cache);
            # a mistake is reported once, by rank 0.
            setup = ctx.agree_in_turn(lambda: setup_this_run(probe=world == 1))
        if measured and not quiet and ctx.is_main:
            from poetgen.training.config import auto_preset

            budget = setup.config.max_time
            chosen = auto_preset(budget, len(setup.dataset.train), measured[-1])
            typer.echo(f"Preset auto: {chosen} for {budget:g} s on this machine (its training speed "
                       f"{measured[-1]:.2f}x the machine the presets were measured on)", err=True)
        from poetgen.training.loop import catch_signals
        from poetgen.training.loop import train as run_training

        plan = ctx.agree(lambda: plan_for(setup, world, ctx.local_rank if ctx.distributed else None))
        if dry_run:
            if ctx.is_main:
                _print_plan(plan, setup, json_out)
            return
        renderer = _TrainRenderer(console, plan)
        # Under torchrun a worker must not abort halfway on a repeated signal (see catch_signals): keep catching
        # until the end, so torchrun's follow-up SIGTERM cannot cut rank 0's last words short.
        with renderer, catch_signals(abort_on_repeat=not ctx.distributed) as stop:
            result = run_training(
                setup.config, setup.dataset, setup.run_dir, resume=setup.resume, init_from=setup.init_from,
                map_unknown=map_unknown, callbacks=renderer, stop=stop,
            )
            _report_training(result, ctx, json_out, quiet)
    except PoetgenError as e:
        if ctx.rank > 0:  # rank 0 speaks for all; a rank's own trouble is shown with its rank
            if reported_by_rank0(e):
                raise typer.Exit(1) from None
            raise fail(f"[rank {ctx.rank}] {e}") from None
        raise
    finally:
        ctx.close()


def _report_training(result, ctx, json_out: bool, quiet: bool) -> None:
    code = 0
    if result.status == "interrupted":
        code = 143 if result.signal == "SIGTERM" else 130
    if not ctx.is_main:
        raise typer.Exit(code)
    if json_out:
        print_json(result.to_dict())
    if result.status == "interrupted":
        if not ctx.distributed:
            again = f"poetgen train --resume {result.run_dir}"
        elif os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE"):  # one machine
            again = f"poetgen train --nproc {ctx.world_size} --resume {result.run_dir}"
        else:
            again = f"the same torchrun command ({ctx.world_size} processes) with --resume {result.run_dir}"
        typer.echo(
            f"Interrupted by {result.signal or 'a stop request'} at step {result.step}; saved {result.last_checkpoint}.\n"
            f"Resume with: {again}",
            err=True,
        )
        raise typer.Exit(code)
    if not quiet:
        val = (f", best val {result.best_val_loss:.4f} nats ({result.best_val_loss / 0.6931471805599453:.3f} bits/char)"
               if result.best_val_loss is not None else "")
        typer.echo(
            f"Done ({result.status.replace('_', ' ')}) at step {result.step}{val}. "
            f"Checkpoints in {result.run_dir}", err=True,
        )


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _streams_text(plan) -> str:
    if plan.world_size > 1:
        return f"{plan.world_size} processes × {plan.streams // plan.world_size} streams"
    return f"{plan.streams} streams"


def _print_plan(plan, setup, json_out: bool) -> None:
    rows = {
        "run directory": str(setup.run_dir),
        "dataset": str(setup.dataset.path),
        "model": f"{setup.config.cell} {setup.config.layers}×{setup.config.hidden}, embed {setup.config.embed}",
        "parameters": f"{plan.parameters:,}",
        "vocabulary": f"{plan.vocab_size:,} symbols",
        "tokens per epoch": f"{plan.tokens_per_epoch:,} (train split {plan.train_tokens:,}, val {plan.val_tokens:,})",
        "batches per epoch": f"{plan.batches_per_epoch:,} ({_streams_text(plan)} × {setup.config.seq_len} chars)",
        "total steps": f"{plan.total_steps:,}" if plan.total_steps is not None else "until --max-time",
        "estimated memory": _fmt_bytes(plan.estimated_memory_bytes),
        "device": f"{plan.device} ({plan.precision})",
    }
    if json_out:
        print_json({**plan.to_dict(), "run_dir": str(setup.run_dir), "config": setup.config.to_dict()})
        return
    for k, v in rows.items():
        typer.echo(f"{k}: {v}")


class _TrainRenderer:
    """Training callbacks -> a Rich progress bar on a terminal, plain log lines otherwise, nothing when quiet."""

    def __init__(self, console, plan):
        self.console, self.plan = console, plan
        self.quiet = console.quiet
        self.live = console.is_terminal and not self.quiet
        self.bar = None
        self.log_every = 10

    def __enter__(self):
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("step {task.completed:,.0f}/{task.fields[total_text]}"), BarColumn(),
                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=self.console, transient=True,
            )
            self.bar.start()
            total = self.plan.total_steps
            self.task = self.bar.add_task("train", total=total, total_text=f"{total:,}" if total else "?", detail="")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False

    def _print(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(text, highlight=False, markup=False)
        else:
            typer.echo(text, err=True)

    def on_start(self, info: dict) -> None:
        self.log_every = info["config"]["log_every"]
        verb = "Resuming" if info["type"] == "resume" else "Training"
        p = info["plan"]
        procs = f", {p['world_size']} processes" if p.get("world_size", 1) > 1 else ""
        self._print(f"{verb} {info['run_dir']} at step {info['step']}: {p['parameters']:,} parameters, "
                    f"{p['batches_per_epoch']:,} batches/epoch, device {p['device']} ({p['precision']}){procs}")

    def on_step(self, info: dict) -> None:
        val = f"val {info['val_loss']:.3f} ({info['val_bpc']:.3f} bpc)" if info["val_loss"] is not None else "val -"
        detail = (f"loss {info['smooth_loss']:.3f} | {val} | {info['chars_per_sec']:,.0f} chars/s | "
                  f"lr {info['lr']:.2e} | eta {_fmt_time(info['eta'])}")
        if self.bar is not None:
            self.bar.update(self.task, completed=info["step"], detail=detail)
        elif info["step"] % self.log_every == 0:
            total = f"/{info['total_steps']:,}" if info["total_steps"] else ""
            self._print(f"step {info['step']:,}{total} | epoch {info['epoch']:.2f} | {detail}")

    def on_eval(self, info: dict) -> None:
        mark = " (best)" if info["best"] else ""
        self._print(f"eval at step {info['step']:,}: val loss {info['val_loss']:.4f} nats, "
                    f"{info['val_bpc']:.4f} bits/char{mark}")

    def on_sample(self, step: int, text: str) -> None:
        self._print(f"sample at step {step:,}: " + text.replace("\n", " ⏎ "))

    def on_checkpoint(self, path, kind: str) -> None:
        pass


# --- sample -----------------------------------------------------------------------------------------------------


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


@app.command()
@handles_errors
def sample(
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c",
        help="Checkpoint file or run directory. Default: the best checkpoint of the newest run in ./checkpoints.",
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
        1.0, "--repetition-penalty", help="Divide the probability of characters already used by this (punctuation exempt)."
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
        help="Even lines end in level-toned (平) characters of one rhyme group. Approximation: modern Mandarin "
        "readings from pypinyin, tones 1-2 as level, the 14 groups of 中华新韵 — not the Tang-era 平水韵.",
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
        "and on more (more help big batches on idle cores; 1 is faster for one stream or on a busy machine).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Say nothing on stderr but errors."),
) -> None:
    """Generate text from a trained model: many samples in one batch, or Tang poems in guaranteed form.

    Samples are separated by blank lines, poems shown one couplet per line. Prime characters the model does not
    know are an error, unless converting between simplified and traditional (the model's script) fixes them.

    Example:

        poetgen sample --form 七绝 --acrostic 春夏秋冬 --rhyme -n 5 --seed 1
    """
    if stream and (json_out or num_samples != 1 or primes_file is not None):
        raise typer.BadParameter("--stream prints one sample as text: use it without --json, -n or --primes-file")
    primes = _read_primes(prime, primes_file)
    if output_script is not None and output_script not in ("simplified", "traditional"):
        raise typer.BadParameter(f"--output-script must be simplified or traditional, not {output_script!r}")

    # On the CPU, sampling runs on numpy (poetgen.model.runtime) and never imports torch, which alone takes seconds.
    from poetgen.checkpoint.format import find_checkpoint
    from poetgen.model.runtime import load_runtime, torch_gpu_build
    from poetgen.generation.sample import SampleOptions, generate

    note = (lambda msg: None) if quiet else (lambda msg: typer.echo(msg, err=True))
    path = find_checkpoint(checkpoint if checkpoint is not None else "checkpoints")
    note(f"Checkpoint: {path}")
    if threads is not None and threads < 1:
        raise typer.BadParameter(f"--threads must be at least 1, got {threads}")
    options = SampleOptions(
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, length=length,
        num_samples=num_samples, seed=seed, form=form, acrostic=acrostic, line_length=line_length, rhyme=rhyme,
        style=style, output_script=output_script,
    )
    options.validate()  # before the load: a bad value is reported at once
    on_cpu = device == "cpu" or (device == "auto" and not torch_gpu_build())
    if not on_cpu:  # a GPU (or an unknown device name, refused here): the torch model steps on it
        import torch

        from poetgen.checkpoint.torch_io import load_model
        from poetgen.model.devices import resolve_device

        torch_device = resolve_device(device)
        on_cpu = torch_device.type == "cpu"
        if not on_cpu:
            if threads is not None:
                torch.set_num_threads(threads)
            model, ckpt = load_model(path, torch_device)
            vocab = ckpt.vocab
    if on_cpu:
        model = load_runtime(path)
        vocab = model.vocab

    out = None
    if stream:  # the only case where the file must be open before generation
        out = output.open("w", encoding="utf-8") if output is not None else None
    try:
        shown = [""]

        def show(piece: str) -> None:
            piece = re.sub(r"([。？！])", "\\1\n", piece)
            (out.write if out is not None else sys.stdout.write)(piece)
            if out is None:
                sys.stdout.flush()
            shown[0] = piece or shown[0]

        result = generate(model, vocab, primes, options, on_text=show if stream else None, threads=threads)
        for n in result.notes:
            note(f"Note: {n}")
        if stream:
            if not shown[0].endswith("\n"):
                (out.write if out is not None else sys.stdout.write)("\n")
        else:
            if json_out:
                settings = result.options | {"checkpoint": str(path)}
                settings.pop("seed", None)
                text = "".join(
                    json.dumps({"prime": s.prime, "text": s.text, "settings": settings, "seed": result.seed,
                                "mean_logprob": round(s.mean_logprob, 6), "tokens": s.tokens, "ended": s.ended},
                               ensure_ascii=False) + "\n"
                    for s in result.samples
                )
            else:
                text = "\n\n".join(poem_display(s.text) for s in result.samples) + "\n"
            if output is not None:
                output.write_text(text, encoding="utf-8")
            else:
                typer.echo(text, nl=False)
    finally:
        if out is not None:
            out.close()
    if output is not None:
        note(f"Wrote {len(result.samples)} sample(s) to {output}")
    if seed is None:
        note(f"Seed: {result.seed}")


# --- eval -------------------------------------------------------------------------------------------------------

_TONE_NOTE = ("tones and rhymes are the modern-Mandarin approximation (pypinyin readings, tones 1-2 level, "
              "中华新韵 groups), not the Tang-era 平水韵")


@app.command(name="eval")
@handles_errors
def eval_(
    checkpoints: Optional[List[str]] = typer.Argument(
        None, help="Checkpoint files or run directories; several give one comparison table."
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
        None, "--form", "-f", help="Form of the generated poems (五绝 七绝 五律 七律); also the declared form they are judged by."
    ),
    rhyme: bool = typer.Option(False, "--rhyme", help="Generate with the rhyme constraint (needs --form)."),
    prime: Optional[str] = typer.Option(None, "--prime", "-p", help="Text every generated sample starts from."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="Sampling temperature; 0 is greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k likeliest symbols only."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling threshold."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the samples. Default: random (reported)."),
    save_samples: Optional[Path] = typer.Option(
        None, "--save-samples", help="Also write the generated poems as JSONL (re-measure them with --poems)."
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
    the training split, distinct-1/-2 and repeated characters. Tones and rhymes are the modern-Mandarin
    approximation (pypinyin, 中华新韵), not the Tang-era 平水韵.

    Example:

        poetgen eval checkpoints/tang-lstm --samples 50 --form 五绝 --seed 1
    """
    if not checkpoints and poems is None:
        raise typer.BadParameter("give at least one CHECKPOINT, or --poems FILE")
    if samples and not checkpoints:
        raise typer.BadParameter("--samples needs a CHECKPOINT to generate from")
    if data and not checkpoints:
        raise typer.BadParameter("--data is scored by a model: give a CHECKPOINT")
    if no_loss and not samples and poems is None:
        raise typer.BadParameter("--no-loss leaves nothing to measure: add --samples N or --poems FILE")
    if split not in ("val", "train"):
        raise typer.BadParameter(f"--split must be val or train, not {split!r}")
    if rhyme and not form:
        raise typer.BadParameter("--rhyme needs --form")

    from poetgen.evaluation.poems import Poem, evaluate_poems, read_poems

    console = _stderr_console(quiet)
    note = (lambda msg: None) if quiet else (lambda msg: typer.echo(msg, err=True))
    model_reports, poem_reports = [], []
    indexes: dict = {}
    generated: list[dict] = []

    def index_for(ckpt):
        """The copy-rate index of a checkpoint's training split, built once per dataset; None if it is gone."""
        from poetgen.errors import DatasetError
        from poetgen.evaluation.scoring import checkpoint_dataset
        from poetgen.evaluation.poems import TrainingIndex

        try:
            ds = checkpoint_dataset(ckpt.dataset_meta)
        except DatasetError as e:
            note(f"Note: no copy rate for {ckpt.path}: {e}")
            return None
        key = str(ds.path.resolve())
        if key not in indexes:
            indexes[key] = TrainingIndex(ds.train, ds.vocab)
        return indexes[key]

    loaded = []
    if checkpoints:
        import torch

        from poetgen.checkpoint.torch_io import find_checkpoint, load_model
        from poetgen.model.devices import resolve_device
        from poetgen.evaluation.scoring import evaluate_model

        if threads is not None:
            torch.set_num_threads(threads)
        torch_device = resolve_device(device)
        for c in checkpoints:
            model, ckpt = load_model(find_checkpoint(c), torch_device)
            loaded.append((model, ckpt))
            if no_loss:
                continue
            with _progress(console, "Scoring") as on_progress:
                report = evaluate_model(
                    model, ckpt, data, split=split, streams=streams, warmup=warmup, encoding=encoding,
                    doc_sep=doc_sep, text_fields=_split_csv(text_field) or None, on_progress=on_progress,
                )
            model_reports.append(report)

    if samples:
        from poetgen.poetry.forms import parse_form
        from poetgen.generation.sample import SampleOptions, generate

        declared = parse_form(form).name if form else None
        for model, ckpt in loaded:
            options = SampleOptions(temperature=temperature, top_k=top_k, top_p=top_p, num_samples=samples,
                                    seed=seed, form=form, rhyme=rhyme)
            result = generate(model, ckpt.vocab, [prime or ""], options)
            if seed is None:
                note(f"Seed of the samples of {ckpt.path}: {result.seed}")
            texts = [s.text for s in result.samples]
            generated.extend({"text": t, "form": declared, "checkpoint": str(ckpt.path)} for t in texts)
            report = evaluate_poems([Poem(t, declared) for t in texts], index_for(ckpt))
            poem_reports.append((f"{samples} samples of {ckpt.path}", report))
    if poems is not None:
        index = index_for(loaded[0][1]) if loaded else None
        poem_reports.append((str(poems), evaluate_poems(read_poems(poems), index)))
    if save_samples is not None and generated:
        save_samples.write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generated),
                                encoding="utf-8")
        note(f"Wrote {len(generated)} poem(s) to {save_samples}")

    if json_out:
        print_json({
            "models": [r.to_dict() for r in model_reports],
            "poems": [{"source": label, **r.to_dict()} for label, r in poem_reports],
            "tone_note": _TONE_NOTE if poem_reports else None,
        })
        return
    for r in model_reports:
        for n in r.notes:
            note(f"Note: {r.checkpoint}: {n}")
    if model_reports:
        _print_model_table(model_reports)
    if poem_reports:
        _print_poem_reports(poem_reports)


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1%}"


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
        ("format compliance", _pct(r.format_rate)),
        ("regular poems", f"{r.regular:,} (rhyme and 平仄 measured on these)"),
        ("rhyme rate", _pct(r.rhyme_rate)),
        ("平仄 agreement 2-4-6", _pct(r.tone_246)),
        ("平仄 agreement all positions", _pct(r.tone_full)),
        ("2-4-6 all right", _pct(r.tone_perfect_rate)),
        ("copied lines", f"{_pct(r.copy_line_rate)} of {r.copy_lines_checked:,}" if r.copy_line_rate is not None
         else "- (no training text to compare with)"),
        ("copied 7-grams", f"{_pct(r.copy_ngram_rate)} of {r.copy_ngrams_checked:,}" if r.copy_ngram_rate is not None
         else "- (no training text to compare with)"),
        ("distinct-1 / distinct-2", " / ".join("-" if x is None else f"{x:.3f}" for x in (r.distinct_1, r.distinct_2))),
        ("repeated characters", _pct(r.repeated_char_rate)),
    ]


def _print_poem_reports(reports) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    if not out.is_terminal:
        for label, r in reports:
            typer.echo(f"source: {label}")
            for k, v in _poem_rows(r):
                typer.echo(f"{k}: {v}")
        typer.echo(f"note: {_TONE_NOTE}")
        return
    table = Table(title="Poem metrics")
    table.add_column("")
    for label, _ in reports:
        table.add_column(label, justify="right")
    rows = [_poem_rows(r) for _, r in reports]
    for i, (k, _) in enumerate(rows[0]):
        table.add_row(k, *(row[i][1] for row in rows))
    out.print(table)
    out.print(f"Note: {_TONE_NOTE}.")


# --- plot -------------------------------------------------------------------------------------------------------


@app.command()
@handles_errors
def plot(
    runs: List[str] = typer.Argument(
        ..., help="Run directories, metrics.jsonl files, or a directory of runs (e.g. checkpoints)."
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Write a PNG here (needs matplotlib: pip install 'poetgen[plot]')."
    ),
    title: Optional[str] = typer.Option(None, "--title", help="Title of the PNG."),
    log_y: bool = typer.Option(False, "--log-y", help="Logarithmic loss axis in the PNG."),
    width: int = typer.Option(60, "--width", min=8, help="Columns of the terminal chart."),
    height: int = typer.Option(12, "--height", min=3, help="Rows of the terminal chart."),
) -> None:
    """Training curves: train and validation loss against step, for one or several runs.

    Without --output, a character chart with a sparkline per curve is printed (no extra packages needed);
    with --output, a PNG is written through matplotlib (the optional `plot` extra).

    Example:

        poetgen plot checkpoints/run-a checkpoints/run-b -o curves.png
    """
    from poetgen.evaluation.plot import load_runs, plot_png, render_terminal

    curves = load_runs(runs)
    if output is None:
        typer.echo(render_terminal(curves, width=width, height=height))
        return
    drawn = plot_png(curves, output, title=title, log_y=log_y)
    typer.echo(f"Wrote {output} ({len(drawn)} curve(s) from {len(curves)} run(s))", err=True)


# --- download ---------------------------------------------------------------------------------------------------


@app.command()
@handles_errors
def download(
    corpus: str = typer.Argument("tang", help="Corpus to fetch: tang (全唐诗, poet.tang.0.json … 57000.json)."),
    files: Optional[List[str]] = typer.Option(
        None, "--files", help="Only these files: numbers (0,1000) or names (poet.tang.0.json); repeatable or a,b."
    ),
    mirror: Optional[str] = typer.Option(
        None, "--mirror", metavar="URL",
        help="Base URL (http, https or file) under which the files sit by name. "
        "Default: $POETGEN_MIRROR, else chinese-poetry on GitHub at a pinned commit.",
    ),
    dest: Optional[Path] = typer.Option(
        None, "--dest", help="Folder to write to. Default: <cache>/corpora/<corpus>, where `prepare corpus:tang` looks."
    ),
    retries: int = typer.Option(5, "--retries", min=0, help="Retries per file on timeouts, dropped connections, 5xx."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="Seconds to wait for data before retrying."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, no retry notices, no summary line."),
) -> None:
    """Download a complete corpus into the cache and verify every file against its pinned SHA-256.

    Files that are already there and verify are not fetched again; an interrupted download resumes. The cache is
    $POETGEN_CACHE_DIR, else $XDG_CACHE_HOME/poetgen, else ~/.cache/poetgen.

    Example:

        poetgen download tang && poetgen prepare corpus:tang
    """
    from poetgen.data.download import download_corpus

    console = _stderr_console(quiet)
    with _download_progress(console) as on_progress:
        report = download_corpus(
            corpus, dest=dest, mirror=mirror, files=files or None, retries=retries, timeout=timeout,
            on_progress=on_progress,
        )
    if json_out:
        print_json(report.to_dict())
    elif not quiet:
        typer.echo(
            f"{report.corpus}: {report.verified} file(s) verified in {report.dest} ({len(report.downloaded)} "
            f"downloaded, {len(report.skipped)} already present, {report.bytes / 1e6:.1f} MB received)"
        )


class _download_progress:
    """Renders download events: a Rich bar (files, and bytes of the current file) on stderr when it is a terminal;
    otherwise only retry notices, as plain lines. Nothing at all when quiet."""

    def __init__(self, console):
        self.console = console
        self.bar = None

    def __enter__(self):
        console = self.console
        if console.quiet:
            return None
        if not console.is_terminal:
            def plain(event: dict) -> None:
                if event["event"] == "retry":
                    typer.echo(_retry_notice(event), err=True)

            return plain
        from rich.progress import BarColumn, Progress, TextColumn

        self.bar = bar = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
            console=console, transient=True,
        )
        bar.start()
        tasks: dict = {}

        def on_progress(event: dict) -> None:
            if not tasks:
                tasks["files"] = bar.add_task("files", total=event["files"], detail=f"0/{event['files']}")
                tasks["file"] = bar.add_task("", total=None, detail="")
            kind = event["event"]
            if kind == "retry":
                bar.console.print(_retry_notice(event), highlight=False)
            elif kind in ("start", "progress"):
                done, total = event["bytes_done"], event["bytes_total"]
                detail = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
                bar.update(tasks["file"], description=event["file"], completed=done, total=total, detail=detail)
            elif kind in ("done", "skip"):
                bar.update(tasks["files"], completed=event["index"], detail=f"{event['index']}/{event['files']}")

        return on_progress

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def _retry_notice(event: dict) -> str:
    return f"retrying {event['file']} in {event['delay']:.1f} s (attempt {event['attempt']} failed: {event['error']})"


def main() -> None:
    try:
        app()
    except BaseException as e:
        # A torchrun worker leaves without the interpreter's finalisation (see poetgen.training.distributed.leave). That
        # module is loaded only by commands that may join a process group: other commands pay nothing here.
        dist = sys.modules.get("poetgen.training.distributed")
        if dist is None or not dist.joined():
            raise
        dist.leave(_exit_status(e))


def _exit_status(e: BaseException) -> int:
    """The exit status Python itself would give for ``e`` escaping the program (and what it would print)."""
    if isinstance(e, SystemExit):
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    import traceback

    traceback.print_exception(e)
    return 1


if __name__ == "__main__":
    main()
