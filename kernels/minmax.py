"""Page min/max metadata: channel-wise min and max of each page's valid keys.

Semantics: ``flexicache_hf.ops.page_minmax_ref``. One program reduces PAGES consecutive pages of one
(batch, head); padding tokens (valid False) are ignored and a page with no valid token gets zeros.
Runs once per prefill (and once per filled page), so it is simple rather than tuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import new_output, next_pow2

PAGES = 4


@triton.jit
def _page_minmax_kernel(
    KEYS, VALID, KMIN, KMAX, H, P, s_kb, s_kh, s_kt, s_vb, s_vt,
    PS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, PAGES: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_t = tl.arange(0, PS)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    base = KEYS + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    for i in tl.static_range(PAGES):
        p = tl.program_id(1) * PAGES + i
        pos = p.to(tl.int64) * PS + offs_t
        in_range = pos < P * PS  # the last program's trailing pages do not exist
        valid = tl.load(VALID + b * s_vb + pos * s_vt, mask=in_range, other=0) != 0
        k = tl.load(base + pos[:, None] * s_kt + offs_d[None, :], mask=in_range[:, None] & mask_d[None, :], other=0.0)
        k = k.to(tl.float32)  # exact for fp16/bf16; min/max commute with the round trip
        kmin = tl.min(tl.where(valid[:, None], k, float("inf")), 0)
        kmax = tl.max(tl.where(valid[:, None], k, float("-inf")), 0)
        any_valid = tl.max(valid.to(tl.int32), 0) > 0
        kmin = tl.where(any_valid, kmin, 0.0)
        kmax = tl.where(any_valid, kmax, 0.0)
        out = (bh.to(tl.int64) * P + p) * D + offs_d
        smask = mask_d & ((p + offs_d * 0) < P)  # a vector mask: the interpreter rejects scalar ones
        tl.store(KMIN + out, kmin.to(KMIN.dtype.element_ty), mask=smask)
        tl.store(KMAX + out, kmax.to(KMAX.dtype.element_ty), mask=smask)


def page_minmax(keys: torch.Tensor, valid: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [B, H, P*page_size, D]; valid [B, P*page_size] bool -> kmin, kmax [B, H, P, D] (keys' dtype)."""
    B, H, T, D = keys.shape
    P = T // page_size
    assert page_size & (page_size - 1) == 0, "page_size must be a power of two"
    kmin = new_output((B, H, P, D), keys.device, keys.dtype)
    kmax = new_output((B, H, P, D), keys.device, keys.dtype)
    if kmin.numel() == 0:
        return kmin, kmax
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    if valid.dtype == torch.bool:
        valid = valid.view(torch.uint8)
    _page_minmax_kernel[(B * H, triton.cdiv(P, PAGES))](
        keys, valid, kmin, kmax, H, P, keys.stride(0), keys.stride(1), keys.stride(2),
        valid.stride(0), valid.stride(1), PS=page_size, D=D, D_PAD=max(16, next_pow2(D)), PAGES=PAGES,
        num_warps=4,
    )
    return kmin, kmax
