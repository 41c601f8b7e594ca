"""The `poetgen` command line: the Typer app, its commands registered from one module each (poetgen.cli.<command>),
and the entry point. A command parses its flags, calls the library, renders what comes back; nothing else.

Heavy modules (torch, numpy, opencc) are imported inside the commands, so `poetgen --help` stays instant.
Every PoetgenError becomes `Error: ...` on stderr and exit code 1; usage errors keep click's exit code 2.
"""

from __future__ import annotations

import os
import sys

import typer

# PyTorch's CPU kernels run on OpenMP threads that, by default, spin while they wait. On a machine where anything
# else is running, that turns a training step into a 10-30x slowdown (measured on 2 cores with one other busy
# process: 30 steps in 177 s spinning, 7.3 s waiting passively, 5.2 s on one thread). It must be set before torch
# loads its OpenMP runtime, hence here, at import; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's OpenBLAS (what `sample` runs on) spins too: about 0.1 s after each multi-threaded product by default, which
# beside one other busy process made 2-thread sampling 1.6-2x slower than 1 thread and poisoned the steps after it.
# 2**4 cycles instead (measured: the thread tuner of poetgen.generation.threads then lost at most 15% to 1 thread on a
# busy machine and kept its 1.4x gain for 64 streams on idle cores). Read when numpy loads, hence here as well.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

app = typer.Typer(
    name="poetgen",
    help="Train and sample character-level RNN / LSTM / GRU language models, above all for Tang poetry.\n\n"
    "Example:\n\n    poetgen prepare && poetgen train && poetgen sample --form 五绝",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# At load time the command modules import only typer, the shared rendering and the torch-free configuration their
# help texts are made from (training.config, model.config, paths); the rest inside the commands.
from poetgen.cli import download, models, plot, prepare, sample, serve, train  # noqa: E402
from poetgen.cli import eval as eval_cmd  # noqa: E402  (not the builtin's name)


def version_callback(value: bool) -> None:
    if value:
        from poetgen import __version__

        typer.echo(f"poetgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Show the version."
    ),
) -> None:
    """Train and sample character-level RNN / LSTM / GRU language models, above all for Tang poetry."""


app.command()(prepare.prepare)
app.command()(train.train)
app.command()(sample.sample)
app.command(name="eval")(eval_cmd.eval_)
app.command()(plot.plot)
app.command()(download.download)
app.command()(models.models)
app.command()(serve.serve)


def main() -> None:
    try:
        app()
    except BaseException as e:
        # A torchrun worker leaves without the interpreter's finalisation (poetgen.training.distributed.leave). That
        # module is loaded only by commands that may join a process group: other commands pay nothing here.
        dist = sys.modules.get("poetgen.training.distributed")
        if dist is None or not dist.joined():
            raise
        dist.leave(_exit_status(e))


def _exit_status(e: BaseException) -> int:
    """The exit status Python itself would give for ``e`` escaping the program (and what it would print)."""
    if isinstance(e, SystemExit):
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    import traceback

    traceback.print_exception(e)
    return 1


if __name__ == "__main__":
    main()
