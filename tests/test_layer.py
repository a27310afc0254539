"""flexicache_hf.layer: FlexiCacheLayer, the transformers side of one layer (update, attend, crop, rebuild,
repartition, batch reordering, validity from masks) and the errors it gives."""

import pytest
import torch

from conftest import Recorder, make_cache, tiny_pair
from flexicache_hf import FlexiCache, FlexiCacheConfig, FlexiCacheLayer, HeadProfile, ops
from flexicache_hf.compat import cache_kwargs


def _ids(b, n, seed):
    return torch.randint(1, 256, (b, n), generator=torch.Generator().manual_seed(seed))


def _layer(unstable=(1,), H=3, **knobs):
    knobs = dict(dict(page_size=4, topk_pages=2, rerank_interval=3, host_headroom_pages=1), **knobs)
    return FlexiCacheLayer(0, H, list(unstable), FlexiCacheConfig(**knobs))


def _kv(B, H, T, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)


def _generated(fc, knobs=None, B=2, T=70, new=30, seed=17):
    cache = make_cache(fc, **(knobs or dict(topk_pages=2, page_size=8, rerank_interval=2)))
    fc.generate(_ids(B, T, seed), max_new_tokens=new, do_sample=False, **cache_kwargs(cache))
    return cache


# ------------------------------------------------------------------------------------------------
# crop, rebuild, repartition
# ------------------------------------------------------------------------------------------------
def test_crop_keeps_prefix_bit_exact():
    _, fc = tiny_pair()
    ids = _ids(2, 70, 17)
    cache = _generated(fc)
    before = [cache.full_kv(i) for i in range(2)]
    cache.crop(-13)
    assert cache.get_seq_length() == 70 + 29 - 13
    for i, (k, v) in enumerate(before):
        fk, fv = cache.full_kv(i)
        assert torch.equal(fk, k[:, :, :-13]) and torch.equal(fv, v[:, :, :-13])
    with torch.no_grad():  # and it decodes on from there
        fc(ids[:, :1], use_cache=True, **cache_kwargs(cache))
    assert cache.get_seq_length() == 70 + 29 - 13 + 1


def test_crop_by_count_kept_and_its_limits():
    """A positive argument keeps the first n tokens (the legacy form); cropping more than held is an error;
    an empty layer ignores a crop; cropping nothing changes nothing."""
    _, fc = tiny_pair()
    cache = _generated(fc)
    layer = cache.layers[0]
    k, v = layer.full_kv()
    memory = layer.memory
    layer.crop(0)
    assert layer.memory is memory  # nothing re-paged
    layer.crop(41)
    assert layer.get_seq_length() == 41 and torch.equal(layer.full_kv()[0], k[:, :, :41])
    with pytest.raises(ValueError, match="cannot crop 42 tokens from a cache holding 41"):
        layer.crop(-42)
    empty = _layer()
    empty.crop(-3)
    assert not empty.is_initialized


def test_rebuild_pages_a_context_as_a_prefill():
    """rebuild(): K/V, validity (padding included) and metadata as a prefill of the same tokens leaves them;
    the next decode step is a first step (every head selects afresh)."""
    layer = _layer()
    k, v = _kv(2, 3, 23)
    valid = torch.ones(2, 23, dtype=torch.bool)
    valid[0, :6] = False
    layer.rebuild(k, v, valid)
    m = layer.memory
    assert layer.get_seq_length() == 23 and layer.memory.selected_at == 23 and layer.pending is None
    fk, fv = layer.full_kv()
    assert torch.equal(fk, k) and torch.equal(fv, v) and torch.equal(m.kv_valid[:, :23], valid)
    kmin, kmax = ops.page_minmax_ref(k[:, :, :20], valid[:, :20], 4)
    assert torch.equal(m.stable.meta.kmin[:, :, :5], kmin[:, [0, 2]]) and torch.equal(m.unstable.meta.kmax[:, :, :5], kmax[:, [1]])
    assert torch.equal(m.page_valid[:, :5], valid[:, :20].view(2, 5, 4).any(-1))
    assert layer.decode_flags().first and layer.decode_flags().rerank


@pytest.mark.parametrize("new_split", [[0, 1], [], [0, 1, 2]])
def test_repartition_keeps_every_kv_and_decodes_on(new_split):
    """A new stable/unstable split (what online calibration does): every K/V and its validity are kept, the
    groups follow the split, and the next forward decodes exactly from there."""
    _, fc = tiny_pair("llama", 6, 3, 32)
    ids = _ids(2, 41, 3)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    cache = make_cache(fc, topk_pages=2, page_size=4, rerank_interval=3)
    rec = Recorder(cache)
    fc.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **cache_kwargs(cache))
    layer = cache.layers[1]
    valid = layer.memory.kv_valid[:, : layer.length].clone()
    layer.repartition(new_split)
    assert layer.unstable == new_split and layer.stable == [h for h in range(3) if h not in new_split]
    assert (layer.memory.unstable is None) == (not new_split) and (layer.memory.stable is None) == (len(new_split) == 3)
    assert torch.equal(layer.memory.kv_valid[:, : layer.length], valid)
    assert rec.all_exact()
    with torch.no_grad():
        fc(ids[:, :1], attention_mask=torch.cat([mask, torch.ones(2, 13, dtype=mask.dtype)], 1), use_cache=True,
           **cache_kwargs(cache))
    assert rec.all_exact()


def test_repartition_before_any_forward_only_sets_the_split():
    layer = _layer()
    layer.repartition([0, 2])
    assert not layer.is_initialized and layer.unstable == [0, 2] and layer.stable == [1]


