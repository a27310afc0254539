"""flexicache_hf.ops: the PyTorch references that define every op, on tiny cases worked by hand, and the dispatch.

The kernels are checked against these references in test_kernels.py; here the references themselves are
checked against what they promise (the slot rule, masking, ties, padding, -1 entries), on the CPU."""

import pytest
import torch

from conftest import sketch_case
from flexicache_hf import ops

NEG = float("-inf")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------
# the slot rule
# ------------------------------------------------------------------------------------------------
def test_slot_index_addresses_a_row_major_buffer_as_a_page_pool():
    """Page p of row r = b * H + h of a [B, H, pages * ps, D] buffer is pool slot slot_index(r, p, pages) of the
    buffer viewed as [-1, ps, D] (the unstable heads' GPU pages); tensors broadcast."""
    B, H, pages, ps, D = 2, 3, 5, 4, 2
    buf = torch.randn(B, H, pages * ps, D)
    pool = buf.view(-1, ps, D)
    for b in range(B):
        for h in range(H):
            for p in range(pages):
                assert torch.equal(pool[ops.slot_index(b * H + h, p, pages)], buf[b, h, p * ps : (p + 1) * ps])
    rows = torch.arange(B * H).view(-1, 1)
    entries = torch.tensor([[4, 0, 2]])
    assert torch.equal(ops.slot_index(rows, entries, pages), rows * pages + entries)


def test_host_index_addresses_the_page_major_host_pool():
    """Page p of row r in the host pool [pages, B, H, ps, D] is slot host_index(p, r, B * H) of it as [-1, ps, D]."""
    P, B, H, ps, D = 4, 2, 3, 2, 5
    host = torch.randn(P, B, H, ps, D)
    pool = host.view(-1, ps, D)
    for p in range(P):
        for b in range(B):
            for h in range(H):
                assert torch.equal(pool[ops.host_index(p, b * H + h, B * H)], host[p, b, h])
    pages = torch.tensor([[3, 1]])
    assert torch.equal(ops.host_index(pages, torch.tensor([[5], [0]]), B * H), pages * (B * H) + torch.tensor([[5], [0]]))


# ------------------------------------------------------------------------------------------------
# page metadata
# ------------------------------------------------------------------------------------------------
def test_page_minmax_ref_by_hand():
    """Two pages of 3 tokens, one channel: min/max over the valid tokens only; a page with none gets zeros."""
    keys = torch.tensor([[5.0, -1.0, 2.0, 7.0, 8.0, 9.0]]).view(1, 1, 6, 1)
    valid = torch.tensor([[False, True, True, True, True, True]])
    kmin, kmax = ops.page_minmax_ref(keys, valid, 3)
    assert kmin.view(-1).tolist() == [-1.0, 7.0] and kmax.view(-1).tolist() == [2.0, 9.0]
    kmin, kmax = ops.page_minmax_ref(keys, torch.tensor([[False] * 3 + [True] * 3]), 3)
    assert kmin.view(-1).tolist() == [0.0, 7.0] and kmax.view(-1).tolist() == [0.0, 9.0]  # page 0: no valid token
    assert kmin.shape == (1, 1, 2, 1) and kmin.dtype == keys.dtype


def test_page_sketch_ref_by_hand():
    """2 bits in a box [0, 4]: levels floor(k / 4 * 4) clamped to 3, packed channel j + s * (D*bits//8) into
    bits [2s, 2s+2) of byte j; decoded at the level's midpoint."""
    keys = torch.tensor([0.0, 1.5, 2.0, 4.0, 3.9, 0.1, 1.0, 2.9]).view(1, 1, 2, 4)  # 2 tokens, D = 4: 1 byte each
    kmin, kmax = torch.zeros(1, 1, 1, 4), torch.full((1, 1, 1, 4), 4.0)
    codes = ops.page_sketch_ref(keys, torch.ones(1, 2, dtype=torch.bool), kmin, kmax, 2, 2)
    levels = [[0, 1, 2, 3], [3, 0, 1, 2]]
    assert codes.shape == (1, 1, 1, 2, 1) and codes.dtype == torch.uint8
    assert codes.view(-1).tolist() == [sum(l << (2 * j) for j, l in enumerate(t)) for t in levels]
    khat = ops.sketch_keys_ref(kmin, kmax, codes)
    assert khat.view(2, 4).tolist() == [[(l + 0.5) for l in t] for t in levels]


