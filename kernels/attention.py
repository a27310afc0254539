"""Sparse decode attention: one query token per head over a per-row page table (flash-decoding).

Semantics: ``flexicache_hf.ops.paged_decode_attention_ref``.

Layout of the work:
- one launch serves both head groups of a layer (unstable heads: every page resident, a page's slot
  follows from its id; stable heads: a slot table), each row finds its group, pools and query head
  itself, and writes straight into the layer's [B, H, G, D] output: no split of the query, no merge of
  two outputs, two launches fewer per layer;
- one program handles the whole GQA group (G query heads) of one row (batch, KV head), so every K/V
  page is read from memory once per group, not once per query head; the group is the M side of the
  two tensor-core dots (padded to 16, the smallest dot tile);
- the row's token list (M entries x page_size tokens, flattened) is split into chunks (split-K /
  flash-decoding) so that small batches still fill the GPU; each split keeps an online softmax in
  fp32 and writes its normalised partial output and log2-sum-exp; a second small kernel merges the
  splits (merging in the last split program to finish, through an atomic arrival counter, measured
  no faster on the H100). With a single split the first kernel writes the final output directly.
- tokens are walked BLOCK_T at a time; token j of the list is entry j // page_size, offset
  j % page_size, so page_size and BLOCK_T are independent powers of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import gdc_launch_dependents, gdc_wait, interpreting, new_output, next_pow2, num_sms, pdl

LOG2E = 1.4426950408889634

# Default launch shape, tuned on the H100 (benchmarks/gpu_check_kernels.py --sweep, CUDA-graph timing,
# Llama-3.1-8B shapes): 128 tokens (8 pages of 16) per step, 4 warps, 2 pipeline stages; 2.3 TB/s on
# 130 MB of scattered pages (76% of 3 TB/s). The page lists are split until there are 3 programs per SM:
# timed inside the whole decode step (benchmarks/timeline.py --variants) 3 beat the 8 that the kernel
# alone prefers, 32k/batch 8: 39 vs 42 us, 10k/batch 40: 93 vs 94 us (fewer splits, less to merge).
BLOCK_T = 128
NUM_WARPS = 4
NUM_STAGES = 2
PROGRAMS_PER_SM = 3
TILE_BYTES = 32768  # cap on one K (or V) tile: fp32 pools get 64-token steps (shared memory)
# V must be zero at invalid tokens (unwritten slots may hold anything, even NaN, and 0 * NaN = NaN):
# masking V's load with the valid flags measured 5-10% faster than zeroing V after the load.
V_LOAD_MASK = True
# P @ V with P in tf32 (10-bit mantissa) instead of bf16 (7): about half the rounding error of a bf16
# decode (2.2e-3 -> 1.2e-3 relative) but measured 10% slower on the H100, so off by default.
PV_TF32 = False


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # UPCAST: the Triton interpreter (3.9) computes bf16 dots wrongly; the operands are bf16 values
    # already, so an exact fp32 dot gives what the tensor cores give (fp32 accumulation).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _row(n, N0, HG0, HG1, HEADS0, HEADS1, H):
    """Row n of the launch -> (group, row within the group, batch, q/out row b * H + head)."""
    if n < N0:
        grp = 0
        r = n
        b = r // HG0
        head = tl.load(HEADS0 + r % HG0)
    else:
        grp = 1
        r = n - N0
        b = r // HG1
        head = tl.load(HEADS1 + r % HG1)
    return grp, r, b, b * H + head


@triton.jit
def _attn_split_kernel(
    Q, OUT, O_PART, LSE, VALID,
    K0, V0, PIDS0, HEADS0, N0, M0, HG0, RS0, BY_ENTRY0, PENDING0,
    K1, V1, PIDS1, HEADS1, M1, HG1, RS1, BY_ENTRY1, PENDING1,
    qk_scale, H, T, tokens_per_split, n_splits, s_kp, s_kt,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    PS: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr,
    PV_TF32: tl.constexpr, V_LOAD_MASK: tl.constexpr, PDL: tl.constexpr,
):
    n = tl.program_id(0)
    split = tl.program_id(1)
    grp, r, b, qrow = _row(n, N0, HG0, HG1, HEADS0, HEADS1, H)
    if PDL:  # the merge may launch now (it waits for our end). Launched early ourselves, a group whose
        gdc_launch_dependents()  # page table the kernel before is still writing waits for it;
        if tl.where(grp == 0, PENDING0, PENDING1) != 0:  # the other group reads while that kernel runs
            gdc_wait()
    # the row's group: its pools, page table, length and addressing (scalar selects, no divergence)
    if grp == 0:
        Kp, Vp, Pp = K0, V0, PIDS0
    else:
        Kp, Vp, Pp = K1, V1, PIDS1
    M = tl.where(grp == 0, M0, M1)
    row_slots = tl.where(grp == 0, RS0, RS1).to(tl.int64)
    by_entry = tl.where(grp == 0, BY_ENTRY0, BY_ENTRY1) != 0
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_t = tl.arange(0, BLOCK_T)
    mask_g = offs_g < G
    mask_d = offs_d < D  # D=80 is padded to 128 with masks
    qd_mask = mask_g[:, None] & mask_d[None, :]
    q = tl.load(Q + (qrow * G + offs_g[:, None]) * D + offs_d[None, :], mask=qd_mask, other=0.0)
    if F32:  # fp32 (or mixed) inputs: exact fp32 dots instead of tf32
        q = q.to(tl.float32)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)

    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, M * PS)
    for j0 in range(start, end, BLOCK_T):
        j = j0 + offs_t
        e = j // PS  # entry of the page table
        t = j % PS  # token inside the page
        pid = tl.load(Pp + r * M + e, mask=j < end, other=-1).to(tl.int64)
        used = pid >= 0  # page id -1: no page, skipped (its loads are masked off: no memory traffic)
        slot = r * row_slots + tl.where(by_entry, e, pid)
        pos = pid * PS + t
        ok = used & (pos < T)
        ok = ok & (tl.load(VALID + b * T + pos, mask=ok, other=0) != 0)
        # K is loaded wherever the page exists (`used`), not only at valid tokens: that keeps the
        # valid-flag load off K's dependency chain; invalid tokens get -inf logits below. V must be
        # zero at invalid tokens: its load is masked by `ok` (V_LOAD_MASK) or it is zeroed after.
        kv_mask = used[:, None] & mask_d[None, :]
        k = tl.load(Kp + slot[:, None] * s_kp + t[:, None] * s_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v_ptr = Vp + slot[:, None] * s_kp + t[:, None] * s_kt + offs_d[None, :]
        if V_LOAD_MASK:
            v = tl.load(v_ptr, mask=ok[:, None] & mask_d[None, :], other=0.0)
        else:
            v = tl.where(ok[:, None], tl.load(v_ptr, mask=kv_mask, other=0.0), 0.0)
        if F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
            qk = _dot(q, tl.trans(k), UPCAST)
        qk = tl.where(ok[None, :], qk * qk_scale, float("-inf"))  # log2 domain: scale * log2(e)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: avoid -inf - -inf
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if F32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        elif PV_TF32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="tf32")
        else:
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]  # rows with nothing valid: acc = 0 -> zeros, like the reference
    if PDL:  # no write before the kernel before has finished: our buffers may be blocks it used
        gdc_wait()
    if SPLIT:
        base = n * n_splits + split
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(O_PART + (base * G + offs_g[:, None]) * D + offs_d[None, :], o, mask=qd_mask)
        tl.store(LSE + base * G + offs_g, lse, mask=mask_g)
    else:
        tl.store(OUT + (qrow * G + offs_g[:, None]) * D + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=qd_mask)


@triton.jit
def _attn_merge_kernel(
    O_PART, LSE, OUT, n_splits, N0, HG0, HG1, HEADS0, HEADS1, H,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        gdc_wait()
    n = tl.program_id(0)
    qrow = _row(n, N0, HG0, HG1, HEADS0, HEADS1, H)[3]
    # Log-sum-exp merge of the splits of one row: out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max).
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask_g = offs_g < G
    mask = mask_g[:, None] & (offs_d < D)[None, :]
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for s in range(n_splits):
        base = n * n_splits + s
        lse = tl.load(LSE + base * G + offs_g, mask=mask_g, other=float("-inf"))
        o = tl.load(O_PART + (base * G + offs_g[:, None]) * D + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        w = tl.exp2(lse - m_use)
        acc = acc * alpha[:, None] + w[:, None] * o
        l = l * alpha + w
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(OUT + (qrow * G + offs_g[:, None]) * D + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=mask)


def _split_plan(n_rows: int, tokens: int, block_t: int, device, num_splits: int | None):
    """(splits, tokens per split): enough programs to fill the GPU, each a whole number of blocks."""
    n_blocks = max(1, triton.cdiv(tokens, block_t))
    if num_splits is None:
        num_splits = triton.cdiv(PROGRAMS_PER_SM * num_sms(device), max(1, n_rows))
    num_splits = max(1, min(int(num_splits), n_blocks))
    blocks_per_split = triton.cdiv(n_blocks, num_splits)
    return triton.cdiv(n_blocks, blocks_per_split), blocks_per_split * block_t


def _paged_decode_attention(q, groups, kv_valid, scale, *,
                            num_splits=None, block_t=None, num_warps=None, num_stages=None):
    """paged_decode_attention with launch knobs exposed (tests and the benchmark sweep use them)."""
    B, H, G, D = q.shape
    assert 1 <= len(groups) <= 2, "one or two head groups per launch"
    T = kv_valid.shape[1]
    covered = sum(len(g.heads) for g in groups)
    out = new_output(q.shape, q.device, q.dtype) if covered == H else torch.zeros_like(q)
    rows = [B * len(g.heads) for g in groups]
    Ms = [g.page_ids.shape[-1] for g in groups]
    if sum(rows) == 0 or T == 0:
        return out.zero_()
    k_pool = groups[0].k_pool
    PS = k_pool.shape[1]
    assert PS & (PS - 1) == 0, "page_size must be a power of two"
    for g in groups:  # one stride pair serves both groups: pools are contiguous [slots, page_size, D]
        assert g.k_pool.is_contiguous() and g.v_pool.is_contiguous() and g.k_pool.shape[1:] == (PS, D)
        assert g.v_pool.shape == g.k_pool.shape and g.k_pool.dtype == k_pool.dtype
    q = q.contiguous()
    if kv_valid.dtype == torch.bool:
        kv_valid = kv_valid.view(torch.uint8)
    kv_valid = kv_valid.contiguous()
    flat = []
    for g, n in zip(groups, rows):
        flat.append((g.k_pool, g.v_pool, g.page_ids.contiguous(), g.heads.contiguous(),
                     g.k_pool.shape[0] // max(1, n), int(g.by_entry), int(g.pending)))
    g0 = flat[0]
    g1 = flat[1] if len(flat) > 1 else g0

    launch = pdl(q.device)
    d_pad = max(16, next_pow2(D))
    block_t = block_t or max(16, min(BLOCK_T, TILE_BYTES // (d_pad * k_pool.element_size())))
    N = sum(rows)
    splits, per_split = _split_plan(N, max(Ms) * PS, block_t, q.device, num_splits)
    f32 = not (q.dtype == k_pool.dtype and q.dtype in (torch.float16, torch.bfloat16))
    g_pad = max(16, next_pow2(G))  # tl.dot needs M >= 16
    if splits > 1:
        o_part = new_output((N, splits, G, D), q.device, torch.float32)
        lse = new_output((N, splits, G), q.device, torch.float32)
    else:  # unused by the kernel (SPLIT=False); any tensor will do
        o_part = lse = out
    hg0, hg1 = len(groups[0].heads), len(groups[-1].heads)
    _attn_split_kernel[(N, splits)](
        q, out, o_part, lse, kv_valid,
        g0[0], g0[1], g0[2], g0[3], rows[0], Ms[0], hg0, g0[4], g0[5], g0[6],
        g1[0], g1[1], g1[2], g1[3], Ms[-1], hg1, g1[4], g1[5], g1[6],
        float(scale) * LOG2E, H, T, per_split, splits, PS * D, D,
        G=G, G_PAD=g_pad, D=D, D_PAD=d_pad, PS=PS, BLOCK_T=block_t, SPLIT=splits > 1, F32=f32,
        UPCAST=interpreting() and q.dtype == torch.bfloat16, PV_TF32=PV_TF32,
        V_LOAD_MASK=V_LOAD_MASK,
        num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES, **launch,
    )
    if splits > 1:
        _attn_merge_kernel[(N,)](o_part, lse, out, splits, rows[0], hg0, hg1, g0[3], g1[3], H,
                                 G=G, G_PAD=next_pow2(G), D=D, D_PAD=d_pad, num_warps=4, **launch)
    return out


def paged_decode_attention(q, groups, kv_valid, scale):
    """Decode attention of one query token per head over per-row page tables, all head groups in one launch.

    q [B, H, G, D]; groups: one or two ops.PageGroup; kv_valid [B, T] bool. Returns [B, H, G, D] in q's
    dtype (see ops.paged_decode_attention_ref).
    """
    return _paged_decode_attention(q, groups, kv_valid, scale)
