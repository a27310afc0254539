"""The numeric operations of the decode path, each as a plain PyTorch reference that defines it.

On CUDA tensors the Triton kernels in `flexicache_hf.kernels` replace them (same signatures, same
semantics); everywhere else the references run. Nothing here knows about caches: inputs are plain
tensors, page pools and index tables.

Shapes:
    N rows = (batch, kv_head) pairs of one head group, row-major: row = b * heads + h
    G      = query heads per KV head (GQA group)
    pool   = [num_pages, page_size, D] page pool; a row's pages are addressed by pool index ("slot")
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

NEG_INF = float("-inf")


def slot_index(row, entry, row_slots: int):
    """The one slot rule: entry `entry` of row `row` (b * heads + h) of a pool with `row_slots` slots per row.
    An entry is a page id where every page is resident (GPU pages) or a slot-table column (stable heads)."""
    return row * row_slots + entry


def host_index(page, row, rows: int):
    """Page `page` of row `row` in the page-major host pool [pages, batch * heads, ...]."""
    return page * rows + row


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (tests run tiny models in fp64)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------
def page_minmax_ref(keys: torch.Tensor, valid: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise min and max of each full page's keys over its valid (non-padding) tokens.

    keys [B, H, P*page_size, D]; valid [B, P*page_size] bool -> kmin, kmax [B, H, P, D] (keys' dtype).
    A page without a valid token gets zeros (its score is masked by the caller; zeros avoid inf*0).
    """
    B, H, T, D = keys.shape
    P = T // page_size
    k = keys.reshape(B, H, P, page_size, D)
    m = valid.reshape(B, 1, P, page_size, 1)
    kmin = k.masked_fill(~m, float("inf")).amin(dim=3)
    kmax = k.masked_fill(~m, NEG_INF).amax(dim=3)
    empty = ~valid.reshape(B, 1, P, page_size).any(-1, keepdim=True)  # [B,1,P,1]
    return kmin.masked_fill(empty, 0), kmax.masked_fill(empty, 0)


