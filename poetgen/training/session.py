"""From `poetgen train`'s arguments to a training run, in one process or in each of N under torchrun.

``TrainRequest`` holds what the user asked for. A ``Session`` turns it into the run's settings, data and directory
(poetgen.training.runs.setup_run, preset `auto`'s speed probe included), the run's plan (sizes, steps, memory), and
the run itself (poetgen.training.loop.train), agreeing across the ranks of a process group where there is one:
every rank sets up (local rank 0 first: it may prepare a raw corpus into the cache the others read), and a mistake
is reported once, by rank 0. ``check_launch`` does the same set-up for N processes before torchrun starts, so a
mistake is one line instead of torchrun's failure report.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from poetgen.errors import ConfigError
from poetgen.paths import RUNS_DIR
from poetgen.training.config import AUTO_CURVES, BF16_MIN_GAIN, BF16_MIN_HIDDEN, PROBE_SHARE, PROBED_FIELDS, \
    auto_preset, parse_duration
from poetgen.training.runs import RunSetup, setup_run

if TYPE_CHECKING:
    from poetgen.training.distributed import Local


@dataclass
class TrainRequest:
    data: str | None = None  # dataset directory, raw corpus, or None (bundled corpus; on resume the run's own)
    preset: str | None = None
    config_file: str | Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # the flags actually given: TrainConfig field -> value
    resume: str | None = None
    init_from: str | None = None
    runs_dir: str | Path = RUNS_DIR
    name: str | None = None
    map_unknown: bool = False
    attention: str | None = None  # --attention: a pair dataset's encoder-decoder (None: its default, or the source's)

    def __post_init__(self) -> None:
        if isinstance(self.overrides.get("max_time"), str):
            self.overrides = {**self.overrides, "max_time": parse_duration(self.overrides["max_time"])}

    def setup(self, probe: bool) -> tuple[RunSetup, dict[str, tuple[float, str]] | None]:
        """-> (the run's setup, what preset `auto` measured: {preset: (the steps a second a run of it makes, by its
        probe times PROBE_SHARE; the precision they were taken in)} for the presets it weighed, or None when it
        measured nothing).

        ``probe``: let auto time this machine: preset auto's speed probe of each preset it weighs, and precision
        auto's bf16 probe on a CPU with native bf16 (a training step of the run's own model in both precisions; bf16
        from BF16_MIN_GAIN times fp32's speed; the choice is written into the run's config, so a resume keeps it).
        Not with several processes: ranks could measure different speeds and build different models, so auto takes
        the reference machine's speeds (REFERENCE_STEPS_PER_SEC) and the precision as it is (fp32 on a CPU)."""
        from poetgen.model.devices import bf16_candidate  # torch: not at import (the CLI's help must not load it)
        from poetgen.training.config import PRESETS, TrainConfig

        measured: dict[str, dict[str, float]] = {"fp32": {}, "bf16": {}}  # precision -> preset -> steps a second
        taken: dict[str, str] = {}  # preset -> the precision its speed was taken in

        def speed(settings: dict, preset: str) -> float:
            """Preset auto's speed of ``preset`` (steps a second): fp32's, or bf16's where bf16 would run it (forced,
            or auto and BF16_MIN_GAIN faster), for the preset's model and batch as the flags and file change them."""
            from poetgen.training.loop import step_speed

            device, threads = settings.get("device", "auto"), settings.get("threads")
            asked = settings.get("precision", "auto")
            shape = TrainConfig(**{**PRESETS[preset], **{k: v for k, v in settings.items() if k in PROBED_FIELDS}})
            bf16 = asked != "fp32" and bf16_candidate(device) and (asked == "bf16" or shape.hidden >= BF16_MIN_HIDDEN)
            if asked != "bf16" or not bf16:
                measured["fp32"][preset] = step_speed(shape, device, threads)
            if bf16:
                measured["bf16"][preset] = step_speed(shape, device, threads, precision="bf16")
            faster = bf16 and (asked == "bf16" or measured["bf16"][preset] >= BF16_MIN_GAIN * measured["fp32"][preset])
            taken[preset] = "bf16" if faster else "fp32"
            return rate(preset)

        def rate(preset: str) -> float:
            """The steps a second a real run of ``preset`` makes, by its probe in the precision taken for it."""
            return PROBE_SHARE * measured[taken[preset]][preset]

        def make(speed_fn) -> RunSetup:
            return setup_run(
                self.data, preset=self.preset, config_file=self.config_file, overrides=self.overrides,
                resume=self.resume, init_from=self.init_from, runs_dir=self.runs_dir, name=self.name,
                speed=speed_fn,
            )

        def precision_of(setup: RunSetup) -> tuple[Any, str]:
            """The run's own probe (None where precision auto weighs nothing) and the precision that runs."""
            c = setup.config
            if probe and setup.resume is None and c.precision == "auto" and bf16_candidate(c.device) \
                    and c.hidden >= BF16_MIN_HIDDEN:
                found = self._probe(setup)
                return found, "bf16" if found.gain >= BF16_MIN_GAIN else "fp32"
            return None, "bf16" if c.precision == "bf16" else "fp32"

        def chosen(setup: RunSetup) -> str | None:
            return auto_preset(setup.config.max_time, setup.dataset.auto_tokens, rate) if taken else None

        setup = make(speed if probe else None)
        found, runs = precision_of(setup)
        kept = False
        for _ in range(2):
            preset = chosen(setup)
            if preset is None or taken[preset] == runs or preset not in measured[runs]:
                break
            # Preset auto weighed the preset that trains in the precision its probe favoured; the other one runs (the
            # run's own model and data decided, or bf16 is not weighed for it): pick again in that one's speed, for
            # it and for the presets it speaks for (bf16 gains more the wider the model: fp32 for it and the
            # narrower, bf16 for it and the wider), and probe the run again if its model changed.
            k = list(AUTO_CURVES).index(preset)
            for p in list(AUTO_CURVES)[: k + 1] if runs == "fp32" else list(AUTO_CURVES)[k:]:
                if p in measured[runs]:
                    taken[p] = runs
            before = setup.config
            setup = make(lambda settings, p: rate(p))
            if found is not None and _architecture(setup.config) != _architecture(before):
                found, runs = precision_of(setup)
        else:
            preset = chosen(setup)
            if found is not None and preset is not None and taken[preset] != runs:
                # the probes disagree back and forth (gains near BF16_MIN_GAIN): train in the precision the preset
                # was chosen at, so that the preset and the precision agree
                runs, kept = taken[preset], True
        if found is not None:
            setup.config = replace(setup.config, precision=runs)
            setup.notes.append(precision_note(setup.config, setup.dataset.is_pairs, runs, found, kept))
        return setup, ({p: (rate(p), taken[p]) for p in taken} if taken else None)

    def _probe(self, setup: RunSetup) -> Any:
        """poetgen.training.loop.precision_probe of the model this run trains: a fine-tuned model's vocabulary,
        the dataset's ids mapped into it, as the loop will."""
        from poetgen.data.batches import vocab_map
        from poetgen.training.loop import precision_probe

        source = setup.init_from
        id_map = vocab_map(setup.dataset.vocab, source.vocab, map_unknown=self.map_unknown) if source else None
        return precision_probe(setup.config, setup.dataset, model_options(self, setup),
                               vocab_size=len(source.vocab) if source else None, id_map=id_map)


