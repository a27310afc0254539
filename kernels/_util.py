"""Small helpers shared by the kernel launchers."""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on numpy over CPU memory."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessor count (cached: the property query is slow); 4 off the GPU (interpreter)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# Tests set this to prove that every output element is written: kernel-allocated float outputs then
# start as NaN instead of whatever torch.empty hands back (often zeros, which would hide a gap).
POISON = False


def new_output(shape, device, dtype) -> torch.Tensor:
    if POISON and dtype.is_floating_point:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)
