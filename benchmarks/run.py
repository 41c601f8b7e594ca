"""Issue 7's benchmarks in one command: poetgen side by side with plain-PyTorch baselines measured in the same run.

    python benchmarks/run.py --quick                    # smoke check: every code path, tiny budgets, a few minutes
    python benchmarks/run.py --full                     # the real figures (~40 min); updates benchmarks/RESULTS.md
    python benchmarks/run.py --full --only tang flops   # some groups only (their sections of RESULTS.md alone)
    python benchmarks/run.py --quick --json             # everything as one JSON object on stdout

Groups (--only): shakespeare, tang, flops, sample, prepare. Each prints rows of: target, poetgen's figure, the
anchor's figure measured in the same run, their ratio, and pass/FAIL against the issue's target.

* shakespeare: `poetgen prepare input.txt --split tail --val-fraction 0.1`, then poetgen trained with its default
  settings for 85 s and for 10 min, each scored by `poetgen eval` on its last checkpoint (exact over the whole
  validation split; the "warm" figure: each of 32 streams primed on the 1,000 characters before it). Anchors on
  the same text: char-rnn's default recipe for 85 s (baselines/charrnn.py) and nanoGPT's CPU recipe for 2,000
  iterations (baselines/nanogpt.py), scored exactly over the same validation text. For scale, an info row: the
  default settings given 85 s x 470 / (this machine's oneDNN peak) seconds, the compute the issue's machine has in
  85 s (its oneDNN peak: about 470 GFLOP/s), next to the 85 s run.
* tang: `poetgen prepare ../shared/data/tang --script simplified`, poetgen trained 10 min (commands below), scored
  by `poetgen eval`; anchor: the pytorch-book recipe trained 10 min on the same training poems
  (baselines/pytorch_book.py), scored per real character on the same validation poems. Bits per character and real
  characters trained per second (poetgen: median of its logged training windows, evaluation pauses excluded).
* flops: the best fp32 matrix-multiply rate through oneDNN and through torch.matmul (flops.py peak), a plain
  nn.LSTM 512x2 training loop (baselines/lstm_loop.py) and poetgen's own loop at the same size (`poetgen train
  --max-steps`, characters per second from its metrics.jsonl), as model FLOPs per second over the oneDNN peak. The
  two loops take turns for three rounds (the peak is measured before and after them, the best counts), because a
  shared machine's speed drifts from minute to minute. bf16 autocast against fp32 for poetgen's step (flops.py bf16).
* sample: the rows of benchmarks/bench_sample.py --json (poetgen's sampling speed for an LSTM 256x2 at 1 and 64
  streams next to a plain per-step nn.LSTM sampling loop it times in the same process; whole `poetgen sample`
  and `poetgen --help` calls next to `python -c "import torch"`).
* prepare: `poetgen prepare` on a generated corpus (benchmarks/bench_prepare.py's generator; 1 GB in full mode,
  cached in benchmarks/out/): MB/s and the process's peak resident memory; anchor: reading and decoding the file.

Full mode writes one section per group of RESULTS.md (date, machine, commands, figures), replacing only the groups
that ran. Quick mode prints only; with an explicit --out it writes its own "quick" section, never the full one.
Every process runs with OMP_WAIT_POLICY=PASSIVE and OPENBLAS_THREAD_TIMEOUT=4 (as poetgen's CLI sets for itself)
unless the environment says otherwise, so baselines and poetgen wait for threads alike. Scratch files go to a
temporary directory under benchmarks/out/ (git-ignored), removed at the end unless --keep.
"""

from __future__ import annotations

