"""flexicache_hf.decode: the step kinds (DecodeFlags), the scorer objects, decode_step on a LayerMemory, and
an independent oracle of the whole selection policy through generate() below full budget."""

import dataclasses

import pytest
import torch

from conftest import Recorder, make_cache, tiny_pair
from flexicache_hf import FlexiCacheConfig, FlexiCacheLayer, ops
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.config import DEFAULT_SKETCH_BITS
from flexicache_hf.decode import DecodeFlags, decode_step
from flexicache_hf.scorers import SCORERS, MinMaxBound, SketchMass, SketchMax
from flexicache_hf.memory import LayerMemory


# ------------------------------------------------------------------------------------------------
# DecodeFlags
# ------------------------------------------------------------------------------------------------
def test_decode_flags_at_by_hand():
    """Page size 4, rerank every 3 steps, last full selection at length 10 (a prefill of 10 tokens)."""
    #        length: new_page, fill, rerank, first
    table = {10: (False, False, True, True), 11: (False, True, False, False), 12: (True, False, False, False),
             13: (False, False, True, False), 14: (False, False, False, False), 15: (False, True, False, False),
             16: (True, False, True, False), 19: (False, True, True, False)}
    for length, want in table.items():
        assert DecodeFlags.at(length, 10, 4, 3, True) == DecodeFlags(*want), length
        # without stable heads nothing is reranked (unstable heads select at every step anyway)
        assert DecodeFlags.at(length, 10, 4, 3, False) == DecodeFlags(want[0], want[1], False, want[3]), length
    assert DecodeFlags.at(16, 16, 16, 16, True) == DecodeFlags(True, False, True, True)  # page size 1 is also both
    assert DecodeFlags.at(7, 0, 1, 16, True).new_page and DecodeFlags.at(7, 0, 1, 16, True).fill
    for length in range(10, 40):  # no warm-up: the same kinds as without the argument
        assert DecodeFlags.at(length, 10, 4, 3, True, 0) == DecodeFlags.at(length, 10, 4, 3, True), length


def test_decode_flags_warm_up():
    """Warm-up of 5 steps, rerank every 3, prefill of 10 tokens: steps 0-4 after the prefill re-select and promote
    at once (first); after them the periodic reranks (every 3 steps counted from the prefill: 6, 9, ...)."""
    for length in range(10, 30):
        since = length - 10
        f = DecodeFlags.at(length, 10, 4, 3, True, 5)
        assert (f.new_page, f.fill) == (length % 4 == 0, (length + 1) % 4 == 0), length
        assert f.first == (since < 5), length
        assert f.rerank == (since < 5 or since % 3 == 0), length
        # without stable heads nothing is reranked; the warm-up's steps are still their own kind
        assert DecodeFlags.at(length, 10, 4, 3, False, 5) == f._replace(rerank=False), length
    # a warm-up longer than the interval: every step of it promotes at once, the periodic reranks take over
    assert [DecodeFlags.at(n, 0, 16, 4, True, 10).first for n in range(14)] == [True] * 10 + [False] * 4
    assert [DecodeFlags.at(n, 0, 16, 4, True, 10).rerank for n in range(14)] == [True] * 10 + [False, False, True, False]


