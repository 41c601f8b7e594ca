"""The corpus that ships in data/: well formed, simplified, and what `prepare`/`train` use by default."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from helpers import REPO
from poetgen.cli.app import app
from poetgen.data.dataset import load_dataset
from poetgen.data.normalize import convert_script
from poetgen.paths import bundled_corpus
from poetgen.poetry.forms import detect_form

# Received characters that OpenCC's t2s would change (see data/README.md).
T2S_EXCEPTIONS = {"袷", "摐"}


@pytest.fixture(scope="module")
def poems() -> list[dict]:
    path = REPO / "data" / "poems.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_found_by_the_package():
    assert bundled_corpus() == REPO / "data" / "poems.jsonl"


def test_records_are_well_formed(poems):
    assert len(poems) >= 300
    for p in poems:
        assert list(p) == ["title", "author", "paragraphs"], p
        assert p["title"] and p["author"] and p["paragraphs"]
        for para in p["paragraphs"]:
            assert para[-1] in "。？！", (p["title"], para)
            assert para.isprintable() and not any(c.isascii() for c in para), (p["title"], para)


def test_no_duplicates(poems):
    assert len({(p["title"], p["author"]) for p in poems}) == len(poems)
    assert len({"".join(p["paragraphs"]) for p in poems}) == len(poems)


def test_simplified_characters(poems):
    for p in poems:
        for s in [p["title"], p["author"], *p["paragraphs"]]:
            converted = convert_script(s, "simplified")
            changed = {a for a, b in zip(s, converted) if a != b}
            assert changed <= T2S_EXCEPTIONS, (p["title"], changed)


def test_forms_counts_match_the_readme(poems):
    forms = Counter(detect_form("".join(p["paragraphs"])) or "other" for p in poems)
    readme = (REPO / "data" / "README.md").read_text(encoding="utf-8")
    for name, n in forms.items():
        label = {"other": "古体"}.get(name, name)
        row = next(line for line in readme.splitlines() if line.startswith(f"| {label}"))
        assert row.endswith(f"| {n} |"), (name, n, row)
    assert all(forms[f] >= 50 for f in ("五绝", "七绝", "五律", "七律")) and forms["other"] >= 20
    assert f"**{len(poems)}** poems" in readme


def test_prepare_without_sources_uses_it(tmp_path):
    r = CliRunner().invoke(app, ["prepare", "-o", str(tmp_path / "ds"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["counts"]["documents"] == sum(1 for _ in open(REPO / "data" / "poems.jsonl", encoding="utf-8"))
    ds = load_dataset(tmp_path / "ds")
    assert ds.meta["script"] == "simplified" and summary["sources"][0]["kind"].startswith("chinese-poetry")