def test_page_scores_ref_spread():
    """spread 1 is the bound (the centre/half-width form equals the elementwise max when kmin <= kmax);
    spread 0 is the box centre's q.c; scores fall monotonically with the spread."""
    q = torch.randn(3, 4, 32, dtype=torch.float64)
    a, b = torch.randn(2, 3, 11, 32, dtype=torch.float64)
    kmin, kmax = torch.minimum(a, b), torch.maximum(a, b)
    bound = ops.page_scores_ref(q, kmin, kmax)
    c, r = (kmax + kmin) / 2, (kmax - kmin) / 2
    per_q = lambda s: (torch.einsum("ngd,npd->ngp", q, c) + s * torch.einsum("ngd,npd->ngp", q.abs(), r)).amax(1)  # noqa: E731
    torch.testing.assert_close(bound, per_q(1.0))
    torch.testing.assert_close(ops.page_scores_ref(q, kmin, kmax, 0.0), per_q(0.0))
    assert (ops.page_scores_ref(q, kmin, kmax, 0.5) <= bound + 1e-12).all()
    assert (ops.page_scores_ref(q, kmin, kmax, 0.0) <= ops.page_scores_ref(q, kmin, kmax, 0.5) + 1e-12).all()


def test_page_scores_ref_bounds_every_key_of_the_page():
    """The MinMax bound is an upper bound of q.k over the page's keys, max over the GQA group, in fp32."""
    keys = torch.randn(2, 5, 8, 16)  # [N, P, ps, D]
    q = torch.randn(2, 3, 16)
    kmin, kmax = keys.amin(2), keys.amax(2)
    s = ops.page_scores_ref(q, kmin, kmax)
    exact = torch.einsum("ngd,nptd->ngpt", q, keys).amax(-1).amax(1)
    assert s.dtype == torch.float32 and s.shape == (2, 5)
    assert (s >= exact - 1e-5).all()


def test_page_mass_ref_properties():
    """Each query head's shares over the candidates sum to 1 (so a row's masses sum to G); with one query
    head, mass ranks pages as the logsumexp does; equal to a softmax over every sketched token, summed per page."""
    ps, D, G = 4, 16, 3
    _, _, kmin, kmax, codes = sketch_case(torch.float64, 2, ps, D, P=7)
    q = torch.randn(3, G, D, dtype=torch.float64)
    lse = ops.page_lse_ref(q, kmin[0], kmax[0], codes[0], 0.5)
    lse[1, :, 2] = float("-inf")  # row 1: page 2 is no candidate
    mass = ops.page_mass_ref(lse)
    assert torch.allclose(mass.masked_fill(mass.isneginf(), 0).sum(-1), torch.full((3,), float(G), dtype=mass.dtype))
    assert mass[1, 2] == float("-inf") and mass.isfinite().sum() == 3 * 7 - 1
    khat = ops.sketch_keys_ref(kmin[0], kmax[0], codes[0])
    probs = (torch.einsum("ngd,nptd->ngpt", q, khat) * 0.5).flatten(2).softmax(-1).view(3, G, 7, ps)
    torch.testing.assert_close(mass[0], probs[0].sum((0, 2)))
    one = ops.page_mass_ref(lse[:, :1])
    assert torch.equal(one.argsort(-1), lse[:, 0].argsort(-1))