# ------------------------------------------------------------------------------------------------
# scorers
# ------------------------------------------------------------------------------------------------
def test_scorers_are_small_frozen_values():
    assert MinMaxBound() == MinMaxBound(1.0) and MinMaxBound().sketch_bits == 0
    assert SketchMax(1).sketch_bits == 1 and SketchMass().sketch_bits == 2 and isinstance(SketchMass(), SketchMax)
    assert SketchMax(2) != SketchMass(2) and hash(SketchMass(2)) == hash(SketchMass(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        MinMaxBound().spread = 0.5
    assert SCORERS == {"minmax": MinMaxBound, "sketch_max": SketchMax, "sketch_mass": SketchMass}


def test_the_config_shorthand_builds_the_scorer():
    assert FlexiCacheConfig().scorer == (SketchMass(DEFAULT_SKETCH_BITS) if DEFAULT_SKETCH_BITS else MinMaxBound(1.0))
    assert FlexiCacheConfig(score_spread=0.5).scorer == MinMaxBound(0.5)
    assert FlexiCacheConfig(sketch_bits=1, sketch_score="max").scorer == SketchMax(1)
    assert FlexiCacheConfig(sketch_bits=4).scorer == SketchMass(4)
    c = FlexiCacheConfig(scorer="sketch_mass")
    assert c.scorer == SketchMass(2) and c.sketch_bits == 2  # sketch_bits follows the scorer
    assert FlexiCacheConfig(scorer=SketchMax(1)).sketch_bits == 1


@pytest.mark.parametrize("scorer", [MinMaxBound(), MinMaxBound(0.25), SketchMax(2), SketchMax(1), SketchMass(2), SketchMass(4)],
                         ids=repr)
def test_scorer_summarise_and_select_are_the_references(scorer):
    """summarise: page_minmax_ref (+ page_sketch_ref with bits); select: select_pages_ref with the scorer's
    spread, or its codes, ranked by the best sketched q.k (SketchMax) or the predicted mass (SketchMass)."""
    B, H, G, D, ps, P = 2, 3, 2, 16, 4, 7
    keys = torch.randn(B, H, P * ps, D, dtype=torch.float64)
    valid = torch.ones(B, P * ps, dtype=torch.bool)
    valid[1, :6] = False
    kmin, kmax, codes = scorer.summarise(keys, valid, ps, False)
    rmin, rmax = ops.page_minmax_ref(keys, valid, ps)
    assert torch.equal(kmin, rmin) and torch.equal(kmax, rmax)
    if scorer.sketch_bits:
        assert torch.equal(codes, ops.page_sketch_ref(keys, valid, rmin, rmax, ps, scorer.sketch_bits))
    else:
        assert codes is None
    q = torch.randn(B, H, G, D, dtype=torch.float64)
    heads = torch.tensor([0, 2])
    rows = lambda t: None if t is None else t[:, heads].flatten(0, 1)  # noqa: E731
    page_valid = valid.view(B, P, ps).any(-1)
    current = torch.tensor([6])
    for append in (False, True):
        got = scorer.select(q, rows(kmin), rows(kmax), rows(codes), page_valid, current, 3, heads, 0.3, append, False)
        want = ops.select_pages_ref(q, rows(kmin), rows(kmax), page_valid, current, 3, append, heads,
                                    spread=getattr(scorer, "spread", 1.0), codes=rows(codes),
                                    mass_scale=0.3 if isinstance(scorer, SketchMass) else None)
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------
# decode_step on a LayerMemory
# ------------------------------------------------------------------------------------------------
B, H, G, D = 2, 3, 2, 8


def _memory(unstable, T, scorer, ps=4, topk=64, rerank=3, seed=0):
    """A LayerMemory after a prefill of T tokens (row 1: 5 padding tokens), as the layer leaves it; the keys
    and values it holds and the generator for more."""
    g = torch.Generator().manual_seed(seed)
    cfg = FlexiCacheConfig(page_size=ps, topk_pages=topk, rerank_interval=rerank, scorer=scorer, host_headroom_pages=1)
    k, v = torch.randn(2, B, H, T, D, generator=g, dtype=torch.float64)
    mem = LayerMemory(k, unstable, cfg, lambda keys, valid: scorer.summarise(keys, valid, ps, False))
    mem.append(k, v)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :5] = False
    mem.mark_valid(valid, 0)
    mem.summarise_pages(0, keys=k)
    return mem, cfg, k, v, g


def _steps(mem, cfg, k, v, g, n, selected_at, warmup=0, **kw):
    """n decode steps with random queries; yields (flags, q, out, keys, values) after each."""
    for _ in range(n):
        flags = DecodeFlags.at(mem.length, selected_at, cfg.page_size, cfg.rerank_interval, mem.stable is not None,
                               warmup)
        q = torch.randn(B, H, G, D, generator=g, dtype=torch.float64)
        nk, nv = torch.randn(2, B, H, 1, D, generator=g, dtype=torch.float64)
        mem.append_token(nk, nv, flags.new_page, flags.fill)
        k, v = torch.cat([k, nk], 2), torch.cat([v, nv], 2)
        length = mem.length
        out = decode_step(q, mem, cfg.scorer, flags, cfg.topk_pages, 0.35, use_kernels=False, **kw)
        assert mem.length == length + 1 and int(mem.pos) == mem.length  # the step advanced the position
        yield flags, q, out, k, v


@pytest.mark.parametrize("scorer", [MinMaxBound(), SketchMax(2), SketchMass(2)], ids=repr)
@pytest.mark.parametrize("unstable", [[1], [], [0, 1, 2]], ids=["mixed", "all_stable", "all_unstable"])
def test_decode_step_at_full_budget_is_dense_attention(scorer, unstable):
    """A budget covering every page: each step's output is dense attention over every valid token, in fp64."""
    mem, cfg, k, v, g = _memory(unstable, 13, scorer)
    for flags, q, out, k, v in _steps(mem, cfg, k, v, g, 14, selected_at=13):
        ok = mem.kv_valid[:, : k.shape[2]]
        logits = torch.einsum("bhgd,bhtd->bhgt", q, k) * 0.35
        want = logits.masked_fill(~ok[:, None, None], float("-inf")).softmax(-1) @ v
        torch.testing.assert_close(out, want, atol=1e-12, rtol=0)


def test_decode_step_records_each_groups_selection():
    """record() sees the unstable heads' top-K page ids (the current page is not among them) at every step and
    the stable heads' top-K at every rerank."""
    mem, cfg, k, v, g = _memory([0, 2], 17, MinMaxBound(), topk=2, rerank=3)
    seen = {"unstable": [], "stable": []}
    record = lambda group, t: seen[group].append(t.clone())  # noqa: E731
    reranks = 0
    for flags, *_ in _steps(mem, cfg, k, v, g, 6, selected_at=17, record=record):
        current = (mem.length - 1) // cfg.page_size
        last = seen["unstable"][-1]
        assert last.shape == (B, 2, 2) and ((last >= 0) & (last < current)).all()
        reranks += flags.rerank
    assert len(seen["unstable"]) == 6 and len(seen["stable"]) == reranks == 2
    assert all(t.shape == (B, 1, 2) for t in seen["stable"])


def test_decode_step_promotes_at_once_after_a_prefill_and_in_the_background_at_a_rerank(monkeypatch):
    """The first step after a multi-token forward promotes before attention (nothing is resident yet); a periodic
    rerank promotes after it (this step still reads the old set); other steps never promote. With a warm-up,
    every step of it promotes before attention."""
    mem, cfg, k, v, g = _memory([1], 21, MinMaxBound(), topk=2, rerank=3)
    calls = []
    promote = LayerMemory.promote
    monkeypatch.setattr(LayerMemory, "promote", lambda self, sel, background, active=None, after=None: (
        calls.append(background), promote(self, sel, background, active, after)))
    kinds = []
    for flags, *_ in _steps(mem, cfg, k, v, g, 10, selected_at=21):
        kinds.append(flags)
    assert calls == [not f.first for f in kinds if f.rerank] and calls[0] is False and len(calls) == 4
    mem, cfg, k, v, g = _memory([1], 21, MinMaxBound(), topk=2, rerank=3)
    calls.clear()
    list(_steps(mem, cfg, k, v, g, 10, selected_at=21, warmup=4))
    # steps 0-3 at once, then the periodic reranks at steps 6 and 9, in the background
    assert calls == [False] * 4 + [True, True]
    mem, cfg, k, v, g = _memory([0, 1, 2], 21, MinMaxBound(), topk=2, rerank=3)
    calls.clear()
    list(_steps(mem, cfg, k, v, g, 10, selected_at=21))
    assert calls == []  # unstable heads only: nothing to promote


# ------------------------------------------------------------------------------------------------
# the selection policy end to end, below full budget
# ------------------------------------------------------------------------------------------------
def _oracle_decode(q, keys, values, valid, state, layer, cfg, scale):
    """Dense masked attention over the pages the method says each head reads at this step."""
    B, Hq, _, D = q.shape
    H, ps, K = keys.shape[1], cfg.page_size, cfg.topk_pages
    L = keys.shape[2]
    current = (L - 1) // ps
    n_full = L // ps
    kmin, kmax = ops.page_minmax_ref(keys[:, :, : n_full * ps], valid[:, : n_full * ps], ps)
    codes = None
    if cfg.sketch_bits:
        codes = ops.page_sketch_ref(keys[:, :, : n_full * ps], valid[:, : n_full * ps], kmin, kmax, ps, cfg.sketch_bits)
    page_ok = valid[:, : n_full * ps].view(B, n_full, ps).any(-1)
    qg = q.reshape(B, H, Hq // H, D)
    pages = torch.zeros(B, H, current + 1, dtype=torch.bool)
    # the first step and the warm-up's select with immediate effect; a periodic rerank from the next step on
    immediate = state["step"] == 0 or state["step"] < cfg.warmup_steps
    for h in range(H):
        unstable = h in layer.unstable
        if unstable or immediate or state["step"] % cfg.rerank_interval == 0:
            if current <= K:
                sel = torch.zeros(B, current, dtype=torch.bool) | page_ok[:, :current]
            else:
                if codes is not None and cfg.sketch_score == "mass":
                    # each query head's softmax over every sketched token of the candidate pages, summed
                    # over the page and the group
                    khat = ops.sketch_keys_ref(kmin[:, h, :current], kmax[:, h, :current], codes[:, h, :current])
                    logits = torch.einsum("bgd,bptd->bgpt", qg[:, h].double(), khat.double()) * scale
                    logits = logits.masked_fill(~page_ok[:, None, :current, None], float("-inf"))
                    probs = logits.flatten(2).softmax(-1).view_as(logits)
                    s = probs.sum(-1).sum(1).masked_fill(~page_ok[:, :current], float("-inf"))
                else:
                    s = ops.page_scores_ref(qg[:, h], kmin[:, h, :current], kmax[:, h, :current], cfg.score_spread,
                                            None if codes is None else codes[:, h, :current])
                    s = s.masked_fill(~page_ok[:, :current], float("-inf"))
                # ties go to the lower page (a padding token's zero query scores every page 0)
                idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :K]
                top = s.gather(-1, idx)
                sel = torch.zeros(B, current, dtype=torch.bool)
                sel.scatter_(1, idx, top > float("-inf"))
            if not unstable:  # a periodic rerank takes effect from the next step (its pages are copied
                state.setdefault("sel" if immediate else "next", {})[h] = (sel, current)  # meanwhile); the first at once
        if not unstable:
            sel, since = state["sel"][h]
            pages[:, h, : sel.shape[1]] = sel
            pages[:, h, since:] = True  # tail: pages created since the rerank, and the current page
        else:
            pages[:, h, :current] = sel
            pages[:, h, current] = True
    tok = pages.repeat_interleave(ps, dim=-1)[:, :, :L] & valid[:, None, :L]  # [B, H, L]
    logits = torch.einsum("bhgd,bhtd->bhgt", qg.double(), keys.double()) * scale
    logits = logits.masked_fill(~tok[:, :, None], float("-inf"))
    out = torch.einsum("bhgt,bhtd->bhgd", logits.softmax(-1), values.double())
    state["step"] += 1
    state["sel"].update(state.pop("next", {}))
    return out.reshape(B, 1, Hq, D)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
@pytest.mark.parametrize("warmup", [0, 7])
@pytest.mark.parametrize("spread,bits,rank", [(1.0, 0, "mass"), (0.5, 0, "mass"), (1.0, 2, "max"), (1.0, 1, "max"),
                                             (1.0, 2, "mass"), (1.0, 1, "mass")])
def test_sparse_decode_matches_oracle(device, spread, bits, rank, warmup):
    """On CUDA the reranks' promotions run on the copy stream, overlapped: the same pages must be read.
    spread 0.5: the cache scores pages with the configured score_spread; bits: by the key sketch, ranked
    by the best sketched q.k ("max") or by the attention mass the sketched keys predict ("mass"). warmup: the
    stable heads re-select with immediate effect at the first 7 steps (then every 5 steps, from step 10)."""
    _, fc = tiny_pair("llama", 8, 2, 32, dtype=torch.float64, layers=2)
    fc = fc.to(device)
    ids = torch.randint(1, 256, (2, 150), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, :29], mask[1, :29] = 0, 0
    ids, mask = ids.to(device), mask.to(device)
    cache = make_cache(fc, topk_pages=4, page_size=8, rerank_interval=5, use_kernels=False, score_spread=spread,
                       sketch_bits=bits, sketch_score=rank, warmup_steps=warmup)
    rec = Recorder(cache)
    seen = []
    orig = FlexiCacheLayer._decode

    def spy(self, query, scale, flags):
        out = orig(self, query, scale, flags)
        seen.append((self.layer_idx, query.clone(), out.clone(), self.length, self.memory.kv_valid[:, : self.length].clone(), scale))
        return out

    FlexiCacheLayer._decode = spy
    try:
        fc.generate(ids, attention_mask=mask, max_new_tokens=60, min_new_tokens=60, do_sample=False, **cache_kwargs(cache))
    finally:
        FlexiCacheLayer._decode = orig
    states = {i: {"step": 0, "sel": {}} for i in range(2)}
    assert len(seen) == 2 * 59
    for layer_idx, q, out, L, valid, scale in seen:
        k, v = rec.kv(layer_idx)
        q, k, v, valid = q.cpu(), k.cpu(), v.cpu(), valid.cpu()
        expect = _oracle_decode(q, k[:, :, :L], v[:, :, :L], valid, states[layer_idx], cache.layers[layer_idx], cache.config, scale)
        torch.testing.assert_close(out.cpu(), expect.to(out.dtype), atol=1e-10, rtol=0)
    # metadata on the GPU per full page and KV head: kmin + kmax (fp64 here), plus the sketch's bytes
    layer = cache.layers[0]
    per_page = 2 * 32 * 8 + 8 * 32 * bits // 8
    assert cache.memory_report()["metadata_bytes"] == 2 * len(cache.layers) * 2 * layer.memory.full_pages * per_page
