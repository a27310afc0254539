"""Page selection of one head group at a decode step: masked MinMax scores, then the top K.

Semantics: ``flexicache_hf.ops.select_pages_ref`` / ``topk_pages_ref`` (ties go to the lower page).

Top-K runs as a tournament of small Triton sorts instead of torch.topk, whose radix select gives one
thread block to each row: at 32k tokens and batch 8 that is 16 blocks walking 2048 scores each, plus
five more launches to mark, order and append. Here each score and its page id are packed into one
int64 whose signed order is (score, then lower page first), so one ``tl.sort`` orders both:
- chunk pass: many programs, each sorts CHUNK packed scores of one row and keeps its best k (the top k
  of a row lies in the union of its chunks' top k); repeated while a row has more than FINAL entries;
- final pass: one program per row sorts what is left and writes the best k as page ids, best first,
  -1 for missing candidates, optionally the current page appended as the last column (the unstable
  heads' page table, ready for attention).
One program per row sorting a whole row (2-4k pages) was measured slower than torch.topk on the H100;
the chunk pass is what spreads the work over the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import gdc_launch_dependents, gdc_wait, next_pow2, pdl
from .scores import _candidates, _q_row, score_inputs

CHUNK = 256  # packed scores per chunk-pass program (at least 2k, so that a pass shrinks a row)
FINAL = 512  # a row at most this long is finished by one program
SCORE_CHANNELS = 16  # channels per step of the fused scores + chunk pass
NUM_WARPS = 8  # measured best for the sorts on the H100 (benchmarks/gpu_check_kernels.py --sweep-select)
_NEG_INF_KEY = tl.constexpr(-2139095041)  # the key of -inf: scores at or below it are no candidates
_MASK32 = tl.constexpr(0xFFFFFFFF)
_NOTHING = tl.constexpr(-(2**63))  # below every packed score: padding


@triton.jit
def _pack(s, page):
    """fp32 score + page id -> int64 ordered by score, then by lower page (larger key = better)."""
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 == 0.0 for the reference: one key for both
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed int order == float order
    return (key.to(tl.int64) << 32) | (page.to(tl.int64) ^ _MASK32)  # MASK32 - page


@triton.jit
def _load_packed(IN, n, s_in, offs, L, FROM_SCORES: tl.constexpr):
    """Entries offs of row n: fp32 scores (packed here with their page ids) or packed keys; padding past L."""
    inside = offs < L
    if FROM_SCORES:
        s = tl.load(IN + n.to(tl.int64) * s_in + offs, mask=inside, other=float("-inf"))
        x = tl.where(inside, _pack(s, offs), _NOTHING)
    else:
        x = tl.load(IN + n.to(tl.int64) * s_in + offs, mask=inside, other=_NOTHING)
    return x


@triton.jit
def _chunk_kernel(IN, OUT, L, s_in, s_out, k, FROM_SCORES: tl.constexpr, CH: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # launched early: wait for the kernel before (its scores or packed keys), let the next one launch
        gdc_wait()
        gdc_launch_dependents()
    n = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * CH + tl.arange(0, CH)
    x = tl.sort(_load_packed(IN, n, s_in, offs, L, FROM_SCORES), descending=True)
    j = tl.arange(0, CH)
    tl.store(OUT + n.to(tl.int64) * s_out + c * k + j, x, mask=j < k)


@triton.jit
def _scores_chunk_kernel(
    Q, KMIN, KMAX, OUT, P, s_qn, s_qg, s_mn, s_mp, s_xn, s_xp, VALID, CURRENT, s_vb, rows_per_batch,
    HEADS, H, s_out, k,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, CH: tl.constexpr,
    MAPPED: tl.constexpr, PDL: tl.constexpr,
):
    # The first chunk pass fused with the masked MinMax scores (kernels/scores.py): CH pages of one row,
    # walked DC channels at a time, their best k packed and kept; the scores never go to memory.
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    n = tl.program_id(0)
    c = tl.program_id(1)
    qrow = _q_row(n, HEADS, H, rows_per_batch, MAPPED)
    offs_p = c * CH + tl.arange(0, CH)
    mask_p = offs_p < P
    p64 = offs_p.to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    offs_c = tl.arange(0, DC)
    acc = tl.zeros([G_PAD, CH], tl.float32)  # per query head of the group: sum over channels
    for d0 in range(0, D, DC):
        d = d0 + offs_c
        m = mask_p[:, None] & (d < D)[None, :]
        kmin = tl.load(KMIN + n.to(tl.int64) * s_mn + p64[:, None] * s_mp + d[None, :], mask=m, other=0.0)
        kmax = tl.load(KMAX + n.to(tl.int64) * s_xn + p64[:, None] * s_xp + d[None, :], mask=m, other=0.0)
        kmin = kmin.to(tl.float32)
        kmax = kmax.to(tl.float32)
        qt = tl.load(Q + qrow * s_qn + offs_g[:, None] * s_qg + d[None, :],
                     mask=(offs_g < G)[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        for g in tl.static_range(G):
            qg = tl.sum(tl.where(offs_g[:, None] == g, qt, 0.0), 0)[None, :]
            part = tl.sum(tl.maximum(qg * kmax, qg * kmin), 1)
            acc = tl.where(offs_g[:, None] == g, acc + part[None, :], acc)
    best = tl.max(tl.where((offs_g < G)[:, None], acc, float("-inf")), 0)  # max over the group
    best = tl.where(_candidates(VALID, CURRENT, s_vb, n, rows_per_batch, offs_p, mask_p), best, float("-inf"))
    x = tl.sort(tl.where(mask_p, _pack(best, offs_p), _NOTHING), descending=True)
    j = tl.arange(0, CH)
    tl.store(OUT + n.to(tl.int64) * s_out + c * k + j, x, mask=j < k)


@triton.jit
def _final_kernel(IN, OUT, CUR, L, s_in, s_out, k, FROM_SCORES: tl.constexpr, APPEND: tl.constexpr,
                  CH: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    n = tl.program_id(0)
    offs = tl.arange(0, CH)
    x = tl.sort(_load_packed(IN, n, s_in, offs, L, FROM_SCORES), descending=True)
    ids = tl.where((x >> 32) > _NEG_INF_KEY, (x & _MASK32) ^ _MASK32, -1)  # best first, then -1
    out = OUT + n.to(tl.int64) * s_out
    tl.store(out + offs, ids, mask=offs < k)
    if APPEND:
        tl.store(out + k, tl.load(CUR).to(tl.int64))


def topk_pages(scores: torch.Tensor, k: int, append: torch.Tensor | None = None) -> torch.Tensor:
    """scores [N, P] fp32 -> [N, min(k, P)] int64 (ops.topk_pages_ref), plus `append` [1] as a last column."""
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    return _tournament(scores, scores.shape[1], True, scores.shape, k, append)


def _tournament(x, L, from_scores, shape, k, append):
    """Chunk passes while rows are longer than FINAL, then the final pass; x holds L entries per row:
    fp32 scores of pages 0..L-1 (from_scores) or packed keys."""
    (N, P), device = shape, x.device
    k = min(k, P)
    out = torch.empty(N, k + (append is not None), device=device, dtype=torch.int64)
    if N == 0:
        return out
    if k == 0:
        return out.copy_(append.view(1, 1).expand(N, 1)) if append is not None else out
    launch = pdl(device)
    chunk, final = _sizes(k)
    while L > final:
        n_chunks = triton.cdiv(L, chunk)
        y = torch.empty(N, n_chunks * k, device=device, dtype=torch.int64)
        _chunk_kernel[(N, n_chunks)](x, y, L, x.stride(0), y.stride(0), k, FROM_SCORES=from_scores, CH=chunk,
                                     num_warps=NUM_WARPS, **launch)
        x, L, from_scores = y, n_chunks * k, False
    cur = append if append is not None else out
    _final_kernel[(N,)](x, out, cur, L, x.stride(0), out.stride(0), k, FROM_SCORES=from_scores,
                        APPEND=append is not None, CH=max(16, next_pow2(L)), num_warps=NUM_WARPS, **launch)
    return out


def _sizes(k):
    """(chunk, final): a chunk keeps k of at least 2k entries, so every pass at least halves a row."""
    return max(CHUNK, next_pow2(2 * k)), max(FINAL, next_pow2(2 * k))


def select_pages(q, kmin, kmax, page_valid, current, k, append_current=False, heads=None):
    """The top-k candidate pages per row (see ops.select_pages_ref): [N, min(k, P)] best first, then -1;
    with append_current the current page follows as one more column; with `heads`, q is the layer's
    [B, H, G, D] query and the rows are its heads `heads` (read in place, no gathered copy).

    The scores are computed inside the first chunk pass (no [N, P] score tensor); the kernel sums each
    page's bound DC channels at a time, so near-ties may order differently from page_scores' sums."""
    N, P, D = kmin.shape
    G = q.shape[-2]
    append = current if append_current else None
    kk = min(k, P)
    if N == 0 or kk == 0 or G == 0:
        return _tournament(kmin.new_empty(N, P, dtype=torch.float32).fill_(float("-inf")), P, True, (N, P), k,
                           append)
    q, kmin, kmax, mask_args, map_args = score_inputs(q, kmin, kmax, page_valid, current, heads)
    chunk = _sizes(kk)[0]
    n_chunks = triton.cdiv(P, chunk)
    packed = torch.empty(N, n_chunks * kk, device=q.device, dtype=torch.int64)
    _scores_chunk_kernel[(N, n_chunks)](
        q, kmin, kmax, packed, P, q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1),
        kmax.stride(0), kmax.stride(1), *mask_args, *map_args, packed.stride(0), kk,
        G=G, G_PAD=next_pow2(G), D=D, DC=SCORE_CHANNELS, CH=chunk, MAPPED=heads is not None,
        num_warps=NUM_WARPS, **pdl(q.device),
    )
    return _tournament(packed, n_chunks * kk, False, (N, P), k, append)
