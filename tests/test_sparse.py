"""Below full budget: an independent oracle of the selection policy, and no data loss."""

import pytest
import torch

from conftest import Recorder, make_cache, tiny_pair
from flexicache_hf import FlexiCache, FlexiCacheLayer, HeadProfile, ops


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
    for h in range(H):
        unstable = h in layer.unstable
        if unstable or state["step"] % cfg.rerank_interval == 0:
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
                state.setdefault("next" if state["step"] else "sel", {})[h] = (sel, current)  # meanwhile); the first at once
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
@pytest.mark.parametrize("spread,bits,rank", [(1.0, 0, "mass"), (0.5, 0, "mass"), (1.0, 2, "max"), (1.0, 1, "max"),
                                             (1.0, 2, "mass"), (1.0, 1, "mass")])
def test_sparse_decode_matches_oracle(device, spread, bits, rank):
    """On CUDA the reranks' promotions run on the copy stream, overlapped: the same pages must be read.
    spread 0.5: the cache scores pages with the configured score_spread; bits: by the key sketch, ranked
    by the best sketched q.k ("max") or by the attention mass the sketched keys predict ("mass")."""
    _, fc = tiny_pair("llama", 8, 2, 32, dtype=torch.float64, layers=2)
    fc = fc.to(device)
    ids = torch.randint(1, 256, (2, 150), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, :29], mask[1, :29] = 0, 0
    ids, mask = ids.to(device), mask.to(device)
    cache = make_cache(fc, topk_pages=4, page_size=8, rerank_interval=5, use_kernels=False, score_spread=spread,
                       sketch_bits=bits, sketch_score=rank)
    rec = Recorder(cache)
    seen = []
    orig = FlexiCacheLayer._decode

    def spy(self, query, scale, flags):
        out = orig(self, query, scale, flags)
        seen.append((self.layer_idx, query.clone(), out.clone(), self.length, self.memory.kv_valid[:, : self.length].clone(), scale))
        return out

    FlexiCacheLayer._decode = spy
    try:
        fc.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=60, min_new_tokens=60, do_sample=False)
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


def test_no_data_loss_300_steps_with_padding():
    _, fc = tiny_pair("llama", 6, 3, 32, layers=2)
    ids = torch.randint(1, 256, (2, 101), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    ids[0, :17], mask[0, :17] = 0, 0
    cache = make_cache(fc, topk_pages=3, page_size=16, rerank_interval=4)
    rec = Recorder(cache)
    fc.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=300, min_new_tokens=300, do_sample=False)
    for layer_idx in range(2):
        k, v = rec.kv(layer_idx)
        fk, fv = cache.full_kv(layer_idx)
        assert fk.shape == (2, 3, 101 + 299, 32)
        assert torch.equal(fk, k) and torch.equal(fv, v)
    report = cache.memory_report()
    # stable heads hold only their slots on the GPU; the host holds every full page of theirs
    layer = cache.layers[0]
    slots = cache.config.resident_slots
    assert report["stable_gpu_kv_bytes"] < report["dense_kv_bytes"] / 2
    assert layer.memory.stable.k.shape[2] == slots
    per_page = 2 * 2 * len(layer.stable) * 16 * 32 * 4  # k + v, batch 2, stable heads, page, head_dim, fp32
    assert report["host_kv_bytes"] == 2 * ((101 + 299) // 16) * per_page  # two layers


def test_stable_gpu_bytes_bounded_by_budget():
    _, fc = tiny_pair("llama", 4, 2, 32, layers=1)
    ids = torch.randint(1, 256, (1, 500), generator=torch.Generator().manual_seed(7))
    cache = FlexiCache(fc.config, profile=HeadProfile.all_stable(1, 2), topk_pages=4, page_size=16, rerank_interval=8)
    fc.generate(ids, past_key_values=cache, max_new_tokens=40, do_sample=False)
    r = cache.memory_report()
    per_slot = 2 * 2 * 16 * 32 * 4  # k+v, 2 heads, page, head_dim, fp32
    assert r["gpu_kv_bytes"] == cache.config.resident_slots * per_slot
    assert r["host_kv_bytes"] == ((500 + 39) // 16) * per_slot
    # every resident slot holds a distinct page: no page is duplicated or lost
    sp = cache.layers[0].memory.stable.slot_page
    for row in sp.view(-1, sp.shape[-1]):
        used = row[row >= 0]
        assert used.unique().numel() == used.numel() <= cache.config.resident_slots
