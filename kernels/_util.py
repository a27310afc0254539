"""Small helpers shared by the kernel launchers."""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton >= 3.3 on Hopper and later: programmatic dependent launch
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401 (kernels import them)
except ImportError:  # older Triton: kernels are compiled with PDL=False and never reach these names
    gdc_launch_dependents = gdc_wait = None


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on numpy over CPU memory."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Programmatic dependent launch (Hopper+): each kernel of the decode chain (scores, top-k passes,
# attention, merge) lets the next one launch as soon as it starts; the next one waits (gdc_wait) before
# it reads its predecessor's output or writes any memory (the caching allocator may hand it a block the
# previous kernel still uses). So the stable heads' attention streams its pages while the unstable heads'
# top-k still runs: 34 vs 39 us per layer at 32k/batch 8 on the H100. Bit-identical to plain stream
# order (tests/test_graphs.py::test_pdl_equals_stream_order). FLEXICACHE_HF_PDL=0 in the environment (or
# PDL = False) turns it off. (A GPU eval crash once blamed on it was a garbage collection during a
# CUDA-graph capture, seen with PDL off too and fixed in graphs.py.)
PDL = os.environ.get("FLEXICACHE_HF_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def pdl(device: torch.device) -> dict:
    """Launch arguments of a decode-chain kernel on `device`: with programmatic dependent launch (the
    kernel's PDL constexpr and the launch option) where the GPU and Triton support it."""
    on = (PDL and gdc_wait is not None and device.type == "cuda" and not interpreting()
          and _capability(device.index if device.index is not None else torch.cuda.current_device())[0] >= 9)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


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


def skip_args(skip, placeholder) -> tuple:
    """(SKIP pointer, HAS_SKIP) for a kernel that takes a skip flag: a device flag [1] that, where set, makes the
    kernel return at once (a compiled step's stable heads, which select only at reranks but launch at every
    step); without one, any tensor stands in for the pointer, never read."""
    return (placeholder, False) if skip is None else (skip, True)