def _architecture(c: Any) -> tuple:
    return (c.cell, c.layers, c.hidden, c.embed, c.head, c.batch_size, c.seq_len)


def auto_note(budget: float, train_tokens: int, speeds: dict[str, tuple[float, str]]) -> str:
    """The stderr line that says what preset auto measured and chose, e.g. "Preset auto: small for 128 s on this
    machine (the steps the budget buys at each preset's measured speed, and the loss its curve gives on Tiny
    Shakespeare: quick 1,909 fp32 1.66, short 1,225 bf16 1.60, small 569 bf16 1.55)"."""
    from poetgen.training.config import predicted_loss

    chosen = auto_preset(budget, train_tokens, lambda p: speeds[p][0])
    each = ", ".join(f"{p} {budget * rate:,.0f} {prec} {predicted_loss(p, budget * rate):.2f}"
                     for p, (rate, prec) in speeds.items())
    return (f"Preset auto: {chosen} for {budget:g} s on this machine (the steps the budget buys at each preset's "
            f"measured speed, and the loss its curve gives on Tiny Shakespeare: {each})")


def precision_note(c: Any, pairs: bool, chosen: str, found: Any, kept: bool = False) -> str:
    """The stderr line that says what precision auto measured and chose (``kept``: against the probe, to agree with
    the preset chosen at that precision's speed)."""
    size = f"{c.cell.upper()} {c.layers}×{c.hidden}, batch {c.batch_size}" + ("" if pairs else f"×{c.seq_len}")
    return (f"Precision auto: {chosen} (this CPU multiplies bf16 natively; a training step of {size} ran "
            f"{found.gain:.2f}x as fast in bf16 as in fp32, {found.bf16:,.0f} against {found.fp32:,.0f} chars/s, "
            f"median of {found.trials} alternating trial{'s' if found.trials > 1 else ''}; bf16 is chosen from "
            f"{BF16_MIN_GAIN:g}x" + (f", but {chosen} is kept: preset auto chose this model at {chosen}'s speed"
                                     if kept else "") + "; --precision fp32 or bf16 decides instead)")


