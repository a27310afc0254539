"""Page selection: the top-K candidate pages of each row, in one launch after the masked scores.

Semantics: ``flexicache_hf.ops.select_pages_ref`` / ``topk_pages_ref``. It replaces the chain
masked_fill -> torch.topk -> where -> sort (5+ launches per head group and layer, each a few us in a
captured decode step) by a single program per row that holds the row's scores in registers:

- each fp32 score becomes an order-preserving int32, packed with its page id into one int64 (ties go to
  the lower page), so every key is unique;
- ``tl.sort`` orders the keys; the K-th largest is the threshold, and exactly the K keys at or above it
  are taken (only finite scores: -inf marks a non-candidate);
- a prefix sum over the taken flags, in page order, gives each taken page its output slot, so the ids
  come out ascending (attention then sums pages in context order), followed by -1 for unused entries.

Rows longer than MAX_PAGES take the PyTorch path (a whole row must fit one program's registers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import next_pow2
from .scores import page_scores

MAX_PAGES = 16384  # 256k tokens of 16-token pages; a sort of 16k int64 keys per program (16 warps)


@triton.jit
def _topk_pages_kernel(S, OUT, P, s_n, K: tl.constexpr, K_PAD: tl.constexpr, P_PAD: tl.constexpr):
    n = tl.program_id(0)
    offs = tl.arange(0, P_PAD)
    s = tl.load(S + n.to(tl.int64) * s_n + offs, mask=offs < P, other=float("-inf"))
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int32 order = float order
    packed = (key.to(tl.int64) << 32) | (P_PAD - 1 - offs).to(tl.int64)  # unique; lower page first on ties
    srt = tl.sort(packed, descending=True)
    kth = tl.max(tl.where(offs == K - 1, srt, tl.min(srt, 0)), 0)
    take = (packed >= kth) & (s > float("-inf"))
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    base = OUT + n.to(tl.int64) * K
    tl.store(base + pos, offs.to(tl.int64), mask=take)
    count = tl.sum(take.to(tl.int32), 0)
    rest = tl.arange(0, K_PAD)
    tl.store(base + rest, tl.full([K_PAD], -1, tl.int64), mask=(rest >= count) & (rest < K))


def topk_pages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [N, P] fp32 (-inf: not a candidate) -> [N, k] page ids, ascending, then -1 (k <= P)."""
    N, P = scores.shape
    out = torch.empty(N, k, dtype=torch.long, device=scores.device)
    if N == 0 or k == 0:
        return out
    p_pad = max(16, next_pow2(P))
    if p_pad > MAX_PAGES:
        from flexicache_hf.ops import topk_pages_ref

        return topk_pages_ref(scores, k)
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    _topk_pages_kernel[(N,)](scores, out, P, scores.stride(0), K=k, K_PAD=next_pow2(k), P_PAD=p_pad,
                             num_warps=min(16, max(4, p_pad // 1024)))
    return out


def select_pages(q, kmin, kmax, page_valid, current, k):
    """The top-k candidate pages per row (see ops.select_pages_ref): masked scores, then topk_pages."""
    P = kmin.shape[1]
    return topk_pages(page_scores(q, kmin, kmax, page_valid, current), min(k, P))
