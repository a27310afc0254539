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

from ._util import gdc_launch_dependents, gdc_wait, next_pow2, pdl, skip_args
from .scores import page_lse, page_mass, page_scores

CHUNK = 256  # packed scores per chunk-pass program (at least 2k, so that a pass shrinks a row)
FINAL = 512  # a row at most this long is finished by one program
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
def _chunk_kernel(IN, OUT, L, s_in, s_out, k, SKIP, FROM_SCORES: tl.constexpr, CH: tl.constexpr, PDL: tl.constexpr,
                  HAS_SKIP: tl.constexpr):
    if PDL:  # the next kernel launches now (and waits for our end); we wait for the scores or packed keys
        gdc_launch_dependents()
        gdc_wait()
    if HAS_SKIP:
        if tl.load(SKIP) != 0:
            return
    n = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * CH + tl.arange(0, CH)
    x = tl.sort(_load_packed(IN, n, s_in, offs, L, FROM_SCORES), descending=True)
    j = tl.arange(0, CH)
    tl.store(OUT + n.to(tl.int64) * s_out + c * k + j, x, mask=j < k)


@triton.jit
def _final_kernel(IN, OUT, CUR, L, s_in, s_out, k, SKIP, FROM_SCORES: tl.constexpr, APPEND: tl.constexpr,
                  CH: tl.constexpr, PDL: tl.constexpr, HAS_SKIP: tl.constexpr):
    if PDL:  # trigger first: the attention launch's stable rows start while the selection still runs
        gdc_launch_dependents()
        gdc_wait()
    n = tl.program_id(0)
    offs = tl.arange(0, CH)
    skipped = False
    if HAS_SKIP:
        skipped = tl.load(SKIP) != 0
    if skipped:  # nothing was scored: no page selected
        ids = tl.full([CH], -1, tl.int64)
    else:
        x = tl.sort(_load_packed(IN, n, s_in, offs, L, FROM_SCORES), descending=True)
        ids = tl.where((x >> 32) > _NEG_INF_KEY, (x & _MASK32) ^ _MASK32, -1)  # best first, then -1
    out = OUT + n.to(tl.int64) * s_out
    tl.store(out + offs, ids, mask=offs < k)
    if APPEND:
        tl.store(out + k, tl.load(CUR).to(tl.int64))


def topk_pages(scores: torch.Tensor, k: int, append: torch.Tensor | None = None, skip=None) -> torch.Tensor:
    """scores [N, P] fp32 -> [N, min(k, P)] int64 (ops.topk_pages_ref), plus `append` [1] as a last column;
    with `skip` (a device flag [1]) set, -1 everywhere but the appended column."""
    N, P = scores.shape
    k = min(k, P)
    out = torch.empty(N, k + (append is not None), device=scores.device, dtype=torch.int64)
    if N == 0:
        return out
    if append is not None and k == 0:
        return out.copy_(append.view(1, 1).expand(N, 1))  # (nothing to skip)
    if k == 0:
        return out
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    x, L, from_scores = scores, P, True
    skip_ptr, has_skip = skip_args(skip, scores)
    launch = dict(pdl(scores.device), HAS_SKIP=has_skip)
    chunk, final = max(CHUNK, next_pow2(2 * k)), max(FINAL, next_pow2(2 * k))
    while L > final:
        n_chunks = triton.cdiv(L, chunk)
        y = torch.empty(N, n_chunks * k, device=scores.device, dtype=torch.int64)
        _chunk_kernel[(N, n_chunks)](x, y, L, x.stride(0), y.stride(0), k, skip_ptr, FROM_SCORES=from_scores, CH=chunk,
                                     num_warps=NUM_WARPS, **launch)
        x, L, from_scores = y, n_chunks * k, False
    cur = append if append is not None else out
    _final_kernel[(N,)](x, out, cur, L, x.stride(0), out.stride(0), k, skip_ptr, FROM_SCORES=from_scores,
                        APPEND=append is not None, CH=max(16, next_pow2(L)), num_warps=NUM_WARPS, **launch)
    return out


def select_pages(q, kmin, kmax, page_valid, current, k, append_current=False, heads=None, spread=1.0, codes=None,
                 mass_scale=None, skip=None):
    """The top-k candidate pages per row (see ops.select_pages_ref): [N, min(k, P)] best first, then -1;
    with append_current the current page follows as one more column; with `heads`, q is the layer's
    [B, H, G, D] query and the rows are its heads `heads` (read in place, no gathered copy). With codes and
    mass_scale, pages rank by the attention mass their sketched keys predict (two more passes). With `skip` (a
    device flag [1]) set, every kernel returns at once and no page is selected (-1)."""
    if codes is not None and mass_scale is not None:
        scores = page_mass(page_lse(q, kmin, kmax, codes, mass_scale, page_valid, current, heads, skip), skip)
    else:
        scores = page_scores(q, kmin, kmax, page_valid, current, heads, spread, codes, skip)
    return topk_pages(scores, k, current if append_current else None, skip)