def model_options(request: TrainRequest, setup: RunSetup) -> dict[str, Any] | None:
    """Model fields beyond TrainConfig's, from the flags: {"attention": ...} for a pair dataset's encoder-decoder
    (the flag on a text dataset is the CLI's usage error). A resumed or fine-tuned model keeps its own, so a flag
    that disagrees with its checkpoint is refused, as --hidden is (ConfigError)."""
    if request.attention is None:
        return None
    source = setup.resume or setup.init_from
    saved = getattr(source.model_config, "attention", None) if source is not None else None
    if saved is not None and saved != request.attention:
        why = ("these settings cannot change on --resume (fine-tune with --init-from instead)" if setup.resume
               else f"--init-from {source.path} fixes the architecture; these flags disagree with it")
        raise ConfigError(f"{why}: attention ({saved!r} -> {request.attention!r})")
    return {"attention": request.attention}


def plan_run(setup: RunSetup, world_size: int = 1, local_rank: int | None = None,
             options: dict[str, Any] | None = None) -> Any:
    """The run's poetgen.training.loop.Plan, for the vocabulary it will train (a resumed or fine-tuned model's).
    ``options``: model_options()."""
    from poetgen.training.loop import make_plan

    source = setup.resume or setup.init_from
    vocab = source.vocab if source else setup.dataset.vocab
    return make_plan(setup.config, setup.dataset, len(vocab), world_size=world_size, local_rank=local_rank,
                     model_options=options)


def check_launch(request: TrainRequest, nproc: int) -> RunSetup:
    """Set up and plan the run as its ``nproc`` workers will (no speed probe, as under torchrun), so that a mistake
    is raised here, once, before torchrun starts. A raw corpus is prepared here, into the cache the workers read.
    -> the setup (for the CLI's own checks of its flags)."""
    setup, _ = request.setup(probe=False)
    plan_run(setup, nproc, options=model_options(request, setup))
    return setup


class Session:
    """One process's part of a run. ``ctx``: poetgen.training.distributed's context (a plain Local outside torchrun);
    ``world_size``: the processes the run is planned for (a dry run may plan for N without starting them)."""

    def __init__(self, request: TrainRequest, ctx: Local, world_size: int | None = None):
        self.request, self.ctx = request, ctx
        self.world_size = world_size or ctx.world_size
        self.setup: RunSetup | None = None
        self.speed: dict[str, tuple[float, str]] | None = None  # what preset auto measured (TrainRequest.setup)

    def open(self) -> RunSetup:
        def setup() -> tuple[RunSetup, dict[str, tuple[float, str]] | None]:
            found = self.request.setup(probe=self.world_size == 1)
            model_options(self.request, found[0])  # a flag the checkpoint disagrees with: refused on every rank
            return found

        self.setup, self.speed = self.ctx.agree_in_turn(setup)
        return self.setup

    def preset_note(self) -> str | None:
        """What auto measured and chose, a line each: the preset, when it measured this machine, and the precision,
        when it weighed bf16 (None when neither)."""
        if self.setup is None:
            return None
        lines = []
        if self.speed is not None:
            lines.append(auto_note(self.setup.config.max_time, self.setup.dataset.auto_tokens, self.speed))
        lines += self.setup.notes
        return "\n".join(lines) or None

    def plan(self) -> Any:
        assert self.setup is not None, "open() first"
        ctx = self.ctx
        return ctx.agree(lambda: plan_run(self.setup, self.world_size, ctx.local_rank if ctx.distributed else None,
                                          model_options(self.request, self.setup)))

    def run(self, callbacks: Any = None, stop: Any = None) -> Any:
        """Train; -> poetgen.training.loop.TrainResult."""
        from poetgen.training.loop import train

        s = self.setup
        assert s is not None, "open() first"
        return train(s.config, s.dataset, s.run_dir, resume=s.resume, init_from=s.init_from,
                     map_unknown=self.request.map_unknown, callbacks=callbacks, stop=stop,
                     model_options=model_options(self.request, s))
