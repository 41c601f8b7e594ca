"""`poetgen plot`: training curves in the terminal or as a PNG (poetgen.evaluation.plot)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from poetgen.cli.common import handles_errors


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
