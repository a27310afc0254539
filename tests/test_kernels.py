"""Triton kernels vs their PyTorch references (flexicache_hf.ops.*_ref) on awkward random inputs.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below
before Triton is imported) on small shapes; with CUDA the same tests run on the GPU.
"""

import os

import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 without CUDA, before anything imports Triton (Triton reads it
# at import: its jit helpers are built then).
assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"

pytest.importorskip("triton")

from conftest import sketch_case  # noqa: E402
from flexicache_hf import ops  # noqa: E402
from flexicache_hf.kernels import _util, attention, copy, promote, scores, select, summary  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}

@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Kernel-allocated outputs start as NaN: a NaN left in a result is an element never written."""
    monkeypatch.setattr(_util, "POISON", True)
    torch.manual_seed(0)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), "output has NaN: an element was never written"
    assert rel_err(out, ref) <= TOL[dtype], rel_err(out, ref)


# ------------------------------------------------------------------------------------------------
# paged_decode_attention (both head groups of a layer in one launch)
# ------------------------------------------------------------------------------------------------
def make_attention_case(dtype, G, D, ps, B=3, H=5, unstable=(1, 3), M=5, T=77, S=6, groups="both"):
    """Random layer with the awkward parts: odd M/T/S, a partial last page (positions >= T), left
    padding, -1 entries, a row with no page at all, a batch row with no valid token. Unstable heads
    address pages by id in a [rows * P, ps, D] buffer, stable heads by entry in a [rows * S, ps, D]
    slot pool whose slot table has holes."""
    q = torch.randn(B, H, G, D, device=DEV).to(dtype)
    P = -(-T // ps)  # pages per row; the last one is partial
    u = torch.tensor(unstable, device=DEV, dtype=torch.long)
    s = torch.tensor([h for h in range(H) if h not in unstable], device=DEV, dtype=torch.long)
    out = []
    if groups in ("both", "unstable"):
        Nu = B * len(u)
        ids = torch.rand(Nu, P - 1, device=DEV).argsort(-1)[:, : M - 1].sort(-1).values
        ids = torch.nn.functional.pad(ids, (0, M - 1 - ids.shape[1]), value=-1)  # fewer pages than M - 1
        ids[0, :2] = -1  # fewer candidates than K
        ids = torch.cat([ids, torch.full((Nu, 1), P - 1, device=DEV)], 1)  # the current page last
        ids[1, :] = -1  # nothing to attend
        pool = [torch.randn(Nu * P, ps, D, device=DEV).to(dtype) for _ in range(2)]
        out.append(ops.PageGroup(*pool, ids.view(B, len(u), M), u, by_entry=False))
    if groups in ("both", "stable"):
        Ns = B * len(s)
        ids = torch.randint(0, P, (Ns, S), device=DEV)
        ids[:, -1] = P - 1
        ids[0, ::2] = -1
        ids[2, 1] = -1
        pool = [torch.randn(Ns * S, ps, D, device=DEV).to(dtype) for _ in range(2)]
        out.append(ops.PageGroup(*pool, ids.view(B, len(s), S), s, by_entry=True))
    kv_valid = torch.ones(B, T, dtype=torch.bool, device=DEV)
    kv_valid[1, :ps + 3] = False  # left padding, crossing a page boundary
    kv_valid[0, -2:] = False  # not yet written tail
    kv_valid[B - 1] = False  # a batch row with nothing valid
    return q, out, kv_valid, D ** -0.5


ATTN_CASES = [  # dtype, G, D, page_size
    (torch.float32, 1, 64, 16),
    (torch.float32, 3, 80, 8),
    (torch.float32, 7, 128, 16),
    (torch.bfloat16, 4, 128, 16),
    (torch.bfloat16, 7, 80, 4),
    (torch.bfloat16, 1, 64, 32),
    (torch.float16, 3, 64, 16),
]


@pytest.mark.parametrize("dtype,G,D,ps", ATTN_CASES)
@pytest.mark.parametrize("num_splits", [1, 3, 5])
def test_kernel_paged_decode_attention(dtype, G, D, ps, num_splits):
    q, groups, kv_valid, scale = make_attention_case(dtype, G, D, ps)
    ref = ops.paged_decode_attention_ref(q, groups, kv_valid, scale)
    out = attention._paged_decode_attention(q, groups, kv_valid, scale, num_splits=num_splits, block_t=16)
    check(out, ref, dtype)
    assert (out[:, 3].abs().sum() > 0) and (out[2] == 0).all(), "batch row 2 has nothing valid: zeros"
    assert (out[0, 3] == 0).all(), "unstable row 1 (batch 0, head 3) has no page: zeros"


@pytest.mark.parametrize("which", ["unstable", "stable"])
def test_kernel_paged_decode_attention_one_group(which):
    """A layer whose heads are all of one kind (or a head in no group: zeros, like the reference)."""
    unstable = (0, 1, 2) if which == "unstable" else ()
    q, groups, kv_valid, scale = make_attention_case(torch.bfloat16, 4, 64, 16, H=3, unstable=unstable, groups=which)
    check(attention._paged_decode_attention(q, groups, kv_valid, scale, num_splits=2, block_t=32),
          ops.paged_decode_attention_ref(q, groups, kv_valid, scale), torch.bfloat16)
    q, groups, kv_valid, scale = make_attention_case(torch.float32, 2, 64, 16, H=4, unstable=(0, 2), groups="unstable")
    out = attention.paged_decode_attention(q, groups, kv_valid, scale)
    check(out, ops.paged_decode_attention_ref(q, groups, kv_valid, scale), torch.float32)
    assert (out[:, [1, 3]] == 0).all()


@pytest.mark.parametrize("dtype,G,D", [(torch.bfloat16, 4, 128), (torch.float32, 7, 128), (torch.float16, 3, 80)])
def test_kernel_paged_decode_attention_default_plan(dtype, G, D):
    """The public entry point with its default launch shape (the tuned one on the GPU)."""
    q, groups, kv_valid, scale = make_attention_case(dtype, G, D, 16, B=2, M=9, T=150, S=10)
    check(attention.paged_decode_attention(q, groups, kv_valid, scale),
          ops.paged_decode_attention_ref(q, groups, kv_valid, scale), dtype)


@pytest.mark.parametrize("v_load_mask", [False, True])
def test_kernel_paged_decode_attention_ignores_garbage_in_masked_tokens(v_load_mask, monkeypatch):
    """Unwritten slots may hold anything, even NaN: masked tokens must not leak through 0 * NaN."""
    monkeypatch.setattr(attention, "V_LOAD_MASK", v_load_mask)
    q, groups, kv_valid, scale = make_attention_case(torch.float32, 3, 64, 16)
    ref = ops.paged_decode_attention_ref(q, groups, kv_valid, scale)
    tail = (kv_valid.shape[1] - 1) // 16  # positions 77.. of the last page do not exist
    dirty = []
    for g in groups:
        k, v = g.k_pool.clone(), g.v_pool.clone()
        rows, M = g.page_ids.shape[0] * g.page_ids.shape[1], g.page_ids.shape[2]
        ids = g.page_ids.reshape(rows, M)
        for r in range(rows):
            for e in range(M):
                if ids[r, e] == tail:
                    slot = r * (k.shape[0] // rows) + (e if g.by_entry else tail)
                    k[slot, 77 % 16:] = v[slot, 77 % 16:] = float("nan")
        dirty.append(g._replace(k_pool=k, v_pool=v))
    out = attention._paged_decode_attention(q, dirty, kv_valid, scale, num_splits=2, block_t=16)
    check(out, ref, torch.float32)


def test_kernel_paged_decode_attention_through_ops():
    q, groups, kv_valid, scale = make_attention_case(torch.bfloat16, 3, 64, 16, B=2, M=3, T=40, S=4)
    out = ops.paged_decode_attention(q, groups, kv_valid, scale, use_kernels=True)
    check(out, ops.paged_decode_attention_ref(q, groups, kv_valid, scale), torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# page_scores
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G,D", [(1, 64), (3, 80), (7, 128), (5, 64)])
def test_kernel_page_scores(dtype, G, D):
    N, P = 5, 37
    q = torch.randn(N, G, D, device=DEV).to(dtype)
    a, b = torch.randn(2, N, P, D, device=DEV).to(dtype)
    kmin, kmax = torch.minimum(a, b), torch.maximum(a, b)
    kmin[1, 3] = kmax[1, 3] = 0  # an empty page's metadata
    out = scores.page_scores(q, kmin, kmax)
    check(out, ops.page_scores_ref(q, kmin, kmax), torch.float32 if dtype == torch.float32 else dtype)


@pytest.mark.parametrize("spread", [0.0, 0.5, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_page_scores_spread(dtype, spread):
    """q.c + spread |q|.r (centre and half-width of the key box), masked and mapped as the bound is; G 1 and 5."""
    for G in (1, 5):
        N, P, D = 6, 29, 64
        q = torch.randn(N, G, D, device=DEV).to(dtype)
        a, b = torch.randn(2, N, P, D, device=DEV).to(dtype)
        kmin, kmax = torch.minimum(a, b), torch.maximum(a, b)
        check(scores.page_scores(q, kmin, kmax, spread=spread), ops.page_scores_ref(q, kmin, kmax, spread),
              torch.float32 if dtype == torch.float32 else dtype)
        page_valid = torch.rand(2, P, device=DEV) > 0.2
        current = torch.tensor([23], device=DEV)
        got = select.select_pages(q, kmin, kmax, page_valid, current, 7, spread=spread)
        masked = scores.page_scores(q, kmin, kmax, page_valid, current, spread=spread)
        assert torch.equal(got, ops.topk_pages_ref(masked, 7))


def test_kernel_page_scores_any_kmin_kmax_and_strides():
    """Elementwise max(q*kmax, q*kmin), even where kmin > kmax; non-contiguous rows."""
    q = torch.randn(4, 3, 80, device=DEV)
    kk = torch.randn(4, 2, 21, 80, device=DEV)
    kmin, kmax = kk[:, 0], kk[:, 1]  # views with a row stride of 2 * 21 * 80
    check(scores.page_scores(q, kmin, kmax), ops.page_scores_ref(q, kmin, kmax), torch.float32)


def make_sketch_case(dtype, bits, ps, D, B=2, H=3, P=13):
    return sketch_case(dtype, bits, ps, D, B, H, P, device=DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,ps,D,G", [(2, 16, 64, 5), (1, 8, 48, 1), (4, 4, 80, 3), (2, 1, 64, 7)])
def test_kernel_page_scores_sketch(dtype, bits, ps, D, G):
    """Best sketched q.k per page: plain rows, masked + mapped rows (the decode call), and the selection."""
    B, H, P = 2, 3, 13
    _, _, kmin, kmax, codes = make_sketch_case(dtype, bits, ps, D, B, H, P)
    rows = lambda t: t.flatten(0, 1)  # noqa: E731  [B*H, P, ...]
    q = torch.randn(B, H + 1, G, D, device=DEV).to(dtype)  # the layer's query; the group is heads 0, 2, 3
    heads = torch.tensor([0, 2, 3], device=DEV)
    q_rows = q[:, heads].flatten(0, 1)
    ref = ops.page_scores_ref(q_rows, rows(kmin), rows(kmax), codes=rows(codes))
    tol = torch.float32 if dtype == torch.float32 else dtype
    check(scores.page_scores(q_rows, rows(kmin), rows(kmax), codes=rows(codes)), ref, tol)
    page_valid = torch.rand(B, P + 3, device=DEV) > 0.2
    current = torch.tensor([11], device=DEV)
    masked = scores.page_scores(q, rows(kmin), rows(kmax), page_valid, current, heads, codes=rows(codes))
    cand = page_valid[:, :P].repeat_interleave(H, 0) & (torch.arange(P, device=DEV) < 11)
    check(masked.masked_fill(~cand, 0), ref.masked_fill(~cand, 0), tol)
    assert (masked[~cand] == float("-inf")).all()
    got = select.select_pages(q, rows(kmin), rows(kmax), page_valid, current, 4, True, heads, codes=rows(codes))
    assert torch.equal(got[:, :-1], ops.topk_pages_ref(masked, 4)) and (got[:, -1] == 11).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,ps,D,G", [(2, 16, 64, 5), (1, 8, 48, 1), (4, 4, 80, 3), (2, 1, 64, 7)])
def test_kernel_page_lse_and_mass(dtype, bits, ps, D, G):
    """Sketched logsumexps per query head and page (plain rows; masked + mapped rows, with a batch row that
    has no candidate), the predicted mass over the candidates, and the selection by it."""
    B, H, P = 2, 3, 13
    _, _, kmin, kmax, codes = make_sketch_case(dtype, bits, ps, D, B, H, P)
    rows = lambda t: t.flatten(0, 1)  # noqa: E731
    q = torch.randn(B, H + 1, G, D, device=DEV).to(dtype)
    heads = torch.tensor([0, 2, 3], device=DEV)
    q_rows = q[:, heads].flatten(0, 1)
    ref = ops.page_lse_ref(q_rows, rows(kmin), rows(kmax), rows(codes), 0.3)
    assert ref.shape == (B * H, G, P)
    tol = torch.float32 if dtype == torch.float32 else dtype
    check(scores.page_lse(q_rows, rows(kmin), rows(kmax), rows(codes), 0.3), ref, tol)
    page_valid = torch.rand(B, P + 3, device=DEV) > 0.2
    page_valid[1] = False  # batch row 1: no candidate at all
    current = torch.tensor([11], device=DEV)
    lse = scores.page_lse(q, rows(kmin), rows(kmax), rows(codes), 0.3, page_valid, current, heads)
    cand = (page_valid[:, :P].repeat_interleave(H, 0) & (torch.arange(P, device=DEV) < 11))[:, None].expand_as(lse)
    assert torch.equal(lse.isneginf(), ~cand)
    check(lse.masked_fill(~cand, 0), ref.masked_fill(~cand, 0), tol)
    mass = scores.page_mass(lse)
    want = ops.page_mass_ref(lse)
    assert torch.equal(mass.isneginf(), want.isneginf()) and torch.equal(want.isneginf(), ~cand[:, 0])
    torch.testing.assert_close(mass.masked_fill(~cand[:, 0], 0), want.masked_fill(~cand[:, 0], 0), rtol=1e-5, atol=1e-6)
    got = select.select_pages(q, rows(kmin), rows(kmax), page_valid, current, 4, True, heads, codes=rows(codes),
                              mass_scale=0.3)
    assert torch.equal(got[:, :-1], ops.topk_pages_ref(mass, 4)) and (got[:, -1] == 11).all()
    assert (got[H:, :-1] == -1).all()  # the row without candidates selects nothing


@pytest.mark.parametrize("route", ["bound", "sketch_max", "sketch_mass"])
def test_kernel_select_pages_skip_flag(route):
    """A compiled step launches the stable heads' selection every step with a device flag: set, every kernel
    returns at once and nothing is selected (-1; the appended current page stays); clear, the same pages as
    without a flag. Rows long enough for a chunk pass (P > 512)."""
    B, H, P, G, D, ps = 2, 3, 700, 3, 64, 4
    _, _, kmin, kmax, codes = sketch_case(torch.float32, 2, ps, D, B, H, P, device=DEV)
    rows = lambda t: t.flatten(0, 1)  # noqa: E731
    q = torch.randn(B, H + 1, G, D, device=DEV)
    heads = torch.tensor([0, 2, 3], device=DEV)
    page_valid = torch.rand(B, P, device=DEV) > 0.1
    current = torch.tensor([650], device=DEV)
    kw = {"bound": {}, "sketch_max": {"codes": rows(codes)}, "sketch_mass": {"codes": rows(codes), "mass_scale": 0.3}}[route]
    args = (q, rows(kmin), rows(kmax), page_valid, current, 5, True, heads)
    plain = select.select_pages(*args, **kw)
    for flag in (True, False):
        skip = torch.tensor([flag], device=DEV)
        got = select.select_pages(*args, **kw, skip=skip)
        ref = ops.select_pages_ref(*args, **kw, skip=skip)
        assert (got[:, -1] == 650).all() and (ref[:, -1] == 650).all()
        if flag:
            assert (got[:, :-1] == -1).all() and (ref[:, :-1] == -1).all()
        else:
            assert torch.equal(got, plain) and torch.equal(ref, ops.select_pages_ref(*args, **kw))


# ------------------------------------------------------------------------------------------------
# page_summary (min/max and the key sketch in one launch)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ps,D,bits", [(16, 128, 0), (4, 80, 0), (8, 64, 0), (16, 64, 2), (4, 80, 2), (8, 48, 1),
                                       (1, 64, 4), (16, 128, 2)])
def test_kernel_page_summary(dtype, ps, D, bits):
    B, H, P = 3, 2, 7
    keys = torch.randn(B, H, P * ps, D, device=DEV).to(dtype)
    keys[:, :, :, 5] = 0.25  # a flat box: level 0
    keys[0, 1, 3] = keys[0, 1, 2]  # ties at the box's edges
    valid = torch.ones(B, P * ps, dtype=torch.bool, device=DEV)
    valid[0, : 2 * ps + 1] = False  # left padding: two empty pages and a partly valid one
    valid[1, -3:] = False  # padding after the first valid token of a page
    valid[2] = False  # nothing valid: all zeros
    got, ref = summary.page_summary(keys, valid, ps, bits), ops.page_summary_ref(keys, valid, ps, bits)
    assert not got[0].isnan().any() and not got[1].isnan().any()
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert (got[2] is None) == (bits == 0)
    if bits:
        assert got[2].dtype == torch.uint8 and torch.equal(got[2], ref[2])


def test_kernel_page_summary_strided_keys_and_one_page():
    keys = torch.randn(2, 24, 3, 64, device=DEV).transpose(1, 2)  # [B, H, T, D] with H/T swapped strides
    valid = torch.rand(2, 24, device=DEV) > 0.3
    for k, v in ((keys, valid), (keys[:, :, 8:16], valid[:, 8:16])):  # a decode step's one current page
        got, ref = summary.page_summary(k, v, 8, 2), ops.page_summary_ref(k, v, 8, 2)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    got = ops.page_summary(keys, valid, 8, 2, use_kernels=True)
    assert all(torch.equal(a, b) for a, b in zip(got, ops.page_summary_ref(keys, valid, 8, 2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,by_slot", [(2, False), (2, True), (0, False), (4, True)])
def test_kernel_summarise_page_in_place(dtype, bits, by_slot):
    """A decode step's page summary read where the page lives (a token span, or each row's own slot) and written
    into the metadata at the device's page index: the same buffers as the reference leaves, every other page and
    row untouched; a partly valid page (left padding) and a page with no valid token."""
    B, H, cap, ps, D, S = 3, 2, 5, 8, 64, 4
    valid = torch.rand(B, cap * ps, device=DEV) > 0.3
    valid[1] = False  # no valid token: zeros
    page = torch.tensor([3], device=DEV)
    if by_slot:
        pool, slot = torch.randn(B, H, S, ps, D, device=DEV).to(dtype), torch.randint(0, S, (B, H), device=DEV)
    else:
        pool, slot = torch.randn(B, H, cap * ps, D, device=DEV).to(dtype), None
    def buffers():
        g = torch.Generator(device=DEV).manual_seed(1)
        meta = [torch.randn(B, H, cap, D, device=DEV, generator=g).to(dtype) for _ in range(2)]
        codes = torch.randint(0, 255, (B, H, cap, ps, D * bits // 8), device=DEV, generator=g,
                              dtype=torch.uint8) if bits else None
        return [*meta, codes, torch.rand(B, cap, device=DEV, generator=g) > 0.5]
    got, want = buffers(), buffers()
    summary.summarise_page(pool, valid, page, ps, *got, slot=slot)
    ops.summarise_page_ref(pool, valid, page, ps, *want, slot=slot)
    for a, b in zip(got, want):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    ops.summarise_page(pool, valid, page, ps, *got[:3], None, slot, use_kernels=True)  # no validity written
    assert torch.equal(got[3], want[3])


# ------------------------------------------------------------------------------------------------
# copy_pages
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D,dtype", [(128, torch.bfloat16), (80, torch.float32), (64, torch.float16)])
@pytest.mark.parametrize("src_on_host", [True, False])
@pytest.mark.parametrize("paired", [False, True])
def test_kernel_copy_pages(D, dtype, src_on_host, paired):
    """Scattered pages, some entries skipped (-1); paired: a second pool pair (V) copied with the same indices
    in the same launch."""
    ps, S_src, S_dst, n = 16, 23, 13, 9
    srcs = [torch.randn(S_src, ps, D).to(dtype) for _ in range(2)]
    if DEV.type == "cuda":
        srcs = [s.pin_memory() if src_on_host else s.to(DEV) for s in srcs]
    elif not src_on_host:
        pytest.skip("no second device on the CPU")
    dsts = [torch.randn(S_dst, ps, D, device=DEV).to(dtype) for _ in range(2)]
    src_idx = torch.randperm(S_src)[:n]
    src_idx[3] = -1
    dst_idx = torch.randperm(S_dst)[:n]
    expect, before = [d.clone() for d in dsts], dsts[1].clone()
    for s, e in zip(srcs, expect):
        ops.copy_pages_ref(s, src_idx, e, dst_idx)
    pair = (srcs[1], dsts[1]) if paired else None
    copy._copy_pages(srcs[0], src_idx, dsts[0], dst_idx, pair, min_programs=4)  # fewer programs than pages
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dsts[0], expect[0])
    assert torch.equal(dsts[1], expect[1] if paired else before)
    ops.copy_pages(srcs[0], src_idx, expect[0], dst_idx, pair=(srcs[1], expect[1]))  # the dispatcher, same result
    assert torch.equal(expect[0], dsts[0]) and (not paired or torch.equal(expect[1], dsts[1]))


@pytest.mark.parametrize("to_host", [True, False])
def test_kernel_copy_pages_one_token_rows_through_a_mapped_pool(to_host):
    """Decode write-through and promotion address the pinned pool through its CUDA view (alloc.mapped), and
    the write-through copies rows of one token (pages [1, D])."""
    from flexicache_hf.memory.alloc import mapped

    D, rows, S = 40, 7, 19
    host = torch.randn(S, 1, D).to(torch.bfloat16)
    gpu = torch.randn(rows, 1, D).to(torch.bfloat16).to(DEV)
    if DEV.type == "cuda":
        host = host.pin_memory()
    view = mapped(host, DEV) if DEV.type == "cuda" else host
    src_idx, dst_idx = torch.arange(rows, device=DEV), torch.randperm(S, device=DEV)[:rows]
    if to_host:
        expect = host.clone()
        ops.copy_pages_ref(gpu.cpu(), src_idx.cpu(), expect, dst_idx.cpu())
        copy.copy_pages(gpu, src_idx, view, dst_idx)
        got = host
    else:
        expect = gpu.clone()
        ops.copy_pages_ref(host.to(DEV), dst_idx, expect, src_idx)
        copy.copy_pages(view, dst_idx, gpu, src_idx)
        got = gpu
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(got.cpu(), expect.cpu())


def test_kernel_copy_pages_empty_and_through_ops():
    src = torch.randn(6, 16, 64)
    if DEV.type == "cuda":
        src = src.pin_memory()
    dst = torch.zeros(4, 16, 64, device=DEV)
    copy.copy_pages(src, torch.empty(0, dtype=torch.long), dst, torch.empty(0, dtype=torch.long))
    assert (dst == 0).all()
    ops.copy_pages(src, torch.tensor([5, 0]), dst, torch.tensor([1, 3]), use_kernels=True)
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dst[1].cpu(), src[5]) and torch.equal(dst[3].cpu(), src[0]) and (dst[[0, 2]] == 0).all()


def test_kernel_paged_decode_attention_pv_tf32(monkeypatch):
    monkeypatch.setattr(attention, "PV_TF32", True)
    q, groups, kv_valid, scale = make_attention_case(torch.bfloat16, 4, 128, 16)
    check(attention._paged_decode_attention(q, groups, kv_valid, scale, num_splits=2, block_t=32),
          ops.paged_decode_attention_ref(q, groups, kv_valid, scale), torch.bfloat16)


@pytest.mark.parametrize("direction", ["to_gpu", "to_host"])
def test_kernel_copy_pages_skips_minus_one_and_writes_pinned_host(direction):
    """Fixed-shape callers (promotion, decode offload) mark entries with nothing to copy as -1; on the GPU
    the kernel also writes a pinned host pool in place (decode offload)."""
    ps, D = 16, 80
    g = torch.Generator().manual_seed(3)
    src_idx = torch.tensor([4, -1, 0, -1, 7, 2, -1])
    dst_idx = torch.tensor([1, 5, 3, -1, 0, 6, 2])
    if direction == "to_gpu":
        src, dst = torch.randn(9, ps, D, generator=g), torch.randn(8, ps, D, generator=g).to(DEV)
        if DEV.type == "cuda":
            src = src.pin_memory()
    else:
        if DEV.type != "cuda":
            pytest.skip("a GPU -> pinned host write needs a GPU")
        src, dst = torch.randn(9, ps, D, generator=g).to(DEV), torch.randn(8, ps, D, generator=g).pin_memory()
    expect = dst.cpu().clone()
    ops.copy_pages_ref(src.cpu(), src_idx, expect, dst_idx)
    assert torch.equal(expect[[5, 2]], dst.cpu()[[5, 2]])  # the reference skipped the -1 entries
    copy._copy_pages(src, src_idx.to(src.device if src.is_cuda else DEV), dst, dst_idx.to(src.device if src.is_cuda else DEV),
                     min_programs=2)
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), expect)


# ------------------------------------------------------------------------------------------------
# select_pages (masked scores kernel + top-k)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 7])
def test_kernel_select_pages(dtype, G):
    """Masked scores equal the reference's masking; the selection equals topk_pages_ref of the kernel's own
    scores (fp32 sums may reorder near-ties against the reference, so ids are compared on one score set);
    fewer candidates than k give every candidate, then -1."""
    B, H, P, D, k = 3, 2, 45, 80, 6
    N = B * H
    q = torch.randn(N, G, D, device=DEV).to(dtype)
    a, b = torch.randn(2, N, P, D, device=DEV).to(dtype)
    kmin, kmax = torch.minimum(a, b), torch.maximum(a, b)
    page_valid = torch.rand(B, P + 5, device=DEV) > 0.2
    page_valid[1, :20] = False  # a left-padded row
    current = torch.tensor([31], device=DEV)
    masked = scores.page_scores(q, kmin, kmax, page_valid, current)
    ref = ops.page_scores_ref(q, kmin, kmax)
    cand = page_valid.repeat_interleave(H, 0)[:, :P] & (torch.arange(P, device=DEV) < 31)
    assert torch.equal(masked.isinf(), ~cand)
    torch.testing.assert_close(masked[cand], ref[cand], rtol=1e-5, atol=1e-4)
    got = select.select_pages(q, kmin, kmax, page_valid, current, k)
    assert torch.equal(got, ops.topk_pages_ref(masked, k))
    assert torch.equal(got, ops.select_pages_ref(q.double(), kmin.double(), kmax.double(), page_valid, current, k)) \
        or dtype == torch.bfloat16  # fp64 reference scores: the same ranking unless near-ties (checked in fp32)
    few = select.select_pages(q, kmin, kmax, page_valid, torch.tensor([4], device=DEV), k)
    assert torch.equal(few, ops.select_pages_ref(q, kmin, kmax, page_valid, torch.tensor([4], device=DEV), k))
    assert (few[:, 4:] == -1).all()
    table = select.select_pages(q, kmin, kmax, page_valid, current, k, append_current=True)
    assert torch.equal(table, ops.select_pages_ref(q, kmin, kmax, page_valid, current, k, append_current=True))
    assert torch.equal(table[:, :-1], got) and (table[:, -1] == 31).all()
    # rows read in place from the layer's query: heads 3 and 0 of a 4-head layer (B x 2 = N rows)
    layer_q = torch.randn(B, 4, G, D, device=DEV).to(dtype)
    layer_q[:, [3, 0]] = q.view(B, H, G, D)
    heads = torch.tensor([3, 0], device=DEV)
    mapped = select.select_pages(layer_q, kmin, kmax, page_valid, current, k, heads=heads)
    assert torch.equal(mapped, got)
    assert torch.equal(ops.select_pages_ref(layer_q, kmin, kmax, page_valid, current, k, heads=heads),
                       ops.select_pages_ref(q, kmin, kmax, page_valid, current, k))


@pytest.mark.parametrize("N,P,k", [(2, 700, 5), (3, 37, 8), (2, 20, 32), (1, 1, 1)])
def test_kernel_topk_pages(N, P, k):
    """The sort tournament equals the reference exactly, ties included (to the lower page; -0.0 == 0.0):
    chunk pass (P > 512), one final pass, k > P, missing candidates (-inf) as -1, the appended page."""
    s = torch.randn(N, P, device=DEV)
    s[0, ::3] = float("-inf")
    s[-1] = torch.randint(-1, 2, (P,), device=DEV).float()  # ties, zeros of both signs
    s[-1, ::2] *= -1
    if N > 1:
        s[1, 3:] = float("-inf")  # three candidates only
    ref = ops.topk_pages_ref(s, min(k, P))
    assert torch.equal(select.topk_pages(s, k), ref)
    appended = select.topk_pages(s, k, torch.tensor([P], device=DEV))
    assert torch.equal(appended[:, :-1], ref) and (appended[:, -1] == P).all()


def test_kernel_pdl_default_and_cuda_only(monkeypatch):
    """Programmatic dependent launch is on unless FLEXICACHE_HF_PDL=0, and never reaches the interpreter/CPU."""
    assert _util.PDL is (os.environ.get("FLEXICACHE_HF_PDL", "1") != "0")
    monkeypatch.setattr(_util, "PDL", True)
    assert _util.pdl(torch.device("cpu")) == {"PDL": False}


# ------------------------------------------------------------------------------------------------
# plan_promotion
# ------------------------------------------------------------------------------------------------
def make_promotion_case(B, H, S, K, P, g, slot_page=None):
    """A block table with holes (or `slot_page`) and a selection from pages [0, P) drawn to overlap it: -1
    scattered in both, some selected pages already resident; in a new table row 0 holds the current page
    without selecting it (its slot must be kept) and selects a page it does not hold. A row selects at most
    as many pages as it has slots besides the current page's (the callers' guarantee: free slots suffice)."""
    def rnd(n):
        return torch.randperm(n, generator=g)

    cur = int(rnd(P)[0])
    sp = torch.full((B * H, S), -1, dtype=torch.long) if slot_page is None else slot_page.cpu().view(B * H, S).clone()
    sel = torch.full((B * H, K), -1, dtype=torch.long)
    for i in range(B * H):
        forced = i == 0 and slot_page is None
        if slot_page is None:
            n = int(rnd(S + 1)[0])
            sp[i, rnd(S)[:n]] = rnd(P)[:n]
        if forced and cur not in sp[0]:
            sp[0, rnd(S)[0]] = cur
        held = set(sp[i].tolist()) - {-1}
        pages = [p for p in rnd(P).tolist() if not (forced and p == cur)]
        n = min(K, S - (cur in held), int(rnd(K + 1)[0]))
        if forced:
            new = next(p for p in pages if p not in held)
            pages.remove(new)
            pages.insert(0, new)
            n = max(n, 1)
        sel[i, rnd(K)[:n]] = torch.tensor(pages[:n], dtype=torch.long)
    return sp.view(B, H, S).to(DEV), sel.view(B, H, K).to(DEV), torch.tensor([cur], device=DEV)


@pytest.mark.parametrize("B,H,S,K", [(2, 3, 9, 5), (1, 1, 3, 1), (3, 2, 70, 64), (2, 2, 5, 8)])
@pytest.mark.parametrize("active", [None, True, False])
def test_kernel_plan_promotion(B, H, S, K, active):
    """The updated block table and the copy jobs equal the reference's bit for bit: odd shapes, more selections
    than slots (K > S, mostly -1), holes, resident selections, the current page kept unselected; inactive:
    nothing changes and every job is -1."""
    g = torch.Generator().manual_seed(B * 1000 + S * 10 + K)
    slot_page, selected, current = make_promotion_case(B, H, S, K, S + K // 2 + 2, g)
    flag = None if active is None else torch.tensor([active], device=DEV)
    before, expect = slot_page.clone(), slot_page.clone()
    ref_src, ref_dst = ops.plan_promotion_ref(expect, selected, current, flag)
    src, dst = promote.plan_promotion(slot_page, selected, current, flag)
    assert src.dtype == dst.dtype == torch.long and src.shape == dst.shape == (B * H * K,)
    assert torch.equal(src, ref_src) and torch.equal(dst, ref_dst) and torch.equal(slot_page, expect)
    if active is False:
        assert torch.equal(slot_page, before) and (src == -1).all() and (dst == -1).all()
    else:
        assert (src >= 0).any() and (slot_page[0, 0] == current).any()  # row 0: a promotion, the current page kept


def test_kernel_plan_promotion_through_ops():
    """Rounds of promotions on one block table through the dispatcher (a strided selection, a round with the
    flag off) stay identical to the reference's table."""
    g = torch.Generator().manual_seed(5)
    B, H, S, K, P = 2, 3, 9, 7, 20
    slot_page, selected, current = make_promotion_case(B, H, S, K, P, g)
    expect = slot_page.clone()
    for step in range(4):
        active = torch.tensor([step != 2], device=DEV)
        strided = selected.transpose(0, 1).contiguous().transpose(0, 1)
        got = ops.plan_promotion(slot_page, strided, current, active, use_kernels=True)
        ref = ops.plan_promotion_ref(expect, selected, current, active)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and torch.equal(slot_page, expect)
        _, selected, current = make_promotion_case(B, H, S, K, P, g, slot_page=slot_page)