# ====================================== POETGEN COMMANDS (the lead edits these) ======================================
# What run.py runs on poetgen's side. Placeholders: {shakespeare} = ../shared/data/tinyshakespeare/input.txt,
# {tang} = ../shared/data/tang (quick mode: two of its files), {dataset} = the dataset prepared just before,
# {budget} = BUDGETS[name] for the mode. run.py adds only bookkeeping flags: `-o DIR --json -q` to prepare,
# `--runs-dir DIR --name NAME --json -q` to train, `--json -q` to eval. Anything else here is poetgen's recipe.
POETGEN = {
    "shakespeare-prepare": "prepare {shakespeare} --split tail --val-fraction 0.1",
    "shakespeare-85s": "train {dataset} --max-time {budget}",  # default settings: no other flags (issue 7, target 1)
    "shakespeare-10m": "train {dataset} --max-time {budget}",
    # The same default settings given the compute the issue's machine has in 85 s: 85 s x (its oneDNN peak, about
    # 470 GFLOP/s) / (this machine's, measured in the same group).
    "shakespeare-scaled": "train {dataset} --max-time {budget}",
    "tang-prepare": "prepare {tang} --script simplified",
    "tang-10m": "train {dataset} --max-time {budget}",  # default settings (the adaptive head is automatic here)
    # Throughput at the pytorch-book's model size (embedding 128, LSTM 256 x 2): target 3's "same model size".
    "tang-speed": "train {dataset} --hidden 256 --embed 128 --layers 2 --max-steps {budget} --eval-every 100000 "
                  "--sample-every 0",
    # poetgen's training loop at the throughput benchmark's size (LSTM 512 x 2, embed 512, batch 64, seq 100 in
    # full mode); characters per second are read from metrics.jsonl (one line per step), the first two dropped.
    "flops-step": "train {dataset} --cell lstm --layers {layers} --hidden {hidden} --embed {embed} --dropout 0 "
                  "--no-tie-weights --batch-size {batch} --seq-len {seq} --max-steps {steps} --eval-every 100000 "
                  "--log-every 1 --sample-every 0 --patience 0",
}
# Budgets: (full, quick). poetgen's as --max-time values; the baselines' in seconds (nanoGPT: iterations).
BUDGETS = {
    "shakespeare-85s": ("85", "6"),
    "shakespeare-10m": ("10m", "10"),
    "tang-10m": ("10m", "10"),
    "tang-speed": ("80", "6"),  # steps
    "charrnn": (85, 6),
    "nanogpt": (2000, 30),  # iterations: nanoGPT's recipe is defined by its iteration count
    "pytorch-book": (600, 10),
}
# ======================================================================================================================

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("POETGEN_SHARED_DATA", REPO.parent / "shared" / "data"))
BASELINES = HERE / "baselines"
ISSUE_PEAK_GFLOPS = 470.0  # issue 7's machine: its oneDNN fp32 matrix-multiply rate
GROUPS = ("shakespeare", "tang", "flops", "sample", "prepare")
QUICK_TANG_FILES = ("poet.tang.0.json", "poet.tang.1000.json")
FLOPS_ROUNDS = {False: 3, True: 1}  # by r.quick
FLOPS_SIZE = {"full": dict(layers=2, hidden=512, embed=512, batch=64, seq=100, steps=12),
              "quick": dict(layers=2, hidden=128, embed=128, batch=16, seq=50, steps=6)}


class Skip(Exception):
    """A group that cannot run here (its data is absent): reported, not an error."""


@dataclass
class Row:
    group: str
    measure: str  # what is measured, with its unit
    target: str  # the issue's target, as text
    poetgen: float | None
    anchor: float | None
    anchor_name: str  # what the anchor is
    status: str  # pass | FAIL | info | skip | error
    ratio: float | None = None  # poetgen / anchor
    fmt: str = "{:.3f}"
    note: str = ""

    def cell(self, v: float | None) -> str:
        return "-" if v is None else self.fmt.format(v)


@dataclass
class GroupResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)
    seconds: float = 0.0
    started: str = ""
    load_before: tuple = ()
    error: str | None = None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def status(ok: bool | None) -> str:
    return "info" if ok is None else ("pass" if ok else "FAIL")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# --- processes ------------------------------------------------------------------------------------------------------


class Runner:
    """Runs the benchmark processes; records each command (for RESULTS.md), its wall time and its peak RSS."""

    def __init__(self, work: Path, threads: int, quick: bool):
        self.work, self.threads, self.quick = work, threads, quick
        self.env = dict(os.environ)
        self.env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # numpy's OpenBLAS, as poetgen's CLI sets it
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        self.commands: list[str] = []
        self.count = 0

    def show(self, argv: list[str]) -> str:
        """The command as a person would type it: `poetgen` and `python`, repository-relative paths, $TMP."""
        words = []
        for a in argv:
            a = str(a)
            if a == sys.executable:
                a = "python"
            a = a.replace(str(self.work), "$TMP").replace(str(REPO) + "/", "").replace(str(SHARED.parent), "../shared")
            words.append(a)
        if words[:3] == ["python", "-m", "poetgen"]:
            words = ["poetgen", *words[3:]]
        return " ".join(shlex.quote(w) if w != "$TMP" and not w.startswith("$TMP/") else w for w in words)

    def run(self, argv: list, what: str) -> tuple[str, float, float]:
        """Run to completion: (stdout, wall seconds, peak RSS in MB). Raises RuntimeError on a non-zero exit."""
        argv = [str(a) for a in argv]
        shown = self.show(argv)
        self.commands.append(shown)
        log(f"{what}: {shown}")
        self.count += 1
        out_path, err_path = self.work / f"p{self.count}.out", self.work / f"p{self.count}.err"
        with open(out_path, "w") as out, open(err_path, "w") as err:
            t = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=out, stderr=err, env=self.env, cwd=self.work)
            # wait4 reaps this child alone and gives its own resource usage (ru_maxrss in KiB on Linux).
            _, wait_status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(wait_status)
        if proc.returncode != 0:
            tail = err_path.read_text(errors="replace").strip().splitlines()[-8:]
            raise RuntimeError(f"{shown} exited with {proc.returncode}:\n    " + "\n    ".join(tail))
        return out_path.read_text(), wall, usage.ru_maxrss / 1024

    def json(self, argv: list, what: str) -> dict:
        """Run a command that prints JSON (one object, possibly indented; or one object on its last line)."""
        out, wall, _ = self.run(argv, what)
        try:
            data = json.loads(out)
        except json.JSONDecodeError:
            data = json.loads(out.strip().splitlines()[-1])
        data["_wall"] = wall
        return data

    def poetgen(self, *args) -> list[str]:
        return [sys.executable, "-m", "poetgen", *map(str, args)]

    def script(self, path: Path, *args) -> list[str]:
        threads = ["--threads", str(self.threads)] if self.threads else []
        return [sys.executable, str(path), *map(str, args), *threads, "--json"]


