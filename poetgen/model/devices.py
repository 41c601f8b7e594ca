"""Where training and sampling run: device choice and mixed precision."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from poetgen.errors import ConfigError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """auto = cuda, then mps, then cpu; an explicit device that is not there is a ConfigError.

    ``local_rank`` (distributed training, see poetgen.training.distributed): each process takes cuda:LOCAL_RANK for auto
    and cuda, or the CPU; MPS and a fixed cuda:N are refused (N processes cannot share one device that way).
    """
    if local_rank is not None:
        return _rank_device(name, local_rank)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but CUDA is not available here (try --device auto)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device mps was asked for, but MPS is not available here (try --device auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def _rank_device(name: str, local_rank: int) -> torch.device:
    if name not in ("auto", "cuda", "cpu"):
        raise ConfigError(
            f"--device {name} cannot be used with several processes: each one takes cuda:LOCAL_RANK with --device "
            "cuda (or auto), or the CPU with --device cpu"
        )
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but CUDA is not available here (try --device auto)")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"the process with local rank {local_rank} has no GPU: this machine has {count}. Start at most {count} "
            "processes per machine (torchrun --nproc-per-node), or train on the CPU with --device cpu"
        )
    return torch.device("cuda", local_rank)


def cpu_bf16_native() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX) and oneDNN can use it: there oneDNN's bf16
    LSTM is fast (training steps 1.14x to 1.63x fp32, measured); elsewhere bf16 is emulated or missing."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_candidate(device: str | torch.device) -> bool:
    """Whether precision auto should weigh bf16 on ``device``: a CPU that multiplies bf16 natively. (On CUDA auto is
    bf16 without a probe; a CPU without native bf16 would emulate it, 10-20x slower.)"""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return dev.type == "cpu" and cpu_bf16_native()


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 autocast on CUDA (auto or bf16); on a CPU with native bf16 when asked for (bf16); fp32 elsewhere."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if precision == "bf16":
        if device.type == "cpu" and cpu_bf16_native():
            return torch.bfloat16
        raise ConfigError(f"precision bf16 needs a CUDA device or a CPU with native bf16 (AVX512-BF16 or AMX); this "
                          f"run uses {device}: use --precision fp32 or auto (a run that --precision auto put on bf16 "
                          "elsewhere goes on here with --resume RUN --precision fp32; its numbers then differ from "
                          "an unbroken run's)")
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
