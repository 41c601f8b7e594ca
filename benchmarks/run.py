"""Issues 7 and 20's benchmarks in one command: poetgen side by side with anchors measured in the same run.

    python benchmarks/run.py --quick                    # smoke check: every code path, tiny budgets, a few minutes
    python benchmarks/run.py --full                     # the real figures (~75 min); updates benchmarks/RESULTS.md
    python benchmarks/run.py --full --only tang flops   # some groups only (their sections of RESULTS.md alone)
    python benchmarks/run.py --quick --json             # everything as one JSON object on stdout

Groups (--only): shakespeare, tang, flops, sample, serve, prepare. Each prints rows of: target, poetgen's figure,
the anchor's figure measured in the same run, their ratio, and pass/FAIL against the issue's target. Every target is
a ratio to its anchor (issue 20: machines differ more than absolute targets' margins); where timing noise decides
a row, both sides are timed in alternating trials and each side's median counts (the row says how many). Each
group's section is headed by the machine line: CPU, its matrix-multiply flags, cores, and the oneDNN fp32 and bf16
matrix-multiply peaks (flops.py peak, measured once at the start of the run), and whether the CPU multiplies bf16
natively (poetgen.model.devices.cpu_bf16_native: AVX512-BF16 or AMX-BF16). On Linux each group also says the share
of CPU time the hypervisor took while it ran (steal, /proc/stat), the 85 s trials each their own, and the log names
every process that lost STEAL_WARN or more: on a shared virtual machine that is the noise a timed row cannot average.

* shakespeare (issue 20, targets 1, 2): `poetgen prepare input.txt --split tail --val-fraction 0.1`; nanoGPT's CPU
  recipe for 2,000 iterations (baselines/nanogpt.py) first: its training wall time T (start-up and scoring
  excluded) is the budget of char-rnn's default recipe (baselines/charrnn.py --budget T) and of poetgen's default
  settings (--max-time T).
  Target 1: poetgen's validation loss <= 0.85x nanoGPT's and <= 0.85x char-rnn's. Target 2: --precision auto
  (the default) against --precision fp32 and bf16, each trained 85 s and 10 min: auto's loss at most 0.02 nats
  above the better of the two. At 85 s each of the three runs TRIALS["shakespeare-85s"] times, the order rotating,
  and each one's median run counts (a shared machine's speed moves the loss of so short a run by more than 0.02).
  On a CPU without native bf16 there is no bf16 run ("n/a") and no separate fp32 run: auto runs fp32 there
  (checked), so its run is the fp32 row. Every poetgen run is scored by `poetgen eval` on its last checkpoint
  (exact over the whole validation split; the "warm" figure: each of 32 streams primed on the 1,000 characters
  before it); the baselines score the same validation text exactly. Which precision auto ran is
  read from the run's metrics.jsonl (its plan), with auto's own stderr notes ("Preset auto: ...", "Precision auto:
  ...").
* tang (issue 20, target 3): `poetgen prepare ../shared/data/tang --script simplified`, poetgen trained 10 min
  (commands below), scored by `poetgen eval`; anchor: the pytorch-book recipe trained 10 min on the same training
  poems (baselines/pytorch_book.py), scored per real character on the same validation poems: bits per character
  <= 0.80x the book's. Speed at the book's model size (LSTM 256x2, embedding 128): real characters trained per
  second, TRIALS["tang-speed"] alternating trials (poetgen, book, poetgen, book, ...): poetgen's figure per trial
  is the median of its logged training windows (the first dropped), the book's its rate after 2 warm-up steps
  (pytorch_book.py --no-score); each side's median; >= 5x the book's.
* flops (issue 20, target 4): poetgen's training loop at LSTM 512x2 (`poetgen train --max-steps`, characters per
  second from its metrics.jsonl, one line per step, the first two dropped) against a plain nn.LSTM loop
  (baselines/lstm_loop.py) at the same size, in fp32 and in bf16 (bf16 where the CPU has it natively), trials
  alternating (plain fp32, poetgen fp32, plain bf16, poetgen bf16; TRIALS["flops"] rounds), each trial's median
  step, each side's median trial: ratio >= 0.97. Model FLOP/s as a share of the oneDNN peak in the notes.
* sample (issue 20, target 5): the rows of benchmarks/bench_sample.py --json: poetgen's sampling speed for an LSTM
  256x2 at 1 and 64 streams against a plain per-step nn.LSTM sampling loop timed in the same process (under the
  environment's own OMP_WAIT_POLICY, not the PASSIVE below: poetgen samples without OpenMP), in
  alternating trials (>= 5x and >= 2x at Tiny Shakespeare's vocabulary; Tang's for scale); --tones --rhyme
  against --form alone (issue 16, <= 1.3x); whole `poetgen sample` and `poetgen --help` calls next to
  `python -c "import torch"` (issue 7's limits, absolute).
* serve (issue 20, target 6; issue 19): benchmarks/bench_serve.py --json against `poetgen serve` with the shipped
  model (SERVE_ARGS): 64 concurrent 五绝 requests against the same 64 one at a time, same server, rounds
  alternating, each mode's median round: throughput >= 5x; every request answered, bad ones 4xx (notes).
* prepare (issue 7): `poetgen prepare` on a generated corpus (benchmarks/bench_prepare.py's generator; 1 GB in full
  mode, cached in benchmarks/out/): MB/s and the process's peak resident memory; anchor: reading and decoding the
  file (issue 7's limits, absolute).

Full mode takes about 85 minutes on 2 cores where nanoGPT's 2,000 iterations take 110 s (each further 10 s of them:
+0.5 min): shakespeare ~52 (the twelve runs of target 2 are 46 of them; 32 less without native bf16, where 4 of
them run), tang ~25, flops ~3, sample, serve and prepare ~1-2 each, the peaks 0.5. Full mode writes one section per
group of RESULTS.md (date, machine, commands, figures), replacing only the groups that ran. Quick mode prints only; with
an explicit --out it writes its own "quick" section, never the full one. Every process runs with
OMP_WAIT_POLICY=PASSIVE and OPENBLAS_THREAD_TIMEOUT=4 (as poetgen's CLI sets for itself) unless the environment says
otherwise, so baselines and poetgen wait for threads alike. Scratch files go to a temporary directory under
benchmarks/out/ (git-ignored), removed at the end unless --keep.
"""

