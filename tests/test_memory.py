"""flexicache_hf.memory: LayerMemory through its interface (append, append_token, promote, full_kv,
select_batch, report), the growth policy and the reserved-bytes count; and, through generate(), that no
K/V is ever lost across every transition of the decode path."""

import math
import types

import pytest
import torch

from conftest import Recorder, make_cache, tiny_pair
from flexicache_hf import FlexiCache, FlexiCacheConfig, HeadProfile, ops
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.decode import DecodeFlags
from flexicache_hf.memory import LayerMemory, capacity_for, reserved_bytes
from flexicache_hf.memory.offload import OffloadedPages

B, H, D = 2, 3, 8
PAD = 5  # row 1's first tokens are padding (crossing a page boundary at page_size 4)


class Driver:
    """Drives one LayerMemory as FlexiCacheLayer and decode_step do (append + validity + metadata; per token
    append_token, a promotion at each rerank, next_position), with each rerank's selection drawn at random,
    and keeps every K/V it appended: the truth every check compares with."""

    def __init__(self, unstable, T, ps=4, topk=2, rerank=3, headroom=1, bits=0, max_cache_len=None, seed=0, warmup=0):
        self.g = torch.Generator().manual_seed(seed)
        self.B = B
        self.cfg = FlexiCacheConfig(page_size=ps, topk_pages=topk, rerank_interval=rerank, host_headroom_pages=headroom,
                                    sketch_bits=bits, max_cache_len=max_cache_len, warmup_steps=warmup)
        self.ps, self.unstable = ps, unstable
        k, v = self._kv(T)
        scorer = self.cfg.scorer
        self.mem = LayerMemory(k, unstable, self.cfg, lambda keys, valid: scorer.summarise(keys, valid, ps, False))
        self.k = self.v = None
        self.selected_at, self.sel, self.rerank_page = 0, None, None
        self.seen = {"new_page": 0, "fill": 0, "rerank": 0, "first": 0}
        self.append(T, kv=(k, v))

    def _kv(self, n):
        return (torch.randn(self.B, H, n, D, generator=self.g, dtype=torch.float64),
                torch.randn(self.B, H, n, D, generator=self.g, dtype=torch.float64))

    def _keep(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)

    # ---- the layer's calls ---------------------------------------------------------------------
    def append(self, n, kv=None):
        m = self.mem
        k, v = kv or self._kv(n)
        start = m.length
        chunk = m.append(k, v)
        self._keep(k, v)
        if start == 0:  # the layer records validity from the mask before it summarises
            valid = torch.ones(self.B, n, dtype=torch.bool)
            valid[1, :PAD] = False
            m.mark_valid(valid, 0)
            m.summarise_pages(0, keys=k)
        else:
            m.summarise_pages(start // self.ps, keys_by_group=[kk for _, kk, _ in m.context(chunk)])
        self.selected_at = m.length

    def token(self):
        m = self.mem
        flags = DecodeFlags.at(m.length, self.selected_at, self.ps, self.cfg.rerank_interval, m.stable is not None,
                               self.cfg.warmup_steps)
        for name in self.seen:
            self.seen[name] += getattr(flags, name)
        k, v = self._kv(1)
        m.append_token(k, v, flags.new_page, flags.fill)
        self._keep(k, v)
        if flags.rerank:
            self.sel = self._random_selection(int(m.current_page()))
            m.promote(self.sel, background=not flags.first)
            self.rerank_page = int(m.current_page())
        if m.stable is not None:
            self.check_resident()
        m.next_position()
        return flags

    def _random_selection(self, current):
        """[B, Hs, K]: K distinct pages before `current` per row (fewer: -1), in random order."""
        K, Hs = self.cfg.topk_pages, len(self.mem.stable_heads)
        sel = torch.full((self.B, Hs, K), -1, dtype=torch.long)
        for b in range(self.B):
            for h in range(Hs):
                pages = torch.randperm(current, generator=self.g)[:K]
                sel[b, h, : len(pages)] = pages
        return sel

    # ---- checks ---------------------------------------------------------------------------------
    def check_resident(self):
        """Stable heads' slots hold exactly the last selection, the page current at that rerank and every page
        since (the newest token's page included), each with its true K/V (the current page up to the newest token)."""
        m, ps = self.mem, self.ps
        off, length = m.stable, m.length + 1  # the token just appended is not counted until next_position
        current = (length - 1) // ps
        for b in range(self.B):
            for i, h in enumerate(m.stable_heads.tolist()):
                sp = off.slot_page[b, i]
                held = sp[sp >= 0].tolist()
                want = {p for p in self.sel[b, i].tolist() if p >= 0} | set(range(self.rerank_page, current + 1))
                assert len(held) == len(set(held)) and set(held) == want, (b, h, held, want)
                for slot in (sp >= 0).nonzero().view(-1).tolist():
                    p = int(sp[slot])
                    n = min(ps, length - p * ps)
                    assert torch.equal(off.k[b, i, slot, :n], self.k[b, h, p * ps : p * ps + n])
                    assert torch.equal(off.v[b, i, slot, :n], self.v[b, h, p * ps : p * ps + n])

    def check(self):
        m, ps = self.mem, self.ps
        fk, fv = m.full_kv()
        assert fk.shape == (m.batch, H, m.length, D)
        assert torch.equal(fk, self.k) and torch.equal(fv, self.v)
        full = m.full_pages
        assert full == m.length // ps
        valid = m.kv_valid[:, : full * ps]
        kmin, kmax = ops.page_minmax_ref(self.k[:, :, : full * ps], valid, ps)
        for heads, group in ((m.unstable_heads, m.unstable), (m.stable_heads, m.stable)):
            if group is None:
                continue
            assert torch.equal(group.meta.kmin[:, :, :full], kmin[:, heads])
            assert torch.equal(group.meta.kmax[:, :, :full], kmax[:, heads])
            if self.cfg.sketch_bits:
                codes = ops.page_sketch_ref(self.k[:, :, : full * ps], valid, kmin, kmax, ps, self.cfg.sketch_bits)
                assert torch.equal(group.meta.codes[:, :, :full], codes[:, heads])
        assert torch.equal(m.page_valid[:, :full], valid.view(m.batch, full, ps).any(-1))
        if m.stable is not None and full:  # every full page of the stable heads is in the host pool
            hk, hv = m.stable.host_pages(0, full)
            truth = lambda t: t[:, m.stable_heads, : full * ps].reshape(m.batch, -1, full, ps, D)  # noqa: E731
            assert torch.equal(hk, truth(self.k)) and torch.equal(hv, truth(self.v))


PROFILES = {"mixed": [1], "all_stable": [], "all_unstable": [0, 1, 2]}


@pytest.mark.parametrize("warmup", [0, 5])
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("T", [1, 3, 4, 13])
def test_every_kv_appended_comes_back_bit_exact(profile, T, warmup):
    """Prefill of odd lengths (under a page, one page, a partial page), decode tokens across page fills and
    reranks, a multi-token append that starts mid-page (chunked prefill, multi-turn), more tokens: full_kv is
    what was appended, bit for bit, the metadata is that of the full pages, the host pool holds every full page
    of the stable heads, and the slots exactly the selection, the page of the rerank and those since (with a
    warm-up: a selection and a promotion at each of the first 5 steps after each multi-token append)."""
    d = Driver(PROFILES[profile], T, warmup=warmup)
    d.check()
    capacity, host = d.mem.page_valid.shape[1], d.mem.stable.host_capacity if d.mem.stable is not None else 0
    for _ in range(17):
        d.token()
        d.check()
    d.append(6)
    d.check()
    for _ in range(9):
        d.token()
        d.check()
    assert all(n > 0 for n in d.seen.values()) or profile == "all_unstable"
    assert d.mem.version > 0 and d.mem.page_valid.shape[1] > capacity  # buffers grew on the way
    if d.mem.stable is not None:
        assert d.mem.stable.host_capacity > host  # and so did the host pool


@pytest.mark.parametrize("rerank,warmup", [(3, 0), (3, 5), (4, 10), (16, 16), (16, 32), (1, 3), (5, 1)])
def test_rerank_flags_on_the_device_are_decode_flags(rerank, warmup):
    """A compiled step's (rerank, first) from the device position equal the eager DecodeFlags.at's, through the
    warm-up and the periodic reranks after it, after a prefill and after a later multi-token append."""
    d = Driver([1], 7, rerank=rerank, warmup=warmup)
    m = d.mem
    for selected_at in (7, 30):
        for length in range(selected_at, selected_at + 3 * max(rerank, warmup) + 5):
            m.pos.fill_(length)
            m.sel_at.fill_(selected_at)
            rerank_now, first = m.rerank_flags()
            want = DecodeFlags.at(length, selected_at, d.ps, rerank, True, warmup)
            assert (bool(rerank_now), bool(first)) == (want.rerank, want.first), (selected_at, length)
            assert first.shape == rerank_now.shape == (1,) and first.dtype == torch.bool


def test_sketch_metadata_is_written_for_every_full_page():
    d = Driver([0], 7, bits=2)
    for _ in range(12):
        d.token()
    d.append(5)
    d.token()
    d.check()


def test_promote_makes_the_resident_set_exactly_the_selection_and_the_current_page():
    """After a rerank's promotion nothing else is resident: tail pages not selected are dropped, selected pages
    already resident stay in their slots (not copied again), new ones are copied from the host pool."""
    d = Driver([], 14, topk=3, rerank=5)
    for _ in range(9):
        d.token()
    m = d.mem
    off = m.stable
    before = off.slot_page.clone()
    current = int(m.current_page())
    keep = int(before[0, 0][before[0, 0] >= 0][0])  # a page row (0, 0) already holds
    sel = torch.tensor([[[keep, 0, -1], [1, 2, 0], [3, -1, -1]],
                        [[2, -1, -1], [current - 1, 0, 1], [-1, -1, -1]]])  # the last row: only the current page
    off.k[0, 0, (before[0, 0] == keep).nonzero().item()].fill_(7.0)  # a copy would overwrite this
    m.promote(sel, background=False)
    for b in range(B):
        for i in range(len(m.stable_heads)):
            held = off.slot_page[b, i][off.slot_page[b, i] >= 0].tolist()
            assert sorted(held) == sorted({p for p in sel[b, i].tolist() if p >= 0} | {current})
    slot = (off.slot_page[0, 0] == keep).nonzero().item()
    assert slot == (before[0, 0] == keep).nonzero().item() and (off.k[0, 0, slot] == 7.0).all()  # kept, not copied
    slot = (off.slot_page[1, 1] == 0).nonzero().item()
    assert torch.equal(off.k[1, 1, slot], d.k[1, 1, :4]) and torch.equal(off.v[1, 1, slot], d.v[1, 1, :4])


@pytest.mark.parametrize("profile", PROFILES)
def test_select_batch_reorders_and_repeats_rows(profile):
    """Beams: rows reordered and repeated, every K/V, validity, metadata, slot and host page follows; decoding
    goes on exactly from there."""
    d = Driver(PROFILES[profile], 11)
    for _ in range(6):
        d.token()
    idx = torch.tensor([1, 0, 1])
    valid = d.mem.kv_valid.clone()
    version = d.mem.version
    d.mem.select_batch(idx)
    assert d.mem.batch == 3 and d.mem.version > version
    assert torch.equal(d.mem.kv_valid, valid[idx])
    d.B, d.k, d.v = 3, d.k[idx], d.v[idx]
    if d.sel is not None:
        d.sel = d.sel[idx]
    d.check()
    for _ in range(8):
        d.token()
        d.check()


def test_report_counts_bytes_in_use_and_on_the_host():
    d = Driver([0], 13, bits=2)
    for _ in range(10):
        d.token()
    m, es = d.mem, 8  # fp64
    r = m.report()
    Hs, Hu, full, slots = 2, 1, m.length // 4, d.cfg.resident_slots
    assert r["host_kv_bytes"] == 2 * B * Hs * full * 4 * D * es
    assert r["stable_gpu_kv_bytes"] == 2 * B * Hs * slots * 4 * D * es
    assert r["unstable_gpu_kv_bytes"] == 2 * B * Hu * m.length * D * es
    assert r["gpu_kv_bytes"] == r["stable_gpu_kv_bytes"] + r["unstable_gpu_kv_bytes"]
    assert r["dense_kv_bytes"] == 2 * B * H * m.length * D * es
    assert r["metadata_bytes"] == B * H * full * (2 * D * es + 4 * D * 2 // 8)  # kmin + kmax, 2-bit codes
    assert (r["gpu_reserved_bytes"], r["host_reserved_bytes"]) == reserved_bytes(m)


# ------------------------------------------------------------------------------------------------
# capacity and growth
# ------------------------------------------------------------------------------------------------
def test_capacity_for_adds_an_eighth_at_least_the_headroom():
    assert capacity_for(0, 16) == 16 and capacity_for(8, 1) == 9 and capacity_for(80, 1) == 90 and capacity_for(80, 16) == 96
    for pages in range(0, 3000, 7):
        for headroom in (0, 1, 16):
            assert capacity_for(pages, headroom) == pages + max(pages // 8, headroom)
    grows, cap = 0, 0  # growing one page at a time to 100k pages: O(log n) reallocations, not O(n)
    for pages in range(1, 100_001):
        if pages > cap:
            cap, grows = capacity_for(pages, 1), grows + 1
    assert grows < 100


def test_max_cache_len_sizes_every_buffer_once():
    """With max_cache_len, nothing is reallocated up to it (the buffers a captured decode step bakes in stay),
    graph_buffers names them; past it, fits() is False, graph_buffers() None and reserve() grows them."""
    d = Driver([1], 9, max_cache_len=9 + 23)
    m = d.mem
    assert m.page_valid.shape[1] == math.ceil(32 / 4) and m.fits(32) and not m.fits(33)
    for _ in range(23):
        key = m.graph_buffers(fill=(m.length + 1) % 4 == 0)
        d.token()
    assert key is not None and m.version == 0
    assert m.graph_buffers(fill=False) is None  # the next token would not fit
    d.token()
    d.check()
    assert m.version == 1 and m.fits(m.length + 1)


# ------------------------------------------------------------------------------------------------
# reserved bytes
# ------------------------------------------------------------------------------------------------
def test_reserved_bytes_counts_each_storage_once():
    """Views of one storage count once, across owners too; host_* tensors count as host; the memory room's
    own objects inside an owner are walked, other objects are not."""
    t = torch.zeros(10, dtype=torch.float32)
    h = torch.zeros(6, dtype=torch.float64)
    a = types.SimpleNamespace(x=t, y=t[3:], host_k=h, host_v=h[1:], n=3)
    b = types.SimpleNamespace(z=t.view(2, 5))
    assert reserved_bytes(a) == (40, 48)
    assert reserved_bytes(a, b) == (40, 48)
    assert reserved_bytes(types.SimpleNamespace(inner=types.SimpleNamespace(x=t))) == (0, 0)  # not ours: not walked


def _storages(obj, held, seen_objs):
    """Brute force: every tensor storage reachable from a memory object's attributes, by (data_ptr, host)."""
    if id(obj) in seen_objs:
        return
    seen_objs.add(id(obj))
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            held[value.untyped_storage().data_ptr()] = (name.startswith("host_"), value.untyped_storage().nbytes())
        elif type(value).__module__.startswith("flexicache_hf.memory"):
            _storages(value, held, seen_objs)


@pytest.mark.parametrize("profile", PROFILES)
def test_reserved_bytes_of_a_layer_is_every_storage_it_holds(profile):
    d = Driver(PROFILES[profile], 13, bits=2)
    for _ in range(20):  # past growth of the buffers and of the host pool
        d.token()
    held = {}
    _storages(d.mem, held, set())
    device = sum(n for host, n in held.values() if not host)
    host = sum(n for host, n in held.values() if host)
    assert reserved_bytes(d.mem) == (device, host)
    r = d.mem.report()
    assert r["gpu_reserved_bytes"] >= r["gpu_kv_bytes"] + r["metadata_bytes"]
    assert r["host_reserved_bytes"] >= r["host_kv_bytes"] and (r["host_kv_bytes"] > 0) == (profile != "all_unstable")


def test_host_pool_growth_keeps_every_page():
    off = OffloadedPages(1, 2, 4, 2, 3, 1, 0, torch.float32, "cpu", headroom=1)
    pages = torch.randn(1, 2, 1, 2, 4), torch.randn(1, 2, 1, 2, 4)
    off.offload(0, *pages)
    off.reserve_host(5)
    assert off.host_capacity == capacity_for(5, 1)
    hk, hv = off.host_pages(0, 1)
    assert torch.equal(hk, pages[0]) and torch.equal(hv, pages[1])


# ------------------------------------------------------------------------------------------------
# through generate(): nothing lost, bounded GPU bytes
# ------------------------------------------------------------------------------------------------
def test_no_data_loss_across_every_transition(monkeypatch):
    """~40 decode steps at small pages with a left-padded batch, past every transition of the decode path
    (new page, page fill, rerank, promotion, growth of the buffers and of the host pool): full_kv is what
    update() received, bit for bit, and the host pool holds exactly every full page of the stable heads."""
    from flexicache_hf.layer import FlexiCacheLayer
    from flexicache_hf.memory.layer import LayerMemory as LM

    _, fc = tiny_pair("llama", 6, 3, 32, layers=2)
    T, NEW, ps = 21, 40, 4
    ids = torch.randint(1, 256, (2, T), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    ids[0, :6], mask[0, :6] = 0, 0  # left padding across a page boundary
    cache = make_cache(fc, topk_pages=3, page_size=ps, rerank_interval=3, host_headroom_pages=1)
    rec = Recorder(cache)
    seen = {"new_page": 0, "fill": 0, "rerank": 0, "promote": 0, "grow": 0, "host_grow": 0}
    flags_of = FlexiCacheLayer.decode_flags

    def spy_flags(self, **kw):
        f = flags_of(self, **kw)
        for name in ("new_page", "fill", "rerank"):
            seen[name] += getattr(f, name)
        return f

    promote, reserve, reserve_host = LM.promote, LM.reserve, OffloadedPages.reserve_host

    def spy_promote(self, *a, **kw):
        seen["promote"] += 1
        return promote(self, *a, **kw)

    def spy_reserve(self, tokens):
        v = self.version
        reserve(self, tokens)
        seen["grow"] += self.version != v

    def spy_reserve_host(self, pages):
        cap = self.host_capacity
        reserve_host(self, pages)
        seen["host_grow"] += self.host_capacity != cap

    monkeypatch.setattr(FlexiCacheLayer, "decode_flags", spy_flags)
    monkeypatch.setattr(LM, "promote", spy_promote)
    monkeypatch.setattr(LM, "reserve", spy_reserve)
    monkeypatch.setattr(OffloadedPages, "reserve_host", spy_reserve_host)
    fc.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **cache_kwargs(cache))
    assert all(n > 0 for n in seen.values()), seen
    L = T + NEW - 1
    for layer_idx in range(2):
        k, v = rec.kv(layer_idx)
        fk, fv = cache.full_kv(layer_idx)
        assert fk.shape == (2, 3, L, 32)
        assert torch.equal(fk, k) and torch.equal(fv, v)
        assert not cache.layers[layer_idx].memory.kv_valid[0, :6].any()  # the padding is known as such
    report = cache.memory_report()
    # stable heads hold only their slots on the GPU; the host holds every full page of theirs
    layer = cache.layers[0]
    slots = cache.config.resident_slots
    assert report["stable_gpu_kv_bytes"] < report["dense_kv_bytes"] / 2
    assert layer.memory.stable.k.shape[2] == slots
    stable = sum(len(layer.stable) for layer in cache.layers)
    per_page = 2 * 2 * ps * 32 * 4  # k + v, batch 2, page, head_dim, fp32
    assert report["host_kv_bytes"] == stable * (L // ps) * per_page


def test_stable_gpu_bytes_bounded_by_budget():
    _, fc = tiny_pair("llama", 4, 2, 32, layers=1)
    ids = torch.randint(1, 256, (1, 500), generator=torch.Generator().manual_seed(7))
    cache = FlexiCache(fc.config, profile=HeadProfile.all_stable(1, 2), topk_pages=4, page_size=16, rerank_interval=8)
    fc.generate(ids, max_new_tokens=40, do_sample=False, **cache_kwargs(cache))
    r = cache.memory_report()
    per_slot = 2 * 2 * 16 * 32 * 4  # k+v, 2 heads, page, head_dim, fp32
    assert r["gpu_kv_bytes"] == cache.config.resident_slots * per_slot
    assert r["host_kv_bytes"] == ((500 + 39) // 16) * per_slot
    # every resident slot holds a distinct page: no page is duplicated or lost
    sp = cache.layers[0].memory.stable.slot_page
    for row in sp.view(-1, sp.shape[-1]):
        used = row[row >= 0]
        assert used.unique().numel() == used.numel() <= cache.config.resident_slots
