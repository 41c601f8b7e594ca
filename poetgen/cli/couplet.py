"""`poetgen sample` for an encoder-decoder (对句) checkpoint: each prime is a first line, answered
(poetgen.generation.couplet)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

# sample's flags that mean nothing for an answering line, and their defaults.
_NOT_FOR_PAIRS = {"form": None, "acrostic": None, "line_length": None, "style": None, "rhyme": False,
                  "rhyme_group": None, "pattern": None, "best_of": 1, "repetition_penalty": 1.0, "length": None,
                  "stream": False, "output_script": None}


def answer_command(path: Path, primes: list, params: dict, note) -> None:
    """Answer every prime with ``params`` (sample's arguments) and write the answers: one a line, or with several
    per prime (-n, --beam) each with its mean log-probability per character after a tab; --json gives records."""
    used = [name for name, default in _NOT_FOR_PAIRS.items() if params.get(name) != default]
    if used:
        flags = ", ".join("--" + n.replace("_", "-") for n in used)
        raise typer.BadParameter(f"{flags}: not for an encoder-decoder (对句) model, which answers a first line with "
                                 "one of the same length (its options: -t, --top-k, --top-p, -n, --beam, --tones, "
                                 "--rhyme-book, --seed)")
    import torch

    from poetgen.checkpoint.torch_io import load_model
    from poetgen.generation.couplet import CoupletOptions, answer_lines
    from poetgen.model.devices import resolve_device

    seed = params["seed"]
    if seed is None and not params["beam"] and params["temperature"] > 0:
        seed = int.from_bytes(os.urandom(6), "little")
    options = CoupletOptions(temperature=params["temperature"], top_k=params["top_k"], top_p=params["top_p"],
                             num_samples=params["num_samples"], seed=seed, beam=params["beam"],
                             tones=params["tones"], rhyme_book=params["rhyme_book"])
    options.validate()
    if params["threads"]:
        torch.set_num_threads(params["threads"])
    model, ckpt = load_model(path, resolve_device(params["device"]))
    notes: list[str] = []
    answers = answer_lines(model, ckpt.vocab, primes, options, notes)
    for n in notes:
        note(f"Note: {n}")
    several = options.num_samples > 1 or options.beam
    if params["json_out"]:
        text = "".join(json.dumps({"prime": a.first, **a.record(), "rank": k, "checkpoint": str(path)},
                                  ensure_ascii=False) + "\n" for group in answers for k, a in enumerate(group))
    else:
        blocks = ["\n".join(f"{a.text}\t{a.mean_logprob:.3f}" if several else a.text for a in group)
                  for group in answers]
        text = ("\n\n" if several else "\n").join(blocks) + "\n"
    if params["output"] is not None:
        params["output"].write_text(text, encoding="utf-8")
        note(f"Wrote {sum(map(len, answers))} answer(s) to {params['output']}")
    else:
        typer.echo(text, nl=False)
    if params["seed"] is None and seed is not None:
        note(f"Seed: {seed}")