from __future__ import annotations

# ====================================== POETGEN COMMANDS (the lead edits these) ======================================
# What run.py runs on poetgen's side. Placeholders: {shakespeare} = ../shared/data/tinyshakespeare/input.txt,
# {tang} = ../shared/data/tang (quick mode: two of its files), {dataset} = the dataset prepared just before,
# {budget} = BUDGETS[name] for the mode (a name ending in -fp32 or -bf16: the budget of the name without it).
# run.py adds only bookkeeping flags: `-o DIR --json -q` to prepare, `--runs-dir DIR --name NAME --json` to train
# (not -q: auto's notes on stderr are read), `--json -q` to eval. Anything else here is poetgen's recipe.
POETGEN = {
    "shakespeare-prepare": "prepare {shakespeare} --split tail --val-fraction 0.1",
    # Target 1: the default settings given the wall time nanoGPT's recipe took for its 2,000 iterations in this run
    # ({budget}: its seconds).
    "shakespeare-nanogpt-time": "train {dataset} --max-time {budget}",
    # Target 2: precision auto (the default) against forced fp32 and bf16, at 85 s and at 10 min.
    "shakespeare-85s": "train {dataset} --max-time {budget}",
    "shakespeare-85s-fp32": "train {dataset} --max-time {budget} --precision fp32",
    "shakespeare-85s-bf16": "train {dataset} --max-time {budget} --precision bf16",
    "shakespeare-10m": "train {dataset} --max-time {budget}",
    "shakespeare-10m-fp32": "train {dataset} --max-time {budget} --precision fp32",
    "shakespeare-10m-bf16": "train {dataset} --max-time {budget} --precision bf16",
    "tang-prepare": "prepare {tang} --script simplified",
    "tang-10m": "train {dataset} --max-time {budget}",  # default settings (the adaptive head is automatic here)
    # Throughput at the pytorch-book's model size (embedding 128, LSTM 256 x 2): target 3's "same model size".
    "tang-speed": "train {dataset} --hidden 256 --embed 128 --layers 2 --max-steps {budget} --eval-every 100000 "
                  "--sample-every 0",
    # poetgen's training loop at the throughput benchmark's size (LSTM 512 x 2, embed 512, batch 64, seq 100 in
    # full mode), in each {precision}; characters per second are read from metrics.jsonl (one line per step), the
    # first two dropped.
    "flops-step": "train {dataset} --cell lstm --layers {layers} --hidden {hidden} --embed {embed} --dropout 0 "
                  "--no-tie-weights --batch-size {batch} --seq-len {seq} --max-steps {steps} --eval-every 100000 "
                  "--log-every 1 --sample-every 0 --patience 0 --precision {precision}",
}
# Target 6: what benchmarks/bench_serve.py passes to `poetgen serve` besides its port and batch/queue sizes.
SERVE_ARGS = "-c tang"
# Budgets: (full, quick). poetgen's as --max-time values (tang-speed: steps); the baselines' in seconds (nanoGPT:
# iterations). Target 1's budget is no entry: it is nanoGPT's measured time (quick mode: at least QUICK_MIN_T).
BUDGETS = {
    "shakespeare-85s": ("85", "5"),  # and the fp32 and bf16 runs beside it
    "shakespeare-10m": ("10m", "8"),
    "tang-10m": ("10m", "10"),
    "tang-speed": ("60", "6"),  # steps, each trial
    "nanogpt": (2000, 30),  # iterations: nanoGPT's recipe is defined by its iteration count
    "pytorch-book": (600, 10),
    "pytorch-book-speed": (30, 6),  # seconds, each trial
}
# Alternating trials of each side: (full, quick).
# Target 2 at 85 s: each precision's run repeated, the order rotating, each one's median run counts (a VM's speed moves
# 10-15% from minute to minute, and at 85 s that moves the loss: two identical fp32 runs ended 0.044 apart, 814 and
# 947 steps, on 2026-12-02's AMD EPYC, against the target's 0.02). The 10-minute runs once each (90 minutes more).
TRIALS = {"tang-speed": (3, 2), "flops": (3, 1), "serve": (3, 1), "shakespeare-85s": (3, 1)}
QUICK_MIN_T = 5.0
# run.py logs a process during which the hypervisor took at least this share of the CPU time (steal): a timed figure
# taken then is suspect (2026-12-03's AVX2 AMD EPYC: 17% of the run's busy time; one of three identical 85 s runs
# made half the steps of the others).
STEAL_WARN = 0.05
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
GROUPS = ("shakespeare", "tang", "flops", "sample", "serve", "prepare")
QUICK_TANG_FILES = ("poet.tang.0.json", "poet.tang.1000.json")
FLOPS_SIZE = {"full": dict(layers=2, hidden=512, embed=512, batch=64, seq=100, steps=12),
              "quick": dict(layers=2, hidden=128, embed=128, batch=16, seq=50, steps=6)}
