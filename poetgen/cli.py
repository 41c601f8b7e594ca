"""The `poetgen` command line: parses flags, calls the library, renders progress. Nothing else lives here.

Heavy modules (torch, numpy, opencc) are imported inside the commands, so `poetgen --help` stays instant.
Every PoetgenError becomes `Error: ...` on stderr and exit code 1; usage errors keep click's exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

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


# --- shared plumbing --------------------------------------------------------------------------------------------


def _stderr_console(quiet: bool = False):
    from rich.console import Console

    return Console(stderr=True, quiet=quiet, highlight=False)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `Error: message` on stderr; return the Exit to raise."""
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code)


def handles_errors(func: Callable) -> Callable:
    """Turn the library's own errors into `Error: ...` / exit 1, and Ctrl-C into exit 130, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from poetgen.errors import PoetgenError

        try:
            return func(*args, **kwargs)
        except PoetgenError as e:
            raise fail(str(e)) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted.", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # `poetgen sample | head`: the reader went away; that is not an error of ours.
            try:
                sys.stdout = None  # type: ignore[assignment]
            finally:
                raise typer.Exit(0) from None

    return wrapper


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False))


def version_callback(value: bool) -> None:
    if value:
        from poetgen import __version__

        typer.echo(f"poetgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Show the version."),
) -> None:
    """Train and sample character-level RNN / LSTM / GRU language models, above all for Tang poetry."""


# --- prepare ----------------------------------------------------------------------------------------------------

# (filled in below)


# --- train ------------------------------------------------------------------------------------------------------


@app.command()
@handles_errors
def train() -> None:
    """Train a model (not yet available).

    Example:

        poetgen train corpus.txt
    """
    raise fail("`poetgen train` is not yet available")


# --- sample -----------------------------------------------------------------------------------------------------


@app.command()
@handles_errors
def sample() -> None:
    """Generate text from a trained model (not yet available).

    Example:

        poetgen sample --prime 床前
    """
    raise fail("`poetgen sample` is not yet available")


# --- eval -------------------------------------------------------------------------------------------------------


@app.command(name="eval")
@handles_errors
def eval_() -> None:
    """Measure a model (not yet available).

    Example:

        poetgen eval checkpoints/run/best.ckpt
    """
    raise fail("`poetgen eval` is not yet available")


# --- download ---------------------------------------------------------------------------------------------------

# (added with the full-corpus download)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