def poetgen_argv(r: Runner, name: str, **values) -> list[str]:
    """The POETGEN command `name` with its placeholders filled (a list value becomes several arguments)."""
    mode = 1 if r.quick else 0
    if name in BUDGETS:
        values["budget"] = BUDGETS[name][mode]
    argv = []
    for word in shlex.split(POETGEN[name]):
        m = re.fullmatch(r"\{(\w+)\}", word)
        if m and isinstance(values.get(m.group(1)), (list, tuple)):
            argv.extend(map(str, values[m.group(1)]))
        else:
            argv.append(word.format(**values))
    return r.poetgen(*argv)


def prepare(r: Runner, name: str, out: Path, **values) -> Path:
    r.json([*poetgen_argv(r, name, **values), "-o", out, "--json", "-q"], name)
    return out


def train_and_eval(r: Runner, name: str, dataset: Path, **values) -> dict:
    """Train with the POETGEN command, then `poetgen eval` its last checkpoint; metrics.jsonl summarised."""
    runs = r.work / "runs"
    summary = r.json([*poetgen_argv(r, name, dataset=dataset, **values), "--runs-dir", runs, "--name", name, "--json",
                      "-q"], name)
    run_dir = runs / name
    ev = r.json(r.poetgen("eval", run_dir / "last.ckpt", "--json", "-q"), f"{name} eval")["models"][0]
    score = ev.get("warm") or ev["cold"]
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    cps = [x["chars_per_sec"] for x in records if x.get("type") == "train" and x.get("chars_per_sec")]
    start = next((x for x in records if x.get("type") == "start"), {})
    out = {
        "val_nats": score["nats_per_char"], "val_bits": score["bits_per_char"],
        "val_nats_cold": ev["cold"]["nats_per_char"], "scored": ev["symbols"],
        "steps": summary.get("step"), "epoch": summary.get("epoch"), "elapsed": summary.get("elapsed"),
        "best_val_loss": summary.get("best_val_loss"), "status": summary.get("status"),
        "tokens_seen": summary.get("tokens_seen"),
        "chars_per_sec_overall": (summary["tokens_seen"] / summary["elapsed"]) if summary.get("elapsed") else None,
        "parameters": start.get("plan", {}).get("parameters"), "config": start.get("config"),
    }
    # Training speed: the median of the logged windows (one with an evaluation in it is an outlier the median
    # ignores; the first, warming up, is dropped); a run too short to log any uses its overall rate.
    out["chars_per_sec_median"] = statistics.median(cps[1:] or cps) if cps else out["chars_per_sec_overall"]
    return out


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        raise Skip(f"shared data not available: {p}")
    return p


# --- groups ---------------------------------------------------------------------------------------------------------


def group_shakespeare(r: Runner, g: GroupResult) -> None:
    text = shared("tinyshakespeare", "input.txt")
    ds = prepare(r, "shakespeare-prepare", r.work / "shakespeare", shakespeare=text)
    mode = 1 if r.quick else 0
    charrnn = r.json(r.script(BASELINES / "charrnn.py", ds, "--budget", BUDGETS["charrnn"][mode]), "char-rnn")
    nano_args = ["--max-iters", BUDGETS["nanogpt"][mode]] + (["--stride", 64] if r.quick else [])
    nanogpt = r.json(r.script(BASELINES / "nanogpt.py", ds, *nano_args), "nanoGPT")
    p85 = train_and_eval(r, "shakespeare-85s", ds)
    p10 = train_and_eval(r, "shakespeare-10m", ds)
    b85, b10 = BUDGETS["shakespeare-85s"][mode], BUDGETS["shakespeare-10m"][mode]
    peak = r.json(r.script(HERE / "flops.py", "peak", *(["--quick"] if r.quick else [])), "matmul peak")
    scaled = round(float(b85) * ISSUE_PEAK_GFLOPS / peak["onednn_gflops"])
    scaled = min(scaled, 10) if r.quick else scaled  # quick mode: a smoke check
    ps = train_and_eval(r, "shakespeare-scaled", ds, budget=scaled)
    g.raw.update(charrnn=charrnn, nanogpt=nanogpt, poetgen_85s=p85, poetgen_10m=p10, peak=peak, poetgen_scaled=ps)
    cr = f"char-rnn, {BUDGETS['charrnn'][mode]} s"
    ng = f"nanoGPT, {BUDGETS['nanogpt'][mode]} iters ({nanogpt['train_seconds']:.0f} s)"
    for label, p, limit in ((b85, p85, 1.55), (b10, p10, 1.47)):
        for name, base in ((cr, charrnn), (ng, nanogpt)):
            note = "" if base is nanogpt else (
                f"poetgen {p['steps']} steps, {p['epoch']:.2f} epochs, {p['parameters']:,} parameters; char-rnn "
                f"{charrnn['steps']} steps, {charrnn['epochs']:.2f} epochs; nanoGPT {nanogpt['train_seconds']:.0f} s")
            g.rows.append(Row("shakespeare", f"Tiny Shakespeare, --max-time {label}: val nats/char", f"<= {limit}",
                              p["val_nats"], base["val_nats"], name, status(p["val_nats"] <= limit),
                              ratio(p["val_nats"], base["val_nats"]), note=note))
    preset = {"hidden": "?"} | (ps.get("config") or {})
    g.rows.append(Row("shakespeare", f"Tiny Shakespeare, --max-time {scaled} (the issue machine's {b85} s of "
                      f"compute here): val nats/char", "<= 1.55 (info)", ps["val_nats"], p85["val_nats"],
                      f"poetgen, {b85} s", "info", ratio(ps["val_nats"], p85["val_nats"]),
                      note=f"{b85} s x {ISSUE_PEAK_GFLOPS:.0f} / {peak['onednn_gflops']:.0f} GFLOP/s (oneDNN peak "
                           f"there / here); preset auto: LSTM {preset.get('layers')}x{preset['hidden']}, "
                           f"{ps['steps']} steps, {ps['epoch']:.2f} epochs" + ("; capped at 10 s in quick mode" if r.quick
                                                                                else "")))