MAX_GAP_NATS = 0.02  # target 2: precision auto at most this far above the better of fp32 and bf16


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
    status: str  # pass | FAIL | info | n/a | skip | error
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
    steal: float | None = None  # the share of CPU time the hypervisor took during the group (cpu_steal)
    error: str | None = None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_times(stat: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs since boot, from the ``cpu`` line of /proc/stat; None where there is none
    (not Linux, or a kernel too old to count steal)."""
    try:
        first = stat.read_text().splitlines()[0].split()
        values = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal (guest is in user)
    except (OSError, IndexError, ValueError):
        return None
    return (values[7], sum(values)) if first[0] == "cpu" and len(values) == 8 else None


def cpu_steal(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of all CPU time between two cpu_times() readings that the hypervisor took for other guests (0-1):
    time a busy benchmark process waited for a core it was promised. None when either reading is missing."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def steal_text(share: float | None) -> str:
    return "" if share is None else f"{100 * share:.0f}%"


def status(ok: bool | None) -> str:
    return "info" if ok is None else ("pass" if ok else "FAIL")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def median_of(n: int, what: str = "trial") -> str:
    """How a figure of alternating trials was taken, said in a row: "median of 3 alternating trials"."""
    return f"median of {n} alternating {what}s" if n > 1 else f"1 {what}"


# --- processes ------------------------------------------------------------------------------------------------------


class Runner:
    """Runs the benchmark processes; records each command (for RESULTS.md), its wall time and its peak RSS."""

    def __init__(self, work: Path, threads: int, quick: bool):
        self.work, self.threads, self.quick = work, threads, quick
        self.mode = 1 if quick else 0  # the column of BUDGETS and TRIALS
        self.machine: dict = {}  # machine(), with the peaks measured at the start of the run
        self.env = dict(os.environ)
        self.env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # numpy's OpenBLAS, as poetgen's CLI sets it
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        self.commands: list[str] = []
        self.count = 0
        self.last_err: Path | None = None  # the stderr file of the last process run
        self.last_steal: float | None = None  # the CPU steal share while the last process ran (cpu_steal)

    @property
    def bf16(self) -> bool:
        """Whether this CPU multiplies bf16 natively (poetgen's test; AVX512-BF16 or AMX-BF16)."""
        return bool(self.machine.get("bf16_native"))

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

    def run(self, argv: list, what: str, ok_codes: tuple[int, ...] = (0,),
            cwd: Path | None = None) -> tuple[str, float, float]:
        """Run to completion in ``cwd`` (default: the scratch directory): (stdout, wall seconds, peak RSS in MB).
        Raises RuntimeError on an exit status not in ``ok_codes``."""
        argv = [str(a) for a in argv]
        shown = self.show(argv)
        self.commands.append(shown)
        log(f"{what}: {shown}")
        self.count += 1
        out_path, err_path = self.work / f"p{self.count}.out", self.work / f"p{self.count}.err"
        self.last_err = err_path
        with open(out_path, "w") as out, open(err_path, "w") as err:
            times = cpu_times()
            t = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=out, stderr=err, env=self.env, cwd=cwd or self.work)
            # wait4 reaps this child alone and gives its own resource usage (ru_maxrss in KiB on Linux).
            _, wait_status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t
        self.last_steal = cpu_steal(times, cpu_times())
        if self.last_steal is not None and self.last_steal >= STEAL_WARN:
            log(f"{what}: the hypervisor took {steal_text(self.last_steal)} of the CPU time while it ran")
        proc.returncode = os.waitstatus_to_exitcode(wait_status)
        if proc.returncode not in ok_codes:
            tail = err_path.read_text(errors="replace").strip().splitlines()[-8:]
            raise RuntimeError(f"{shown} exited with {proc.returncode}:\n    " + "\n    ".join(tail))
        return out_path.read_text(), wall, usage.ru_maxrss / 1024

    def json(self, argv: list, what: str, ok_codes: tuple[int, ...] = (0,), cwd: Path | None = None) -> dict:
        """Run a command that prints JSON (one object, possibly indented; or one object on its last line)."""
        out, wall, _ = self.run(argv, what, ok_codes, cwd)
        try:
            data = json.loads(out)
        except json.JSONDecodeError:
            try:
                data = json.loads(out.strip().splitlines()[-1])
            except (json.JSONDecodeError, IndexError):
                tail = self.last_err.read_text(errors="replace").strip().splitlines()[-8:]
                raise RuntimeError(f"{self.commands[-1]} printed no JSON:\n    " + "\n    ".join(tail)) from None
        data["_wall"] = wall
        return data

    def poetgen(self, *args) -> list[str]:
        return [sys.executable, "-m", "poetgen", *map(str, args)]

    def script(self, path: Path, *args) -> list[str]:
        threads = ["--threads", str(self.threads)] if self.threads else []
        return [sys.executable, str(path), *map(str, args), *threads, "--json"]


def budget(r: Runner, name: str):
    """BUDGETS[name] for the mode (None when it has none); a name ending in -fp32 or -bf16 has the budget of the
    name without it."""
    key = name if name in BUDGETS else re.sub(r"-(fp32|bf16)$", "", name)
    return BUDGETS[key][r.mode] if key in BUDGETS else None


def poetgen_argv(r: Runner, name: str, **values) -> list[str]:
    """The POETGEN command `name` with its placeholders filled (a list value becomes several arguments)."""
    if "budget" not in values and budget(r, name) is not None:
        values["budget"] = budget(r, name)
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


AUTO_NOTE = re.compile(r"^(Preset auto|Precision auto): .*$", re.M)


def train(r: Runner, name: str, dataset: Path, run_name: str | None = None, **values) -> dict:
    """Train with the POETGEN command: its summary, the run directory, metrics.jsonl's records, the precision the
    run trained in (its plan: what auto chose) and auto's notes from stderr."""
    runs, run_name = r.work / "runs", run_name or name
    summary = r.json([*poetgen_argv(r, name, dataset=dataset, **values), "--runs-dir", runs, "--name", run_name,
                      "--json"], run_name)
    notes = [m.group(0) for m in AUTO_NOTE.finditer(r.last_err.read_text(errors="replace"))] if r.last_err else []
    run_dir = runs / run_name
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    start = next((x for x in records if x.get("type") == "start"), {})
    cps = [x["chars_per_sec"] for x in records if x.get("type") == "train" and x.get("chars_per_sec")]
    elapsed = summary.get("elapsed")
    return {
        "steal": r.last_steal,
        "summary": summary, "run_dir": run_dir, "notes": notes, "chars_per_sec": cps,
        "steps": summary.get("step"), "epoch": summary.get("epoch"), "elapsed": elapsed,
        "best_val_loss": summary.get("best_val_loss"), "status": summary.get("status"),
        "tokens_seen": summary.get("tokens_seen"),
        "chars_per_sec_overall": summary["tokens_seen"] / elapsed if elapsed else None,
        "parameters": start.get("plan", {}).get("parameters"), "config": start.get("config"),
        "precision": start.get("plan", {}).get("precision"),
        # the median of the logged windows (one with an evaluation in it is an outlier the median ignores; the
        # first, warming up, is dropped); a run too short to log any: its overall rate
        "chars_per_sec_median": statistics.median(cps[1:] or cps) if cps else (
            summary["tokens_seen"] / elapsed if elapsed else None),
    }


def train_and_eval(r: Runner, name: str, dataset: Path, **values) -> dict:
    """Train with the POETGEN command (see ``train``), then `poetgen eval` its last checkpoint."""
    out = train(r, name, dataset, **values)
    ev = r.json(r.poetgen("eval", out["run_dir"] / "last.ckpt", "--json", "-q"), f"{name} eval")["models"][0]
    score = ev.get("warm") or ev["cold"]
    out.update(val_nats=score["nats_per_char"], val_bits=score["bits_per_char"],
               val_nats_cold=ev["cold"]["nats_per_char"], scored=ev["symbols"])
    return out


def median_run(trials: list[dict]) -> dict:
    """The run with the median validation loss among repeated ones (of an even count, the lower middle), carrying
    every trial's loss, steps and precision (``trials``) for the notes."""
    mid = sorted(trials, key=lambda p: p["val_nats"])[(len(trials) - 1) // 2]
    return dict(mid, trials=[(p["val_nats"], p["steps"], p["precision"], p.get("steal")) for p in trials])


def trials_note(p: dict) -> str:
    """"; median of 3 runs: 1.612 (914 steps, bf16), ..." for a run that was repeated, else ""."""
    t = p.get("trials") or []
    if len(t) < 2:
        return ""
    return f"; median of {len(t)} runs: " + ", ".join(
        f"{v:.3f} ({steps} steps, {prec}{', steal ' + steal_text(steal) if steal is not None else ''})"
        for v, steps, prec, steal in t)


def describe(p: dict) -> str:
    """A poetgen run in a note: model, precision, steps, epochs, parameters, and what auto said."""
    c = p.get("config") or {}
    text = (f"LSTM {c.get('layers', '?')}x{c.get('hidden', '?')} {p.get('precision') or '?'}, {p['steps']} steps, "
            f"{p['epoch']:.2f} epochs, {p['parameters'] or 0:,} parameters")
    chosen = []
    for n in p.get("notes", []):  # "Preset auto: short for 85 s on this machine (its ...)" -> before the bracket
        gain = re.search(r"ran ([\d.]+)x as fast in bf16", n)
        chosen.append(re.sub(r" \(.*", "", n) + (f", bf16 step {gain.group(1)}x fp32's" if gain else ""))
    return text + (f" ({'; '.join(chosen)})" if chosen else "")


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        raise Skip(f"shared data not available: {p}")
    return p


# --- groups ---------------------------------------------------------------------------------------------------------


def group_shakespeare(r: Runner, g: GroupResult) -> None:
    text = shared("tinyshakespeare", "input.txt")
    ds = prepare(r, "shakespeare-prepare", r.work / "shakespeare", shakespeare=text)
    # nanoGPT first: the wall time its 2,000 iterations take here is target 1's budget for the others.
    nano_args = ["--max-iters", budget(r, "nanogpt")] + (["--stride", 64] if r.quick else [])
    nanogpt = r.json(r.script(BASELINES / "nanogpt.py", ds, *nano_args), "nanoGPT")
    T = nanogpt["train_seconds"] if not r.quick else max(nanogpt["train_seconds"], QUICK_MIN_T)
    t_arg = f"{T:.1f}"
    charrnn = r.json(r.script(BASELINES / "charrnn.py", ds, "--budget", t_arg), "char-rnn")
    pt = train_and_eval(r, "shakespeare-nanogpt-time", ds, budget=t_arg)
    # Target 2. Without native bf16, auto runs fp32 (checked below): no bf16 run, and auto's run is the fp32 row.
    spans = {"85s": budget(r, "shakespeare-85s"), "10m": budget(r, "shakespeare-10m")}
    runs: dict[tuple[str, str], dict] = {}
    for span in spans:
        precisions = ("auto", "fp32", "bf16") if r.bf16 else ("auto",)
        n = TRIALS.get(f"shakespeare-{span}", (1, 1))[r.mode]
        got: dict[str, list[dict]] = {prec: [] for prec in precisions}
        for i in range(n):
            k = i % len(precisions)  # the order rotates, so each precision runs first, second and last once
            for prec in precisions[k:] + precisions[:k]:
                name = f"shakespeare-{span}" + ("" if prec == "auto" else f"-{prec}")
                got[prec].append(train_and_eval(r, name, ds, run_name=name + (f"-t{i + 1}" if n > 1 else "")))
        for prec, trials in got.items():
            runs[span, prec] = median_run(trials)
    g.raw.update(nanogpt=nanogpt, charrnn=charrnn, budget_seconds=T, poetgen_nanogpt_time=pt,
                 **{f"poetgen_{span}_{prec}": v for (span, prec), v in runs.items()})

    ng = f"nanoGPT, {budget(r, 'nanogpt')} iters ({nanogpt['train_seconds']:.0f} s)"
    what = f"Tiny Shakespeare, defaults, --max-time {t_arg} (nanoGPT's time): val nats/char"
    quick_note = f"; quick mode: at least {QUICK_MIN_T:g} s" if r.quick else ""
    for name, base, note in (
            (ng, nanogpt, f"poetgen {describe(pt)}{quick_note}"),
            (f"char-rnn, {t_arg} s", charrnn, f"char-rnn {charrnn['steps']} steps, {charrnn['epochs']:.2f} epochs")):
        q = ratio(pt["val_nats"], base["val_nats"])
        g.rows.append(Row("shakespeare", what, "<= 0.85 x anchor", pt["val_nats"], base["val_nats"], name,
                          status(q is not None and q <= 0.85), q, note=note))
    for span, label in spans.items():
        g.rows += precision_rows(r, runs, span, label)


def precision_rows(r: Runner, runs: dict, span: str, label: str) -> list[Row]:
    """Target 2 at one budget: auto against the better of fp32 and bf16, and the fp32 and bf16 rows themselves."""
    auto = runs[span, "auto"]
    what = f"Tiny Shakespeare, --max-time {label}, --precision"
    rows = []
    if r.bf16:
        fp32, bf16 = runs[span, "fp32"], runs[span, "bf16"]
        best_name, best = min((("fp32", fp32), ("bf16", bf16)), key=lambda x: x[1]["val_nats"])
        gap = auto["val_nats"] - best["val_nats"]
        rows.append(Row("shakespeare", f"{what} auto (ran {auto['precision']}): val nats/char",
                        f"<= anchor + {MAX_GAP_NATS:g}", auto["val_nats"], best["val_nats"],
                        f"better of fp32 / bf16 ({best_name})", status(gap <= MAX_GAP_NATS),
                        ratio(auto["val_nats"], best["val_nats"]),
                        note=f"{gap:+.3f} nats; auto: {describe(auto)}{trials_note(auto)}"))
        for name, p in (("fp32", fp32), ("bf16", bf16)):
            rows.append(Row("shakespeare", f"{what} {name}: val nats/char", "info", p["val_nats"], auto["val_nats"],
                            "--precision auto", "info", ratio(p["val_nats"], auto["val_nats"]),
                            note=describe(p) + trials_note(p)))
        return rows
    # No native bf16: auto must run fp32, and its run is the fp32 row.
    ok = all(t[2] == "fp32" for t in auto.get("trials") or [(None, None, auto["precision"])])
    rows.append(Row("shakespeare", f"{what} auto (ran {auto['precision']}): val nats/char",
                    "= fp32's row (no native bf16)", auto["val_nats"], auto["val_nats"] if ok else None,
                    "--precision fp32 (auto's own run)", status(ok), 1.0 if ok else None,
                    note=f"auto ran {auto['precision']}: {describe(auto)}{trials_note(auto)}"))
    rows.append(Row("shakespeare", f"{what} fp32: val nats/char", "info", auto["val_nats"] if ok else None,
                    None, "", "info", note="auto ran fp32 (no native bf16): its run, not repeated"))
    rows.append(Row("shakespeare", f"{what} bf16: val nats/char", "n/a", None, None, "", "n/a",
                    note="n/a: no native bf16"))
    return rows


def group_tang(r: Runner, g: GroupResult) -> None:
    tang = shared("tang")
    sources = [shared("tang", f) for f in QUICK_TANG_FILES] if r.quick else [tang]
    ds = prepare(r, "tang-prepare", r.work / "tang", tang=sources)
    book = r.json(r.script(BASELINES / "pytorch_book.py", ds, "--budget", budget(r, "pytorch-book")),
                  "pytorch-book")
    p = train_and_eval(r, "tang-10m", ds)
    # Speed at the book's model size: trials alternate, poetgen then the book, and each side's median counts.
    trials = TRIALS["tang-speed"][r.mode]
    ours, theirs, speed = [], [], {}
    for i in range(trials):
        speed = train(r, "tang-speed", ds, run_name=f"tang-speed-{i + 1}")
        ours.append(speed["chars_per_sec_median"])
        b = r.json(r.script(BASELINES / "pytorch_book.py", ds, "--budget", budget(r, "pytorch-book-speed"),
                            "--no-score"), f"pytorch-book speed, trial {i + 1}")
        theirs.append(b["real_chars_per_sec_warm"] or b["real_chars_per_sec"])
    g.raw.update(pytorch_book=book, poetgen=p, poetgen_speed=speed, speed_poetgen=ours, speed_book=theirs)
    label = budget(r, "tang-10m")
    anchor = f"pytorch-book, {budget(r, 'pytorch-book')} s"
    rb = ratio(p["val_bits"], book["val_bits"])
    g.rows.append(Row("tang", f"Tang, defaults, --max-time {label}: val bits/char", "<= 0.80 x anchor",
                      p["val_bits"], book["val_bits"], anchor, status(rb is not None and rb <= 0.80), rb,
                      note=f"unigram {book['unigram_nats'] / math.log(2):.3f} bits; book {book['epochs']:.2f} "
                           f"epochs; poetgen {describe(p)}"))
    cps, book_cps = statistics.median(ours), statistics.median(theirs)
    rc = ratio(cps, book_cps)
    head = (speed.get("config") or {}).get("head", "?")
    g.rows.append(Row("tang", "Tang, LSTM 256x2 embed 128: real characters trained per second", ">= 5 x anchor",
                      cps, book_cps, f"pytorch-book ({median_of(trials)})",
                      status(rc is not None and rc >= 5.0), rc, fmt="{:,.0f}",
                      note=f"{median_of(trials)} of each side, poetgen {budget(r, 'tang-speed')} steps, book "
                           f"{budget(r, 'pytorch-book-speed')} s: poetgen {', '.join(f'{x:,.0f}' for x in ours)}; "
                           f"book {', '.join(f'{x:,.0f}' for x in theirs)}; poetgen head {head}, "
                           f"{speed.get('precision')}, {speed['parameters'] or 0:,} parameters, book "
                           f"{book['parameters']:,}; the 10-minute run's own rate {p['chars_per_sec_median']:,.0f}"))


def synthetic_text(path: Path, chars: int = 400_000) -> Path:
    """ASCII text over Tiny Shakespeare's 65 symbols (throughput does not depend on which text)."""
    import numpy as np

    alphabet = np.frombuffer(b"\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    rng = np.random.default_rng(0)
    path.write_bytes(alphabet[rng.integers(0, len(alphabet), chars)].tobytes())
    return path


def group_flops(r: Runner, g: GroupResult) -> None:
    size = FLOPS_SIZE["quick" if r.quick else "full"]
    L, H, E, B, T = size["layers"], size["hidden"], size["embed"], size["batch"], size["seq"]
    text = synthetic_text(r.work / "flops.txt")
    ds = r.work / "flops-data"
    r.json(r.poetgen("prepare", text, "--split", "tail", "--val-fraction", "0.002", "-o", ds, "--json", "-q"),
           "flops prepare")
    V = len(json.loads((ds / "vocab.json").read_text())["symbols"])
    # A shared machine's speed drifts by 10-20% from minute to minute: the plain loop and poetgen's loop take turns
    # (plain fp32, poetgen fp32, plain bf16, poetgen bf16), TRIALS rounds; a trial's figure is its median step.
    precisions = ("fp32", "bf16") if r.bf16 else ("fp32",)
    rounds = TRIALS["flops"][r.mode]
    trials: dict[str, dict[str, list[float]]] = {p: {"plain": [], "poetgen": []} for p in precisions}
    for i in range(rounds):
        for prec in precisions:
            plain = r.json(r.script(BASELINES / "lstm_loop.py", "--vocab", V, "--embed", E, "--hidden", H,
                                    "--layers", L, "--batch", B, "--seq", T, "--steps", 3 if r.quick else 8,
                                    "--precision", prec), f"plain nn.LSTM loop, {prec}, round {i + 1}")
            key = "chars_per_sec" if prec == "fp32" else "bf16_chars_per_sec"
            if plain.get(key) is None:
                raise RuntimeError(f"the plain loop failed in {prec}: {plain.get('bf16_error')}")
            trials[prec]["plain"].append(plain[key])
            ours = train(r, "flops-step", ds, run_name=f"flops-{prec}-{i + 1}", precision=prec, **size)
            trials[prec]["poetgen"].append(statistics.median(ours["chars_per_sec"][2:] or ours["chars_per_sec"]))
    sys.path.insert(0, str(BASELINES))
    from common import lstm_train_flops_per_char

    fpc = lstm_train_flops_per_char(V, E, H, L)
    peak = r.machine.get("peak") or {}
    g.raw.update(trials=trials, flops_per_char=fpc, peak=peak)
    medians = {}
    for prec in ("fp32", "bf16"):
        what = f"LSTM {H}x{L}, batch {B}, seq {T}: training chars/s, {prec}"
        if prec not in trials:
            g.rows.append(Row("flops", what, ">= 0.97 x anchor", None, None, "", "n/a", note="n/a: no native bf16"))
            continue
        ours, theirs = statistics.median(trials[prec]["poetgen"]), statistics.median(trials[prec]["plain"])
        medians[prec] = ours
        q = ratio(ours, theirs)
        top = peak.get("onednn_gflops" if prec == "fp32" else "onednn_bf16_gflops")
        share = (f"; model GFLOP/s poetgen {ours * fpc / 1e9:.0f}, plain {theirs * fpc / 1e9:.0f}"
                 + (f" = {ours * fpc / 1e9 / top:.0%} / {theirs * fpc / 1e9 / top:.0%} of the oneDNN {prec} peak "
                    f"{top:.0f}" if top else ""))
        g.rows.append(Row("flops", what, ">= 0.97 x anchor", ours, theirs,
                          f"plain nn.LSTM loop ({median_of(rounds)})",
                          status(q is not None and q >= 0.97), q, fmt="{:,.0f}",
                          note=f"{median_of(rounds)} of each side (a trial: the median of its steps): poetgen "
                               f"{', '.join(f'{x:,.0f}' for x in trials[prec]['poetgen'])}; plain "
                               f"{', '.join(f'{x:,.0f}' for x in trials[prec]['plain'])}{share}"))
    if "bf16" in medians and peak.get("onednn_bf16_gflops") and peak.get("onednn_gflops"):
        gemm = peak["onednn_bf16_gflops"] / peak["onednn_gflops"]
        g.rows.append(Row("flops", f"LSTM {H}x{L}: poetgen's bf16 step speed / its fp32 step speed", "info",
                          medians["bf16"] / medians["fp32"], gemm, "oneDNN bf16 / fp32 matmul peak", "info",
                          fmt="{:.2f}x", note="the figures of the two rows above"))


def group_sample(r: Runner, g: GroupResult) -> None:
    quick = ["--quick"] if r.quick else []
    rows = bench_sample_rows(r, quick)
    g.raw.update(bench_sample=rows)
    speed = [x for x in rows if x["unit"] == "chars/s" and x["name"].startswith("free text")
             and "adaptive" not in x["name"] and x.get("anchor")]
    targets = {1: 5.0, 64: 2.0}  # issue 20, target 5: x the plain per-step loop
    for x in speed:
        t = targets.get(x["streams"])
        # The targets are for a small vocabulary (Tiny Shakespeare's); the rows at a Tang-sized one (6,000 symbols,
        # where the output layer outweighs the recurrence) are shown for scale.
        issue_row = t is not None and x.get("vocab", 65) < 1000
        q = ratio(x["value"], x.get("anchor"))
        note = f"{median_of(x['trials'])} each; " if x.get("trials") else ""
        if x.get("values") and x.get("anchors"):  # the spread: the anchor's speed moves most (torch's threads)
            note += (f"trials: poetgen {min(x['values']):,.0f}-{max(x['values']):,.0f}, anchor "
                     f"{min(x['anchors']):,.0f}-{max(x['anchors']):,.0f}; ")
        if x.get("threads") is not None and x.get("anchor_threads") is not None:
            note += (f"poetgen ended on {x['threads']} BLAS thread(s) (tuned while sampling); the anchor on the "
                     f"better of torch's 1 and default threads: {x['anchor_threads']}")
        g.rows.append(Row("sample", f"LSTM 256x2 sampling, {x['name']}: chars/s",
                          (f">= {t:g} x anchor" if issue_row else f">= {t:g} x anchor (info)") if t else "-",
                          x["value"], x.get("anchor"), x.get("anchor_name") or "plain per-step nn.LSTM loop",
                          status(q is not None and q >= t) if issue_row else "info", q, fmt="{:,.0f}",
                          note=note.rstrip("; ")))
    for x in rows:  # issue 16: the prosody constraints' cost per poem against --form alone
        if x["unit"] == "ms/poem" and x.get("anchor"):
            limit = x.get("limit", 1.3)
            q = ratio(x["value"], x["anchor"])
            g.rows.append(Row("sample", x["name"], f"<= {limit:g} x anchor", x["value"], x["anchor"],
                              x.get("anchor_name", ""), status(q is not None and q <= limit), q, fmt="{:.2f}"))
    walls = [x for x in rows if x["unit"] == "s"]
    calls = [x for x in walls if "poetgen sample" in x["name"]]
    # the issue's call writes 4 poems; else the closest row bench_sample has (a form, a few poems)
    call = next((x for x in calls if re.search(r"-n 4\b", x["name"])), None) or \
        next((x for x in calls if "--form" in x["name"] and "-n 64" not in x["name"]), None) or \
        (calls[0] if calls else None)
    helps = next((x for x in walls if "--help" in x["name"]), None)
    for x, limit in ((call, 2.0), (helps, 0.3)):  # issue 7's limits, in seconds
        if x is not None:
            name = x["name"] if x["name"].startswith(("whole", "`")) else f"`{x['name']}`"
            g.rows.append(Row("sample", f"{name}: seconds", f"< {limit:g}", x["value"], x.get("anchor"),
                              x.get("anchor_name") or "python -c 'import torch'", status(x["value"] < limit),
                              ratio(x["value"], x.get("anchor")), fmt="{:.2f}"))


def group_serve(r: Runner, g: GroupResult) -> None:
    """Target 6: bench_serve.py's concurrent-against-sequential row (it exits 1 when a limit is missed: its JSON
    still says which)."""
    rounds = TRIALS["serve"][r.mode]
    cwd = r.work / "serve"  # empty: `-c tang` names the shipped model only where no path `tang` exists
    cwd.mkdir(exist_ok=True)
    data = r.json([sys.executable, HERE / "bench_serve.py", *shlex.split(SERVE_ARGS), "--rounds", rounds,
                   "--bad", 50 if r.quick else 1000, "--json"], "bench_serve", ok_codes=(0, 1), cwd=cwd)
    g.raw.update(bench_serve=data)
    q = data["speedup"]
    fails = data["failed"]
    m = data["model"]
    b = data["batches"]
    g.rows.append(Row("serve", f"serve: {data['clients']} concurrent {data['form']} requests: poems/s",
                      ">= 5 x anchor", data["concurrent_poems_per_sec"], data["sequential_poems_per_sec"],
                      f"the same requests one at a time (same server, {median_of(rounds, 'round')})",
                      status(q >= 5.0 and fails == 0), q, fmt="{:.1f}",
                      note=f"model {m['name']} ({m['cell']} {m['layers']}x{m['hidden']}, vocabulary "
                           f"{m['vocab_size']}); p50 {data['p50_ms']['concurrent']:.0f} ms against "
                           f"{data['p50_ms']['sequential']:.0f} ms; failed requests {fails}; poems equal to the one "
                           f"written alone {data['equal_to_alone']}/{data['requests']}; batches: mean "
                           f"{b.get('mean_batch', 0):.1f} rows, largest {b.get('max_batch')}; bad requests "
                           f"{data['bad_answered_4xx']}/{data['bad']} answered 4xx, good ones "
                           f"{data['good_answered_200']}/{data['good']} 200; server RSS growth "
                           f"{data['rss_growth_mb']:+.1f} MB"))


def bench_sample_rows(r: Runner, quick: list[str]) -> list[dict]:
    """HOOK into benchmarks/bench_sample.py (owned by another helper): its rows, each
    {name, value, unit ("chars/s" or "s"), anchor (or None), anchor_name, streams, vocab}.

    Reads `bench_sample.py --json` ({"rows": [...]} in that shape), else the older {"speed", "wall"} JSON, else
    the tables it printed before it had --json."""
    script = HERE / "bench_sample.py"
    # The anchor is a torch loop; poetgen's sampling runs no OpenMP. Under the OMP_WAIT_POLICY=PASSIVE set for the
    # training groups (torch on both sides there) every small op of the loop wakes torch's threads: measured
    # 2026-12-02 (AMD EPYC, 64 streams) 12,000-22,000 chars/s against 80,000-97,000 under torch's own policy. So
    # bench_sample runs with the policy the user's environment has, as a user's loop would.
    own = ["env", "-u", "OMP_WAIT_POLICY"] if "OMP_WAIT_POLICY" not in os.environ and shutil.which("env") else []
    if "--json" in script.read_text():
        data = r.json([*own, sys.executable, script, *quick, "--json"], "bench_sample")
        if isinstance(data.get("rows"), list) and all("unit" in x for x in data["rows"]):
            return data["rows"]
        if "speed" in data and "wall" in data:
            return _old_rows(data["speed"], data["wall"])
    out, _, _ = r.run([*own, sys.executable, script, *quick], "bench_sample")
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
               "serve": group_serve, "prepare": group_prepare}
TITLES = {"shakespeare": "Tiny Shakespeare: quality in nanoGPT's time; precision auto against fp32 and bf16 "
                         "(issue 20, targets 1, 2)",
          "tang": "Tang: bits per character and training speed against the pytorch-book recipe (issue 20, target 3)",
          "flops": "Training step at LSTM 512x2 against a plain nn.LSTM loop, fp32 and bf16 (issue 20, target 4)",
          "sample": "Sampling against a plain per-step loop; start-up (issue 20, target 5; issues 7, 16)",
          "serve": "Serving: concurrent requests against one at a time (issue 20, target 6; issue 19)",
          "prepare": "prepare (issue 7)"}


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
        # poetgen.model.devices.cpu_bf16_native's flags; flops.py peak asks poetgen itself (which also asks oneDNN)
        info["bf16_native"] = "avx512_bf16" in flags or "amx_bf16" in flags
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


def measure_peaks(r: Runner) -> None:
    """The oneDNN fp32 and bf16 matrix-multiply peaks (flops.py peak) into r.machine, once per run: the machine
    line of every group shows them. A failure is noted, not fatal."""
    try:
        peak = r.json(r.script(HERE / "flops.py", "peak", *(["--quick"] if r.quick else [])), "matmul peaks")
    except (RuntimeError, OSError, ValueError) as e:
        r.machine["peak_error"] = str(e).splitlines()[0]
        return
    r.machine["peak"] = peak
    if peak.get("bf16_native") is not None:
        r.machine["bf16_native"] = peak["bf16_native"]


def machine_line(m: dict, threads: int) -> str:
    peak = m.get("peak") or {}
    if peak:
        how = "" if peak.get("onednn_bf16_how", "mkldnn_linear") == "mkldnn_linear" else (
            f" (through {peak['onednn_bf16_how']}: oneDNN refused bf16)")
        peaks = (f"oneDNN matmul peaks (flops.py peak) fp32 {peak['onednn_gflops']:,.0f}, bf16 "
                 f"{peak['onednn_bf16_gflops']:,.0f}"
                 f"{how} GFLOP/s")
    else:
        peaks = f"matmul peaks not measured{': ' + m['peak_error'] if m.get('peak_error') else ''}"
    native = {True: "native bf16", False: "no native bf16"}.get(m.get("bf16_native"), "native bf16 unknown")
    return (f"{m.get('cpu')}, {m.get('cpus_usable')} cores usable ({m.get('mhz')} MHz), flags "
            f"{' '.join(m.get('matmul_flags', [])) or '-'} ({native}); {peaks}; {m.get('memory_gib')} GiB; torch "
            f"{m.get('torch')} (CPU capability {m.get('torch_cpu_capability')}), "
            f"{threads or m.get('torch_default_threads')} threads; Python {m.get('python')}")


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
             f"{' '.join(f'{x:.1f}' for x in g.load_before)}"
             + (f"; CPU time taken by the hypervisor (steal) during the group: {steal_text(g.steal)}"
                if g.steal is not None else ""), "", f"Machine: {machine_line(m, threads)}; every "
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
    title = ("## Issues 7 and 20: poetgen against anchors measured in the same run, side by side "
             "(`python benchmarks/run.py --full`)" if mode == "full" else
             "## Issues 7 and 20, quick smoke check (`python benchmarks/run.py --quick --out ...`): tiny budgets, the "
             "figures mean nothing")
    intro = ("Written by benchmarks/run.py (its docstring says what each row measures). Each group's block records "
             "its own run; `--only` replaces only the groups it ran.")
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    if begin not in text:
        blocks = "\n".join(f"<!-- group {n}: begin -->\n_not run yet_\n<!-- group {n}: end -->\n" for n in GROUPS)
        text = text.rstrip("\n") + f"\n\n{begin}\n{title}\n\n{intro}\n\n{blocks}{end}\n"
    i, j = text.index(begin), text.index(end)
    section = re.sub(r"\A(.*\n)## .*\n", lambda x: x.group(1) + title + "\n", text[i:j])  # the title of today
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
    mode.add_argument("--full", action="store_true", help="the real figures (~75 min on 2 cores)")
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
    m = r.machine = machine()
    results: list[GroupResult] = []
    t_all = time.perf_counter()
    try:
        measure_peaks(r)
        log(f"{mode_name} mode; scratch {work}; {machine_line(m, args.threads)}")
        for name in args.only or GROUPS:
            g = GroupResult(name, started=dt.datetime.now().strftime("%Y-%m-%d %H:%M"), load_before=os.getloadavg())
            first = len(r.commands)
            times = cpu_times()
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
            g.steal = cpu_steal(times, cpu_times())
            g.commands = r.commands[first:]
            results.append(g)
            log(f"{name}: done in {g.seconds / 60:.1f} min" + (f"; steal {steal_text(g.steal)}" if g.steal else ""))
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
        print(f"\npoetgen benchmarks (issues 7, 20), {mode_name} mode, {(time.perf_counter() - t_all) / 60:.1f} min; "
              f"{machine_line(m, args.threads)}\n")
        print_table(rows)
    if out is not None:
        update_results(out, results, m, args.threads, mode_name)
        log(f"wrote the {mode_name} section of {out}")
    return 1 if any(g.error and not g.error.startswith("shared data") for g in results) else 0


if __name__ == "__main__":
    sys.exit(main())
