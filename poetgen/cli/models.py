"""`poetgen models`: the models shipped with poetgen and their model cards (poetgen.checkpoint.shipped)."""

from __future__ import annotations

from typing import Optional

import typer

from poetgen.cli.common import handles_errors, print_json


@handles_errors
def models(
    name: Optional[str] = typer.Argument(None, help="A shipped model's name (tang): show its whole model card."),
    json_out: bool = typer.Option(False, "--json", help="The card(s) as JSON on stdout."),
) -> None:
    """List the models shipped with poetgen, or show one model card (data, recipe, validation figures, poem
    metrics, known weaknesses). A model's file is checked against the SHA-256 its card records.

    Use one with `poetgen sample -c NAME`; with no run in ./checkpoints, `sample` and `eval` use `tang`.

    Example:

        poetgen models tang --json
    """
    from poetgen.checkpoint.shipped import describe_shipped

    cards = describe_shipped(name)
    if json_out:
        print_json(cards[0] if name else cards)
        return
    if name:
        for key, value in _flatten(cards[0]):
            typer.echo(f"{key}: {value}")
        return
    if not cards:
        typer.echo("No shipped models.")
    for card in cards:
        bits = (card.get("validation") or {}).get("bits_per_char")
        figure = f", {bits:.3f} bits/char on its validation split" if isinstance(bits, (int, float)) else ""
        typer.echo(f"{card['name']}: {card.get('summary') or 'no summary'} ({card.get('bytes', 0) / 2**20:.1f} MiB"
                   f"{figure})" + (f" — {card['problem']}" if card.get("problem") else ""))


def _flatten(card: dict, prefix: str = ""):
    """("training.steps", 5000) pairs, nested objects flattened; lists of text joined."""
    for key, value in card.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            yield f"{prefix}{key}", "; ".join(value)
        else:
            yield f"{prefix}{key}", value