def group_tang(r: Runner, g: GroupResult) -> None:
    tang = shared("tang")
    sources = [shared("tang", f) for f in QUICK_TANG_FILES] if r.quick else [tang]
    ds = prepare(r, "tang-prepare", r.work / "tang", tang=sources)
    mode = 1 if r.quick else 0
    book = r.json(r.script(BASELINES / "pytorch_book.py", ds, "--budget", BUDGETS["pytorch-book"][mode]),
                  "pytorch-book")
    p = train_and_eval(r, "tang-10m", ds)
    speed = train_and_eval(r, "tang-speed", ds)
    g.raw.update(pytorch_book=book, poetgen=p, poetgen_speed=speed)
    label = BUDGETS["tang-10m"][mode]
    anchor = f"pytorch-book, {BUDGETS['pytorch-book'][mode]} s"
    rb = ratio(p["val_bits"], book["val_bits"])
    g.rows.append(Row("tang", f"Tang, --max-time {label}: val bits/char", "<= 0.85 x anchor", p["val_bits"],
                      book["val_bits"], anchor, status(rb is not None and rb <= 0.85), rb,
                      note=f"unigram {book['unigram_nats'] / math.log(2):.3f} bits; book {book['epochs']:.2f} "
                           f"epochs, poetgen {p['epoch']:.2f}"))
    rc = ratio(speed["chars_per_sec_median"], book["real_chars_per_sec"])
    head = (speed.get("config") or {}).get("head", "?")
    g.rows.append(Row("tang", "Tang, LSTM 256x2 embed 128: real characters trained per second", ">= 5 x anchor",
                      speed["chars_per_sec_median"], book["real_chars_per_sec"], anchor,
                      status(rc is not None and rc >= 5.0), rc, fmt="{:,.0f}",
                      note=f"head {head}; parameters: poetgen {speed['parameters']:,}, book {book['parameters']:,}; "
                           f"the 10-minute run's own rate {p['chars_per_sec_median']:,.0f}"
                      if speed["parameters"] else ""))


