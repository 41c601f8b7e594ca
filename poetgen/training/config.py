"""Training configuration: typed defaults, presets, TOML files, and their precedence.

Precedence, lowest first: the defaults below (= the ``small`` preset), then ``--preset`` (or a ``preset`` key in the
config file), then the TOML config file, then command-line flags. Unknown keys and wrong types are refused.

With no preset named anywhere, ``auto`` applies, by the --max-time budget: of ``quick``, ``short`` and ``small`` the
one whose measured loss curve (AUTO_CURVES, loss after n steps) is lowest at the steps the budget buys at that preset's
own speed on this machine, in the precision it would run (poetgen.training.loop.step_speed); with no time budget, or
on a training split under AUTO_MIN_TOKENS characters, always ``small``. The presets and curves were found
by measurement (benchmarks/RESULTS.md, "training recipe search"; the README's table): the shorter the budget, the
narrower the LSTM that wins, and where bf16 speeds the wider model more (AMX), the wider model wins sooner.
``PRESETS`` below is the one definition; the CLI's help text is made from it (``describe_preset``).

A config file is flat TOML whose keys are the field names below (``batch_size`` or ``batch-size``)::

    preset = "small"
    cell = "gru"
    hidden = 384
    max_time = "10m"      # seconds, or a duration such as "90s", "10m", "1h30m"
"""

from __future__ import annotations

import bisect
import math
import re
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

from poetgen.errors import ConfigError
from poetgen.model.config import HEAD_CHOICES, REGULARISERS, check_type

PRECISIONS = ("auto", "fp32", "bf16")
# precision auto on a CPU with native bf16 (AVX512-BF16, AMX) takes bf16 when a training step of the run's own model is
# at least this much faster in bf16 than in fp32 (poetgen.training.session). The issue that asked for it set 1.3x; with
# the output layer in fp32 a bf16 step learns almost what an fp32 step does (0.013 nats behind after 400 steps), and
# measured on Tiny Shakespeare (AMX) bf16 already won at 1.12x (`short`, 128 s: 1.579 against fp32's 1.617) and at
# 1.17x (85 s: 1.680 against 1.751); where more steps no longer help (10 minutes, overfitting), 1.54x lost 0.013.
BF16_MIN_GAIN = 1.1
# ... and weighs it only for a model at least this wide: below, oneDNN's bf16 steps are no faster than fp32 (too small
# to be bound by the multiplications), so the probe's second or two would be spent for nothing.
BF16_MIN_HIDDEN = 128
# The budget when neither max_steps, max_epochs nor max_time is set: 10 epochs, but at least 500 steps (a small
# corpus such as the bundled one has only a few batches per epoch).
DEFAULT_EPOCHS = 10
DEFAULT_MIN_STEPS = 500
# `auto` (see the module docstring and auto_preset): each candidate's validation loss on Tiny Shakespeare (nats/char,
# the run's own figure at its end) after a run of n steps (its learning rate decaying to zero at the end), (n, loss)
# in order (benchmarks/RESULTS.md, "training recipe search"): real-time runs of 85, 130, 280 and 420 s and nine
# minutes of compute on the reference machine, and `small` at 150 and 230 steps on an AMX Xeon (2.075 and 1.860 there,
# + 0.020: the same machine's 489 steps gave 1.569 against the reference's 1.589).
AUTO_CURVES: dict[str, tuple[tuple[int, float], ...]] = {
    "quick": ((1210, 1.708), (1918, 1.659), (4583, 1.662)),
    "short": ((539, 1.726), (979, 1.641), (1960, 1.529), (3384, 1.494)),
    "small": ((150, 2.095), (230, 1.880), (489, 1.589), (732, 1.496), (950, 1.465)),
}
# Their steps a second on the reference machine (2 cores, AVX2, oneDNN fp32 peak ~130 GFLOP/s), in those real-time
# runs: what auto assumes when it measures nothing (under torchrun). The curves then cross near 95 s and 405 s.
REFERENCE_STEPS_PER_SEC = {"quick": 14.2, "short": 7.0, "small": 1.74}
# A real run makes this share of the steps its probe (poetgen.training.loop.step_speed) promises: data, logging and
# evaluations (AMX Xeon, Tiny Shakespeare: 0.92 and 0.95 at 128 s, 0.83 at 85 s; the probe reads a bare step).
PROBE_SHARE = 0.9
# What the probe of a preset takes from the flags and the config file besides the preset: the model and the batch.
PROBED_FIELDS = ("cell", "layers", "hidden", "embed", "dropout", "weight_drop", "embed_dropout", "batch_size",
                 "seq_len")
