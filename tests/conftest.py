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


_BF16_LSTM: list[bool] = []


@pytest.fixture
def cpu_bf16_lstm() -> None:
    """Skip unless this CPU's oneDNN runs an LSTM under bf16 autocast. On a CPU without AVX-512 it cannot ("could not
    create a primitive descriptor for the LSTM forward propagation primitive", seen on an AVX2 AMD EPYC), so poetgen
    never puts a run there in bf16 (model.devices.autocast_dtype refuses --precision bf16 without native bf16)."""
    if not _BF16_LSTM:
        import torch

        lstm = torch.nn.LSTM(4, 4, batch_first=True)
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                lstm(torch.zeros(1, 2, 4))
            _BF16_LSTM.append(True)
        except RuntimeError:
            _BF16_LSTM.append(False)
    if not _BF16_LSTM[0]:
        pytest.skip("this CPU's oneDNN cannot run an LSTM in bf16 (no AVX-512); poetgen refuses bf16 here")
