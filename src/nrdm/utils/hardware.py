"""What the machine can do fast."""
from __future__ import annotations

import warnings

import torch


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without either, CPU bf16 matmuls are emulated (on an AVX2-only CPU a
    512^2 bf16 matmul runs about 100x slower than in fp32)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def warn_if_slow_bf16(device: torch.device | str, precision: str, what: str) -> None:
    if precision == "bf16" and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(f"{what}=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): bf16 is emulated here "
                      f"and far slower than fp32; use {what}=fp32 on this machine", stacklevel=2)