# `small` always for a training split under AUTO_MIN_TOKENS characters (quick and short have no dropout and overfit a
# small corpus: on the bundled 474 poems in 3 minutes quick reached 6.88 nats/char, small 6.19).
AUTO_MIN_TOKENS = 500_000
MODEL_FIELDS = ("cell", "layers", "hidden", "embed", "dropout", "weight_drop", "embed_dropout", "tie_weights", "head",
                "cutoffs", "div_value")
# Changing these on --resume would change what a step means (data position, shapes): refused.
FIXED_ON_RESUME = ("cell", "layers", "hidden", "embed", "tie_weights", "head", "cutoffs", "div_value", "batch_size",
                   "seq_len")


@dataclass
class TrainConfig:
    # model
    cell: str = "lstm"
    layers: int = 2
    hidden: int = 384
    embed: int = 64
    dropout: float = 0.1
    weight_drop: float = 0.0  # DropConnect on the recurrent matrices (the language model; poetgen.model.rnn)
    embed_dropout: float = 0.0  # whole characters dropped from the embedding (the language model)
    tie_weights: bool = False
    head: str = "auto"  # full softmax | adaptive softmax (large vocabularies) | auto (adaptive from 4,096 symbols)
    cutoffs: tuple[int, ...] = ()  # adaptive head: shortlist size, then each further cluster's start; () = automatic
    div_value: float = 4.0  # adaptive head: tail cluster i projects hidden -> hidden // div_value ** (i + 1)
    # data and optimisation
    batch_size: int = 64  # parallel contiguous streams
    seq_len: int = 64  # characters per truncated-BPTT window
    lr: float = 1e-2
    min_lr_ratio: float = 0.0  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 5.0  # max global gradient norm; 0 = off
    # budget (0 = no limit); training stops at whichever comes first; none given = DEFAULT_EPOCHS / _MIN_STEPS
    max_steps: int = 0
    max_epochs: int = 0
    max_time: float = 0.0  # seconds of wall clock, counted across resumes
    # evaluation, checkpoints, progress
    eval_every: int = 500  # steps between evaluations of the whole validation split (each costs training time)
    patience: int = 5  # stop after this many evaluations without improvement; 0 = never
    save_every: int = 0  # steps between saves of last.ckpt; 0 = at every evaluation
    keep: int = 0  # also keep the N newest step-<k>.ckpt snapshots; 0 = only last and best
    sample_every: int = 2  # show a sample every N evaluations; 0 = never
    sample_length: int = 120
    log_every: int = 10  # steps between metrics.jsonl lines / plain log lines
    # runtime
    seed: int = 1337
    device: str = "auto"
    # auto: bf16 autocast on CUDA; on a CPU fp32, unless `poetgen train` (training.session) measured bf16 faster and
    # wrote bf16 here
    precision: str = "auto"
    compile: bool = False
    threads: int = 0  # CPU threads for torch; 0 = torch's default

    def __post_init__(self) -> None:
        for f in fields(self):
            check_type(f.name, getattr(self, f.name), f.type)
        self.max_time = float(self.max_time)
        for name in REGULARISERS:
            setattr(self, name, float(getattr(self, name)))
        self.div_value = float(self.div_value)
        self.cutoffs = tuple(self.cutoffs)  # a TOML or JSON list
        positive = ("layers", "hidden", "embed", "batch_size", "seq_len", "eval_every", "sample_length", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "weight_decay", "grad_clip", "max_steps", "max_epochs", "max_time",
                        "patience", "save_every", "keep", "sample_every", "threads")
        for name in non_negative:
            v = getattr(self, name)
            if v < 0 or (isinstance(v, float) and not math.isfinite(v)):
                raise ConfigError(f"{name} must be 0 or more, got {v}")
        if not -(2**63) <= self.seed < 2**64:  # what torch.manual_seed accepts
            raise ConfigError(f"seed must be from -2**63 to 2**64 - 1, got {self.seed}")
        if self.cell not in ("rnn", "lstm", "gru"):
            raise ConfigError(f"cell must be rnn, lstm or gru, got {self.cell!r}")
        for name in REGULARISERS:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.tie_weights and self.embed != self.hidden:
            raise ConfigError(f"tie_weights needs embed == hidden (got embed={self.embed}, hidden={self.hidden})")
        self._check_head()

    def _check_head(self) -> None:
        """What can be checked without the vocabulary; the model config checks the cutoffs against its size."""
        if self.head not in HEAD_CHOICES:
            raise ConfigError(f"head must be one of {', '.join(HEAD_CHOICES)}, got {self.head!r}")
        c = self.cutoffs
        if c and (c[0] < 1 or any(b <= a for a, b in zip(c, c[1:]))):
            raise ConfigError(f"cutoffs must be rising positive integers (the shortlist size, then the start of each "
                              f"further cluster), got {','.join(map(str, c))}")
        if c and self.head == "full":
            raise ConfigError("cutoffs apply to the adaptive head only: add --head adaptive, or drop --cutoffs")
        if not (self.div_value >= 1.0 and math.isfinite(self.div_value)):
            raise ConfigError(f"div_value must be a number of at least 1, got {self.div_value}")
        if self.tie_weights and self.head == "adaptive":
            raise ConfigError("tie_weights needs the full head: the adaptive head has no (V, H) output matrix to share")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> TrainConfig:
        return cls(**normalise_keys(d, where))

    def model_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in MODEL_FIELDS}


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(layers=1, hidden=128, embed=64, dropout=0.0, batch_size=32, seq_len=64, lr=3e-3,
                 warmup_steps=50, eval_every=100),
    "quick": dict(layers=2, hidden=128, embed=64, dropout=0.0, batch_size=50, seq_len=50, lr=2e-2,
                  warmup_steps=20),
    "short": dict(hidden=256, dropout=0.0, batch_size=32, lr=1.5e-2),
    "small": {},
    "medium": dict(layers=2, hidden=512, embed=256, dropout=0.2, seq_len=128, lr=1.5e-3, warmup_steps=200),
    "large": dict(layers=3, hidden=1024, embed=512, dropout=0.3, seq_len=256, lr=1e-3, warmup_steps=500,
                  eval_every=1000),
}



