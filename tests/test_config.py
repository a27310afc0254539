"""Bad input is a clear error that says what to change."""

import json

import pytest

from conftest import tiny_pair
from flexicache_hf import FlexiCache, FlexiCacheConfig, HeadProfile


@pytest.mark.parametrize(
    "knobs,match",
    [
        (dict(page_size=0), "page_size=0 is invalid: it must be an int in \\[1, 256\\]"),
        (dict(page_size=12), "power of two"),
        (dict(page_size=16.0), "must be an int"),
        (dict(topk_pages=0), "topk_pages=0 is invalid: it must be an int in \\[1, "),
        (dict(rerank_interval=0), "rerank_interval=0 is invalid"),
        (dict(rerank_interval=True), "must be an int"),
        (dict(use_kernels="yes"), "use_kernels"),
        (dict(max_cache_len=0), "max_cache_len=0 is invalid: give the prompt \\+ new tokens"),
        (dict(max_cache_len=4096.0), "max_cache_len=4096.0 is invalid"),
        (dict(score_spread=1.5), "score_spread=1.5 is invalid: give a number in \\[0, 1\\]"),
        (dict(score_spread=-0.1), "score_spread=-0.1 is invalid"),
        (dict(score_spread="0.5"), "score_spread='0.5' is invalid"),
        (dict(sketch_bits=3), "sketch_bits=3 is invalid: use 0 \\(MinMax bound only\\), 1, 2 or 4"),
        (dict(sketch_bits=True), "sketch_bits=True is invalid"),
        (dict(sketch_bits=2.0), "sketch_bits=2.0 is invalid"),
        (dict(sketch_bits=2, sketch_score="sum"), 'sketch_score=\'sum\' is invalid: use "mass"'),
        (dict(sketch_bits=2, score_spread=0.5), "score_spread=0.5 is invalid: it shapes the MinMax bound, which sketch_bits"),
        # upper bounds: a typo fails here, not in the allocator (issue 17, item 8)
        (dict(topk_pages=10**12), "topk_pages=1000000000000 is invalid: it must be an int in \\[1, 16777216\\]"),
        (dict(max_cache_len=10**12), "max_cache_len=1000000000000 is invalid"),
        (dict(page_size=2**40), "page_size=1099511627776 is invalid: it must be an int in \\[1, 256\\]"),
        (dict(rerank_interval=10**9), "rerank_interval=1000000000 is invalid: it must be an int in \\[1, 4096\\]"),
        (dict(host_headroom_pages=10**12), "host_headroom_pages=1000000000000 is invalid"),
        # auto_unstable: a fraction in (0, 1] or a head count >= 1 (issue 17, item 6)
        (dict(auto_unstable=0), "auto_unstable=0 is invalid: a head count must be >= 1"),
        (dict(auto_unstable=-1), "auto_unstable=-1 is invalid"),
        (dict(auto_unstable=-3), "auto_unstable=-3 is invalid"),
        (dict(auto_unstable=0.0), "auto_unstable=0.0 is invalid: give a fraction in \\(0, 1\\]"),
        (dict(auto_unstable=1.5), "auto_unstable=1.5 is invalid"),
        (dict(auto_unstable=100.0), "auto_unstable=100.0 is invalid"),
        (dict(auto_unstable="0.25"), "auto_unstable='0.25' is invalid"),
        (dict(auto_unstable=True), "auto_unstable=True is invalid"),
        # the stable heads' warm-up: decode steps, 0 (none) up to the rerank interval's bound
        (dict(warmup_steps=-1), "warmup_steps=-1 is invalid: it must be an int in \\[0, 4096\\], e.g. 16 \\(0: stable heads"),
        (dict(warmup_steps=10**6), "warmup_steps=1000000 is invalid: it must be an int in \\[0, 4096\\]"),
        (dict(warmup_steps=16.0), "warmup_steps=16.0 is invalid"),
        (dict(warmup_steps=True), "warmup_steps=True is invalid"),
        (dict(warmup_steps="16"), "warmup_steps='16' is invalid"),
        (dict(warmup_steps=None), "warmup_steps=None is invalid"),
    ],
)
def test_config_rejects(knobs, match):
    with pytest.raises(ValueError, match=match):
        FlexiCacheConfig(**knobs)


def test_config_takes_numpy_ints_as_ints():
    np = pytest.importorskip("numpy")
    c = FlexiCacheConfig(topk_pages=np.int64(8), auto_unstable=np.int64(4), page_size=np.int32(8), warmup_steps=np.int64(32))
    assert (c.topk_pages, c.auto_unstable, c.page_size) == (8, 4, 8) and type(c.auto_unstable) is int
    assert c.warmup_steps == 32 and type(c.warmup_steps) is int
    assert FlexiCacheConfig(warmup_steps=0).warmup_steps == 0 and FlexiCacheConfig(warmup_steps=4096).warmup_steps == 4096


