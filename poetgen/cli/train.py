"""`poetgen train`: one run, or N processes under torchrun (poetgen.training)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from poetgen.cli.common import fail, fmt_bytes, fmt_time, handles_errors, print_json, status, stderr_console
from poetgen.evaluation.units import LN2
from poetgen.model.config import ATTENTIONS, AUTO_HEAD_MIN_VOCAB, DEFAULT_ATTENTION
from poetgen.paths import RUNS_DIR
from poetgen.training.config import BF16_MIN_GAIN, BF16_MIN_HIDDEN, FIELD_NAMES, preset_help


@handles_errors
def train(
    data: Optional[str] = typer.Argument(
        None, help="A prepared dataset directory, or a raw corpus (prepared on the fly and cached). "
        "None: the bundled corpus (or, with --resume, the run's own dataset).",
    ),
    preset: Optional[str] = typer.Option(
        None, "--preset", "-p",
        help=preset_help(),
    ),
    config_file: Optional[Path] = typer.Option(
        None, "--config", "-c", help="TOML file of settings (flat keys named like the flags: batch_size = 32)."
    ),
    name: Optional[str] = typer.Option(None, "--name", help="Run name. Default: <dataset>-<cell>-<date-time>."),
    runs_dir: Path = typer.Option(RUNS_DIR, "--runs-dir", help="Where run directories are created."),
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
    weight_drop: Optional[float] = typer.Option(
        None, "--weight-drop", help="DropConnect on the recurrent matrices while training (AWD-LSTM): a share of "
        "their weights zeroed, one mask per step (0: off, the default; 0.2-0.5 against overfitting)."
    ),
    embed_dropout: Optional[float] = typer.Option(
        None, "--embed-dropout", help="Drop whole characters from the embedding while training: a share of the "
        "vocabulary unknown for a step (0: off, the default; 0.1 hurt on Tang poems, whose rare characters it hides "
        "whole)."
    ),
    attention: Optional[str] = typer.Option(
        None, "--attention", metavar="dot|additive",
        help="A pair dataset's encoder-decoder (对句) only: dot (multiplicative, Luong's) or additive (Bahdanau's) "
        f"attention over the first line. Default: {DEFAULT_ATTENTION}.",
    ),
    tie_weights: Optional[bool] = typer.Option(
        None, "--tie-weights/--no-tie-weights", help="Share the embedding and output matrices (needs embed == hidden)."
    ),
    head: Optional[str] = typer.Option(
        None, "--head", help="Output layer: full softmax | adaptive softmax (cheaper for large vocabularies, "
        f"such as Chinese) | auto (the default: adaptive from {AUTO_HEAD_MIN_VOCAB:,} symbols).",
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
        None, "--precision", help="auto (the default: bf16 autocast on CUDA; on a CPU with native bf16, AVX512-BF16 "
        f"or AMX, bf16 when a probe of this run's model measures a step at least {BF16_MIN_GAIN:g}x faster, else "
        f"fp32; no probe below --hidden {BF16_MIN_HIDDEN} or under torchrun) | fp32 | bf16 (CUDA, or a CPU with native "
        "bf16). See the README."
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
    """Train a character-level RNN / LSTM / GRU language model (on a pair dataset: the 对句 encoder-decoder).

    Truncated backpropagation through time over --batch-size contiguous streams; AdamW with warmup and cosine
    decay; evaluation on the whole validation split; last.ckpt, best.ckpt and metrics.jsonl in
    checkpoints/<run-name>/. Ctrl-C saves and tells you how to resume (exit 130; SIGTERM 143).

    Several processes: `poetgen train --nproc N ...` on one machine, or `torchrun ... -m poetgen train ...`
    (see the README); rank 0 writes the run, and a run resumes with the number of processes it was made with.

    Example:

        poetgen train datasets/tang --preset small --max-time 10m
    """
    from poetgen.errors import PoetgenError
    from poetgen.training.distributed import init_from_env, reported_by_rank0
    from poetgen.training.session import Session, TrainRequest

    if attention is not None and attention not in ATTENTIONS:
        raise typer.BadParameter(f"--attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    given = {k: v for k, v in locals().items() if k in FIELD_NAMES and v is not None}
    request = TrainRequest(data, preset, config_file, given, resume, init_from, runs_dir, name, map_unknown,
                           attention=attention)
    if nproc is not None and nproc > 1 and not dry_run:
        raise typer.Exit(_launch(request, nproc))
    ctx = init_from_env()  # torchrun's process group; a plain single process otherwise
    console = stderr_console(quiet or not ctx.is_main)  # only rank 0 shows progress
    session = Session(request, ctx, nproc if dry_run and nproc and not ctx.distributed else ctx.world_size)
    try:
        with status(console, "Preparing data…"):
            setup = session.open()
        _check_flags(request, setup, ctx.is_main)
        if session.preset_note() and not quiet and ctx.is_main:
            typer.echo(session.preset_note(), err=True)
        plan = session.plan()
        if dry_run:
            if ctx.is_main:
                _print_plan(plan, setup, json_out)
            return
        from poetgen.training.loop import catch_signals

        # Under torchrun a worker must not abort halfway on a repeated signal (see catch_signals): keep catching
        # until the end, so torchrun's follow-up SIGTERM cannot cut rank 0's last words short.
        with _TrainRenderer(console, plan) as renderer, catch_signals(abort_on_repeat=not ctx.distributed) as stop:
            _report_training(session.run(renderer, stop), ctx, json_out, quiet)
    except PoetgenError as e:
        if ctx.rank > 0:  # rank 0 speaks for all; a rank's own trouble is shown with its rank
            if reported_by_rank0(e):
                raise typer.Exit(1) from None
            raise fail(f"[rank {ctx.rank}] {e}") from None
        raise
    finally:
        ctx.close()


def _launch(request, nproc: int) -> int:
    """`--nproc N`: check the run as its workers will (a mistake is one `Error:` line, and torchrun never starts),
    then start torchrun with this command line minus --nproc; -> torchrun's exit status."""
    from poetgen.training.distributed import launch, strip_option, under_torchrun
    from poetgen.training.session import check_launch

    if under_torchrun():
        raise fail("--nproc starts torchrun itself; leave it out when poetgen is started by torchrun", 2)
    args = sys.argv[1:]
    if "train" not in args:
        raise fail("--nproc needs `poetgen train ...` on the command line", 2)
    _check_flags(request, check_launch(request, nproc))
    return launch(nproc, strip_option(args, "--nproc"))


