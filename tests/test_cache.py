"""FlexiCache as a transformers Cache: what it serves, what it refuses at construction, and what it holds."""

import pytest
import torch
import transformers

from conftest import Recorder, make_cache, tiny_pair
from flexicache_hf import FlexiCache, HeadProfile
from flexicache_hf.compat import cache_kwargs


def _tiny(cfg_cls, model_cls=None, **kw):
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "flexicache"
    return cfg


def test_encoder_decoder_models_are_refused_at_construction():
    bart = _tiny(transformers.BartConfig, vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                 encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)
    t5 = _tiny(transformers.T5Config, vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    for cfg in (bart, t5):
        with pytest.raises(NotImplementedError, match="encoder-decoder model: FlexiCache serves decoder-only"):
            FlexiCache(cfg)


def test_latent_attention_models_are_refused_at_construction():
    cfg = _tiny(transformers.DeepseekV3Config, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=2, num_experts_per_tok=1)
    with pytest.raises(NotImplementedError, match="multi-head latent attention"):
        FlexiCache(cfg)


def test_a_model_instead_of_its_config_is_a_clear_error():
    _, fc = tiny_pair()
    with pytest.raises(TypeError, match=r"FlexiCache\(model.config\), not FlexiCache\(model\)"):
        FlexiCache(fc)
    with pytest.raises(TypeError, match="takes a transformers model config"):
        FlexiCache({"num_hidden_layers": 2})


def test_the_handle_refuses_other_attention_code():
    """A model switched to sdpa after the cache was built: a clear error, not sdpa reading .shape."""
    _, fc = tiny_pair()
    cache = make_cache(fc)
    fc.set_attn_implementation("sdpa")
    with pytest.raises(TypeError, match='attn_implementation="flexicache"'):
        fc.generate(torch.randint(1, 256, (1, 12)), max_new_tokens=2, **cache_kwargs(cache))


def test_backward_through_the_cache_says_it_is_inference_only():
    _, fc = tiny_pair()
    cache = make_cache(fc, topk_pages=2, page_size=4)
    ids = torch.randint(1, 256, (1, 20))
    fc(ids, use_cache=True, **cache_kwargs(cache))  # prefill under grad mode: runs
    out = fc(ids[:, :1], use_cache=True, **cache_kwargs(cache))  # a decode step: runs
    with pytest.raises(RuntimeError, match="FlexiCache is inference-only"):
        out.logits.sum().backward()


# hybrid models (full and sliding layers) at full budget: test_generate.py, the qwen2-hybrid cases
def test_sliding_window_layers_stay_dense_within_their_window():
    """Mistral with a 24-token window, generating far beyond it: tokens equal dense sdpa's, nothing raises."""
    ref, fc = tiny_pair("mistral", sliding_window=24, dtype=torch.float64)
    ids = torch.randint(1, 256, (2, 30), generator=torch.Generator().manual_seed(3))
    a = ref.generate(ids, max_new_tokens=50, min_new_tokens=50, do_sample=False)
    with pytest.warns(UserWarning, match="every layer of this mistral model is a sliding-window layer"):
        cache = FlexiCache(fc.config, profile=HeadProfile.all_stable(2, 2), topk_pages=2, page_size=4)
    b = fc.generate(ids, max_new_tokens=50, min_new_tokens=50, do_sample=False, **cache_kwargs(cache))
    assert torch.equal(a, b)
    assert all(layer.is_sliding for layer in cache.layers)
    with pytest.raises(ValueError, match="sliding-window layer: it keeps only its last 24 tokens"):
        cache.full_kv(0)


def test_reset_keeps_a_calibrated_split_and_restarts_an_unfinished_calibration():
    """profile="auto": once the calibration has decided, a reset keeps the split (the next request, another batch
    size, uses it with nothing lost, and may compile); a calibration cut short by a short request starts afresh."""
    _, fc = tiny_pair("llama", 8, 4, 32, layers=2)
    cache = FlexiCache(fc.config, profile="auto", topk_pages=4, page_size=8, calibration_steps=16)
    gen = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert not cache.is_compileable  # while it records, steps run Python
    fc.generate(torch.randint(1, 256, (2, 120)), **cache_kwargs(cache), **gen)
    first = cache.profile
    assert first is not None and len(first.unstable) == 2
    cache.reset()
    assert cache.profile is first and cache.is_compileable
    rec = Recorder(cache)
    fc.generate(torch.randint(1, 256, (3, 120)), **cache_kwargs(cache), **gen)
    assert cache.profile is first and rec.all_exact()
    assert sorted(len(layer.unstable) for layer in cache.layers) == \
        sorted(len(first.unstable_heads(i)) for i in range(2))

    short = FlexiCache(fc.config, profile="auto", topk_pages=4, page_size=8, calibration_steps=32)
    fc.generate(torch.randint(1, 256, (2, 120)), **cache_kwargs(short), max_new_tokens=5, do_sample=False)
    calibration = short.calibration
    assert calibration.active
    short.reset()
    assert short.profile is None and short.calibration.active and short.calibration is not calibration
    assert all(len(layer.unstable) == 4 for layer in short.layers)  # every head unstable while it records


def test_the_fallback_to_online_calibration_says_so():
    """No profile given and none ships: the cache calibrates online, and says what that costs."""
    _, fc = tiny_pair("llama", 8, 4, 32, layers=2)
    with pytest.warns(UserWarning, match="no shipped head profile .* runs uncompiled"):
        FlexiCache(fc.config)


def test_memory_report_counts_what_the_cache_holds_allocated():
    """Reserved bytes are every byte of the cache's tensors (headroom included); with defaults they stay
    within ~1/8 + a little of the bytes in use."""
    _, fc = tiny_pair("llama", 8, 4, 32, layers=2)
    cache = make_cache(fc)
    fc.generate(torch.randint(1, 256, (2, 1500)), max_new_tokens=3, **cache_kwargs(cache))
    r = cache.memory_report()
    held = {}
    for layer in cache.layers:
        _collect_storages(layer, held)
    device = sum(n for (ptr, host), n in held.items() if not host)
    host = sum(n for (ptr, host), n in held.items() if host)
    assert r["gpu_reserved_bytes"] == device and r["host_reserved_bytes"] == host
    in_use = r["gpu_kv_bytes"] + r["metadata_bytes"]
    assert in_use <= r["gpu_reserved_bytes"] <= 1.35 * in_use
    assert r["host_kv_bytes"] <= r["host_reserved_bytes"] <= 1.35 * r["host_kv_bytes"]


def _collect_storages(obj, held, depth=0):
    """Every tensor storage reachable from obj's attributes (a brute-force twin of memory.reserved_bytes)."""
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            held[(value.untyped_storage().data_ptr(), name.startswith("host_"))] = value.untyped_storage().nbytes()
        elif depth < 3 and hasattr(value, "__dict__") and type(value).__module__.startswith("flexicache_hf"):
            _collect_storages(value, held, depth + 1)
