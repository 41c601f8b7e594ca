"""Where poetgen keeps things: the user cache, the bundled corpus, the default run directory."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_CORPUS_NAME = "poems.jsonl"
ENV_CACHE = "POETGEN_CACHE_DIR"
RUNS_DIR = Path("checkpoints")  # where `train` creates runs and `sample` / `eval` look for the newest, by default


def cache_dir() -> Path:
    """``$POETGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/poetgen``, else ``~/.cache/poetgen`` (not created here)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "poetgen"


def bundled_corpus() -> Path | None:
    """The project's own corpus of Tang poems (``data/poems.jsonl`` in a checkout), or None if not installed."""
    for candidate in (PACKAGE_DIR.parent / "data" / BUNDLED_CORPUS_NAME, PACKAGE_DIR / "data" / BUNDLED_CORPUS_NAME):
        if candidate.is_file():
            return candidate
    return None