def synthetic_text(path: Path, chars: int = 400_000) -> Path:
    """ASCII text over Tiny Shakespeare's 65 symbols (throughput does not depend on which text)."""
    import numpy as np

    alphabet = np.frombuffer(b"\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    rng = np.random.default_rng(0)
    path.write_bytes(alphabet[rng.integers(0, len(alphabet), chars)].tobytes())
    return path


def group_flops(r: Runner, g: GroupResult) -> None:
    size = FLOPS_SIZE["quick" if r.quick else "full"]
    quick = ["--quick"] if r.quick else []
    L, H, E, B, T = size["layers"], size["hidden"], size["embed"], size["batch"], size["seq"]
    text = synthetic_text(r.work / "flops.txt")
    ds = r.work / "flops-data"
    r.json(r.poetgen("prepare", text, "--split", "tail", "--val-fraction", "0.002", "-o", ds, "--json", "-q"),
           "flops prepare")
    V = len(json.loads((ds / "vocab.json").read_text())["symbols"])
    # A shared virtual machine's speed drifts by 10-20% from minute to minute, so the peak is measured before and
    # after (the best counts), and the plain loop and poetgen's loop take turns, FLOPS_ROUNDS rounds each; each
    # side's figure is the median over all its timed steps.
    peaks = [r.json(r.script(HERE / "flops.py", "peak", *quick), "matmul peak")]
    plain_rounds, cps, runs = [], [], r.work / "runs"
    for i in range(FLOPS_ROUNDS[r.quick]):
        plain_rounds.append(r.json(r.script(BASELINES / "lstm_loop.py", "--vocab", V, "--embed", E, "--hidden", H,
                                            "--layers", L, "--batch", B, "--seq", T,
                                            "--steps", 3 if r.quick else 8), f"plain nn.LSTM loop, round {i + 1}"))
        name = f"flops{i + 1}"
        r.json([*poetgen_argv(r, "flops-step", dataset=ds, **size), "--runs-dir", runs, "--name", name, "--json",
                "-q"], f"poetgen step, round {i + 1}")
        records = [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
        cps += [x["chars_per_sec"] for x in records if x.get("type") == "train"][2:]  # the first steps warm up
    peaks.append(r.json(r.script(HERE / "flops.py", "peak", *quick), "matmul peak, again"))
    peak = max(peaks, key=lambda p: p["onednn_gflops"])
    plain = dict(plain_rounds[0], step_seconds=statistics.median(x for p in plain_rounds for x in p["step_times"]))
    plain.update(chars_per_sec=B * T / plain["step_seconds"], gflops=plain["flops_per_char"] * B * T
                 / plain["step_seconds"] / 1e9, rounds=plain_rounds)
    sys.path.insert(0, str(BASELINES))
    from common import lstm_train_flops_per_char

    fpc = lstm_train_flops_per_char(V, E, H, L)
    pg_gflops = statistics.median(cps) * fpc / 1e9
    pg_best = max(cps) * fpc / 1e9
    plain_best = plain["flops_per_char"] * B * T / min(x for p in plain_rounds for x in p["step_times"]) / 1e9
    bf16 = r.json(r.script(HERE / "flops.py", "bf16", *quick, "--dataset", ds), "bf16 step")
    g.raw.update(peak=peak, peaks=peaks, plain_lstm=plain, poetgen_chars_per_sec=cps, poetgen_gflops=pg_gflops,
                 poetgen_best_gflops=pg_best, plain_best_gflops=plain_best, flops_per_char=fpc, bf16=bf16)
    top = peak["onednn_gflops"]
    what = f"LSTM {H}x{L}, batch {B}, seq {T}: model FLOP/s / oneDNN fp32 peak"
    fp, fa = pg_gflops / top, plain["gflops"] / top
    g.rows.append(Row("flops", f"{what}, median step", ">= 0.75", fp, fa, "plain nn.LSTM loop", status(fp >= 0.75),
                      ratio(fp, fa), fmt="{:.1%}",
                      note=f"poetgen {pg_gflops:.0f}, plain {plain['gflops']:.0f}, oneDNN peak {top:.0f}, "
                           f"torch.matmul {peak['matmul_gflops']:.0f} GFLOP/s"))
    # The peak is a best time (other processes only ever slow a run down); the same statistic for the steps.
    fp, fa = pg_best / top, plain_best / top
    g.rows.append(Row("flops", f"{what}, fastest step (the peak's statistic)", ">= 0.75", fp, fa,
                      "plain nn.LSTM loop", status(fp >= 0.75), ratio(fp, fa), fmt="{:.1%}",
                      note=f"poetgen {pg_best:.0f}, plain {plain_best:.0f}, oneDNN peak {top:.0f} GFLOP/s"))
    speed, best = bf16.get("speedup"), bf16.get("best_bf16_mode")
    note = f"bf16 GEMM {peak['bf16_linear_gflops']:.0f} vs fp32 {top:.0f} GFLOP/s"
    if bf16["bf16"]["error"]:
        note += f"; the whole model under autocast fails: {bf16['bf16']['error'].split('. ')[0]}"
    if best:
        note += f"; figure: {best} (" + ("LSTM in fp32, embedding and output layer in bf16" if best == "bf16-head"
                                         else "whole model under autocast") + ")"
    if bf16.get("val_delta") is not None:
        note += f"; val delta {bf16['val_delta']:+.4f} nats"
    g.rows.append(Row("flops", "bf16 autocast step / fp32 step (poetgen, same size)", ">= 1.5 x, val within 0.01",
                      speed, peak["bf16_linear_gflops"] / top, "bf16 GEMM / fp32 GEMM",
                      "adopt" if bf16.get("qualifies") else "info", None, fmt="{:.2f}x", note=note))


def group_sample(r: Runner, g: GroupResult) -> None:
    quick = ["--quick"] if r.quick else []
    rows = bench_sample_rows(r, quick)
    g.raw.update(bench_sample=rows)
    speed = [x for x in rows if x["unit"] == "chars/s" and x["name"].startswith("free text")
             and "adaptive" not in x["name"]]
    targets = {1: 5000, 64: 100_000}
    for x in speed:
        t = targets.get(x["streams"])
        # The issue's anchors (1,700 and 71,000 chars/s for the plain loop) are for a small vocabulary; the rows at
        # a Tang-sized one (6,000 symbols, where the output layer outweighs the recurrence) are shown for scale.
        issue_row = t is not None and x.get("vocab", 65) < 1000
        note = ""
        if x.get("threads") is not None and x.get("anchor_threads") is not None:
            note = (f"poetgen ended on {x['threads']} BLAS thread(s) (tuned while sampling); the anchor's best of torch "
                    f"on 1 and default threads: {x['anchor_threads']}")
        g.rows.append(Row("sample", f"LSTM 256x2 sampling, {x['name']}: chars/s",
                          (f">= {t:,}" if issue_row else f">= {t:,} (info)") if t else "-",
                          x["value"], x.get("anchor"), x.get("anchor_name") or "plain per-step nn.LSTM loop",
                          status(x["value"] >= t) if issue_row else "info", ratio(x["value"], x.get("anchor")),
                          fmt="{:,.0f}", note=note))
    walls = [x for x in rows if x["unit"] == "s"]
    calls = [x for x in walls if "poetgen sample" in x["name"]]
    # the issue's call writes 4 poems; else the closest row bench_sample has (a form, a few poems)
    call = next((x for x in calls if re.search(r"-n 4\b", x["name"])), None) or \
        next((x for x in calls if "--form" in x["name"] and "-n 64" not in x["name"]), None) or \
        (calls[0] if calls else None)
    helps = next((x for x in walls if "--help" in x["name"]), None)
    for x, limit in ((call, 2.0), (helps, 0.3)):
        if x is not None:
            name = x["name"] if x["name"].startswith(("whole", "`")) else f"`{x['name']}`"
            g.rows.append(Row("sample", f"{name}: seconds", f"< {limit:g}", x["value"], x.get("anchor"),
                              x.get("anchor_name") or "python -c 'import torch'", status(x["value"] < limit),
                              ratio(x["value"], x.get("anchor")), fmt="{:.2f}"))


def bench_sample_rows(r: Runner, quick: list[str]) -> list[dict]:
    """HOOK into benchmarks/bench_sample.py (owned by another helper): its rows, each
    {name, value, unit ("chars/s" or "s"), anchor (or None), anchor_name, streams, vocab}.

    Reads `bench_sample.py --json` ({"rows": [...]} in that shape), else the older {"speed", "wall"} JSON, else
    the tables it printed before it had --json."""
    script = HERE / "bench_sample.py"
    if "--json" in script.read_text():
        data = r.json([sys.executable, script, *quick, "--json"], "bench_sample")
        if isinstance(data.get("rows"), list) and all("unit" in x for x in data["rows"]):
            return data["rows"]
        if "speed" in data and "wall" in data:
            return _old_rows(data["speed"], data["wall"])
    out, _, _ = r.run([sys.executable, script, *quick], "bench_sample")
    speed, wall = [], []
    for line in out.splitlines():
        m = re.match(r"(.+?)\s+(\d+)\s+(\d+)\s+([\d,]+)\s*$", line)
        if m and not line.startswith(("run", "end to end")):
            speed.append({"run": m.group(1).strip(), "samples": int(m.group(2)), "threads": int(m.group(3)),
                          "chars_per_sec": float(m.group(4).replace(",", ""))})
            continue
        m = re.match(r"(.+?)\s+(\d+\.\d+)\s*$", line)
        if m:
            wall.append({"run": m.group(1).strip(), "seconds": float(m.group(2))})
    # "  ... --rhyme -n 64" continues the previous command line in bench_sample's table
    for i, w in enumerate(wall):
        if w["run"].startswith("...") and i:
            w["run"] = wall[i - 1]["run"] + " " + w["run"][3:].strip()
    if not speed or not wall:
        raise RuntimeError("could not read bench_sample.py's output:\n" + out[-500:])
    return _old_rows(speed, wall)


def _old_rows(speed: list[dict], wall: list[dict]) -> list[dict]:
    """bench_sample's older figures in the row shape: the best over thread counts; `import torch` as the anchor of
    the whole-process times."""
    best: dict[tuple, dict] = {}
    for x in speed:
        key = (x["run"], x["samples"])
        if key not in best or x["chars_per_sec"] > best[key]["value"]:
            best[key] = {"name": f"{x['run']}, {x['samples']} stream{'s' * (x['samples'] > 1)}",
                         "value": x["chars_per_sec"], "unit": "chars/s", "anchor": None, "anchor_name": "",
                         "streams": x["samples"], "vocab": 6000, "threads": x.get("threads")}
    torch_import = next((x["seconds"] for x in wall if "import torch" in x["run"]), None)
    walls = [{"name": x["run"], "value": x["seconds"], "unit": "s", "anchor": torch_import,
              "anchor_name": "python -c 'import torch'"} for x in wall if "import torch" not in x["run"]]
    return list(best.values()) + walls


def group_prepare(r: Runner, g: GroupResult) -> None:
    sys.path.insert(0, str(HERE))
    from bench_prepare import generate

    size_mb = 16 if r.quick else 1024
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    corpus = out_dir / f"synthetic-{size_mb}mb.txt"
    if not corpus.exists():
        log(f"generating {corpus} ({size_mb} MB; kept for later runs)")
        generate(corpus, size_mb)
    size = corpus.stat().st_size
    _, wall, rss = r.run(r.poetgen("prepare", corpus, "--doc-sep", "blank", "-o", r.work / "prepared", "--json",
                                   "-q"), "prepare")
    shutil.rmtree(r.work / "prepared", ignore_errors=True)
    t = time.perf_counter()
    with open(corpus, "rb") as f:  # the floor of any prepare: read the bytes and decode them
        while block := f.read(1 << 24):
            block.decode("utf-8", errors="ignore")
    decode = size / 1e6 / (time.perf_counter() - t)
    mbs = size / 1e6 / wall
    g.raw.update(bytes=size, wall=wall, mb_per_s=mbs, peak_rss_mb=rss, read_decode_mb_per_s=decode)
    g.rows.append(Row("prepare", f"prepare {size / 1e6:,.0f} MB generated corpus: MB/s", ">= 20", mbs, decode,
                      "read + UTF-8 decode only", status(mbs >= 20), ratio(mbs, decode), fmt="{:.1f}"))
    g.rows.append(Row("prepare", "prepare: peak RSS of the process, MB", "< 500", rss, size / 1e6,
                      "input size, MB", status(rss < 500), ratio(rss, size / 1e6), fmt="{:,.0f}"))


GROUP_FUNCS = {"shakespeare": group_shakespeare, "tang": group_tang, "flops": group_flops, "sample": group_sample,
               "prepare": group_prepare}
TITLES = {"shakespeare": "Tiny Shakespeare: quality per CPU minute (target 1)",
          "tang": "Tang: bits per character and training speed against the pytorch-book recipe (targets 2, 3)",
          "flops": "Training throughput: model FLOP/s against the machine's matrix-multiply peak; bf16 (target 3)",
          "sample": "Sampling and start-up (target 4)", "prepare": "prepare (target 5)"}


# --- machine, table, RESULTS.md -----------------------------------------------------------------------------------


def machine() -> dict:
    info = {"python": platform.python_version(), "os": platform.platform(), "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = re.search(r"model name\s*:\s*(.*)", cpuinfo).group(1).strip()
        flags = set(re.search(r"flags\s*:\s*(.*)", cpuinfo).group(1).split())
        wanted = ("fma", "avx", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16",
                  "amx_int8")
        info["matmul_flags"] = [f for f in wanted if f in flags]
        mhz = re.findall(r"cpu MHz\s*:\s*([\d.]+)", cpuinfo)
        info["mhz"] = round(float(mhz[0])) if mhz else None
        mem = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
        info["memory_gib"] = round(int(mem.group(1)) / 2**20, 1)
    except (OSError, AttributeError):
        info["cpu"] = platform.processor() or "unknown"
    try:
        v = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__, "
                            "torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())"],
                           capture_output=True, text=True, timeout=120).stdout.split()
        info.update(torch=v[0], torch_cpu_capability=v[1], torch_default_threads=int(v[2]))
    except (OSError, IndexError, subprocess.SubprocessError):
        info["torch"] = "unknown"
    return info


def machine_line(m: dict, threads: int) -> str:
    return (f"{m.get('cpu')}, {m.get('cpus_usable')} cores usable ({m.get('mhz')} MHz), flags "
            f"{' '.join(m.get('matmul_flags', [])) or '-'}, {m.get('memory_gib')} GiB; torch {m.get('torch')} "
            f"(CPU capability {m.get('torch_cpu_capability')}), {threads or m.get('torch_default_threads')} threads; "
            f"Python {m.get('python')}")


HEAD = ("target", "measure", "poetgen", "anchor (same run)", "ratio", "result")


def table_rows(rows: list[Row]) -> list[tuple[str, ...]]:
    return [(x.target, x.measure, x.cell(x.poetgen), f"{x.cell(x.anchor)} {x.anchor_name}",
             "-" if x.ratio is None else f"{x.ratio:.2f}", x.status) for x in rows]


def print_table(rows: list[Row]) -> None:
    body = table_rows(rows)
    widths = [max(len(r[i]) for r in [HEAD, *body]) for i in range(len(HEAD))]
    for r in [HEAD, tuple("-" * w for w in widths), *body]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    notes = [f"  {x.measure}: {x.note}" for x in rows if x.note]
    if notes:
        print("notes:")
        print("\n".join(notes))


def env_note(threads: int) -> str:
    policy = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "4")
    return (f"OMP_WAIT_POLICY={policy}, OPENBLAS_THREAD_TIMEOUT={timeout}"
            + (f", OMP_NUM_THREADS={threads}" if threads else ""))


