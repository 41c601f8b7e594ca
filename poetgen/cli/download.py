"""`poetgen download`: a complete corpus into the cache, verified (poetgen.data.download)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from poetgen.cli.common import handles_errors, print_json, stderr_console


@handles_errors
def download(
    corpus: str = typer.Argument("tang", help="Corpus to fetch: tang (全唐诗, poet.tang.0.json … 57000.json)."),
    files: Optional[List[str]] = typer.Option(
        None, "--files", help="Only these files: numbers (0,1000) or names (poet.tang.0.json); repeatable or a,b."
    ),
    mirror: Optional[str] = typer.Option(
        None, "--mirror", metavar="URL",
        help="Base URL (http, https or file) under which the files sit by name. "
        "Default: $POETGEN_MIRROR, else chinese-poetry on GitHub at a pinned commit.",
    ),
    dest: Optional[Path] = typer.Option(
        None, "--dest", help="Folder to write to. Default: <cache>/corpora/<corpus>, where `prepare corpus:tang` looks."
    ),
    retries: int = typer.Option(5, "--retries", min=0, help="Retries per file on timeouts, dropped connections, 5xx."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="Seconds to wait for data before retrying."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, no retry notices, no summary line."),
) -> None:
    """Download a complete corpus into the cache and verify every file against its pinned SHA-256.

    Files that are already there and verify are not fetched again; an interrupted download resumes. The cache is
    $POETGEN_CACHE_DIR, else $XDG_CACHE_HOME/poetgen, else ~/.cache/poetgen.

    Example:

        poetgen download tang && poetgen prepare corpus:tang
    """
    from poetgen.data.download import download_corpus

    console = stderr_console(quiet)
    with _download_progress(console) as on_progress:
        report = download_corpus(
            corpus, dest=dest, mirror=mirror, files=files or None, retries=retries, timeout=timeout,
            on_progress=on_progress,
        )
    if json_out:
        print_json(report.to_dict())
    elif not quiet:
        typer.echo(
            f"{report.corpus}: {report.verified} file(s) verified in {report.dest} ({len(report.downloaded)} "
            f"downloaded, {len(report.skipped)} already present, {report.bytes / 1e6:.1f} MB received)"
        )


class _download_progress:
    """Renders download events: a Rich bar (files, and bytes of the current file) on stderr when it is a terminal;
    otherwise only retry notices, as plain lines. Nothing at all when quiet."""

    def __init__(self, console):
        self.console = console
        self.bar = None

    def __enter__(self):
        console = self.console
        if console.quiet:
            return None
        if not console.is_terminal:
            def plain(event: dict) -> None:
                if event["event"] == "retry":
                    typer.echo(_retry_notice(event), err=True)

            return plain
        from rich.progress import BarColumn, Progress, TextColumn

        self.bar = bar = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
            console=console, transient=True,
        )
        bar.start()
        tasks: dict = {}

        def on_progress(event: dict) -> None:
            if not tasks:
                tasks["files"] = bar.add_task("files", total=event["files"], detail=f"0/{event['files']}")
                tasks["file"] = bar.add_task("", total=None, detail="")
            kind = event["event"]
            if kind == "retry":
                bar.console.print(_retry_notice(event), highlight=False)
            elif kind in ("start", "progress"):
                done, total = event["bytes_done"], event["bytes_total"]
                detail = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
                bar.update(tasks["file"], description=event["file"], completed=done, total=total, detail=detail)
            elif kind in ("done", "skip"):
                bar.update(tasks["files"], completed=event["index"], detail=f"{event['index']}/{event['files']}")

        return on_progress

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def _retry_notice(event: dict) -> str:
    return f"retrying {event['file']} in {event['delay']:.1f} s (attempt {event['attempt']} failed: {event['error']})"
