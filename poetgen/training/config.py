"""Training configuration: typed defaults, presets, TOML files, and their precedence.

Precedence, lowest first: the defaults below (= the ``small`` preset), then ``--preset`` (or a ``preset`` key in the
config file), then the TOML config file, then command-line flags. Unknown keys and wrong types are refused.

With no preset named anywhere, ``auto`` applies, by the --max-time budget: ``quick`` under QUICK_BELOW seconds,
``short`` under SHORT_BELOW, else (and with no time budget) ``small``; on a training split under AUTO_MIN_TOKENS
characters always ``small``. The seconds are the reference machine's: the budget is first scaled by this machine's
measured speed against it (poetgen.training.loop.machine_speed). The presets and thresholds were found by measurement
(benchmarks/RESULTS.md, "training recipe search"; the README's table): the shorter the budget, the narrower the LSTM
that wins. ``PRESETS`` below is the one definition; the CLI's help text is made from it (``describe_preset``).

A config file is flat TOML whose keys are the field names below (``batch_size`` or ``batch-size``)::

    preset = "small"
    cell = "gru"
    hidden = 384
    max_time = "10m"      # seconds, or a duration such as "90s", "10m", "1h30m"
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

from poetgen.errors import ConfigError
from poetgen.model.config import HEAD_CHOICES, check_type

PRECISIONS = ("auto", "fp32", "bf16")
# precision auto on a CPU with native bf16 (AVX512-BF16, AMX) takes bf16 when a training step of the run's own model is
# at least this much faster in bf16 than in fp32 (poetgen.training.session; the issue that asked for it set 1.3x).
BF16_MIN_GAIN = 1.3
# ... and weighs it only for a model at least this wide: below, oneDNN's bf16 steps are no faster than fp32 (too small
# to be bound by the multiplications), so the probe's second or two would be spent for nothing.
BF16_MIN_HIDDEN = 128
# The budget when neither max_steps, max_epochs nor max_time is set: 10 epochs, but at least 500 steps (a small
# corpus such as the bundled one has only a few batches per epoch).
DEFAULT_EPOCHS = 10
DEFAULT_MIN_STEPS = 500
# `auto` (see the module docstring): `quick` below QUICK_BELOW seconds of --max-time, `short` below SHORT_BELOW,
# else `small`; `small` always for a training split under AUTO_MIN_TOKENS characters (quick and short have no dropout
# and overfit a small corpus: on the bundled 474 poems in 3 minutes quick reached 6.88 nats/char, small 6.19).
QUICK_BELOW = 100.0
SHORT_BELOW = 420.0
AUTO_MIN_TOKENS = 500_000
MODEL_FIELDS = ("cell", "layers", "hidden", "embed", "dropout", "tie_weights", "head", "cutoffs", "div_value")
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
        self.dropout = float(self.dropout)
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
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
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
    """The help text of ``--preset``: auto's rule with its thresholds, then every preset described."""
    auto = (f"auto (the default: by --max-time in the reference machine's seconds, scaled by a one-second speed "
            f"probe: quick under {QUICK_BELOW:g} s, short under {SHORT_BELOW / 60:g} min, else small; small for a "
            f"corpus under {AUTO_MIN_TOKENS:,} characters)")
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
    train_tokens: int | None = None, speed: Callable[[dict[str, Any]], float] | None = None,
) -> TrainConfig:
    """defaults < preset < config file < overrides (flags). ``preset`` argument beats a preset key in the file.
    ``train_tokens``: the size of the training split, which preset `auto` weighs (see auto_preset); ``speed``: a
    function of the settings given (file and flags: device, threads) -> this machine's speed for auto_preset,
    called only when `auto` has a time budget to weigh (None: speed 1, the thresholds as measured)."""
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
                             (lambda: speed(given)) if speed is not None else 1.0)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of auto, {', '.join(PRESETS)}")
    values: dict[str, Any] = dict(PRESETS[preset])
    values.update(file_values)
    values.update(flags)
    return TrainConfig(**values)


def auto_preset(max_time: object, train_tokens: int | None = None,
                speed: float | Callable[[], float] | None = 1.0) -> str:
    """The preset `auto` stands for, given the --max-time budget (seconds; 0 = none), the training split's size and
    this machine's ``speed`` (its training throughput as a multiple of the machine the thresholds were measured on;
    see poetgen.training.loop.machine_speed): `quick` under QUICK_BELOW seconds of that machine's compute, `short` under
    SHORT_BELOW, else `small`; always `small` for a corpus of fewer than AUTO_MIN_TOKENS training characters, and
    without a time budget. ``speed`` may be a callable, called only when the choice depends on it."""
    timed = isinstance(max_time, (int, float)) and not isinstance(max_time, bool) and max_time > 0
    if not timed or (train_tokens is not None and train_tokens < AUTO_MIN_TOKENS):
        return "small"
    factor = speed() if callable(speed) else (speed or 1.0)
    budget = max_time * factor
    return "quick" if budget < QUICK_BELOW else "short" if budget < SHORT_BELOW else "small"


def with_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    return replace(config, **normalise_keys(overrides, "flags"))
