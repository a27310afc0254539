"""profile="auto": online calibration of the stable/unstable split, then the normal method. (At full budget it
keeps every head unstable and equals dense: test_generate.py, case llama-greedy-auto.)"""

import pytest
import torch

from conftest import Recorder, tiny_pair
from flexicache_hf import FlexiCache
from flexicache_hf.compat import cache_kwargs


def test_auto_calibrates_then_offloads_without_losing_data():
    _, fc = tiny_pair("llama", 8, 4, 32, layers=2)
    ids = torch.randint(1, 256, (2, 200), generator=torch.Generator().manual_seed(20))
    cache = FlexiCache(fc.config, profile="auto", topk_pages=4, page_size=8, calibration_steps=32, auto_unstable=0.25)
    assert cache.profile is None
    rec = Recorder(cache)
    fc.generate(ids, max_new_tokens=60, min_new_tokens=60, do_sample=False, **cache_kwargs(cache))
    prof = cache.profile
    assert prof is not None and len(prof.unstable) == 2  # 25% of 2 layers x 4 KV heads
    assert "online calibration" in prof.metadata["source"]
    assert sorted(len(l.unstable) for l in cache.layers) == sorted(len(prof.unstable_heads(i)) for i in range(2))
    for i in range(2):
        k, v = rec.kv(i)
        fk, fv = cache.full_kv(i)
        assert torch.equal(fk, k) and torch.equal(fv, v)
    assert cache.memory_report()["host_kv_bytes"] > 0


def test_auto_rejects_bad_knobs():
    _, fc = tiny_pair()
    with pytest.raises(ValueError, match="calibration_steps"):
        FlexiCache(fc.config, profile="auto", calibration_steps=8)
    with pytest.raises(ValueError, match="auto_unstable"):
        FlexiCache(fc.config, profile="auto", auto_unstable=1.5)
