"""What every command shares: the error handling (`Error: ...`, exit codes), stderr consoles, JSON output, progress
bars fed by the library's progress events, and small formatting helpers. Rendering only: no library work here."""

from __future__ import annotations

import functools
import json
import sys
from typing import Callable, List, Optional

import typer


def stderr_console(quiet: bool = False):
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
        except UnicodeError as e:
            # Text that cannot be text: a lone surrogate from a JSON escape or a command-line argument in no
            # encoding. The readers name the file where they can; this is the backstop.
            raise fail(f"text that is not valid Unicode: {e}") from None
        except OSError as e:
            # A full disk, a read-only or missing directory, an I/O error: the environment's, told plainly.
            raise fail(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")) from None

    return wrapper


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False))


def split_csv(values: Optional[List[str]]) -> tuple:
    """Options given several times or comma-separated: `--form 五绝 --form 七绝` or `--form 五绝,七绝`."""
    out: list[str] = []
    for v in values or []:
        out.extend(x.strip() for x in v.replace("，", ",").split(",") if x.strip())
    return tuple(out)


class progress:
    """A Rich progress bar on stderr fed by the library's progress events; nothing when stderr is not a terminal."""

    def __init__(self, console, label: str):
        self.console, self.label = console, label
        self.bar = None

    def __enter__(self):
        if not self.console.is_terminal or self.console.quiet:
            return lambda event: None
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TimeRemainingColumn(), console=self.console, transient=True,
        )
        self.bar.start()
        tasks: dict = {}

        def on_progress(event: dict) -> None:
            stage = event.get("stage", self.label)
            if stage not in tasks:
                tasks[stage] = self.bar.add_task(f"{self.label}: {stage}", total=event.get("total") or None)
            self.bar.update(tasks[stage], completed=event.get("done", 0), total=event.get("total") or None)

        return on_progress

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def status(console, text: str):
    """A spinner with ``text`` on a terminal; nothing otherwise."""
    from contextlib import nullcontext

    return console.status(text) if console.is_terminal and not console.quiet else nullcontext()


def fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1%}"