def markdown_group(g: GroupResult, m: dict, threads: int, mode: str) -> str:
    lines = [f"### {TITLES[g.name]}", "",
             f"{g.started}, {mode} mode, {g.seconds / 60:.1f} min; load average before: "
             f"{' '.join(f'{x:.1f}' for x in g.load_before)}", "", f"Machine: {machine_line(m, threads)}; every "
             f"process with {env_note(threads)}", ""]
    if g.error:
        lines += [f"Not measured: {g.error}", ""]
    if g.rows:
        lines += ["| " + " | ".join(HEAD) + " |", "|" + " --- |" * len(HEAD)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in table_rows(g.rows)]
        lines += [""] + [f"- {x.measure}: {x.note}" for x in g.rows if x.note] + [""]
    if g.commands:
        lines += ["Commands (`$TMP`: the run's scratch directory):", "", "```"] + g.commands + ["```", ""]
    return "\n".join(lines)


def update_results(path: Path, groups: list[GroupResult], m: dict, threads: int, mode: str) -> None:
    """Replace this mode's block of each group that ran inside its section; other groups' blocks stay, and so does
    a block whose group failed or was skipped this time."""
    begin, end = f"<!-- run.py {mode}: begin -->", f"<!-- run.py {mode}: end -->"
    title = ("## Issue 7: poetgen against plain-PyTorch baselines, side by side (`python benchmarks/run.py --full`)"
             if mode == "full" else
             "## Issue 7 quick smoke check (`python benchmarks/run.py --quick --out ...`): tiny budgets, the figures "
             "mean nothing")
    intro = ("Written by benchmarks/run.py (its docstring says what each row measures). Each group's block records "
             "its own run; `--only` replaces only the groups it ran.")
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    if begin not in text:
        blocks = "\n".join(f"<!-- group {n}: begin -->\n_not run yet_\n<!-- group {n}: end -->\n" for n in GROUPS)
        text = text.rstrip("\n") + f"\n\n{begin}\n{title}\n\n{intro}\n\n{blocks}{end}\n"
    i, j = text.index(begin), text.index(end)
    section = text[i:j]
    for g in groups:
        b, e = f"<!-- group {g.name}: begin -->", f"<!-- group {g.name}: end -->"
        new = f"{b}\n{markdown_group(g, m, threads, mode)}{e}"
        if g.error and b in section and "_not run yet_" not in section[section.index(b):section.index(e)]:
            continue  # a failed or skipped rerun never wipes the figures of an earlier run
        if b in section:
            section = section[: section.index(b)] + new + section[section.index(e) + len(e):]
        else:
            section = section.rstrip("\n") + "\n" + new + "\n"
    path.write_text(text[:i] + section + text[j:], encoding="utf-8")