def test_auto_unstable_count_above_the_heads_fails_at_construction():
    _, fc = tiny_pair(layers=2, kv_heads=2)  # 4 KV heads in all
    with pytest.raises(ValueError, match="unstable=100 heads is out of range: the model has 4 KV heads"):
        FlexiCache(fc.config, profile="auto", auto_unstable=100)
    FlexiCache(fc.config, profile="auto", auto_unstable=4)


def test_config_defaults():
    """The paper's page size, budget and rerank interval; the scorer that keeps accuracy on every real model we
    run (2-bit key sketches ranked by predicted mass); the paper's MinMax bound by name."""
    from flexicache_hf import MinMaxBound, SketchMass

    c = FlexiCacheConfig()
    assert (c.page_size, c.topk_pages, c.rerank_interval) == (16, 64, 16)
    assert c.warmup_steps == 16  # docs/accuracy.md, "Warm-up"
    assert c.scorer == SketchMass(2) and c.sketch_bits == 2
    assert c.resident_slots == 64 + 1 + 1
    assert FlexiCacheConfig(sketch_bits=0).scorer == MinMaxBound() == FlexiCacheConfig(scorer="minmax").scorer


def test_profile_mismatch_names_the_shapes():
    _, fc = tiny_pair(layers=2, kv_heads=2)
    with pytest.raises(ValueError, match=r"3 layers x 2 KV heads.*model has 2 layers x 2 KV heads"):
        FlexiCache(fc.config, profile=HeadProfile(3, 2, []))
    with pytest.raises(ValueError, match=r"2 layers x 4 KV heads"):
        FlexiCache(fc.config, profile=HeadProfile(2, 4, []))


def test_profile_rejects_bad_entries(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        HeadProfile(2, 2, [(0, 2)])
    with pytest.raises(ValueError, match="more than once"):
        HeadProfile(2, 2, [(0, 1), (0, 1)])
    with pytest.raises(ValueError, match="pairs"):
        HeadProfile(2, 2, [(0,)])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON head profile"):
        HeadProfile.load(bad)
    bad.write_text(json.dumps({"num_layers": 2}))
    with pytest.raises(ValueError, match="lacks required keys"):
        HeadProfile.load(bad)


def test_profile_json_round_trip(tmp_path):
    p = HeadProfile(4, 2, [(3, 1), (0, 0)], {"model_id": "x/y", "recall": 0.9})
    p.save(tmp_path / "p.json")
    q = HeadProfile.load(tmp_path / "p.json")
    assert (q.num_layers, q.num_kv_heads, q.unstable, q.metadata) == (4, 2, [(0, 0), (3, 1)], p.metadata)


def test_cache_rejects_mixed_knobs_and_unknown_knobs():
    _, fc = tiny_pair()
    prof = HeadProfile.all_stable(2, 2)
    with pytest.raises(ValueError, match="either config="):
        FlexiCache(fc.config, profile=prof, config=FlexiCacheConfig(), topk_pages=8)
    with pytest.raises(TypeError, match="valid knobs"):
        FlexiCache(fc.config, profile=prof, top_k=8)
    with pytest.raises(ValueError, match="neither a file nor"):
        FlexiCache(fc.config, profile="no/such-model")


def test_cache_rejects_a_model_not_loaded_with_flexicache():
    ref, _ = tiny_pair()
    with pytest.raises(ValueError, match='attn_implementation="flexicache"'):
        FlexiCache(ref.config, profile=HeadProfile.all_stable(2, 2))


def test_full_kv_before_any_forward_is_a_clear_error():
    _, fc = tiny_pair()
    cache = FlexiCache(fc.config, profile=HeadProfile.all_stable(2, 2))
    with pytest.raises(ValueError, match="run a forward pass first"):
        cache.full_kv(0)
    assert cache.memory_report()["gpu_kv_bytes"] == 0


def test_sketch_bits_that_do_not_pack_the_head_dim_are_a_clear_error():
    """head_dim 36 with 1 bit per channel is 4.5 bytes per token: refused at construction, before anything is
    allocated, naming the settings that fit."""
    _, fc = tiny_pair("llama", 2, 2, 36)
    with pytest.raises(ValueError, match=r"head_dim is 36\): pass sketch_bits in \[2, 4\] or scorer=MinMaxBound\(\)"):
        FlexiCache(fc.config, profile=HeadProfile.all_stable(2, 2), sketch_bits=1)