def describe_preset(name: str) -> str:
    """A preset in a few words, from PRESETS itself: ``2×256, embed 64, batch 32×64, lr 0.015`` (what the CLI's help
    shows, so help and presets cannot drift apart)."""
    c = TrainConfig(**PRESETS[name])
    return (f"{c.cell.upper() if c.cell != 'lstm' else 'LSTM'} {c.layers}×{c.hidden}, embed {c.embed}, "
            f"batch {c.batch_size}×{c.seq_len}, lr {c.lr:g}, dropout {c.dropout:g}")


def preset_help() -> str:
    """The help text of ``--preset``: auto's rule, then every preset described."""
    auto = (f"auto (the default: with --max-time, the one of {', '.join(AUTO_CURVES)} whose measured loss curve is "
            f"lowest after the steps the budget buys, by a speed probe of each on this machine; without, and for a "
            f"corpus under {AUTO_MIN_TOKENS:,} characters, small)")
    return " | ".join([auto, *(f"{n} ({describe_preset(n)})" for n in PRESETS)]) + "."


def normalise_keys(d: dict, where: str) -> dict[str, Any]:
    """Accept `batch-size` as well as `batch_size`; refuse keys that are not TrainConfig fields."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a table of settings")
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = str(key).replace("-", "_")
        if name not in FIELD_NAMES:
            hint = " (settings are flat keys; no [tables])" if isinstance(value, dict) else ""
            raise ConfigError(f"{where}: unknown setting {key!r}{hint}. Known: {', '.join(FIELD_NAMES)}")
        if name == "max_time" and isinstance(value, str):
            value = parse_duration(value)
        if name == "cutoffs" and isinstance(value, str):
            value = parse_cutoffs(value)
        out[name] = value
    return out


def parse_duration(text: str) -> float:
    """'600', '90s', '10m', '1.5h', '1h30m' -> seconds."""
    s = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", s)
    if not parts or "".join(n + u for n, u in parts) != s:
        raise ConfigError(f"not a duration: {text!r} (use seconds, or e.g. 90s, 10m, 1h30m)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def parse_cutoffs(text: str) -> tuple[int, ...]:
    """'2000,4000' (or '2000 4000') -> (2000, 4000); '' -> () (automatic)."""
    items = [x for x in re.split(r"[,\s]+", text.strip()) if x]
    if not all(re.fullmatch(r"\d+", x) for x in items):
        raise ConfigError(f"cutoffs must be comma-separated whole numbers such as 2000,4000, got {text!r}")
    return tuple(int(x) for x in items)


def load_toml(path: str | Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p} is not valid TOML: {e}") from None


def resolve_config(
    preset: str | None = None, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
    train_tokens: int | None = None, speed: Callable[[dict[str, Any], str], float] | None = None,
) -> TrainConfig:
    """defaults < preset < config file < overrides (flags). ``preset`` argument beats a preset key in the file.
    ``train_tokens``: the size of the training split, which preset `auto` weighs (see auto_preset); ``speed``: a
    function of the settings given (file and flags: device, threads) and a preset's name -> that preset's training
    steps a second on this machine (auto_preset's ``steps_per_sec``), called only when `auto` has a time budget to
    weigh (None: the reference machine's)."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        raw = dict(load_toml(config_file))
        file_preset = raw.pop("preset", None)
        if file_preset is not None and not isinstance(file_preset, str):
            raise ConfigError(f"{config_file}: preset must be a string")
        preset = preset or file_preset
        file_values = normalise_keys(raw, str(config_file))
    flags = normalise_keys(overrides or {}, "flags")
    if preset is None or preset == "auto":
        given = {**file_values, **flags}
        if speed is not None:
            TrainConfig(**given)  # a bad value is refused here, before the speed probe runs on it
        preset = auto_preset(given.get("max_time", 0.0), train_tokens,
                             (lambda name: speed(given, name)) if speed is not None else None)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of auto, {', '.join(PRESETS)}")
    values: dict[str, Any] = dict(PRESETS[preset])
    values.update(file_values)
    values.update(flags)
    return TrainConfig(**values)


def predicted_loss(preset: str, steps: float) -> float:
    """``preset``'s loss after a run of ``steps`` steps, by AUTO_CURVES: linear in log steps between measured points;
    before the first, the first segment's slope; after the last, the last loss (no preset is credited with a gain
    nobody measured)."""
    points = AUTO_CURVES[preset]
    x = math.log(max(steps, 1e-9))
    xs = [math.log(n) for n, _ in points]
    if x >= xs[-1]:
        return points[-1][1]
    i = max(1, bisect.bisect_right(xs, x))  # the segment (i - 1, i); below the first point, the first one extended
    (x0, y0), (x1, y1) = (xs[i - 1], points[i - 1][1]), (xs[i], points[i][1])
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def auto_preset(max_time: object, train_tokens: int | None = None,
                steps_per_sec: Callable[[str], float] | None = None) -> str:
    """The preset `auto` stands for, given the --max-time budget (seconds; 0 = none), the training split's size and
    ``steps_per_sec``: a preset's name -> its training steps a second on this machine (poetgen.training.session, by
    poetgen.training.loop.step_speed), called only when the choice depends on it; None: REFERENCE_STEPS_PER_SEC.
    Of AUTO_CURVES' presets, the one with the lowest predicted_loss after the steps the budget buys (the narrower on
    a tie); always `small` for a corpus of fewer than AUTO_MIN_TOKENS training characters, and without a time
    budget."""
    timed = isinstance(max_time, (int, float)) and not isinstance(max_time, bool) and max_time > 0
    if not timed or (train_tokens is not None and train_tokens < AUTO_MIN_TOKENS):
        return "small"
    rate = steps_per_sec or REFERENCE_STEPS_PER_SEC.__getitem__
    return min(AUTO_CURVES, key=lambda p: predicted_loss(p, max_time * rate(p)))


def with_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    return replace(config, **normalise_keys(overrides, "flags"))
