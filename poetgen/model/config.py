"""The model's configuration, without torch: `poetgen sample` reads checkpoints on the CPU without importing it.

poetgen.model.rnn imports ModelConfig, CELLS, HEADS and auto_cutoffs from here: one definition for the torch model and
the numpy runtime (poetgen.model.runtime). What the fields mean: poetgen.model.rnn's docstring.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from poetgen.errors import ConfigError

CELLS = ("rnn", "lstm", "gru")
# Dropout rates: how the model trains, not what it is (fine-tuning may change them; inference ignores them).
REGULARISERS = ("dropout", "weight_drop", "embed_dropout")

HEADS = ("full", "adaptive")  # what a model has
HEAD_CHOICES = (*HEADS, "auto")  # what a user may ask for: auto resolves by vocabulary size (AUTO_HEAD_MIN_VOCAB)
# head = "auto" picks the adaptive softmax from this vocabulary size on (auto_cutoffs; benchmarks/bench_adaptive.py).
AUTO_HEAD_MIN_VOCAB = 4096


def auto_cutoffs(vocab_size: int) -> tuple[int, ...]:
    """Cutoffs for the adaptive head when none are given: a shortlist of the ~1,000 most frequent symbols, then a
    middle cluster up to 4x the shortlist and a last cluster of the rare rest (when that holds enough symbols).

    On the Tang corpus (V = 8,798: (1000, 4000)) the 1,000 most frequent symbols cover 84.7% of the characters and
    the 4,000 most frequent 99.2%. Measured there (benchmarks/bench_adaptive.py, LSTM 256x2), this trained 3-4x
    faster than the full softmax and faster than a 2,000 shortlist, at an equal or lower validation loss.
    """
    shortlist = min(1000, max(1, vocab_size // 4))
    cutoffs = [shortlist]
    if 4 * shortlist < vocab_size - shortlist // 2:  # a last cluster big enough to be worth its own projection
        cutoffs.append(4 * shortlist)
    return tuple(cutoffs)


def check_type(name: str, value: object, type_name: object) -> None:
    """Refuse a value of the wrong type. ``type_name`` is a dataclass annotation string: int, float, str, bool or
    tuple[int, ...] (a list or tuple of ints: the adaptive head's cutoffs)."""
    if str(type_name) == "tuple[int, ...]":
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ConfigError(f"{name} must be a list of integers, got {type(value).__name__} {value!r}")
        return
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool}[str(type_name)]
    # bool is an int subclass: True must not pass as a layer count, nor 1 as a flag.
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise ConfigError(f"{name} must be {type_name}, got {type(value).__name__} {value!r}")


def resolve_head(c: Any) -> None:
    """Resolve a model config's head = auto and empty cutoffs to concrete values (what a checkpoint records), then
    check them; ``c`` is a ModelConfig or a Seq2SeqConfig (vocab_size, head, cutoffs, div_value, tie_weights)."""
    if c.head not in HEAD_CHOICES:
        raise ConfigError(f"head must be full, adaptive or auto, got {c.head!r}")
    if c.head == "auto":
        c.head = "adaptive" if c.cutoffs or c.vocab_size >= AUTO_HEAD_MIN_VOCAB else "full"
    if c.head == "full":
        if c.cutoffs:
            raise ConfigError("cutoffs apply to the adaptive head only: add --head adaptive, or drop --cutoffs")
        return
    if not (1.0 <= c.div_value and math.isfinite(c.div_value)):
        raise ConfigError(f"div_value must be a number of at least 1, got {c.div_value}")
    if c.tie_weights:
        raise ConfigError("tie_weights needs the full head: the adaptive head has no (V, H) output matrix to share")
    if c.vocab_size < 3:
        raise ConfigError(f"the adaptive head needs at least 3 symbols, got {c.vocab_size}")
    if not c.cutoffs:
        c.cutoffs = auto_cutoffs(c.vocab_size)
    cut, V = c.cutoffs, c.vocab_size
    if any(b <= a for a, b in zip(cut, cut[1:])) or cut[0] < 1 or cut[-1] >= V:
        raise ConfigError(
            f"cutoffs must rise strictly from 1 to at most vocab_size - 1 = {V - 1} (the shortlist size, then "
            f"the start of each further cluster), got {', '.join(map(str, cut))}"
        )


