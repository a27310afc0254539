"""Sparse decode attention: one query token per head over a per-row list of pages (flash-decoding).

Semantics: ``flexicache_hf.ops.sparse_decode_attention_ref``.

Layout of the work:
- one program handles the whole GQA group (G query heads) of one row (batch, KV head), so every K/V
  page is read from memory once per group, not once per query head; the group is the M side of the
  two tensor-core dots (padded to 16, the smallest dot tile);
- the row's token list (M entries x page_size tokens, flattened) is split into chunks (split-K /
  flash-decoding) so that small batches still fill the GPU; each split keeps an online softmax in
  fp32 and writes its normalised partial output and log2-sum-exp; a second small kernel merges the
  splits. With a single split the first kernel writes the final output directly (one launch).
- tokens are walked BLOCK_T at a time; token j of the list is entry j // page_size, offset
  j % page_size, so page_size and BLOCK_T are independent powers of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import interpreting, new_output, next_pow2, num_sms

LOG2E = 1.4426950408889634

# Default launch shape, tuned on the H100 (benchmarks/gpu_check_kernels.py --sweep, CUDA-graph timing,
# Llama-3.1-8B shapes): 128 tokens (8 pages of 16) per step, 4 warps, 2 pipeline stages, the page lists
# split until there are 8 programs per SM; 2.3 TB/s on 130 MB of scattered pages (76% of 3 TB/s).
BLOCK_T = 128
NUM_WARPS = 4
NUM_STAGES = 2
PROGRAMS_PER_SM = 8
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
def _attn_split_kernel(
    Q, K, V, SLOTS, PIDS, VALID, OUT, O_PART, LSE,
    qk_scale, M, T, rows_per_batch, tokens_per_split, n_splits,
    s_kp, s_kt, s_vp, s_vt,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    PS: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr,
    PV_TF32: tl.constexpr, V_LOAD_MASK: tl.constexpr,
):
    n = tl.program_id(0)
    split = tl.program_id(1)
    b = n // rows_per_batch
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_t = tl.arange(0, BLOCK_T)
    mask_g = offs_g < G
    mask_d = offs_d < D  # D=80 is padded to 128 with masks
    qd_mask = mask_g[:, None] & mask_d[None, :]
    q = tl.load(Q + (n * G + offs_g[:, None]) * D + offs_d[None, :], mask=qd_mask, other=0.0)
    if F32:  # fp32 (or mixed) inputs: exact fp32 dots instead of tf32
        q = q.to(tl.float32)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)

    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, M * PS)
    for j0 in range(start, end, BLOCK_T):
        j = j0 + offs_t
        e = j // PS  # entry of the page list
        t = j % PS  # token inside the page
        slot = tl.load(SLOTS + n * M + e, mask=j < end, other=-1).to(tl.int64)
        used = slot >= 0  # slot -1: no page, skipped (its loads are masked off: no memory traffic)
        pid = tl.maximum(tl.load(PIDS + n * M + e, mask=used, other=0).to(tl.int64), 0)
        pos = pid * PS + t
        ok = used & (pos < T)
        ok = ok & (tl.load(VALID + b * T + pos, mask=ok, other=0) != 0)
        # K is loaded wherever the page exists (`used`), not only at valid tokens: that keeps the
        # valid-flag load off K's dependency chain; invalid tokens get -inf logits below. V must be
        # zero at invalid tokens: its load is masked by `ok` (V_LOAD_MASK) or it is zeroed after.
        kv_mask = used[:, None] & mask_d[None, :]
        k = tl.load(K + slot[:, None] * s_kp + t[:, None] * s_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v_ptr = V + slot[:, None] * s_vp + t[:, None] * s_vt + offs_d[None, :]
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
    if SPLIT:
        base = n * n_splits + split
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(O_PART + (base * G + offs_g[:, None]) * D + offs_d[None, :], o, mask=qd_mask)
        tl.store(LSE + base * G + offs_g, lse, mask=mask_g)
    else:
        tl.store(OUT + (n * G + offs_g[:, None]) * D + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=qd_mask)


@triton.jit
def _attn_merge_kernel(
    O_PART, LSE, OUT, n_splits,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
):
    # Log-sum-exp merge of the splits of one row: out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max).
    n = tl.program_id(0)
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
    tl.store(OUT + (n * G + offs_g[:, None]) * D + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=mask)


def _split_plan(n_rows: int, tokens: int, block_t: int, device, num_splits: int | None):
    """(splits, tokens per split): enough programs to fill the GPU, each a whole number of blocks."""
    n_blocks = max(1, triton.cdiv(tokens, block_t))
    if num_splits is None:
        num_splits = triton.cdiv(PROGRAMS_PER_SM * num_sms(device), max(1, n_rows))
    num_splits = max(1, min(int(num_splits), n_blocks))
    blocks_per_split = triton.cdiv(n_blocks, num_splits)
    return triton.cdiv(n_blocks, blocks_per_split), blocks_per_split * block_t


def _sparse_decode_attention(q, k_pool, v_pool, slots, page_ids, kv_valid, scale, *,
                             num_splits=None, block_t=None, num_warps=None, num_stages=None):
    """sparse_decode_attention with launch knobs exposed (tests and the benchmark sweep use them)."""
    N, G, D = q.shape
    S, PS, Dk = k_pool.shape
    B, T = kv_valid.shape
    M = slots.shape[1]
    assert Dk == D and v_pool.shape[1:] == k_pool.shape[1:], "pool shapes must match q"
    assert PS & (PS - 1) == 0, "page_size must be a power of two"
    out = new_output((N, G, D), q.device, q.dtype)
    if N == 0:
        return out
    if M == 0 or T == 0 or B == 0:
        return out.zero_()
    # Small index tables are made contiguous (cheap); the pools only need unit stride along D.
    q = q.contiguous()
    slots = slots.contiguous()
    page_ids = page_ids.contiguous()
    kv_valid = kv_valid.contiguous()
    if kv_valid.dtype == torch.bool:
        kv_valid = kv_valid.view(torch.uint8)
    if k_pool.stride(2) != 1:
        k_pool = k_pool.contiguous()
    if v_pool.stride(2) != 1:
        v_pool = v_pool.contiguous()

    d_pad = max(16, next_pow2(D))
    block_t = block_t or max(16, min(BLOCK_T, TILE_BYTES // (d_pad * k_pool.element_size())))
    splits, per_split = _split_plan(N, M * PS, block_t, q.device, num_splits)
    f32 = not (q.dtype == k_pool.dtype == v_pool.dtype and q.dtype in (torch.float16, torch.bfloat16))
    g_pad = max(16, next_pow2(G))  # tl.dot needs M >= 16
    if splits > 1:
        o_part = new_output((N, splits, G, D), q.device, torch.float32)
        lse = new_output((N, splits, G), q.device, torch.float32)
    else:  # unused by the kernel (SPLIT=False); any tensor will do
        o_part = lse = out
    _attn_split_kernel[(N, splits)](
        q, k_pool, v_pool, slots, page_ids, kv_valid, out, o_part, lse,
        float(scale) * LOG2E, M, T, N // B, per_split, splits,
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        G=G, G_PAD=g_pad, D=D, D_PAD=d_pad, PS=PS, BLOCK_T=block_t, SPLIT=splits > 1, F32=f32,
        UPCAST=interpreting() and q.dtype == torch.bfloat16, PV_TF32=PV_TF32,
        V_LOAD_MASK=V_LOAD_MASK,
        num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES,
    )
    if splits > 1:
        _attn_merge_kernel[(N,)](o_part, lse, out, splits, G=G, G_PAD=next_pow2(G), D=D, D_PAD=d_pad,
                                 num_warps=4)
    return out


def sparse_decode_attention(q, k_pool, v_pool, slots, page_ids, kv_valid, scale):
    """Decode attention of one query token per head over a per-row list of pages.

    q [N, G, D]; k_pool, v_pool [S, page_size, D]; slots, page_ids [N, M] int (-1: no page);
    kv_valid [B, T] bool. Returns [N, G, D] in q's dtype (see ops.sparse_decode_attention_ref).
    """
    return _sparse_decode_attention(q, k_pool, v_pool, slots, page_ids, kv_valid, scale)