def _check_flags(request, setup, speaks: bool = True) -> None:
    """Usage errors that need the dataset (exit 2; under torchrun rank 0 says it, the others just stop)."""
    if request.attention is not None and not setup.dataset.is_pairs:
        if not speaks:
            raise typer.Exit(2)
        raise typer.BadParameter(f"--attention is for a pair dataset (prepare --pairs: the 对句 encoder-decoder); "
                                 f"{setup.dataset.path} holds text")
    lm_only = [f"--{k.replace('_', '-')}" for k in ("weight_drop", "embed_dropout") if request.overrides.get(k)]
    if lm_only and setup.dataset.is_pairs:
        if not speaks:
            raise typer.Exit(2)
        raise typer.BadParameter(f"{' and '.join(lm_only)} {'apply' if len(lm_only) > 1 else 'applies'} to the "
                                 f"language model; {setup.dataset.path} holds pairs, whose encoder-decoder has "
                                 "--dropout")


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
            f"Interrupted by {result.signal or 'a stop request'} at step {result.step}; "
            f"saved {result.last_checkpoint}.\n"
            f"Resume with: {again}",
            err=True,
        )
        raise typer.Exit(code)
    if not quiet:
        val = (f", best val {result.best_val_loss:.4f} nats ({result.best_val_loss / LN2:.3f} bits/char)"
               if result.best_val_loss is not None else "")
        typer.echo(
            f"Done ({result.status.replace('_', ' ')}) at step {result.step}{val}. "
            f"Checkpoints in {result.run_dir}", err=True,
        )


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
        "estimated memory": fmt_bytes(plan.estimated_memory_bytes),
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
                  f"lr {info['lr']:.2e} | eta {fmt_time(info['eta'])}")
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
