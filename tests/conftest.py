"""Shared fixtures only; the helper functions (paths, shared data, hand-made datasets) live in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_dataset


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Forty short 五绝-shaped documents made of a dozen characters: learnable in a few hundred steps."""
    lines = ["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡"]
    poem = f"{lines[0]}，{lines[1]}。{lines[2]}，{lines[3]}。"
    other = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
    docs = [poem if i % 2 == 0 else other for i in range(40)]
    return make_dataset(tmp_path / "tiny", docs, [poem, other])
