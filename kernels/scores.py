"""Page scores: Quest MinMax upper bound of q.k per page (or its spread-weighted form), or the best q.k
over the page's sketched keys; max over the GQA group, fp32. Or, for ranking by sketched attention mass,
each query head's logsumexp over each page's sketched keys, then each page's share of each head's softmax
summed over the group.

Semantics: ``flexicache_hf.ops.page_scores_ref``, ``page_lse_ref``, ``page_mass_ref``. One program scores
BLOCK_P pages of one row for the whole group, so kmin/kmax (and the codes: the only large inputs) are read
from memory once. The bound is computed elementwise, max(q*kmax, q*kmin), not as q+.kmax + q-.kmin: the
two agree only when kmin <= kmax, and the kernel must match the reference on any input. It is
memory-bound either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import gdc_launch_dependents, gdc_wait, new_output, next_pow2, pdl, skip_args

# Pages per program and warps: timed inside the whole decode step (L2-cold, benchmarks/timeline.py
# --variants), 16 pages x 2 warps beat 32 x 4 (the best alone, L2-warm): 33 vs 34 us at 32k/batch 8
# with programmatic dependent launch, 21 vs 29 us at 8k/batch 8 (more programs stay resident).
BLOCK_P = 16
NUM_WARPS = 2
SKETCH_ELEMENTS = 4096  # decoded key elements per program of the sketch kernel (pages x tokens x D)
SKETCH_WARPS = 1


@triton.jit
def _query_row(n, HEADS, H, rows_per_batch, MAPPED: tl.constexpr):
    if MAPPED:  # q is the layer's [B, H, G, D] query; row n is batch n // Hg, head HEADS[n % Hg]
        return ((n // rows_per_batch) * H + tl.load(HEADS + n % rows_per_batch)).to(tl.int64)
    return n.to(tl.int64)


@triton.jit
def _candidates(n, offs_p, mask_p, VALID, CURRENT, s_vb, rows_per_batch):
    """Row n's candidate pages among offs_p: valid pages before the current one (select_pages)."""
    ok = tl.load(VALID + (n // rows_per_batch) * s_vb + offs_p, mask=mask_p, other=0) != 0
    return ok & (offs_p < tl.load(CURRENT))


@triton.jit
def _store(OUT, best, n, P, offs_p, mask_p, VALID, CURRENT, s_vb, rows_per_batch, MASKED: tl.constexpr):
    if MASKED:
        best = tl.where(_candidates(n, offs_p, mask_p, VALID, CURRENT, s_vb, rows_per_batch), best, float("-inf"))
    tl.store(OUT + n.to(tl.int64) * P + offs_p, best, mask=mask_p)


@triton.jit
def _page_scores_kernel(
    Q, KMIN, KMAX, OUT, P, s_qn, s_qg, s_mn, s_mp, s_xn, s_xp, VALID, CURRENT, s_vb, rows_per_batch,
    HEADS, H, spread, SKIP,
    G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr, MASKED: tl.constexpr,
    MAPPED: tl.constexpr, BOUND: tl.constexpr, PDL: tl.constexpr, HAS_SKIP: tl.constexpr,
):
    if PDL:  # let the next kernel of the chain launch now (it waits for our end before it reads our output
        gdc_launch_dependents()  # or writes), then wait for the kernels before (they wrote q, the metadata)
        gdc_wait()
    if HAS_SKIP:  # a compiled step that does not rerank: nothing to score (select_pages' skip)
        if tl.load(SKIP) != 0:
            return
    n = tl.program_id(0)
    qrow = _query_row(n, HEADS, H, rows_per_batch, MAPPED)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, D_PAD)
    mask_p = offs_p < P
    mask_d = offs_d < D
    mask = mask_p[:, None] & mask_d[None, :]
    p64 = offs_p.to(tl.int64)
    kmin = tl.load(KMIN + n.to(tl.int64) * s_mn + p64[:, None] * s_mp + offs_d[None, :], mask=mask, other=0.0)
    kmax = tl.load(KMAX + n.to(tl.int64) * s_xn + p64[:, None] * s_xp + offs_d[None, :], mask=mask, other=0.0)
    kmin = kmin.to(tl.float32)
    kmax = kmax.to(tl.float32)
    if not BOUND:  # centre and half-width of the key box (ops.page_scores_ref)
        centre = (kmax + kmin) * 0.5
        half = (kmax - kmin) * 0.5
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for g in tl.static_range(G):  # G is small (1..8 in practice): unrolled
        qg = tl.load(Q + qrow * s_qn + g * s_qg + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        if BOUND:
            best = tl.maximum(best, tl.sum(tl.maximum(qg * kmax, qg * kmin), 1))
        else:
            best = tl.maximum(best, tl.sum(qg * centre, 1) + spread * tl.sum(tl.abs(qg) * half, 1))
    _store(OUT, best, n, P, offs_p, mask_p, VALID, CURRENT, s_vb, rows_per_batch, MASKED)


@triton.jit
def _sketch_scores_kernel(
    Q, KMIN, KMAX, CODES, OUT, P, s_qn, s_qg, s_mn, s_mp, s_xn, s_xp, s_cn, s_cp, s_ct, VALID, CURRENT, s_vb,
    rows_per_batch, HEADS, H, scale, SKIP,
    G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, DB: tl.constexpr, PS: tl.constexpr,
    BITS: tl.constexpr, BLOCK_P: tl.constexpr, MASKED: tl.constexpr, MAPPED: tl.constexpr, LSE: tl.constexpr,
    PDL: tl.constexpr, HAS_SKIP: tl.constexpr,
):
    """Each page's best q.khat over its tokens and the group's query heads, or with LSE each query head's
    logsumexp of scale * q.khat over the page ([N, G, P]: row n * G + g). The BLOCK_P pages' tokens are
    decoded once into a [pages, tokens, D] block of keys (ops.sketch_keys_ref), then scored by each query
    head. Channel d of a token sits in byte d % DB of its codes, at bit (d // DB) * BITS."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    if HAS_SKIP:
        if tl.load(SKIP) != 0:
            return
    n = tl.program_id(0)
    qrow = _query_row(n, HEADS, H, rows_per_batch, MAPPED)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_t = tl.arange(0, PS)
    offs_d = tl.arange(0, D_PAD)
    mask_p = offs_p < P
    mask = mask_p[:, None] & (offs_d < D)[None, :]
    p64 = offs_p.to(tl.int64)
    kmin = tl.load(KMIN + n.to(tl.int64) * s_mn + p64[:, None] * s_mp + offs_d[None, :], mask=mask, other=0.0)
    kmax = tl.load(KMAX + n.to(tl.int64) * s_xn + p64[:, None] * s_xp + offs_d[None, :], mask=mask, other=0.0)
    kmin = kmin.to(tl.float32)
    step = (kmax.to(tl.float32) - kmin) * (1.0 / (1 << BITS))  # [BLOCK_P, D_PAD]: one level's width
    codes = tl.load(CODES + n.to(tl.int64) * s_cn + p64[:, None, None] * s_cp + offs_t[None, :, None] * s_ct
                    + (offs_d % DB)[None, None, :], mask=mask[:, None, :], other=0).to(tl.int32)
    level = ((codes >> ((offs_d // DB) * BITS)[None, None, :]) & ((1 << BITS) - 1)).to(tl.float32) + 0.5
    keys = kmin[:, None, :] + level * step[:, None, :]  # [BLOCK_P, PS, D_PAD]
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for g in tl.static_range(G):
        qg = tl.load(Q + qrow * s_qn + g * s_qg + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        logits = tl.sum(keys * qg[None, None, :], 2)  # [BLOCK_P, PS]
        if LSE:  # base-2 exponentials, converted back to natural log units
            logits = logits * (scale * 1.4426950408889634)
            top = tl.max(logits, 1)
            lse = (top + tl.log2(tl.sum(tl.exp2(logits - top[:, None]), 1))) * 0.6931471805599453
            _store(OUT + g * P, lse, n, G * P, offs_p, mask_p, VALID, CURRENT, s_vb, rows_per_batch, MASKED)
        else:
            best = tl.maximum(best, tl.max(logits, 1))
    if not LSE:
        _store(OUT, best, n, P, offs_p, mask_p, VALID, CURRENT, s_vb, rows_per_batch, MASKED)


@triton.jit
def _lse_tile(base, offs_g, offs, G, P):
    """[G_PAD, BLOCK] logsumexps of a row's pages `offs`; padding heads and pages read as -inf."""
    return tl.load(base + offs[None, :], mask=(offs_g < G)[:, None] & (offs < P)[None, :], other=float("-inf"))


@triton.jit
def _mass_kernel(LSE, OUT, P, SKIP, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
                 HAS_SKIP: tl.constexpr):
    """Row n of ops.page_mass_ref: two passes over the row's [G, P] logsumexps, an online softmax
    normaliser per query head, then each page's share summed over the group (-inf: no candidate)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    if HAS_SKIP:
        if tl.load(SKIP) != 0:
            return
    n = tl.program_id(0)
    offs_g = tl.arange(0, G_PAD)
    base = LSE + n.to(tl.int64) * G * P + offs_g[:, None] * P
    top = tl.full([G_PAD], float("-inf"), tl.float32)
    total = tl.zeros([G_PAD], tl.float32)
    for p0 in range(0, P, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        x = _lse_tile(base, offs_g, offs, G, P)
        new_top = tl.maximum(top, tl.max(x, 1))
        safe = tl.where(new_top == float("-inf"), 0.0, new_top)  # a head without candidates so far
        total = total * tl.exp(top - safe) + tl.sum(tl.exp(x - safe[:, None]), 1)
        top = new_top
    safe = tl.where(top == float("-inf"), 0.0, top)
    inv = tl.where(total > 0, 1.0 / total, 0.0)
    for p0 in range(0, P, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        x = _lse_tile(base, offs_g, offs, G, P)
        share = tl.where(x == float("-inf"), 0.0, tl.exp(x - safe[:, None]) * inv[:, None])
        mass = tl.where(tl.max(x, 0) == float("-inf"), float("-inf"), tl.sum(share, 0))
        tl.store(OUT + n.to(tl.int64) * P + offs, mass, mask=offs < P)


def _prepare(q, kmin, kmax, codes, page_valid, current, heads, out):
    """Shared launch arguments: unit-stride inputs, the query row mapping and the candidate mask."""
    N, P, D = kmin.shape
    # Unit stride along D lets the loads vectorise; anything else is copied once.
    q, kmin, kmax = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, kmin, kmax))
    if codes is not None and codes.stride(-1) != 1:
        codes = codes.contiguous()
    mapped = heads is not None
    if mapped:
        B, H = q.shape[:2]
        assert N == B * len(heads), "rows must be batch x heads"
        q = q.contiguous().view(B * H, q.shape[-2], D)  # a no-op view for the decode query
        map_args, rows_per_batch = (heads, H), len(heads)
    else:
        map_args, rows_per_batch = (out, 0), None
    masked = page_valid is not None
    if masked:
        if page_valid.dtype == torch.bool:
            page_valid = page_valid.view(torch.uint8)
        if page_valid.stride(-1) != 1:
            page_valid = page_valid.contiguous()
        mask_args = (page_valid, current, page_valid.stride(0), rows_per_batch or N // page_valid.shape[0])
    else:
        mask_args = (out, out, 0, rows_per_batch or 1)  # unused (MASKED=False)
    return q, kmin, kmax, codes, mask_args, map_args, dict(MASKED=masked, MAPPED=mapped, **pdl(q.device))


def _sketch(q, kmin, kmax, codes, out, mask_args, map_args, scale, flags, skip=None):
    N, P, D = kmin.shape
    ps, db = codes.shape[-2:]
    d_pad = max(16, next_pow2(D))
    # launch shape from `benchmarks/gpu_check_kernels.py --only-sketch` (H100): 4k elements x 1 warp was
    # the fastest of 1-4k x 1-4 warps at 32k/batch 1 and 8 and 10k/batch 40; 8k elements x 4 warps
    # with a tl.dot over the group ran 7-8x slower (register spills)
    block_p = max(1, SKETCH_ELEMENTS // (ps * d_pad))
    skip_ptr, has_skip = skip_args(skip, out)
    _sketch_scores_kernel[(N, triton.cdiv(P, block_p))](
        q, kmin, kmax, codes, out, P, q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1),
        kmax.stride(0), kmax.stride(1), codes.stride(0), codes.stride(1), codes.stride(2), *mask_args, *map_args,
        float(scale), skip_ptr, G=q.shape[-2], D=D, D_PAD=d_pad, DB=db, PS=ps, BITS=8 * db // D, BLOCK_P=block_p,
        num_warps=SKETCH_WARPS, HAS_SKIP=has_skip, **flags,
    )
    return out


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, page_valid=None, current=None,
                heads=None, spread: float = 1.0, codes=None, skip=None) -> torch.Tensor:
    """q [N, G, D]; kmin, kmax [N, P, D]; codes [N, P, ps, D*bits//8] uint8 or None -> scores [N, P] fp32
    (see ops.page_scores_ref).

    With page_valid [B, >=P] bool and current (a device tensor [1]): -inf wherever a page is not a
    candidate (invalid, or not before `current`), as ops.select_pages_ref masks. With heads [Hg]: q is
    the layer's [B, H, G, D] query and row n = b * Hg + h reads head heads[h] of batch b. With skip (a device
    flag [1]) set, nothing is computed and the output is left unwritten."""
    N, P, D = kmin.shape
    G = q.shape[-2]
    out = new_output((N, P), q.device, torch.float32)
    if N == 0 or P == 0:
        return out
    if G == 0:
        return out.fill_(float("-inf"))  # amax over an empty group (the reference raises instead)
    q, kmin, kmax, codes, mask_args, map_args, flags = _prepare(q, kmin, kmax, codes, page_valid, current, heads, out)
    if codes is not None:
        return _sketch(q, kmin, kmax, codes, out, mask_args, map_args, 1.0, dict(LSE=False, **flags), skip)
    skip_ptr, has_skip = skip_args(skip, out)
    _page_scores_kernel[(N, triton.cdiv(P, BLOCK_P))](
        q, kmin, kmax, out, P, q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1),
        kmax.stride(0), kmax.stride(1), *mask_args, *map_args, float(spread), skip_ptr, G=G, D=D,
        D_PAD=max(16, next_pow2(D)), BLOCK_P=BLOCK_P, BOUND=spread == 1.0, num_warps=NUM_WARPS, HAS_SKIP=has_skip,
        **flags,
    )
    return out


def page_lse(q, kmin, kmax, codes, scale: float, page_valid=None, current=None, heads=None, skip=None) -> torch.Tensor:
    """Each query head's logsumexp of scale * q.khat over each page's sketched keys: [N, G, P] fp32
    (ops.page_lse_ref), -inf where a page is no candidate (with page_valid, current; as page_scores)."""
    N, P, D = kmin.shape
    out = new_output((N, q.shape[-2], P), q.device, torch.float32)
    if out.numel() == 0:
        return out
    q, kmin, kmax, codes, mask_args, map_args, flags = _prepare(q, kmin, kmax, codes, page_valid, current, heads, out)
    return _sketch(q, kmin, kmax, codes, out, mask_args, map_args, scale, dict(LSE=True, **flags), skip)


# Logsumexps of a row loaded per loop iteration (G_PAD heads x MASS_BLOCK // G_PAD pages) and warps: a row
# is one program, so the pass is latency-bound; fewer, larger loads win. `gpu_check_kernels.py --only-mass`
# (H100, graph replays): 8k x 8 warps 2.5 / 2.6 / 5.1 us at 32k batch 1 / 32k batch 8 / 10k batch 40,
# against 8.7 / 8.8 / 14.5 us for 1k x 4 warps.
MASS_BLOCK = 8192
MASS_WARPS = 8


def page_mass(lse: torch.Tensor, skip=None) -> torch.Tensor:
    """lse [N, G, P] (-inf: no candidate) -> [N, P] fp32 (ops.page_mass_ref): one program per row."""
    N, G, P = lse.shape
    out = new_output((N, P), lse.device, torch.float32)
    if out.numel() == 0:
        return out
    if G == 0:
        return out.fill_(float("-inf"))
    lse = lse.contiguous()
    g_pad = next_pow2(G)
    skip_ptr, has_skip = skip_args(skip, out)
    _mass_kernel[(N,)](lse, out, P, skip_ptr, G=G, G_PAD=g_pad, BLOCK=max(16, min(MASS_BLOCK // g_pad, next_pow2(P))),
                       num_warps=MASS_WARPS, HAS_SKIP=has_skip, **pdl(lse.device))
    return out