# --- main -------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="tiny budgets: a smoke check of every code path")
    mode.add_argument("--full", action="store_true", help="the real figures (~40 min)")
    ap.add_argument("--only", nargs="+", choices=GROUPS, metavar="NAME", help=f"groups: {', '.join(GROUPS)}")
    ap.add_argument("--out", type=Path, help="results file (full mode default: benchmarks/RESULTS.md; quick mode: "
                                             "none, print only)")
    ap.add_argument("--no-write", action="store_true", help="full mode: do not write the results file")
    ap.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads of every process (default: all)")
    ap.add_argument("--json", action="store_true", help="print everything as one JSON object on stdout")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (datasets, runs, logs)")
    args = ap.parse_args()
    mode_name = "quick" if args.quick else "full"
    out = args.out if args.out else (None if args.quick or args.no_write else HERE / "RESULTS.md")

    (HERE / "out").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"run-{mode_name}-", dir=HERE / "out"))
    r = Runner(work, args.threads, args.quick)
    m = machine()
    log(f"{mode_name} mode; scratch {work}; {machine_line(m, args.threads)}")
    results: list[GroupResult] = []
    t_all = time.perf_counter()
    try:
        for name in args.only or GROUPS:
            g = GroupResult(name, started=dt.datetime.now().strftime("%Y-%m-%d %H:%M"), load_before=os.getloadavg())
            first = len(r.commands)
            t = time.perf_counter()
            try:
                GROUP_FUNCS[name](r, g)
            except Skip as e:
                g.error = str(e)
                g.rows.append(Row(name, str(e), "-", None, None, "", "skip"))
                log(f"{name}: skipped: {e}")
            except Exception as e:  # one group failing must not lose the others' figures
                g.error = f"{type(e).__name__}: {e}"
                g.rows.append(Row(name, f"{name} failed (see stderr)", "-", None, None, "", "error"))
                log(f"{name}: ERROR {g.error}")
            g.seconds = time.perf_counter() - t
            g.commands = r.commands[first:]
            results.append(g)
            log(f"{name}: done in {g.seconds / 60:.1f} min")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    rows = [x for g in results for x in g.rows]
    if args.json:
        print(json.dumps({"mode": mode_name, "machine": m, "threads": args.threads,
                          "seconds": time.perf_counter() - t_all,
                          "groups": [{**asdict(g), "rows": [asdict(x) for x in g.rows]} for g in results]},
                         default=str))
    else:
        print(f"\npoetgen issue 7 benchmarks, {mode_name} mode, {(time.perf_counter() - t_all) / 60:.1f} min; "
              f"{machine_line(m, args.threads)}\n")
        print_table(rows)
    if out is not None:
        update_results(out, results, m, args.threads, mode_name)
        log(f"wrote the {mode_name} section of {out}")
    return 1 if any(g.error and not g.error.startswith("shared data") for g in results) else 0


if __name__ == "__main__":
    sys.exit(main())
