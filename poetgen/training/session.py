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
from poetgen.training.config import BF16_MIN_GAIN, BF16_MIN_HIDDEN, auto_preset, parse_duration
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

    def setup(self, probe: bool) -> tuple[RunSetup, float | None]:
        """-> (the run's setup, the speed preset `auto` measured, or None when it measured nothing).

        ``probe``: let auto time this machine: preset auto's speed probe, and precision auto's bf16 probe on a CPU
        with native bf16 (a training step of the run's own model in both precisions; bf16 from BF16_MIN_GAIN times
        fp32's speed; the choice is written into the run's config, so a resume keeps it). Not with several
        processes: ranks could measure different speeds and build different models, so auto takes the budget as
        it is there (speed 1) and the precision as it is (fp32 on a CPU)."""
        from poetgen.model.devices import bf16_candidate  # torch: not at import (the CLI's help must not load it)

        measured: dict[str, float] = {}

        def speed(settings: dict) -> float:
            """Preset auto's speed: fp32's, or bf16's where bf16 will run (forced, or auto and 1.3x faster)."""
            from poetgen.training.loop import machine_speed

            device, threads = settings.get("device", "auto"), settings.get("threads")
            asked = settings.get("precision", "auto")
            bf16 = asked != "fp32" and bf16_candidate(device)
            if asked != "bf16" or not bf16:
                measured["fp32"] = machine_speed(device, threads)
            if bf16:
                measured["bf16"] = machine_speed(device, threads, precision="bf16")
            tentative = "bf16" if bf16 and (asked == "bf16" or measured["bf16"] >= BF16_MIN_GAIN * measured["fp32"]) \
                else "fp32"
            measured["chosen"] = measured[tentative]
            return measured[tentative]

        def make(speed_fn) -> RunSetup:
            return setup_run(
                self.data, preset=self.preset, config_file=self.config_file, overrides=self.overrides,
                resume=self.resume, init_from=self.init_from, runs_dir=self.runs_dir, name=self.name,
                speed=speed_fn,
            )

        setup = make(speed if probe else None)
        c = setup.config
        found = None
        weigh = probe and setup.resume is None and c.precision == "auto" and bf16_candidate(c.device)
        if weigh and c.hidden >= BF16_MIN_HIDDEN:
            found = self._probe(setup)
            runs = "bf16" if found.gain >= BF16_MIN_GAIN else "fp32"
        else:
            runs = "bf16" if c.precision == "bf16" else "fp32"
        if "chosen" in measured and runs in measured and measured["chosen"] != measured[runs]:
            # Preset auto picked its preset by the speed of the precision the small probe favoured; the other one
            # runs (the run's own size decided, or bf16 is not weighed for it): pick again by that one's speed.
            measured["chosen"] = measured[runs]
            setup = make(lambda settings: measured[runs])
            if found is not None and _architecture(setup.config) != _architecture(c):
                found = self._probe(setup)  # the note (and the choice) must be about the model that trains
                runs = "bf16" if found.gain >= BF16_MIN_GAIN else "fp32"
        if found is not None:
            setup.config = replace(setup.config, precision=runs)
            setup.notes.append(precision_note(setup.config, setup.dataset.is_pairs, runs, found))
        return setup, measured.get("chosen")

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


def precision_note(c: Any, pairs: bool, chosen: str, found: Any) -> str:
    """The stderr line that says what precision auto measured and chose."""
    size = f"{c.cell.upper()} {c.layers}×{c.hidden}, batch {c.batch_size}" + ("" if pairs else f"×{c.seq_len}")
    return (f"Precision auto: {chosen} (this CPU multiplies bf16 natively; a training step of {size} ran "
            f"{found.gain:.2f}x as fast in bf16 as in fp32, {found.bf16:,.0f} against {found.fp32:,.0f} chars/s, "
            f"median of {found.trials} alternating trial{'s' if found.trials > 1 else ''}; bf16 is chosen from "
            f"{BF16_MIN_GAIN:g}x; --precision fp32 or bf16 decides instead)")


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
        self.speed: float | None = None

    def open(self) -> RunSetup:
        def setup() -> tuple[RunSetup, float | None]:
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
            budget = self.setup.config.max_time
            chosen = auto_preset(budget, len(self.setup.dataset.train), self.speed)
            lines.append(f"Preset auto: {chosen} for {budget:g} s on this machine (its training speed "
                         f"{self.speed:.2f}x the machine the presets were measured on, in "
                         f"{'bf16' if self.setup.config.precision == 'bf16' else 'fp32'})")
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
