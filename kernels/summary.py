"""Page summaries: each page's channel-wise key min and max and, with BITS > 0, every token's key sketch.

Semantics: ``flexicache_hf.ops.page_summary_ref`` (``page_minmax_ref``, then ``page_sketch_ref``). One
program summarises PAGES consecutive pages of one (batch, head); padding tokens (valid False) are ignored
and a page with no valid token gets zeros. Channels are loaded as [sub-byte slot s, byte j] (channel
s * D*BITS/8 + j, the sketch's packing), so a token's code bytes are a shift-and-sum over axis 1 and D needs
no power-of-two padding beyond the byte axis. One launch per summarised page set: under torch.compile the
PyTorch reference of a one-page summary became ~60 small ops per layer, which cost launches and compile time.
`summarise_page` is the decode step's form (``ops.summarise_page_ref``): one page read where it lives and its
summary written into the metadata buffers at the device's page index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import new_output, next_pow2

PAGES = 4


@triton.jit
def _page_summary_kernel(
    KEYS, VALID, KMIN, KMAX, CODES, PAGE, SLOT, PAGE_VALID, H, P, CAP, s_kb, s_kh, s_ks, s_kt, s_vb, s_vt, s_pb,
    PS: tl.constexpr, DB: tl.constexpr, DB_PAD: tl.constexpr, PB: tl.constexpr, BITS: tl.constexpr,
    PAGES: tl.constexpr, AT_PAGE: tl.constexpr, BY_SLOT: tl.constexpr, HAS_PV: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_t = tl.arange(0, PS)
    offs_s = tl.arange(0, PB)
    offs_j = tl.arange(0, DB_PAD)
    ch = offs_s[:, None] * DB + offs_j[None, :]  # [PB, DB_PAD] channel index
    mask_c = (offs_j < DB)[None, :] & (offs_s < PB)[:, None]
    base = KEYS + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    # in place (AT_PAGE): one page, the device's `page` of every row, read where it lives (a token span of the
    # unstable heads' buffer, or the slot SLOT[b, h] of the stable heads' pool) and written into the metadata
    # buffers (CAP pages per row) at that page: a decode step's page needs no gather and no copy of its own
    page0 = 0
    if AT_PAGE:
        page0 = tl.load(PAGE).to(tl.int64)
    if BY_SLOT:
        base += tl.load(SLOT + bh).to(tl.int64) * s_ks
        first_key = 0
    else:
        first_key = page0 * PS
    for i in tl.static_range(PAGES):
        p = tl.program_id(1) * PAGES + i
        pos = p.to(tl.int64) * PS + offs_t
        in_range = pos < P * PS  # the last program's trailing pages do not exist
        valid = tl.load(VALID + b * s_vb + (page0 * PS + pos) * s_vt, mask=in_range, other=0) != 0
        k = tl.load(base + (first_key + pos)[:, None, None] * s_kt + ch[None, :, :],
                    mask=in_range[:, None, None] & mask_c[None, :, :], other=0.0)
        k = k.to(tl.float32)  # exact for fp16/bf16; min/max commute with the round trip
        vk = valid[:, None, None]
        kmin = tl.min(tl.where(vk, k, float("inf")), 0)
        kmax = tl.max(tl.where(vk, k, float("-inf")), 0)
        any_valid = tl.max(valid.to(tl.int32), 0) > 0
        kmin = tl.where(any_valid, kmin, 0.0)
        kmax = tl.where(any_valid, kmax, 0.0)
        row_page = bh.to(tl.int64) * CAP + page0 + p
        out = row_page * (PB * DB) + ch
        smask = mask_c & ((p + ch * 0) < P)  # a tensor mask: the interpreter rejects scalar ones
        tl.store(KMIN + out, kmin.to(KMIN.dtype.element_ty), mask=smask)
        tl.store(KMAX + out, kmax.to(KMAX.dtype.element_ty), mask=smask)
        if HAS_PV:  # the page's validity, by the first head's program (every head's would be the same)
            flag = (any_valid.to(tl.int32) + offs_t * 0).to(tl.int8)  # a vector: the interpreter's stores need one
            tl.store(PAGE_VALID + b * s_pb + page0 + p + offs_t * 0, flag, mask=(offs_t + h) == 0)
        if BITS > 0:
            # the reference's level in fp32 from the stored (rounded) box, with IEEE division (Triton's default
            # fp32 division is approximate and would move tokens across level boundaries)
            lo = kmin.to(KMIN.dtype.element_ty).to(tl.float32)
            width = kmax.to(KMAX.dtype.element_ty).to(tl.float32) - lo
            x = tl.math.div_rn(k - lo[None], tl.maximum(width, 1e-30)[None]) * (1 << BITS)
            lvl = tl.where(width[None] > 0, tl.floor(x), 0.0)
            lvl = tl.minimum(tl.maximum(lvl, 0.0), (1 << BITS) - 1).to(tl.int32)
            # a padding token takes the levels of its page's first valid token (token 0 if none: all zeros)
            first = tl.min(tl.where(valid, offs_t, PS), 0)
            stand_in = tl.sum(tl.where((offs_t == first)[:, None, None], lvl, 0), 0)
            lvl = tl.where(vk, lvl, stand_in[None])
            code = tl.sum(lvl << (offs_s * BITS)[None, :, None], 1)  # [PS, DB_PAD]: disjoint bits, sum = or
            dst = (row_page * PS + offs_t[:, None]) * DB + offs_j[None, :]
            cmask = in_range[:, None] & (offs_j < DB)[None, :]
            tl.store(CODES + dst, code.to(tl.uint8), mask=cmask)


def page_summary(keys: torch.Tensor, valid: torch.Tensor, page_size: int, bits: int = 0):
    """keys [B, H, P*page_size, D]; valid [B, P*page_size] bool -> kmin, kmax [B, H, P, D] (keys' dtype) and,
    with bits > 0, codes [B, H, P, page_size, D*bits//8] uint8 (else None)."""
    B, H, T, D = keys.shape
    P = T // page_size
    kmin = new_output((B, H, P, D), keys.device, keys.dtype)
    kmax = new_output((B, H, P, D), keys.device, keys.dtype)
    codes = torch.empty(B, H, P, page_size, D * bits // 8, device=keys.device, dtype=torch.uint8) if bits else None
    if kmin.numel() == 0:
        return kmin, kmax, codes
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    _launch(keys, (keys.stride(0), keys.stride(1), 0, keys.stride(2)), valid, kmin, kmax, codes, page_size, P)
    return kmin, kmax, codes


def summarise_page(pool, valid, page, page_size, kmin, kmax, codes=None, page_valid=None, slot=None) -> None:
    """In place, see ops.summarise_page_ref: pool [B, H, T, D] (the page at tokens page*page_size on) or, with
    slot [B, H], [B, H, S, page_size, D]; page [1] on the device; kmin, kmax [B, H, cap, D], codes, page_valid
    [B, cap] written at the page."""
    B, H = pool.shape[:2]
    if B * H == 0:
        return
    assert pool.stride(-1) == 1 and all(t is None or t.is_contiguous() for t in (kmin, kmax, codes, page_valid))
    strides = (pool.stride(0), pool.stride(1), pool.stride(2), pool.stride(3)) if slot is not None else \
        (pool.stride(0), pool.stride(1), 0, pool.stride(2))
    _launch(pool, strides, valid, kmin, kmax, codes, page_size, 1, page=page, slot=slot, page_valid=page_valid)


def _launch(keys, strides, valid, kmin, kmax, codes, page_size, P, page=None, slot=None, page_valid=None):
    assert page_size & (page_size - 1) == 0, "page_size must be a power of two"
    D = kmin.shape[-1]
    bits = 8 * codes.shape[-1] // D if codes is not None else 0
    B, H, CAP = kmin.shape[:3]
    if valid.dtype == torch.bool:
        valid = valid.view(torch.uint8)
    if page_valid is not None and page_valid.dtype == torch.bool:
        page_valid = page_valid.view(torch.int8)
    pages = min(PAGES, P)  # a decode step summarises one page: no masked iterations in its chain
    PB = 8 // bits if bits else 1  # channels per code byte; without a sketch, one row of D channels
    DB = D // PB
    _page_summary_kernel[(B * H, triton.cdiv(P, pages))](
        keys, valid, kmin, kmax, codes if bits else kmin, kmin if page is None else page,
        kmin if slot is None else slot, valid if page_valid is None else page_valid, H, P, CAP, *strides,
        valid.stride(0), valid.stride(1), 0 if page_valid is None else page_valid.stride(0),
        PS=page_size, DB=DB, DB_PAD=max(16, next_pow2(DB)), PB=PB, BITS=bits, PAGES=pages,
        AT_PAGE=page is not None, BY_SLOT=slot is not None, HAS_PV=page_valid is not None, num_warps=4,
    )
