"""From `poetgen train`'s arguments to a training run, in one process or in each of N under torchrun.

``TrainRequest`` holds what the user asked for. A ``Session`` turns it into the run's settings, data and directory
(poetgen.training.runs.setup_run, preset `auto`'s speed probe included), the run's plan (sizes, steps, memory), and
the run itself (poetgen.training.loop.train), agreeing across the ranks of a process group where there is one:
every rank sets up (local rank 0 first: it may prepare a raw corpus into the cache the others read), and a mistake
is reported once, by rank 0. ``check_launch`` does the same set-up for N processes before torchrun starts, so a
mistake is one line instead of torchrun's failure report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from poetgen.errors import ConfigError
from poetgen.paths import RUNS_DIR
from poetgen.training.config import auto_preset, parse_duration
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

        ``probe``: let auto time this machine. Not with several processes: ranks could measure different speeds and
        build different models, so auto takes the budget as it is there (speed 1)."""
        measured: list[float] = []

        def speed(settings: dict) -> float:
            from poetgen.training.loop import machine_speed

            measured.append(machine_speed(settings.get("device", "auto"), settings.get("threads")))
            return measured[-1]

        setup = setup_run(
            self.data, preset=self.preset, config_file=self.config_file, overrides=self.overrides,
            resume=self.resume, init_from=self.init_from, runs_dir=self.runs_dir, name=self.name,
            speed=speed if probe else None,
        )
        return setup, (measured[-1] if measured else None)


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
        """What preset `auto` measured and chose, when it measured this machine (None otherwise)."""
        if self.speed is None or self.setup is None:
            return None
        budget = self.setup.config.max_time
        chosen = auto_preset(budget, len(self.setup.dataset.train), self.speed)
        return (f"Preset auto: {chosen} for {budget:g} s on this machine (its training speed {self.speed:.2f}x the "
                "machine the presets were measured on)")

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
