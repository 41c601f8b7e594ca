"""Training curves: metrics.jsonl parsing, the terminal chart (always), the PNG (only with matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from poetgen.cli.app import app
from poetgen.evaluation.plot import (
    MARKERS, Curves, PlotError, chart_grid, find_metrics, load_runs, plot_png, read_metrics, render_terminal,
    sparkline,
)

runner = CliRunner()


def _write_run(run: Path, train: list[tuple[int, float]], val: list[tuple[int, float]]) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    recs = [{"type": "start", "step": 0, "config": {}}]
    recs += [{"type": "train", "step": s, "loss": v, "smooth_loss": v + 1} for s, v in train]
    recs += [{"type": "eval", "step": s, "val_loss": v, "best": True} for s, v in val]
    recs.sort(key=lambda r: r["step"])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return run


TRAIN = [(10, 4.0), (20, 3.0), (30, 2.5), (40, 2.0)]
VAL = [(20, 3.2), (40, 2.6)]


def test_read_metrics_takes_train_and_eval_records(tmp_path: Path):
    run = _write_run(tmp_path / "a", TRAIN, VAL)
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"type": "train", "step": 40, "loss": 1.9}) + "\n")  # resumed: the step again
        f.write(json.dumps({"step": 50, "train_loss": 1.8, "val_loss": None}) + "\n")  # untyped keys
        f.write(json.dumps({"step": 50, "val_loss": 2.4}) + "\n")
        f.write(json.dumps({"type": "train", "step": 60, "loss": float("nan")}) + "\n")  # not finite: skipped
        f.write('{"type": "train", "step": 70, "lo')  # cut short by a crash
    c = read_metrics(run)
    assert c.name == "a"
    assert c.train == [(10, 4.0), (20, 3.0), (30, 2.5), (40, 1.9), (50, 1.8)]
    assert c.val == [(20, 3.2), (40, 2.6), (50, 2.4)]
    assert read_metrics(run / "metrics.jsonl").train == c.train


def test_find_metrics_expands_a_directory_of_runs(tmp_path: Path):
    _write_run(tmp_path / "runs" / "b", TRAIN, VAL)
    _write_run(tmp_path / "runs" / "a", TRAIN, [])
    (tmp_path / "runs" / "empty").mkdir()
    assert [p.parent.name for p in find_metrics([tmp_path / "runs"])] == ["a", "b"]
    with pytest.raises(PlotError, match="not found"):
        find_metrics([tmp_path / "nope"])
    with pytest.raises(PlotError, match="no metrics.jsonl"):
        find_metrics([tmp_path / "runs" / "empty"])
    (tmp_path / "runs" / "c").mkdir()
    (tmp_path / "runs" / "c" / "metrics.jsonl").write_text('{"type": "start", "step": 0}\n')
    with pytest.raises(PlotError, match="no loss values"):
        load_runs([tmp_path / "runs" / "c"])


def test_sparkline_by_hand():
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"  # (x - 1) / 2 * 7 -> 7, 3.5 -> 4, 0
    assert sparkline([1.0, 1.0]) == "▁▁"
    # ten buckets of ten: means 4.5, 14.5, ... 94.5 -> levels round(i * 7 / 9) = 0 1 2 2 3 4 5 5 6 7
    assert sparkline(list(range(100)), width=10) == "▁▂▃▃▄▅▆▆▇█"
    assert sparkline([]) == ""


def test_chart_places_points_where_they_belong():
    grid, ranges = chart_grid([("t", TRAIN), ("v", VAL)], width=31, height=11)
    assert ranges == (10, 40, 2.0, 4.0)
    rows = ["".join(r) for r in grid]
    assert rows[0][0] == MARKERS[0]  # (10, 4.0): left, top
    assert rows[10][30] == MARKERS[0]  # (40, 2.0): right, bottom
    assert rows[8][20] == MARKERS[0]  # (30, 2.5): column (30-10)/30*30 = 20, row (4-2.5)/2*10 = 7.5 -> 8
    assert rows[4][10] == MARKERS[1] and rows[7][30] == MARKERS[1]  # val (20, 3.2) and (40, 2.6)


def test_render_terminal_has_axes_legend_and_summaries():
    text = render_terminal([Curves("run1", TRAIN, VAL)], width=30, height=6)
    lines = text.splitlines()
    assert lines[0].startswith("loss (nats/char) against step, 1 run(s)")
    assert lines[1].startswith("4.000 │") and lines[6].startswith("2.000 │")
    assert "10" in lines[8] and lines[8].rstrip().endswith("40")
    assert f"{MARKERS[0]} run1 train: 4.000 → 2.000 (2.885 bits/char), min 2.000 at step 40" in text
    assert f"{MARKERS[1]} run1 val: 3.200 → 2.600" in text
    with pytest.raises(PlotError):
        render_terminal([Curves("empty")])


def test_png_is_valid_and_holds_the_curves(tmp_path: Path):
    pytest.importorskip("matplotlib")
    runs = [Curves("a", TRAIN, VAL), Curves("b", [(5, 5.0), (15, 4.5)], [])]
    out = tmp_path / "sub" / "curves.png"
    drawn = plot_png(runs, out, title="test")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert drawn == {
        "a train": ([10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.5, 2.0]),
        "a val": ([20.0, 40.0], [3.2, 2.6]),
        "b train": ([5.0, 15.0], [5.0, 4.5]),
    }


def test_cli_plot_terminal_and_png(tmp_path: Path):
    run = _write_run(tmp_path / "run1", TRAIN, VAL)
    r = runner.invoke(app, ["plot", str(run), "--width", "20", "--height", "4"])
    assert r.exit_code == 0, r.output
    assert "run1 train: 4.000 → 2.000" in r.stdout
    r = runner.invoke(app, ["plot", str(tmp_path / "missing")])
    assert r.exit_code == 1 and r.stderr.startswith("Error: run not found")
    pytest.importorskip("matplotlib")
    r = runner.invoke(app, ["plot", str(run), "-o", str(tmp_path / "c.png")])
    assert r.exit_code == 0 and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_png_without_matplotlib_says_how_to_get_it(tmp_path: Path, monkeypatch):
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... now raises ImportError
    with pytest.raises(PlotError, match=r"pip install 'poetgen\[plot\]'"):
        plot_png([Curves("a", TRAIN, VAL)], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