def test_page_mass_ref_of_a_row_without_candidates_is_all_minus_inf():
    lse = torch.randn(2, 3, 4)
    lse[1] = NEG
    mass = ops.page_mass_ref(lse)
    assert mass[1].isneginf().all() and mass[0].isfinite().all()


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_page_sketch_ref_properties(bits):
    """Decoded keys lie within half a level of the true ones (exactly kmin in a flat channel); padding
    tokens repeat their page's first valid token; the sketched score lies between the page's true best
    q.k minus the decoding error and the MinMax bound; more bits, closer scores."""
    ps, D = 8, 32
    keys, valid, kmin, kmax, codes = sketch_case(torch.float64, bits, ps, D, P=6)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 6, ps, D * bits // 8)
    khat = ops.sketch_keys_ref(kmin, kmax, codes).flatten(2, 3)  # [B, H, P*ps, D]
    half_level = ((kmax - kmin) / 2 ** (bits + 1)).repeat_interleave(ps, 2)
    ok = valid[:, None, :, None].expand_as(khat)
    assert ((khat - keys).abs() <= half_level + 1e-12)[ok].all()
    assert (khat[..., 5] == 0.25)[valid[:, None].expand(-1, 3, -1)].all()
    first = khat[1, :, 2 * ps + 1]  # page 2's first valid token stands in for its padding token
    assert torch.equal(khat[1, :, 2 * ps], first)
    q = torch.randn(3, 4, D, dtype=torch.float64)
    s = ops.page_scores_ref(q, kmin[0], kmax[0], codes=codes[0])
    exact = torch.einsum("ngd,ntd->ngt", q, keys[0]).view(3, 4, 6, ps).amax(-1).amax(1)
    slack = torch.einsum("ngd,npd->ngp", q.abs(), (kmax - kmin)[0] / 2 ** (bits + 1)).amax(1)
    assert (s <= ops.page_scores_ref(q, kmin[0], kmax[0]) + 1e-9).all()
    assert ((s - exact).abs() <= slack + 1e-9).all()


# ------------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------------
def test_topk_pages_ref_ties_order_and_missing():
    s = torch.tensor([[1.0, 3.0, 3.0, NEG, 2.0], [NEG, 0.0, NEG, -0.0, NEG]])
    assert ops.topk_pages_ref(s, 3).tolist() == [[1, 2, 4], [1, 3, -1]]  # best first, ties to the lower page
    assert ops.topk_pages_ref(s, 5).tolist() == [[1, 2, 4, 0, -1], [1, 3, -1, -1, -1]]
    assert ops.topk_pages_ref(s, 1).dtype == torch.int64


def test_select_pages_ref_candidates_are_valid_pages_before_the_current_one():
    """Rows of batch 0 see pages 0..current-1 that are valid; batch 1 has pages 0 and 1 invalid (padding);
    with fewer candidates than k: every candidate, then -1; append_current adds the current page."""
    B, Hg, P, D = 2, 2, 6, 4
    q = torch.ones(B * Hg, 1, D)
    kmax = torch.arange(P, dtype=torch.float32).view(1, P, 1).expand(B * Hg, P, D).contiguous()  # later page, higher
    kmin = kmax - 1
    page_valid = torch.tensor([[True] * 7, [False, False] + [True] * 5])
    current = torch.tensor([4])
    got = ops.select_pages_ref(q, kmin, kmax, page_valid, current, 3)
    assert got.tolist() == [[3, 2, 1]] * 2 + [[3, 2, -1]] * 2
    table = ops.select_pages_ref(q, kmin, kmax, page_valid, current, 3, append_current=True)
    assert torch.equal(table[:, :-1], got) and (table[:, -1] == 4).all()
    assert ops.select_pages_ref(q, kmin, kmax, page_valid, torch.tensor([0]), 2).tolist() == [[-1, -1]] * 4
    assert ops.select_pages_ref(q, kmin, kmax, page_valid, current, 9).shape == (4, P)  # k > P: min(k, P)


