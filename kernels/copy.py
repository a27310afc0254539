"""Page copies between pools: dst_pool[dst_idx] = src_pool[src_idx], entries with src_idx -1 skipped.

Promotion reads a pinned host pool in place; decode offload writes one in place.
Semantics: ``flexicache_hf.ops.copy_pages_ref``. With unified addressing a pinned (page-locked,
mapped) host tensor's address is valid on the GPU, so a kernel can load the scattered host pages
directly over PCIe (zero-copy): no CPU-side gather into a staging buffer, no copy-engine launch per
page, no host sync (a fixed-shape copy with skipped entries can be captured in a CUDA graph). Triton takes any object with ``data_ptr()`` and ``dtype`` as a pointer, and its launcher
translates the address through cuPointerGetAttribute, which succeeds for pinned host memory; the host
pool is handed over in a small wrapper (``_HostPtr``) so that it is never treated as a CPU tensor.
Like the reference's non_blocking copy, the kernel runs asynchronously on the current stream: the
caller must leave the source pages alone until that stream has passed the copy.

The grid is small (``MIN_PROGRAMS`` CTAs, more only for long entry lists) and each program walks
entries grid-stride: enough PCIe reads in flight to saturate the link, while leaving the SMs to the
compute the copy overlaps.
The same kernel does device->device gathers (src on the GPU) and, under TRITON_INTERPRET=1, CPU
copies; a pageable (non-pinned) host pool is gathered on the host and then copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import interpreting, next_pow2

MIN_PROGRAMS = 32  # H100: 32 CTAs already reach ~50 GB/s (the pinned-copy ceiling is 54.6)
# Fixed-shape callers pass many skipped entries (index -1); past MIN_PROGRAMS * this many entries the
# grid grows, so that no program walks a long list of mostly empty entries.
ENTRIES_PER_PROGRAM = 8
NUM_WARPS = 4


class _HostPtr:
    """A pinned host tensor seen as a bare device-accessible address (unified addressing)."""

    def __init__(self, t: torch.Tensor):
        self.t = t  # keeps the memory alive for the launch
        self.dtype = t.dtype

    def data_ptr(self) -> int:
        return self.t.data_ptr()


@triton.jit
def _copy_pages_kernel(SRC, SRC_IDX, DST, DST_IDX, SRC2, DST2, n, s_src, s_dst, s_src2, s_dst2,
                       PAGE: tl.constexpr, BLOCK: tl.constexpr, PAIR: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < PAGE  # PAGE = page_size * D elements, not always a power of two (D=80)
    for i in range(tl.program_id(0), n, tl.num_programs(0)):
        si = tl.load(SRC_IDX + i).to(tl.int64)
        di = tl.load(DST_IDX + i).to(tl.int64)
        # -1: nothing to copy; the masked load and store move no bytes (a vector mask: the interpreter
        # rejects a scalar one)
        todo = mask & ((offs * 0 + si) >= 0)
        x = tl.load(SRC + si * s_src + offs, mask=todo)
        tl.store(DST + di * s_dst + offs, x, mask=todo)
        if PAIR:  # V with K's indices: one launch for both
            x = tl.load(SRC2 + si * s_src2 + offs, mask=todo)
            tl.store(DST2 + di * s_dst2 + offs, x, mask=todo)


def _launch(src, src_idx, dst, dst_idx, device, min_programs, num_warps, per_program, pair):
    """src and dst: tensors on `device`, or _HostPtr-wrapped pinned host pools; pair: (src2, dst2) alike, or None."""
    src_idx = src_idx.reshape(-1).to(device, non_blocking=True)
    dst_idx = dst_idx.reshape(-1).to(device, non_blocking=True)
    n = src_idx.numel()
    src2, dst2 = pair if pair is not None else (src, dst)
    t = [x.t if isinstance(x, _HostPtr) else x for x in (src, dst, src2, dst2)]
    page = t[1][0].numel()
    programs = max(1, min(n, max(min_programs, triton.cdiv(n, per_program))))
    _copy_pages_kernel[(programs,)](
        src, src_idx, dst, dst_idx, src2, dst2, n, t[0].stride(0), t[1].stride(0), t[2].stride(0), t[3].stride(0),
        PAGE=page, BLOCK=next_pow2(page), PAIR=pair is not None, num_warps=num_warps,
    )


def _copy_pages(src_pool, src_idx, dst_pool, dst_idx, pair=None, *, min_programs=None, num_warps=None,
                per_program=None):
    """copy_pages with the launch knobs exposed (the benchmark sweeps them)."""
    if src_idx.numel() == 0:
        return
    assert dst_idx.numel() == src_idx.numel(), "src_idx and dst_idx must have the same length"
    src2, dst2 = pair if pair is not None else (src_pool, dst_pool)
    srcs, dsts = (src_pool, src2), (dst_pool, dst2)
    assert all(p.shape[1:] == src_pool.shape[1:] for p in srcs + dsts), "pools must have the same page shape"
    knobs = (min_programs or MIN_PROGRAMS, num_warps or NUM_WARPS, per_program or ENTRIES_PER_PROGRAM)
    src_dev, dst_dev = src_pool.device, dst_pool.device
    usable = (all(x.device == src_dev for x in srcs) and all(x.device == dst_dev for x in dsts)
              and all(x[0].is_contiguous() for x in srcs + dsts))
    same = lambda x: x  # noqa: E731
    if usable and (src_dev == dst_dev or interpreting()):
        wrap_src, wrap_dst, device = same, same, dst_dev  # on-device gather (the interpreter: all CPU memory)
    elif usable and src_dev.type == "cpu" and all(x.is_pinned() for x in srcs) and dst_dev.type == "cuda":
        wrap_src, wrap_dst, device = _HostPtr, same, dst_dev  # zero-copy read over PCIe
    elif usable and dst_dev.type == "cpu" and all(x.is_pinned() for x in dsts) and src_dev.type == "cuda":
        wrap_src, wrap_dst, device = same, _HostPtr, src_dev  # zero-copy write over PCIe
    else:  # pageable host memory, another device, odd layouts: the reference (gather, then one copy)
        from flexicache_hf.ops import copy_pages_ref

        return copy_pages_ref(src_pool, src_idx, dst_pool, dst_idx, pair)
    _launch(wrap_src(src_pool), src_idx, wrap_dst(dst_pool), dst_idx, device, *knobs,
            None if pair is None else (wrap_src(pair[0]), wrap_dst(pair[1])))


def copy_pages(src_pool: torch.Tensor, src_idx: torch.Tensor, dst_pool: torch.Tensor, dst_idx: torch.Tensor,
               pair=None) -> None:
    """dst_pool[dst_idx] = src_pool[src_idx] for page pools [S, page_size, D] (see ops.copy_pages_ref); with
    pair = (src_pool2, dst_pool2), the same for them in the same launch (K and V)."""
    _copy_pages(src_pool, src_idx, dst_pool, dst_idx, pair)