def page_sketch_ref(keys: torch.Tensor, valid: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, page_size: int,
                    bits: int) -> torch.Tensor:
    """Per-token key sketch inside each page's key box: `bits` bits per channel.

    keys [B, H, P*page_size, D]; valid [B, P*page_size] bool; kmin, kmax [B, H, P, D] (page_minmax_ref)
    -> codes [B, H, P, page_size, D*bits//8] uint8. Channel d of a token gets the level
    l = floor((k_d - kmin_d) / (kmax_d - kmin_d) * 2^bits), clamped to [0, 2^bits - 1] (0 where the box is
    flat); sketch_keys_ref decodes it to the level's midpoint. Byte j of a token holds channels
    j + s * (D*bits//8), s = 0 .. 8//bits - 1, in bits [s*bits, (s+1)*bits). A padding token gets the levels
    of its page's first valid token (so the page's best sketched q.k is that of its valid tokens).
    """
    B, H, T, D = keys.shape
    P, n, per_byte = T // page_size, 2**bits, 8 // bits
    k = keys.reshape(B, H, P, page_size, D).float()
    lo, width = kmin.float().unsqueeze(3), (kmax.float() - kmin.float()).unsqueeze(3)
    lvl = torch.where(width > 0, ((k - lo) / width.clamp_min(1e-30) * n).floor(), 0.0).clamp(0, n - 1).to(torch.uint8)
    m = valid.reshape(B, 1, P, page_size)
    first = m.to(torch.uint8).argmax(-1)  # [B, 1, P]: the page's first valid token (0 if none)
    stand_in = lvl.gather(3, first.expand(B, H, P)[..., None, None].expand(B, H, P, 1, D))
    lvl = torch.where(m.unsqueeze(-1), lvl, stand_in)
    lvl = lvl.view(B, H, P, page_size, per_byte, D // per_byte)
    codes = torch.zeros(B, H, P, page_size, D // per_byte, dtype=torch.uint8, device=keys.device)
    for s in range(per_byte):
        codes |= lvl[..., s, :] << (s * bits)
    return codes


def page_summary_ref(keys: torch.Tensor, valid: torch.Tensor, page_size: int, bits: int = 0):
    """A page's selection metadata: kmin, kmax (page_minmax_ref) and, with bits > 0, every token's sketch codes
    (page_sketch_ref; else None)."""
    kmin, kmax = page_minmax_ref(keys, valid, page_size)
    return kmin, kmax, page_sketch_ref(keys, valid, kmin, kmax, page_size, bits) if bits else None


def summarise_page_ref(pool: torch.Tensor, valid: torch.Tensor, page: torch.Tensor, page_size: int,
                       kmin: torch.Tensor, kmax: torch.Tensor, codes: torch.Tensor | None = None,
                       page_valid: torch.Tensor | None = None, slot: torch.Tensor | None = None) -> None:
    """In place: page_summary_ref of one page of every row, written into metadata buffers at that page.

    pool: the keys [B, H, T, D], the page at tokens page * page_size on (the unstable heads' buffer), or with slot
    [B, H] the slot pool [B, H, S, page_size, D], the page in slot slot[b, h] (the stable heads' current page);
    valid [B, T] the tokens' validity; page [1] on the device. kmin, kmax [B, H, cap, D] and codes [B, H, cap,
    page_size, D*bits//8] (None: no sketch) get the page's summary at `page`; page_valid [B, cap], if given,
    whether the page holds a valid token."""
    tokens = page * page_size + torch.arange(page_size, device=valid.device)
    v = valid.index_select(1, tokens)
    if slot is None:
        keys = pool.index_select(2, tokens)
    else:
        keys = pool.gather(2, slot.view(*slot.shape, 1, 1, 1).expand(-1, -1, 1, *pool.shape[3:]))[:, :, 0]
    bits = 0 if codes is None else 8 * codes.shape[-1] // kmin.shape[-1]
    for dst, src in zip((kmin, kmax, codes), page_summary_ref(keys, v, page_size, bits)):
        if dst is not None:
            dst.index_copy_(2, page, src)
    if page_valid is not None:
        page_valid.index_copy_(1, page, v.any(-1, keepdim=True))


def sketch_keys_ref(kmin: torch.Tensor, kmax: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Decode page_sketch_ref: kmin, kmax [..., P, D]; codes [..., P, ps, D*bits//8] -> keys [..., P, ps, D] in
    the accumulation dtype, each channel at its level's midpoint kmin + (l + 1/2) (kmax - kmin) / 2^bits."""
    D, Db = kmin.shape[-1], codes.shape[-1]
    bits = 8 * Db // D
    n = 2**bits
    c = codes.to(torch.int32)
    lvl = torch.cat([(c >> (s * bits)) & (n - 1) for s in range(8 // bits)], dim=-1)  # [..., ps, D]
    acc = _acc(kmin)
    lo, width = kmin.to(acc).unsqueeze(-2), (kmax.to(acc) - kmin.to(acc)).unsqueeze(-2)
    return lo + (lvl.to(acc) + 0.5) * (width / n)


def _sketched_logits(q, kmin, kmax, codes) -> torch.Tensor:
    """q.khat of every query head and sketched token: q [N, G, D] -> [N, G, P, ps] (accumulation dtype)."""
    return torch.einsum("ngd,nptd->ngpt", q.to(_acc(q)), sketch_keys_ref(kmin, kmax, codes))


def page_scores_ref(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, spread: float = 1.0,
                    codes: torch.Tensor | None = None) -> torch.Tensor:
    """A page's score for a query: Quest's MinMax upper bound of q.k over the page, or with `codes` the
    largest q.k over its sketched keys; the max over the GQA group, in fp32.

    q [N, G, D]; kmin, kmax [N, P, D]; codes [N, P, ps, D*bits//8] or None -> scores [N, P] fp32.

    The bound is q.c + |q|.r with c, r the centre and half-width of the page's key box (c = (kmax+kmin)/2,
    r = (kmax-kmin)/2). `spread` < 1 weights the half-width down: q.c + spread * |q|.r, no longer a bound
    but a closer estimate of the page's largest q.k on small models (docs/accuracy.md, "page scoring").
    spread = 1 is computed elementwise, max(q*kmax, q*kmin), which equals the bound whenever kmin <= kmax.
    With codes (page_sketch_ref), spread is ignored: the score is max over the page's tokens t of
    q.khat_t, khat_t = sketch_keys_ref's decoded key, an estimate of the page's largest q.k that, unlike
    the bound, sees which token holds which extreme.
    """
    acc = _acc(q)
    qf = q.to(acc).unsqueeze(2)  # [N, G, 1, D]
    if codes is not None:
        return _sketched_logits(q, kmin, kmax, codes).amax(dim=(1, 3))
    kmin, kmax = kmin.to(acc).unsqueeze(1), kmax.to(acc).unsqueeze(1)
    if spread == 1.0:
        per_q = torch.maximum(qf * kmax, qf * kmin).sum(-1)  # [N,G,P]
    else:
        per_q = (qf * ((kmax + kmin) * 0.5)).sum(-1) + spread * (qf.abs() * ((kmax - kmin) * 0.5)).sum(-1)
    return per_q.amax(dim=1)


def page_lse_ref(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, codes: torch.Tensor, scale: float) -> torch.Tensor:
    """Each query head's logsumexp of scale * q.khat over each page's sketched keys (khat: sketch_keys_ref):
    q [N, G, D]; kmin, kmax [N, P, D]; codes [N, P, ps, Db] -> [N, G, P] in the accumulation dtype. The
    attention logits the sketches predict, pooled per page; a partly padded page counts its first valid
    token once more per padding token (page_sketch_ref), a slight overestimate of that one page."""
    return (_sketched_logits(q, kmin, kmax, codes) * scale).logsumexp(-1)


def page_mass_ref(lse: torch.Tensor) -> torch.Tensor:
    """The attention mass the sketches predict for each page: lse [N, G, P] (page_lse_ref; -inf where a page
    is no candidate) -> [N, P], each page's share of each query head's softmax over the candidate pages,
    summed over the GQA group (so every head's choice weighs the same, as in the true attention of the
    group); -inf where a page is no candidate. This is the oracle's criterion (true mass) estimated from
    the sketches; it ranks better than the best sketched q.k when several tokens of a page matter
    (docs/accuracy.md, "Per-token key sketch")."""
    cand = ~torch.isneginf(lse)
    top = lse.amax(-1, keepdim=True)
    share = (lse - top.masked_fill(torch.isneginf(top), 0)).exp()
    mass = (share / share.sum(-1, keepdim=True)).nan_to_num(0.0).sum(1)  # 0/0: a head without candidates
    return mass.masked_fill(~cand.any(1), NEG_INF)


def topk_pages_ref(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest finite scores of each row as page ids, best first (ties: the lower page first),
    then -1 where fewer than k scores are finite. scores [N, P] fp32, k <= P -> [N, k] int64.
    (Attention does not care about the order: it is fixed only so that kernel and reference agree.)"""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.where(scores.gather(-1, order) > NEG_INF, order, -1)


def select_pages_ref(q, kmin, kmax, page_valid, current, k: int, append_current: bool = False,
                     heads=None, spread: float = 1.0, codes=None, mass_scale=None, skip=None) -> torch.Tensor:
    """Decode-time page selection of one head group: the top-k candidate pages per row.

    q [N, G, D], or with `heads` [Hg] the layer's query [B, H, G, D] whose heads `heads` are the rows
    (row n = b * Hg + h); kmin, kmax [N, P, D]; page_valid [B, >=P] bool (row n belongs to batch
    n // (N // B)); current: a device tensor [1], the page holding the newest token. Candidates are the
    valid pages before `current`; their scores (page_scores_ref, with `spread` or `codes` [N, P, ps, Db]; with
    codes and mass_scale, the softmax scale, page_mass_ref over the candidates) rank them. Returns [N, min(k, P)]
    int64: topk_pages_ref of the scores with non-candidates at -inf (so with fewer than k candidates,
    all of them). With append_current, `current` follows as one more column: the page table unstable
    heads attend to. With `skip`, a device bool [1] that holds, no page is selected (-1 but the appended
    column): a compiled step's stable heads select only at reranks, and the kernels then return at once.
    """
    if heads is not None:
        q = q[:, heads].reshape(-1, *q.shape[2:])
    N, P = kmin.shape[:2]
    batch = torch.arange(N, device=q.device) // (N // page_valid.shape[0])
    cand = page_valid[batch, :P] & (torch.arange(P, device=q.device) < current)
    if codes is not None and mass_scale is not None:
        scores = page_mass_ref(page_lse_ref(q, kmin, kmax, codes, mass_scale).masked_fill(~cand[:, None], NEG_INF))
    else:
        scores = page_scores_ref(q, kmin, kmax, spread, codes).masked_fill(~cand, NEG_INF)
    ids = topk_pages_ref(scores, min(k, P))
    if skip is not None:
        ids = ids.masked_fill(skip.view(1, 1), -1)
    if append_current:
        ids = torch.cat([ids, current.view(1, 1).to(ids.dtype).expand(N, 1)], dim=1)
    return ids


def sparse_decode_attention_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    page_ids: torch.Tensor,
    kv_valid: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention of one query token per head over a per-row list of pages.

    q [N, G, D]; k_pool, v_pool [S, page_size, D]; slots, page_ids [N, M] int (-1: no page);
    kv_valid [B, T] bool, True where the token at that position may be attended (not padding, written).
    Row n belongs to batch n // (N // B). A token at position page_ids*page_size + t is attended iff its
    entry is used (slot >= 0) and kv_valid says so. Softmax in fp32; returns [N, G, D] in q's dtype.
    A row with nothing to attend returns zeros.
    """
    N, G, D = q.shape
    ps = k_pool.shape[1]
    B, T = kv_valid.shape
    used = slots >= 0
    acc = _acc(q)
    k = k_pool[slots.clamp(min=0)].to(acc)  # [N, M, ps, D]
    v = v_pool[slots.clamp(min=0)].to(acc)
    pos = page_ids.clamp(min=0).unsqueeze(-1) * ps + torch.arange(ps, device=q.device)  # [N, M, ps]
    batch = torch.arange(N, device=q.device) // (N // B)
    ok = kv_valid[batch[:, None, None], pos.clamp(max=T - 1)] & (pos < T) & used.unsqueeze(-1)
    logits = torch.einsum("ngd,nmtd->ngmt", q.to(acc), k) * scale
    logits = logits.masked_fill(~ok.unsqueeze(1), NEG_INF).reshape(N, G, -1)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros
    v = v.masked_fill(~ok.unsqueeze(-1), 0.0)  # unwritten slots may hold anything; 0 * NaN would leak
    out = torch.einsum("ngs,nsd->ngd", probs, v.reshape(N, -1, D))
    return out.to(q.dtype)


class PageGroup(NamedTuple):
    """One head group's pages for decode attention (rows = batch x len(heads), row r = b * len(heads) + h).

    k_pool, v_pool [rows * row_slots, page_size, D] contiguous; page_ids [B, Hg, M] int (-1: none);
    heads [Hg] long: the group's KV heads in q and the output. The slot of entry e of row r is
    r * row_slots + e with by_entry (a slot table: the stable heads' resident pages), else
    r * row_slots + page_ids[r, e] (every page resident: the unstable heads' buffer).
    """

    k_pool: torch.Tensor
    v_pool: torch.Tensor
    page_ids: torch.Tensor
    heads: torch.Tensor
    by_entry: bool
    # the page table comes from the kernel launched just before (the unstable heads' selection): with
    # programmatic dependent launch only this group waits for it, the others start reading at once
    pending: bool = False


def paged_decode_attention_ref(q: torch.Tensor, groups, kv_valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention of every head of a layer: q [B, H, G, D], groups: PageGroups (each head in at
    most one; heads in none get zeros), kv_valid [B, T] -> [B, H, G, D] (sparse_decode_attention_ref per
    group, with the slots the group's addressing gives)."""
    B, H, G, D = q.shape
    out = torch.zeros_like(q)
    for g in groups:
        Hg, M = g.page_ids.shape[1:]
        rows = B * Hg
        if rows == 0:
            continue
        row_slots = g.k_pool.shape[0] // rows
        ids = g.page_ids.reshape(rows, M)
        entry = torch.arange(M, device=q.device).expand(rows, M) if g.by_entry else ids
        slots = torch.where(ids >= 0, slot_index(torch.arange(rows, device=q.device).view(rows, 1), entry, row_slots), -1)
        o = sparse_decode_attention_ref(q[:, g.heads].reshape(rows, G, D), g.k_pool, g.v_pool, slots, ids,
                                        kv_valid, scale)
        out[:, g.heads] = o.view(B, Hg, G, D)
    return out


def copy_pages_ref(src_pool: torch.Tensor, src_idx: torch.Tensor, dst_pool: torch.Tensor, dst_idx: torch.Tensor,
                   pair=None) -> None:
    """dst_pool[dst_idx] = src_pool[src_idx] for page pools [S, page_size, D] on any devices; entries
    whose src_idx is -1 copy nothing (fixed-shape callers mark the pages that need no copy that way). With
    pair = (src_pool2, dst_pool2), the same copy for them too (V with K's indices).

    Used for promotion (pinned host pool -> GPU slots) and decode offload (GPU slots -> host pool). This
    reference gathers on the source device and then copies: the slow path on CUDA (it waits for the
    host), which the zero-copy kernel replaces.
    """
    keep = (src_idx >= 0).nonzero().view(-1)
    src_idx, dst_idx = src_idx[keep], dst_idx[keep.to(dst_idx.device)]
    if src_idx.numel() == 0:
        return
    for src, dst in [(src_pool, dst_pool)] + ([pair] if pair is not None else []):
        dst[dst_idx.to(dst.device)] = src[src_idx.to(src.device)].to(dst.device)


def plan_promotion_ref(slot_page: torch.Tensor, selected: torch.Tensor, current_page: torch.Tensor,
                       active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A promotion's plan: the resident set of each row becomes `selected` plus the current page.

    slot_page [B, H, S] long, the stable heads' block table (the page each GPU slot holds, -1 = free), updated
    in place; selected [B, H, K] page ids (-1 = none); current_page [1] (its slot is never freed); active
    (device bool [1] or None): a compiled step's rerank flag, where False nothing changes.
    Slots of pages not selected are freed; the r-th selected page of a row that is not resident goes to the
    row's r-th free slot (in slot order). Returns (src, dst), [B*H*K] long each: for each (row, k) the page's
    host pool index (host_index, rows = B*H) and its slot pool index (slot_index, S slots per row), -1 in
    both where nothing is copied."""
    sp = slot_page
    B, H, S = sp.shape
    keep = (sp.unsqueeze(-1) == selected.unsqueeze(-2)).any(-1) | (sp == current_page)
    if active is not None:
        keep |= ~active
    sp.masked_fill_(~keep & (sp >= 0), -1)
    resident = (selected.unsqueeze(-1) == sp.unsqueeze(-2)).any(-1)
    missing = (selected >= 0) & ~resident
    if active is not None:
        missing &= active
    # pair the r-th missing page of a row with the r-th free slot of that row
    free_first = torch.argsort((sp >= 0).to(torch.int8), dim=-1, stable=True)
    dst = free_first.gather(-1, (missing.cumsum(-1) - 1).clamp(min=0))
    # block table: missing pages into their slots; everything else lands in a spare column S
    table = torch.cat([sp, sp.new_full((B, H, 1), -1)], dim=-1)
    table.scatter_(-1, torch.where(missing, dst, S), selected)
    sp.copy_(table[..., :S])
    rows = torch.arange(B * H, device=sp.device).view(B, H, 1)
    src = torch.where(missing, host_index(selected, rows, B * H), -1).view(-1)
    return src, torch.where(missing, slot_index(rows, dst, S), -1).view(-1)


# ------------------------------------------------------------------------------------------------
# dispatch: the Triton kernel of each op on CUDA (flexicache_hf.kernels, same signature), its reference
# elsewhere (and under TRITON_INTERPRET=1 in the CPU tests, when use_kernels=True)
# ------------------------------------------------------------------------------------------------
def _kernels(device: torch.device, use_kernels):
    """The kernels module if ops on `device` should run kernels, else None."""
    if use_kernels is False or (use_kernels == "auto" and device.type != "cuda"):
        return None
    try:  # imported late: Triton reads TRITON_INTERPRET once, at import
        from flexicache_hf import kernels
    except ImportError as e:  # triton missing
        if use_kernels is True:
            raise RuntimeError(f"use_kernels=True but the Triton kernels cannot be imported: {e}") from e
        return None
    if not kernels.AVAILABLE:
        if use_kernels is True:
            raise RuntimeError("use_kernels=True but the Triton kernels are not available in this install")
        return None
    return kernels


def kernels_available(device: torch.device, use_kernels="auto") -> bool:
    """Whether ops on tensors of `device` run the Triton kernels."""
    return _kernels(device, use_kernels) is not None


def _on(t: torch.Tensor):
    """Triton launches on the current device: a layer placed on another GPU (device_map) switches to it."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def page_summary(keys, valid, page_size, bits=0, use_kernels="auto"):
    """page_summary_ref; one launch for the whole summary on CUDA (a compiled step summarises its current
    page through the custom op: the reference was ~60 small ops per layer)."""
    if torch.compiler.is_compiling():
        kmin, kmax, codes = torch.ops.flexicache.page_summary(keys, valid, page_size, bits, str(use_kernels))
        return kmin, kmax, codes if bits else None
    k = _kernels(keys.device, use_kernels)
    if k is None:
        return page_summary_ref(keys, valid, page_size, bits)
    with _on(keys):
        return k.page_summary(keys, valid, page_size, bits)


def summarise_page(pool, valid, page, page_size, kmin, kmax, codes=None, page_valid=None, slot=None,
                   use_kernels="auto"):
    """summarise_page_ref; a decode step's page summary in one launch per head group on CUDA."""
    if torch.compiler.is_compiling():
        return torch.ops.flexicache.summarise_page(pool, valid, page, page_size, kmin, kmax, codes, page_valid, slot,
                                                   str(use_kernels))
    k = _kernels(pool.device, use_kernels)
    if k is None:
        return summarise_page_ref(pool, valid, page, page_size, kmin, kmax, codes, page_valid, slot)
    with _on(pool):
        return k.summarise_page(pool, valid, page, page_size, kmin, kmax, codes, page_valid, slot)


def select_pages(q, kmin, kmax, page_valid, current, k, append_current=False, heads=None, use_kernels="auto",
                 spread=1.0, codes=None, mass_scale=None, skip=None):
    if torch.compiler.is_compiling():
        return torch.ops.flexicache.select_pages(q, kmin, kmax, page_valid, current, k, append_current, heads,
                                                 str(use_kernels), spread, codes, mass_scale, skip)
    args = (q, kmin, kmax, page_valid, current, k, append_current, heads, spread, codes, mass_scale, skip)
    kern = _kernels(q.device, use_kernels)
    if kern is None:
        return select_pages_ref(*args)
    with _on(q):
        return kern.select_pages(*args)


def paged_decode_attention(q, groups, kv_valid, scale, use_kernels="auto"):
    if torch.compiler.is_compiling():
        assert 1 <= len(groups) <= 2
        flat = [x for g in groups for x in g] + [None, None, None, None, False, False] * (2 - len(groups))
        return torch.ops.flexicache.paged_decode_attention(q, kv_valid, scale, str(use_kernels), *flat)
    k = _kernels(q.device, use_kernels)
    if k is None:
        return paged_decode_attention_ref(q, groups, kv_valid, scale)
    with _on(q):
        return k.paged_decode_attention(q, groups, kv_valid, scale)


def copy_pages(src_pool, src_idx, dst_pool, dst_idx, use_kernels="auto", pair=None):
    """copy_pages_ref; with pair = (src_pool2, dst_pool2) the same copy for them too (K and V: one launch)."""
    if torch.compiler.is_compiling():
        src2, dst2 = pair if pair is not None else (None, None)
        return torch.ops.flexicache.copy_pages(src_pool, src_idx, dst_pool, dst_idx, str(use_kernels), src2, dst2)
    # the kernel's win is reading or writing pinned host memory in place; a pageable host pool on one
    # side of a GPU copy takes the reference path
    gpu = dst_pool if dst_pool.device.type == "cuda" else src_pool
    host = src_pool if gpu is dst_pool else dst_pool
    if gpu.device.type == "cuda" and host.device.type == "cpu" and not host.is_pinned():
        use_kernels = False
    k = _kernels(gpu.device, use_kernels)
    if k is None:
        return copy_pages_ref(src_pool, src_idx, dst_pool, dst_idx, pair)
    with _on(gpu):
        return k.copy_pages(src_pool, src_idx, dst_pool, dst_idx, pair)


def plan_promotion(slot_page, selected, current_page, active=None, use_kernels="auto", after=None):
    """plan_promotion_ref on the device. `after`: a tensor the plan must follow in a compiled step (its attention
    output, for a promotion after attention): the plan does not read it, but without the dependency inductor may
    move the promotion before the attention that reads the old slots, and must then copy the slot pools and
    block table to keep them for it (a clone of every stable slot, every rerank step)."""
    if torch.compiler.is_compiling():
        return torch.ops.flexicache.plan_promotion(slot_page, selected, current_page, active, str(use_kernels), after)
    k = _kernels(slot_page.device, use_kernels)
    if k is None:
        return plan_promotion_ref(slot_page, selected, current_page, active)
    with _on(slot_page):
        return k.plan_promotion(slot_page, selected, current_page, active)


# ------------------------------------------------------------------------------------------------
# torch.compile: the ops a decode step launches kernels through are custom ops, opaque to the
# compiler (it fuses the model's own operations around them; CUDA graphs capture their launches)
# ------------------------------------------------------------------------------------------------
def _use(s: str):
    return {"True": True, "False": False}.get(s, s)


@torch.library.custom_op("flexicache::select_pages", mutates_args=())
def _select_pages_op(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, page_valid: torch.Tensor,
                     current: torch.Tensor, k: int, append_current: bool, heads: torch.Tensor | None,
                     use_kernels: str, spread: float, codes: torch.Tensor | None,
                     mass_scale: float | None, skip: torch.Tensor | None) -> torch.Tensor:
    return select_pages(q, kmin, kmax, page_valid, current, k, append_current, heads, _use(use_kernels), spread,
                        codes, mass_scale, skip)


@_select_pages_op.register_fake
def _(q, kmin, kmax, page_valid, current, k, append_current, heads, use_kernels, spread, codes, mass_scale, skip):
    rows = q.shape[0] if heads is None else q.shape[0] * heads.shape[0]
    return q.new_empty(rows, min(k, kmin.shape[1]) + int(append_current), dtype=torch.long)


@torch.library.custom_op("flexicache::paged_decode_attention", mutates_args=())
def _attention_op(q: torch.Tensor, kv_valid: torch.Tensor, scale: float, use_kernels: str,
                  k0: torch.Tensor, v0: torch.Tensor, ids0: torch.Tensor, heads0: torch.Tensor, entry0: bool,
                  pending0: bool, k1: torch.Tensor | None, v1: torch.Tensor | None, ids1: torch.Tensor | None,
                  heads1: torch.Tensor | None, entry1: bool, pending1: bool) -> torch.Tensor:
    groups = [PageGroup(k0, v0, ids0, heads0, entry0, pending0)]
    if k1 is not None:
        groups.append(PageGroup(k1, v1, ids1, heads1, entry1, pending1))
    return paged_decode_attention(q, groups, kv_valid, scale, _use(use_kernels))


@_attention_op.register_fake
def _(q, kv_valid, scale, use_kernels, *groups):
    return torch.empty_like(q)


@torch.library.custom_op("flexicache::copy_pages", mutates_args=("dst_pool", "dst_pool2"))
def _copy_pages_op(src_pool: torch.Tensor, src_idx: torch.Tensor, dst_pool: torch.Tensor, dst_idx: torch.Tensor,
                   use_kernels: str, src_pool2: torch.Tensor | None, dst_pool2: torch.Tensor | None) -> None:
    copy_pages(src_pool, src_idx, dst_pool, dst_idx, _use(use_kernels),
               None if src_pool2 is None else (src_pool2, dst_pool2))


@_copy_pages_op.register_fake
def _(src_pool, src_idx, dst_pool, dst_idx, use_kernels, src_pool2, dst_pool2):
    return None


@torch.library.custom_op("flexicache::plan_promotion", mutates_args=("slot_page",))
def _plan_promotion_op(slot_page: torch.Tensor, selected: torch.Tensor, current_page: torch.Tensor,
                       active: torch.Tensor | None, use_kernels: str,
                       after: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return plan_promotion(slot_page, selected, current_page, active, _use(use_kernels))


@_plan_promotion_op.register_fake
def _(slot_page, selected, current_page, active, use_kernels, after):
    return selected.new_empty(selected.numel()), selected.new_empty(selected.numel())


@torch.library.custom_op("flexicache::page_summary", mutates_args=())
def _page_summary_op(keys: torch.Tensor, valid: torch.Tensor, page_size: int, bits: int,
                     use_kernels: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kmin, kmax, codes = page_summary(keys, valid, page_size, bits, _use(use_kernels))
    return kmin, kmax, codes if codes is not None else keys.new_empty(0, dtype=torch.uint8)


@_page_summary_op.register_fake
def _(keys, valid, page_size, bits, use_kernels):
    B, H, T, D = keys.shape
    P = T // page_size
    codes = keys.new_empty((B, H, P, page_size, D * bits // 8) if bits else (0,), dtype=torch.uint8)
    return keys.new_empty(B, H, P, D), keys.new_empty(B, H, P, D), codes


@torch.library.custom_op("flexicache::summarise_page", mutates_args=("kmin", "kmax", "codes", "page_valid"))
def _summarise_page_op(pool: torch.Tensor, valid: torch.Tensor, page: torch.Tensor, page_size: int,
                       kmin: torch.Tensor, kmax: torch.Tensor, codes: torch.Tensor | None,
                       page_valid: torch.Tensor | None, slot: torch.Tensor | None, use_kernels: str) -> None:
    summarise_page(pool, valid, page, page_size, kmin, kmax, codes, page_valid, slot, _use(use_kernels))


@_summarise_page_op.register_fake
def _(pool, valid, page, page_size, kmin, kmax, codes, page_valid, slot, use_kernels):
    return None