def test_select_pages_ref_reads_the_group_heads_of_the_layer_query():
    """With `heads`, rows are (b, heads[h]) of the layer's query [B, H, G, D]: the same as the gathered rows."""
    B, H, G, P, D = 2, 4, 3, 7, 8
    q = torch.randn(B, H, G, D)
    heads = torch.tensor([3, 1])
    a, b = torch.randn(2, B * 2, P, D)
    kmin, kmax = torch.minimum(a, b), torch.maximum(a, b)
    page_valid = torch.ones(B, P, dtype=torch.bool)
    cur = torch.tensor([6])
    rows = q[:, heads].reshape(-1, G, D)
    assert torch.equal(ops.select_pages_ref(q, kmin, kmax, page_valid, cur, 3, heads=heads),
                       ops.select_pages_ref(rows, kmin, kmax, page_valid, cur, 3))


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------
def _dense(q, k, v, ok, scale):
    """q [G, D], k/v [T, D], ok [T] -> softmax attention over the tokens ok says."""
    logits = (q.double() @ k.double().T * scale).masked_fill(~ok, NEG)
    return logits.softmax(-1) @ v.double()


def test_sparse_decode_attention_ref_by_hand():
    """One row reads pages 2 and 0 (in that order) of a 3-page pool: dense attention over their valid tokens;
    positions past the context, padding and entries of -1 are never read; NaN in what is masked does not leak."""
    ps, D, G, T = 4, 8, 2, 10  # page 2 is partial: positions 10, 11 do not exist
    k_pool, v_pool = torch.randn(3, ps, D, dtype=torch.float64), torch.randn(3, ps, D, dtype=torch.float64)
    k_pool[2, 2:] = v_pool[2, 2:] = float("nan")  # unwritten
    kv_valid = torch.ones(1, T, dtype=torch.bool)
    kv_valid[0, 1] = False  # padding
    k_pool[0, 1] = v_pool[0, 1] = float("nan")
    q = torch.randn(1, G, D, dtype=torch.float64)
    slots = torch.tensor([[2, -1, 0]])
    page_ids = torch.tensor([[2, 1, 0]])  # entry 1 unused: page 1 is not read
    out = ops.sparse_decode_attention_ref(q, k_pool, v_pool, slots, page_ids, kv_valid, 0.3)
    toks = torch.tensor([0, 2, 3, 8, 9])  # page 0 without its padding token, page 2's two written tokens
    k, v = k_pool.reshape(-1, D)[toks], v_pool.reshape(-1, D)[toks]
    assert not out.isnan().any()
    torch.testing.assert_close(out[0], _dense(q[0], k, v, torch.ones(5, dtype=torch.bool), 0.3), atol=1e-12, rtol=0)
    empty = ops.sparse_decode_attention_ref(q, k_pool, v_pool, torch.full((1, 3), -1), page_ids, kv_valid, 0.3)
    assert (empty == 0).all()  # nothing to attend: zeros