# ------------------------------------------------------------------------------------------------
# batch reordering (beams, batch expansion)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["reorder_cache", "batch_select_indices", "batch_repeat_interleave"])
def test_batch_reordering_moves_every_row(how):
    _, fc = tiny_pair()
    cache = _generated(fc, dict(topk_pages=2, page_size=8, rerank_interval=2, sketch_bits=2))
    before = [cache.full_kv(i) for i in range(2)]
    valid = [layer.memory.kv_valid.clone() for layer in cache.layers]
    idx = {"reorder_cache": torch.tensor([1, 1]), "batch_select_indices": torch.tensor([1]),
           "batch_repeat_interleave": torch.tensor([0, 0, 0, 1, 1, 1])}[how]
    for layer in cache.layers:
        getattr(layer, how)(3 if how == "batch_repeat_interleave" else idx)
    for i, layer in enumerate(cache.layers):
        fk, fv = cache.full_kv(i)
        assert torch.equal(fk, before[i][0][idx]) and torch.equal(fv, before[i][1][idx])
        assert torch.equal(layer.memory.kv_valid, valid[i][idx]) and layer.memory.batch == len(idx)


def test_reordering_an_empty_layer_does_nothing():
    layer = _layer()
    layer.reorder_cache(torch.tensor([0]))
    layer.batch_select_indices(torch.tensor([0]))
    layer.batch_repeat_interleave(2)
    assert not layer.is_initialized


# ------------------------------------------------------------------------------------------------
# validity from the attention mask
# ------------------------------------------------------------------------------------------------
def test_validity_follows_the_padding_mask_of_every_forward():
    """Left padding of a prefill and of a later chunk (a second turn, padded too) is recorded as not valid;
    decode tokens are valid."""
    _, fc = tiny_pair()
    ids = _ids(2, 30, 5)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    cache = make_cache(fc, topk_pages=2, page_size=4)
    with torch.no_grad():
        fc(ids, attention_mask=mask, use_cache=True, **cache_kwargs(cache))
        chunk = torch.ones(2, 9, dtype=mask.dtype)
        chunk[1, 2] = 0  # a hole inside a later chunk
        mask = torch.cat([mask, chunk], 1)
        fc(_ids(2, 9, 6), attention_mask=mask, use_cache=True, **cache_kwargs(cache))
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        fc(_ids(2, 1, 7), attention_mask=mask, use_cache=True, **cache_kwargs(cache))
    for layer in cache.layers:
        assert torch.equal(layer.memory.kv_valid[:, :40], mask.bool())


def test_validity_from_an_additive_or_boolean_mask_or_none():
    """The layer reads the last query row of a 4D mask: bool (True attends) or additive (0 attends); None is
    causal without padding; anything else is refused."""
    k, v = _kv(2, 3, 6)
    for mask in (None, torch.tensor([[1, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)):
        layer = _layer()
        layer.update(k, v)
        additive = None if mask is None else torch.zeros(2, 1, 6, 6).masked_fill(~mask[:, None, None], -1e9)
        for m in (None,) if mask is None else (mask[:, None, None].expand(2, 1, 6, 6), additive):
            layer._record_validity(m, 0, 6)
            want = torch.ones(2, 6, dtype=torch.bool) if mask is None else mask
            assert torch.equal(layer.memory.kv_valid[:, :6], want)
    with pytest.raises(NotImplementedError, match="needs a 4D attention mask or None, got Tensor"):
        layer._record_validity(torch.ones(2, 6), 0, 6)


# ------------------------------------------------------------------------------------------------
# errors and the CacheLayerMixin surface
# ------------------------------------------------------------------------------------------------
def test_batch_size_change_is_a_clear_error():
    _, fc = tiny_pair()
    cache = FlexiCache(fc.config, profile=HeadProfile.all_stable(2, 2))
    fc.generate(torch.randint(1, 256, (2, 10)), max_new_tokens=2, **cache_kwargs(cache))
    with pytest.raises(ValueError, match=r"batch size changed from 2 to 3; call cache.reset\(\)"):
        fc.generate(torch.randint(1, 256, (3, 10)), max_new_tokens=2, **cache_kwargs(cache))


def test_layer_errors_say_what_is_wrong():
    k, v = _kv(1, 4, 5)
    with pytest.raises(ValueError, match="layer 0: got 4 KV heads, the cache was built for 3"):
        _layer().update(k, v)
    with pytest.raises(ValueError, match="holds no K/V yet: run a forward pass first"):
        _layer().full_kv()
    layer = _layer(H=4)
    with pytest.raises(RuntimeError, match="attention called without a preceding cache update"):
        layer.attend(None, torch.randn(1, 4, 5, 8), None)
    layer.update(k, v)
    with pytest.raises(NotImplementedError, match="softcapping"):
        layer.attend(None, torch.randn(1, 4, 5, 8), None, scaling=1.0, softcap=30.0)


def test_lengths_and_reset():
    layer = _layer()
    assert layer.get_seq_length() == 0 and layer.get_max_length() == -1
    k, v = _kv(2, 3, 9)
    handle, same = layer.update(k, v)
    assert handle is same and handle.layer is layer
    # a decode step's mask covers the reserved capacity (a fixed shape under torch.compile); a prefill's is exact
    assert layer.get_seq_length() == 9 and layer.get_mask_sizes(1) == (layer.memory.capacity, 0)
    assert layer.memory.capacity >= 10 and layer.get_mask_sizes(4) == (13, 0)
    memory = layer.memory
    layer.reset()
    assert not layer.is_initialized and layer.get_seq_length() == 0
    layer.update(*_kv(2, 3, 5))  # the next request of the same shape reuses the buffers
    assert layer.memory is memory and layer.get_seq_length() == 5 and memory.selected_at == 5
    assert not memory.kv_valid[:, 5:].any() and int(memory.pos) == 5
    layer.release()
    assert layer.memory is None and not layer.is_initialized
