"""`poetgen eval` for an encoder-decoder (对句) model: how well it answers the held-out first lines.

* cross-entropy: the exact mean over every answer character of the pairs, given their first lines
  (poetgen.evaluation.scoring.pair_cross_entropy, training's validation figure);
* character BLEU-4 and exact match of the decoded answers (beam search by default) against the held-out answers.
  BLEU is corpus-level over characters, as sacrebleu's ``tokenize='char'`` computes it (each character a token;
  the standard brevity penalty; no smoothing, which only matters when an n-gram order has no match at all).
  sacrebleu itself installs, but brings lxml, portalocker, regex, tabulate and colorama for these 30 lines;
  tests/test_couplet_eval.py checks the two agree where sacrebleu is installed;
* of the decoded answers: the same-length rate (same length, punctuation at the same places), and the tone
  opposition at the line end (over pairs whose first line ends in a character of one definite tone) and at
  positions 2-4-6, by a rhyme book (平水韵 by default);
* an attention heat map of one pair (``plot_attention``).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from poetgen.errors import DatasetError, PoetgenError
from poetgen.generation.couplet import TONE_POSITIONS, Answer, CoupletOptions, answer_lines, opposed_at_end, tone_of
from poetgen.poetry.forms import is_han


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (0-100) over characters, one reference per hypothesis."""
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for h, r in zip(hypotheses, references):
        h, r = h.replace(" ", ""), r.replace(" ", "")
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, 5):
            hc = Counter(h[i:i + n] for i in range(len(h) - n + 1))
            rc = Counter(r[i:i + n] for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(0, len(h) - n + 1)
    if hyp_len == 0 or any(m == 0 for m in matches):
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * brevity * math.exp(log_precision)


def same_shape(first: str, answer: str) -> bool:
    """Same length, and the first line's marks at the same places (Han characters elsewhere)."""
    return len(first) == len(answer) and all((is_han(a) and is_han(b)) or (not is_han(a) and a == b)
                                             for a, b in zip(first, answer))


@dataclass
class LineRates:
    lines: int
    same_length_rate: float
    tone_end_rate: float | None  # opposed at the end, over lines whose first line ends in a definite tone
    tone_end_lines: int
    tone_246_rate: float | None  # opposed at 2-4-6, over those positions with a definite first-line tone
    first_position_repeats: int  # answers with a first-line character at its same position


def line_rates(answers: Sequence[Answer], book: Any) -> LineRates:
    ends, opposed_246, total_246 = [], 0, 0
    for a in answers:
        end = opposed_at_end(a.first, a.text, book)
        if end is not None:
            ends.append(end)
        for pos in TONE_POSITIONS:
            if pos < len(a.first) and len(a.text) == len(a.first) and (t := tone_of(a.first[pos - 1], book)):
                total_246 += 1
                opposed_246 += tone_of(a.text[pos - 1], book) == ("仄" if t == "平" else "平")
    n = len(answers)
    return LineRates(
        lines=n, same_length_rate=sum(same_shape(a.first, a.text) for a in answers) / n if n else 0.0,
        tone_end_rate=sum(ends) / len(ends) if ends else None, tone_end_lines=len(ends),
        tone_246_rate=opposed_246 / total_246 if total_246 else None,
        first_position_repeats=sum(any(x == y and is_han(x) for x, y in zip(a.first, a.text)) for a in answers),
    )


@dataclass
class CoupletReport:
    checkpoint: str
    data: str
    pairs: int
    characters: int
    nats_per_char: float
    bleu4: float
    exact_match: float
    decoding: str  # e.g. "beam 4" or "greedy", with "--tones" when used
    rates: LineRates
    middle: LineRates | None  # the same on the 律诗 middle couplets (颔联, 颈联) alone
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = "seq2seq"
        return d


def open_pairs(ckpt: Any, data: Sequence[str] | None, split: str = "val"):
    """The pair dataset to measure on: ``data`` (one pair dataset directory) or the checkpoint's own."""
    from poetgen.data.dataset import load_dataset, recorded_dataset

    if data:
        if len(data) != 1:
            raise DatasetError("an encoder-decoder is measured on one pair dataset (prepare --pairs)")
        dataset = load_dataset(data[0])
    else:
        dataset = recorded_dataset(ckpt.dataset_meta)
    if not dataset.is_pairs:
        raise DatasetError(f"{dataset.path} holds text, not pairs: prepare it with --pairs")
    if dataset.vocab != ckpt.vocab:
        raise DatasetError(f"{dataset.path} has another vocabulary than {ckpt.path}")
    if len(dataset.pairs[split]) == 0:
        raise DatasetError(f"the {split} split of {dataset.path} has no pairs")
    return dataset


def evaluate_couplets(model: Any, ckpt: Any, data: Sequence[str] | None = None, *, split: str = "val",
                      beam: int = 4, tones: bool = False, rhyme_book: str = "pingshui", limit: int | None = None,
                      middle_only: bool = False) -> CoupletReport:
    """The figures of the module docstring on ``split`` (its first ``limit`` pairs; ``middle_only``: its 律诗
    middle couplets only); a training split's pairs added by ``prepare --augment`` are left out. ``beam`` 0 decodes
    greedily."""
    import numpy as np

    from poetgen.data.dataset import ACROSS, MIDDLE, REVERSED
    from poetgen.evaluation.scoring import pair_cross_entropy
    from poetgen.poetry.prosody import rhyme_book as book_named

    t0 = time.perf_counter()
    dataset = open_pairs(ckpt, data, split)
    table = dataset.pairs[split]
    couplets = (table[:, 2] & (REVERSED | ACROSS)) == 0  # not the pairs `prepare --augment` adds to training
    rows = np.flatnonzero(couplets & ((table[:, 2] & MIDDLE) != 0 if middle_only else True))
    rows = rows[:limit] if limit else rows
    if len(rows) == 0:
        raise DatasetError(f"no {'律诗 middle couplets' if middle_only else 'pairs'} in the {split} split of "
                           f"{dataset.path}")
    score = pair_cross_entropy(model, getattr(dataset, split), table[rows])
    lines = dataset.pair_lines(split, rows)
    vocab = ckpt.vocab
    firsts = [vocab.decode(f.tolist()) for f, _, _ in lines]
    refs = [vocab.decode(a.tolist()) for _, a, _ in lines]
    options = CoupletOptions(temperature=0.0, beam=beam, tones=tones, rhyme_book=rhyme_book)
    answers = [group[0] for group in answer_lines(model, vocab, firsts, options)]
    hyps = [a.text for a in answers]
    book = book_named(rhyme_book)
    middle = [a for a, (_, _, f) in zip(answers, lines) if f & MIDDLE]
    return CoupletReport(
        checkpoint=str(ckpt.path), data=f"{split} split of {dataset.path}" + (" (律诗 middle couplets)" if middle_only
                                                                             else ""),
        pairs=score.pairs, characters=score.characters, nats_per_char=score.score.nats, bleu4=bleu4(hyps, refs),
        exact_match=sum(h == r for h, r in zip(hyps, refs)) / len(refs),
        decoding=(f"beam {beam}" if beam else "greedy") + (" --tones" if tones else ""),
        rates=line_rates(answers, book), middle=line_rates(middle, book) if middle else None,
        seconds=time.perf_counter() - t0,
    )


CJK_FONTS = ["WenQuanYi Micro Hei", "Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC", "SimHei",
             "PingFang SC", "Microsoft YaHei"]
CJK_FILES = ("wqy", "notosanscjk", "sourcehansans", "droidsansfallback", "simhei", "msyh", "pingfang")


def _cjk_font(size: int = 14):
    """A font with Han characters: one matplotlib knows by name, else a system font file by its usual names
    (matplotlib's cache may predate the font, and it skips some .ttc collections), else the default."""
    from matplotlib import font_manager
    from matplotlib.font_manager import FontProperties

    present = {f.name for f in font_manager.fontManager.ttflist}
    for name in CJK_FONTS:
        if name in present:
            return FontProperties(family=name, size=size)
    for path in sorted(font_manager.findSystemFonts()):
        if any(k in Path(path).name.lower().replace("-", "").replace("_", "") for k in CJK_FILES):
            return FontProperties(fname=path, size=size)
    return FontProperties(size=size)


def plot_attention(answer: Answer, path: str | Path) -> Path:
    """A heat map of the attention of ``answer`` (decoded with its weights): one row per answer character, one
    column per first-line character. Needs matplotlib (the plot extra)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PoetgenError("--plot-attention needs matplotlib: pip install 'poetgen[plot]'") from None
    font = _cjk_font()
    fig = Figure(figsize=(1.2 + 0.6 * len(answer.first), 1.2 + 0.6 * len(answer.text)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(answer.attention, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(answer.first)), list(answer.first), fontproperties=font)
    ax.set_yticks(range(len(answer.text)), list(answer.text), fontproperties=font)
    ax.set_xlabel("first line", fontproperties=font)
    ax.set_ylabel("answer", fontproperties=font)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
