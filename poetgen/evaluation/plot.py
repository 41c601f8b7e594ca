"""Training curves: train and validation loss against step, from the metrics.jsonl of one or several runs.

Two renderings of the same series: a PNG through matplotlib (an optional extra: ``pip install 'poetgen[plot]'``;
only the object-oriented Figure API is used, so no GUI backend or global pyplot state is involved), and a small
character chart with sparklines for a terminal, which needs nothing.

metrics.jsonl (written by poetgen.training.loop) holds one JSON object per line; records of ``"type": "train"``
carry the
training loss of that step's batch as ``loss``, records of ``"type": "eval"`` the loss over the whole validation
split as ``val_loss`` (both in nats per character). Lines without a type but with ``train_loss`` / ``val_loss``
keys are read too; a line cut short by a crash is skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from poetgen.errors import PoetgenError
from poetgen.evaluation.units import LN2

METRICS = "metrics.jsonl"
SPARKS = "▁▂▃▄▅▆▇█"
MARKERS = "•o+x*#@%"


class PlotError(PoetgenError):
    """No metrics to plot, or matplotlib missing for a PNG."""


@dataclass
class Curves:
    name: str
    train: list[tuple[int, float]] = field(default_factory=list)  # (step, loss in nats), by step
    val: list[tuple[int, float]] = field(default_factory=list)

    def series(self) -> list[tuple[str, list[tuple[int, float]]]]:
        """(label, points) for each non-empty series, train first."""
        return [(f"{self.name} {kind}", pts) for kind, pts in (("train", self.train), ("val", self.val)) if pts]


def find_metrics(paths: Sequence[str | Path]) -> list[Path]:
    """metrics.jsonl files for the given run directories, metrics files, or directories of runs."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif (p / METRICS).is_file():
            found.append(p / METRICS)
        elif p.is_dir():
            runs = sorted(d / METRICS for d in p.iterdir() if (d / METRICS).is_file())
            if not runs:
                raise PlotError(f"no {METRICS} in {p} or in the run directories under it")
            found.extend(runs)
        else:
            raise PlotError(f"run not found: {p}")
    return found


def read_metrics(path: str | Path, name: str | None = None) -> Curves:
    """The train and val curves of one run (its directory or its metrics.jsonl). A step logged twice (a resumed
    run) keeps its last value."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PlotError(f"no metrics file: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlotError(f"cannot read {p}: {e}") from None
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue
        kind = rec.get("type")
        if kind == "train" or (kind is None and "train_loss" in rec):
            value, target = rec.get("loss", rec.get("train_loss")), train
        elif kind == "eval" or (kind is None and "val_loss" in rec):
            value, target = rec.get("val_loss"), val
        else:
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            target[rec["step"]] = float(value)
    return Curves(name or p.parent.name, sorted(train.items()), sorted(val.items()))


def load_runs(paths: Sequence[str | Path]) -> list[Curves]:
    runs = [read_metrics(p) for p in find_metrics(paths)]
    if not any(r.train or r.val for r in runs):
        raise PlotError("the metrics hold no loss values yet (nothing logged: train longer or lower --log-every)")
    return runs


# --- PNG --------------------------------------------------------------------------------------------------------


def plot_png(
    runs: Sequence[Curves], path: str | Path, *, title: str | None = None, log_y: bool = False
) -> dict[str, tuple[list[float], list[float]]]:
    """Write a PNG of every run's train (thin line) and val (markers) loss against step.

    Returns the series as drawn, read back from the plot's own line objects: label -> (steps, losses).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(
            "a PNG plot needs matplotlib: pip install 'poetgen[plot]' (or leave out --output for a terminal chart)"
        ) from None
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in range(10)]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        if run.train:
            xs, ys = zip(*run.train)
            ax.plot(xs, ys, color=color, linewidth=0.8, alpha=0.6, label=f"{run.name} train")
        if run.val:
            xs, ys = zip(*run.val)
            ax.plot(xs, ys, color=color, linewidth=1.8, marker="o", markersize=3, label=f"{run.name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    if log_y:
        ax.set_yscale("log")
    else:
        ax.secondary_yaxis("right", functions=(lambda x: x / LN2, lambda b: b * LN2)).set_ylabel("bits per character")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return {line.get_label(): ([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
            for line in ax.get_lines()}


# --- terminal -----------------------------------------------------------------------------------------------------


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """One block character per bucket of ``values`` (bucket means), low ▁ to high █; width at most ``width``."""
    if not values:
        return ""
    n = min(width, len(values))
    buckets = [values[i * len(values) // n : (i + 1) * len(values) // n] for i in range(n)]
    means = [sum(b) / len(b) for b in buckets]
    lo, hi = min(means), max(means)
    span = hi - lo
    return "".join(SPARKS[round((m - lo) / span * (len(SPARKS) - 1)) if span > 0 else 0] for m in means)


def chart_grid(
    series: Sequence[tuple[str, list[tuple[int, float]]]], width: int, height: int
) -> tuple[list[list[str]], tuple[float, float, float, float]]:
    """Place each series on a width x height grid of characters (a marker per series, the mean of the points
    that fall in a column); later series draw over earlier ones. Returns the grid (rows top to bottom) and the
    ranges (x0, x1, y0, y1)."""
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    grid = [[" "] * width for _ in range(height)]
    for k, (_, pts) in enumerate(series):
        columns: dict[int, list[float]] = {}
        for x, y in pts:
            col = round((x - x0) / (x1 - x0) * (width - 1)) if x1 > x0 else 0
            columns.setdefault(col, []).append(y)
        for col, vals in columns.items():
            v = sum(vals) / len(vals)
            row = round((y1 - v) / (y1 - y0) * (height - 1)) if y1 > y0 else height - 1
            grid[row][col] = MARKERS[k % len(MARKERS)]
    return grid, (x0, x1, y0, y1)


def render_terminal(runs: Sequence[Curves], width: int = 60, height: int = 12) -> str:
    """A character chart of every series (loss in nats against step), its legend, and one line per series:
    first -> last value, the minimum and where, and a sparkline."""
    series = [s for run in runs for s in run.series()]
    if not series:
        raise PlotError("no loss values to draw")
    width, height = max(width, 8), max(height, 3)
    grid, (x0, x1, y0, y1) = chart_grid(series, width, height)
    labels = {0: f"{y1:.3f}", height - 1: f"{y0:.3f}", (height - 1) // 2: f"{(y0 + y1) / 2:.3f}"}
    pad = max(len(v) for v in labels.values())
    out = [f"loss (nats/char) against step, {len(runs)} run(s)"]
    for r, row in enumerate(grid):
        out.append(f"{labels.get(r, ''):>{pad}} │{''.join(row)}")
    out.append(" " * pad + " └" + "─" * width)
    left, right = f"{x0:,}", f"{x1:,}"
    out.append(" " * (pad + 2) + left + right.rjust(width - len(left)))
    for k, (label, pts) in enumerate(series):
        vals = [y for _, y in pts]
        best = min(pts, key=lambda p: p[1])
        out.append(
            f"{MARKERS[k % len(MARKERS)]} {label}: {vals[0]:.3f} → {vals[-1]:.3f} "
            f"({vals[-1] / LN2:.3f} bits/char), min {best[1]:.3f} at step {best[0]:,}  {sparkline(vals)}"
        )
    return "\n".join(out)
