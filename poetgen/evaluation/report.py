"""Everything `poetgen eval` measures, as one call: the cross-entropy of each model (poetgen.evaluation.scoring), and
the poem metrics (poetgen.evaluation.poems) of poems each model writes and of a file of poems, with the copy rate
against the training split of the model's own dataset (its index built once per dataset).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence


# What the poem metrics' tones and rhymes are measured by, said wherever they are shown.
TONE_NOTES = {
    "pingshui": "tones and rhymes by the 平水韵 (pingshui: the rhyme book of Tang verse, 106 groups, 上/去/入 oblique); "
                "real regular Tang poems score 88% rhyme and 94% at 2-4-6 by it (benchmarks/RESULTS.md)",
    "xinyun": "tones and rhymes by 中华新韵 (xinyun: the modern-Mandarin approximation, pypinyin readings, tones 1-2 "
              "level), not the Tang-era 平水韵: the old entering tone reads as level",
}


def tone_note(book: str) -> str:
    return TONE_NOTES[book]


@dataclass
class EvalRequest:
    checkpoints: Sequence[str] = ()  # files or run directories
    data: Sequence[str] | None = None  # text to score instead of each checkpoint's validation split
    split: str = "val"
    streams: int = 32
    warmup: int = 1000
    encoding: str | None = None
    doc_sep: str = "file"
    text_fields: Sequence[str] | None = None
    loss: bool = True  # score the models (False: only poem metrics)
    poems: Path | None = None  # a JSONL file of poems to measure
    samples: int = 0  # poems to generate per model and measure
    form: str | None = None
    rhyme: bool = False
    rhyme_book: str = "pingshui"  # the book the samples rhyme by and all poems are measured by
    tones: bool = False  # generate with the regulated tone patterns
    prime: str | None = None
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    device: str = "auto"
    threads: int | None = None
    beam: int = 4  # encoder-decoder models: decode the held-out first lines with this beam (0: greedy)
    plot_attention: Path | None = None  # encoder-decoder models: the attention heat map of one pair, as a PNG


@dataclass
class EvalOutcome:
    models: list = field(default_factory=list)  # poetgen.evaluation.scoring.EvalReport, one per checkpoint
    poems: list = field(default_factory=list)  # (label, poetgen.evaluation.poems.PoemReport)
    generated: list[dict] = field(default_factory=list)  # {"text", "form", "checkpoint"} per generated poem
    notes: list[str] = field(default_factory=list)
    book: str = "pingshui"
    couplets: list = field(default_factory=list)  # poetgen.evaluation.couplets.CoupletReport, per pair model

    def save_generated(self, path: str | Path) -> None:
        """The generated poems as JSON Lines (measure them again with `eval --poems`)."""
        import json

        Path(path).write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in self.generated),
                              encoding="utf-8")

    def to_dict(self) -> dict:
        return {
            "models": [r.to_dict() for r in self.models],
            "poems": [{"source": label, **r.to_dict()} for label, r in self.poems],
            "tone_note": tone_note(self.book) if self.poems else None,
            "couplets": [c.to_dict() for c in self.couplets],
        }


def _copies_for(ckpt: Any, notes: list[str]) -> Any:
    """The copy-rate index of the checkpoint's own training split (poetgen.data.copies), or None with a note."""
    from poetgen.data.copies import training_copies

    index = training_copies(ckpt.dataset_meta)
    if index is None:
        notes.append(f"no copy rate for {ckpt.path}: the dataset it was trained on is not on this machine")
    return index


def run_eval(r: EvalRequest, on_progress: Callable[[dict], None] | None = None) -> EvalOutcome:
    """Load each checkpoint once (torch, on ``r.device``), score it unless ``r.loss`` is off, generate and measure
    ``r.samples`` poems from it, then measure ``r.poems``. Notes (a missing dataset, the seed drawn) come back in
    ``EvalOutcome.notes``."""
    from poetgen.evaluation.poems import Poem, evaluate_poems, read_poems

    out = EvalOutcome(book=r.rhyme_book)
    loaded = []
    if r.checkpoints:
        import torch

        from poetgen.checkpoint.torch_io import find_checkpoint, load_model
        from poetgen.evaluation.scoring import evaluate_model
        from poetgen.model.devices import resolve_device

        if r.threads is not None:
            torch.set_num_threads(r.threads)
        device = resolve_device(r.device)
        for c in r.checkpoints:
            model, ckpt = load_model(find_checkpoint(c), device)
            if getattr(ckpt.model_config, "kind", "charrnn") == "seq2seq":  # 对句: measured as answers
                out.couplets.append(_couplets(model, ckpt, r, out.notes))
                continue
            loaded.append((model, ckpt))
            if r.loss:
                out.models.append(evaluate_model(
                    model, ckpt, r.data, split=r.split, streams=r.streams, warmup=r.warmup, encoding=r.encoding,
                    doc_sep=r.doc_sep, text_fields=r.text_fields, on_progress=on_progress,
                ))
    if r.samples:
        from poetgen.generation.sample import SampleOptions, generate
        from poetgen.poetry.forms import parse_form

        declared = parse_form(r.form).name if r.form else None
        for model, ckpt in loaded:
            options = SampleOptions(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, num_samples=r.samples,
                                    seed=r.seed, form=r.form, rhyme=r.rhyme, rhyme_book=r.rhyme_book, tones=r.tones)
            result = generate(model, ckpt.vocab, [r.prime or ""], options)
            if r.seed is None:
                out.notes.append(f"seed of the samples of {ckpt.path}: {result.seed}")
            texts = [s.text for s in result.samples]
            out.generated.extend({"text": t, "form": declared, "checkpoint": str(ckpt.path)} for t in texts)
            report = evaluate_poems([Poem(t, declared) for t in texts], _copies_for(ckpt, out.notes), book=r.rhyme_book)
            out.poems.append((f"{r.samples} samples of {ckpt.path}", report))
    if r.poems is not None:
        index = _copies_for(loaded[0][1], out.notes) if loaded else None
        out.poems.append((str(r.poems), evaluate_poems(read_poems(r.poems), index, book=r.rhyme_book)))
    for report in out.models:
        out.notes.extend(f"{report.checkpoint}: {n}" for n in report.notes)
    return out


def _couplets(model: Any, ckpt: Any, r: EvalRequest, notes: list[str]) -> Any:
    """An encoder-decoder's figures (poetgen.evaluation.couplets), and its attention map when asked for: of the
    --prime as a first line, else of the split's first pair."""
    from poetgen.evaluation.couplets import evaluate_couplets, open_pairs, plot_attention
    from poetgen.generation.couplet import CoupletOptions, answer_lines

    if r.samples:
        notes.append(f"{ckpt.path} answers first lines: --samples is for poem models")
    report = evaluate_couplets(model, ckpt, r.data, split=r.split, beam=r.beam, tones=r.tones,
                               rhyme_book=r.rhyme_book)
    if r.plot_attention is not None:
        if r.prime:
            first = r.prime
        else:
            dataset = open_pairs(ckpt, r.data, r.split)
            first = ckpt.vocab.decode(dataset.pair_lines(r.split, [0])[0][0].tolist())
        answer = answer_lines(model, ckpt.vocab, [first], CoupletOptions(beam=r.beam, tones=r.tones))[0][0]
        plot_attention(answer, r.plot_attention)
        notes.append(f"attention of {first} → {answer.text} written to {r.plot_attention}")
    return report