def test_paged_decode_attention_ref_addressing_by_entry_and_by_page_agree():
    """The same pages through a slot table (by_entry, stable heads) and through page ids into a full buffer
    (unstable heads) give the same output; a head in no group gets zeros; fp32 q gives fp32 out."""
    B, H, G, D, ps, P = 2, 3, 2, 8, 4, 5
    T = P * ps - 1
    buf_k, buf_v = torch.randn(B, 1, P * ps, D), torch.randn(B, 1, P * ps, D)
    q = torch.randn(B, H, G, D)
    kv_valid = torch.ones(B, T, dtype=torch.bool)
    kv_valid[1, :3] = False
    ids = torch.tensor([[3, 0, 4], [1, -1, 4]]).view(B, 1, 3)
    by_page = ops.PageGroup(buf_k.reshape(-1, ps, D), buf_v.reshape(-1, ps, D), ids, torch.tensor([0]), by_entry=False)
    # a slot pool of 4 slots per row holding the same pages at other slots; slot 3 holds garbage
    slot_pages = torch.tensor([[4, 3, 0, -1], [-1, 4, 1, -1]])
    sk, sv = torch.full((B, 4, ps, D), float("nan")), torch.full((B, 4, ps, D), float("nan"))
    for b in range(B):
        for s, p in enumerate(slot_pages[b].tolist()):
            if p >= 0:
                sk[b, s], sv[b, s] = buf_k[b, 0, p * ps : (p + 1) * ps], buf_v[b, 0, p * ps : (p + 1) * ps]
    by_entry = ops.PageGroup(sk.reshape(-1, ps, D), sv.reshape(-1, ps, D), slot_pages.view(B, 1, 4), torch.tensor([2]),
                             by_entry=True)
    q[:, 2] = q[:, 0]
    out = ops.paged_decode_attention_ref(q, [by_page, by_entry], kv_valid, D**-0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[:, 2], out[:, 0], atol=1e-6, rtol=0)
    assert (out[:, 1] == 0).all()
    for b in range(B):  # and both equal dense attention over those pages
        pages = sorted(p for p in ids[b, 0].tolist() if p >= 0)
        pos = torch.cat([torch.arange(p * ps, min((p + 1) * ps, T)) for p in pages])
        want = _dense(q[b, 0], buf_k[b, 0, pos], buf_v[b, 0, pos], kv_valid[b, pos], D**-0.5)
        torch.testing.assert_close(out[b, 0].double(), want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# copies and dispatch
# ------------------------------------------------------------------------------------------------
def test_plan_promotion_ref_pairs_missing_pages_with_free_slots_in_order():
    """Unselected pages free their slots (not the current page's); the r-th missing selection of a row takes its
    r-th free slot; the copy jobs address the page-major host pool and the row's slots; inactive: no change."""
    sp = torch.tensor([[[7, -1, 3, 9, 5]], [[-1, -1, -1, -1, -1]]])  # B=2, H=1, S=5
    sel = torch.tensor([[[3, 4, -1, 6]], [[1, -1, 2, -1]]])
    src, dst = ops.plan_promotion_ref(sp, sel, torch.tensor([9]))
    assert sp.tolist() == [[[4, 6, 3, 9, -1]], [[1, 2, -1, -1, -1]]]  # 7, 5 freed; 9 is the current page
    assert src.tolist() == [-1, ops.host_index(4, 0, 2), -1, ops.host_index(6, 0, 2), ops.host_index(1, 1, 2), -1,
                            ops.host_index(2, 1, 2), -1]
    assert dst.tolist() == [-1, 0, -1, 1, 5, -1, 6, -1]  # slot_index(row, slot, 5)
    before = sp.clone()
    src, dst = ops.plan_promotion_ref(sp, torch.full_like(sel, -1), torch.tensor([0]), torch.tensor([False]))
    assert torch.equal(sp, before) and (src == -1).all() and (dst == -1).all()


def test_copy_pages_ref_skips_minus_one():
    src, dst = torch.randn(5, 2, 3), torch.zeros(4, 2, 3)
    ops.copy_pages_ref(src, torch.tensor([4, -1, 0]), dst, torch.tensor([1, 2, 3]))
    assert torch.equal(dst[1], src[4]) and torch.equal(dst[3], src[0]) and (dst[[0, 2]] == 0).all()
    ops.copy_pages_ref(src, torch.tensor([-1, -1]), dst, torch.tensor([0, 2]))  # nothing to copy
    assert (dst[[0, 2]] == 0).all()


def test_dispatch_runs_the_references_off_cuda():
    """On the CPU "auto" and False take the references (same results, bit for bit); kernels_available says so."""
    cpu = torch.device("cpu")
    assert not ops.kernels_available(cpu, "auto") and not ops.kernels_available(cpu, False)
    keys, valid = torch.randn(1, 2, 12, 8), torch.rand(1, 12) > 0.3
    for use in ("auto", False):
        got, want = ops.page_summary(keys, valid, 4, 2, use), ops.page_summary_ref(keys, valid, 4, 2)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    q = torch.randn(2, 3, 8)
    a, b = torch.randn(2, 2, 3, 8)
    args = (q, torch.minimum(a, b), torch.maximum(a, b), torch.ones(1, 3, dtype=torch.bool), torch.tensor([2]), 2)
    assert torch.equal(ops.select_pages(*args), ops.select_pages_ref(*args))
