"""A promotion's plan: free the slots of demoted pages, give each missing selected page a free slot.

Semantics: ``flexicache_hf.ops.plan_promotion_ref`` (the block table is updated in place; src/dst are the
copy jobs, -1 where nothing is copied). One program per row (b * heads + h): a row's plan depends only on
its own S slots and K selections (a few dozen of each), so the whole row fits in registers and the
pairing of missing pages with free slots is a [S, K] comparison plus prefix sums, with no sort, no host
sync and fixed shapes (it runs inside CUDA graphs and compiled steps, one launch instead of the
reference's dozen small ops).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import next_pow2


@triton.jit
def _plan_promotion_kernel(SLOT_PAGE, SELECTED, CURRENT, ACTIVE, SRC, DST, S, K, rows,
                           S_PAD: tl.constexpr, K_PAD: tl.constexpr, HAS_ACTIVE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, K_PAD)
    in_k = offs_k < K
    # a compiled rerank step launches two plans, and its flags leave one of them idle: an idle plan only marks
    # its jobs empty (the full plan costs ~12 us per call on the H200 at 64 pages, most of a rerank's plan time)
    idle = False
    if HAS_ACTIVE:
        idle = tl.load(ACTIVE) == 0
    if idle:
        tl.store(SRC + row * K + offs_k, tl.full([K_PAD], -1, tl.int64), mask=in_k)
        tl.store(DST + row * K + offs_k, tl.full([K_PAD], -1, tl.int64), mask=in_k)
    else:
        _plan_row(SLOT_PAGE, SELECTED, CURRENT, SRC, DST, S, K, rows, row, S_PAD, K_PAD)


@triton.jit
def _plan_row(SLOT_PAGE, SELECTED, CURRENT, SRC, DST, S, K, rows, row, S_PAD: tl.constexpr, K_PAD: tl.constexpr):
    offs_s = tl.arange(0, S_PAD)
    offs_k = tl.arange(0, K_PAD)
    in_s = offs_s < S
    in_k = offs_k < K
    # page ids in 32 bits (a row has far fewer than 2^31 pages): the [S, K] comparisons below are most of the
    # kernel's time, and half the registers of int64
    sp = tl.load(SLOT_PAGE + row * S + offs_s, mask=in_s, other=-1).to(tl.int32)
    sel = tl.load(SELECTED + row * K + offs_k, mask=in_k, other=-1).to(tl.int32)
    cur = tl.load(CURRENT).to(tl.int32)

    # free the slots of pages neither selected nor current
    keep = (tl.max(((sp[:, None] == sel[None, :]) & in_k[None, :]).to(tl.int32), 1) > 0) | (sp == cur)
    sp = tl.where(keep | (sp < 0), sp, -1)

    resident = tl.max(((sel[None, :] == sp[:, None]) & in_s[:, None]).to(tl.int32), 0) > 0
    missing = (sel >= 0) & ~resident & in_k
    rank = tl.cumsum(missing.to(tl.int32), 0) - 1

    # Each slot's place in the reference's stable argsort: free slots first, then the occupied ones, each in
    # slot order. Within the callers' guarantee only free slots are ever paired; ranking the occupied ones
    # too keeps the kernel identical to the reference even where that guarantee is broken.
    free = (sp < 0) & in_s
    free_upto = tl.cumsum(free.to(tl.int32), 0)
    pos = tl.where(free, free_upto - 1, tl.sum(free.to(tl.int32), 0) + offs_s - free_upto)

    # the r-th missing page goes to the slot at place r: at most one match per slot and per selection
    match = (pos[:, None] == rank[None, :]) & in_s[:, None] & missing[None, :]
    new_page = tl.max(tl.where(match, sel[None, :], -1), 1)
    tl.store(SLOT_PAGE + row * S + offs_s, tl.where(new_page >= 0, new_page, sp).to(tl.int64), mask=in_s)
    slot = tl.max(tl.where(match, offs_s[:, None], -1), 0).to(tl.int64)
    # ops.host_index(page, row, rows) and ops.slot_index(row, slot, S)
    tl.store(SRC + row * K + offs_k, tl.where(missing, sel.to(tl.int64) * rows + row, -1), mask=in_k)
    tl.store(DST + row * K + offs_k, tl.where(missing, row * S + slot, -1), mask=in_k)


def plan_promotion(slot_page: torch.Tensor, selected: torch.Tensor, current_page: torch.Tensor,
                   active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """slot_page [B, H, S] long (updated in place); selected [B, H, K]; current_page [1]; active bool [1] or
    None -> (src, dst), [B*H*K] long each (see ops.plan_promotion_ref)."""
    B, H, S = slot_page.shape
    K = selected.shape[-1]
    assert slot_page.dtype == torch.long and slot_page.is_contiguous(), "slot_page is updated in place"
    src = torch.empty(B * H * K, dtype=torch.long, device=slot_page.device)
    dst = torch.empty_like(src)
    if B * H == 0:
        return src, dst
    selected = selected.contiguous()
    if active is not None and active.dtype == torch.bool:
        active = active.view(torch.uint8)
    _plan_promotion_kernel[(B * H,)](
        slot_page, selected, current_page, slot_page if active is None else active, src, dst, S, K, B * H,
        S_PAD=next_pow2(S), K_PAD=next_pow2(K), HAS_ACTIVE=active is not None, num_warps=4,
    )
    return src, dst
