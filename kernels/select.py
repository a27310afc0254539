"""Page selection of one head group at a decode step: masked MinMax scores, then the top K.

Semantics: ``flexicache_hf.ops.select_pages_ref``. The masking (valid pages before the current one)
happens inside the scores kernel, which saves four elementwise launches per head group and layer; the
top K then come from ``torch.topk`` (with -1 for missing candidates and ids sorted ascending, so that
attention sums pages in context order). One Triton program per row holding the row's scores and
sorting them (tl.sort) was tried: exact, but slower than torch.topk on the H100 at 2-4k pages per row
(32k/batch 8: 3.7x against 5.6x faster than dense per layer), so it was dropped.

Ties: the reference gives them to the lower page; torch.topk breaks them its own way. Ties need equal
scores, which real queries and keys practically never produce (a zero query, e.g. a padding token's,
does: every page scores 0).
"""

from __future__ import annotations

from flexicache_hf.ops import ascending_page_ids

from .scores import page_scores


def select_pages(q, kmin, kmax, page_valid, current, k):
    """The top-k candidate pages per row (see ops.select_pages_ref): [N, min(k, P)], ascending, then -1."""
    P = kmin.shape[1]
    scores = page_scores(q, kmin, kmax, page_valid, current)
    top, ids = scores.topk(min(k, P), dim=-1, sorted=False)
    return ascending_page_ids(top, ids, P)