@dataclass
class ModelConfig:
    vocab_size: int
    cell: str = "lstm"  # rnn (tanh) | lstm | gru
    layers: int = 2
    hidden: int = 256
    embed: int = 128
    dropout: float = 0.0  # on the embedding output, between layers, and before the output layer
    # Training-only regularisers of the language model (AWD-LSTM, Merity et al. 2018); nothing changes at inference:
    weight_drop: float = 0.0  # DropConnect on the recurrent (hidden-to-hidden) matrices: one mask per step
    embed_dropout: float = 0.0  # drop whole characters: rows of the embedding matrix, one mask per step
    tie_weights: bool = False  # output layer shares the embedding matrix; needs embed == hidden
    head: str = "full"  # full | adaptive (softmax; see the module docstring) | auto (adaptive from AUTO_HEAD_MIN_VOCAB)
    cutoffs: tuple[int, ...] = ()  # adaptive head: shortlist size, then the start of each further tail cluster
    div_value: float = 4.0  # adaptive head: tail cluster i projects H -> H // div_value ** (i + 1)

    def __post_init__(self) -> None:
        for f in fields(self):
            check_type(f"model {f.name}", getattr(self, f.name), f.type)
        self.cutoffs = tuple(self.cutoffs)  # a JSON list from a checkpoint
        if self.vocab_size < 2:
            raise ConfigError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if self.cell not in CELLS:
            raise ConfigError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        for name in ("layers", "hidden", "embed"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in REGULARISERS:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.tie_weights and self.embed != self.hidden:
            raise ConfigError(
                f"tie_weights needs embed == hidden (got embed={self.embed}, hidden={self.hidden}): "
                "the output layer reuses the embedding matrix"
            )
        self._check_head()

    def _check_head(self) -> None:
        resolve_head(self)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cutoffs"] = list(self.cutoffs)  # as JSON stores it
        # Written only when used: an older poetgen refuses keys it does not know, and with both at 0 the file is
        # one it can read (its defaults are the same; inference never looks at them).
        for name in ("weight_drop", "embed_dropout"):
            if not d[name]:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: object) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"model config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(map(str, unknown))}")
        if "vocab_size" not in d:
            raise ConfigError("model config is missing vocab_size")
        return cls(**d)


# --- the encoder-decoder (poetgen.model.seq2seq) ----------------------------------------------------------------

MODEL_KINDS = ("charrnn", "seq2seq")
ATTENTIONS = ("dot", "additive")  # Luong's multiplicative ("general": q·W k) and Bahdanau's additive (v·tanh(Wq+Uk))
# dot: measured as good as additive on the toy tasks and 全唐诗 pairs, and cheaper (README, "对句"); the default.
DEFAULT_ATTENTION = "dot"


@dataclass
class Seq2SeqConfig:
    """The 对句 encoder-decoder: a bidirectional encoder of ``layers`` x ``hidden`` per direction, a decoder of
    ``layers`` x ``hidden`` with ``attention`` over the encoder's outputs, one embedding for both; its output layer
    is CharRNN's (head full or adaptive, with cutoffs and div_value; auto as there). tie_weights exists so that the
    training code reads every model's architecture alike, and is refused."""

    vocab_size: int
    kind: str = "seq2seq"
    cell: str = "gru"  # gru | lstm
    layers: int = 2
    hidden: int = 256
    embed: int = 128
    dropout: float = 0.0
    attention: str = DEFAULT_ATTENTION
    tie_weights: bool = False
    head: str = "full"
    cutoffs: tuple[int, ...] = ()
    div_value: float = 4.0

    def __post_init__(self) -> None:
        for f in fields(self):
            check_type(f"model {f.name}", getattr(self, f.name), f.type)
        self.cutoffs = tuple(self.cutoffs)
        if self.kind != "seq2seq":
            raise ConfigError(f"an encoder-decoder config has kind seq2seq, got {self.kind!r}")
        if self.vocab_size < 2:
            raise ConfigError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if self.cell not in ("gru", "lstm"):
            raise ConfigError(f"the encoder-decoder's cell must be gru or lstm, got {self.cell!r}")
        for name in ("layers", "hidden", "embed"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.tie_weights:
            raise ConfigError("the encoder-decoder's output layer reads the attention's mix, not the embedding: no "
                              "--tie-weights")
        resolve_head(self)  # full, or the adaptive softmax (auto: from AUTO_HEAD_MIN_VOCAB symbols on, as CharRNN)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cutoffs"] = list(self.cutoffs)
        return d

    @classmethod
    def from_dict(cls, d: object) -> Seq2SeqConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"model config must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(map(str, unknown))}")
        if "vocab_size" not in d:
            raise ConfigError("model config is missing vocab_size")
        return cls(**d)


def model_kind(d: object) -> str:
    """The kind a model config mapping (as a checkpoint stores it) describes: charrnn when it names none."""
    kind = d.get("kind", "charrnn") if isinstance(d, dict) else "charrnn"
    if kind not in MODEL_KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; this poetgen knows {', '.join(MODEL_KINDS)}")
    return str(kind)


def config_from_dict(d: object) -> ModelConfig | Seq2SeqConfig:
    """A checkpoint's model config, of the class its kind names. A CharRNN config carries no kind field, so files
    written before the encoder-decoder read as before, and an older poetgen refuses an encoder-decoder's config
    (an unknown key) instead of misreading it."""
    return Seq2SeqConfig.from_dict(d) if model_kind(d) == "seq2seq" else ModelConfig.from_dict(d)


class AnyModelConfig:
    """For code that takes a config class (poetgen.checkpoint.format.parse_checkpoint): reads either kind."""

    from_dict = staticmethod(config_from_dict)
