"""The strongest property: with a budget that covers the whole context, FlexiCache is dense attention."""

import pytest
import torch

from conftest import make_cache, tiny_pair

NEW = 64


def _compare(ref, fc, ids, mask, cache, greedy, atol):
    out_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, **greedy)
    out_fc = fc.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, **greedy)
    assert torch.equal(out_ref.sequences, out_fc.sequences)
    for step, (a, b) in enumerate(zip(out_ref.logits, out_fc.logits)):
        torch.testing.assert_close(b, a, atol=atol, rtol=0, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize(
    "arch,heads,kv_heads,head_dim,prompt,page_size",
    [
        ("llama", 3, 3, 64, 61, 16),  # GQA group 1 (MHA)
        ("llama", 6, 2, 80, 77, 16),  # group 3, head_dim 80
        ("mistral", 7, 1, 128, 45, 8),  # group 7, MQA
        ("qwen2", 14, 2, 64, 100, 16),  # group 7, biases
        ("qwen3", 8, 4, 64, 33, 4),  # q/k norms
    ],
)
def test_full_budget_equals_dense(arch, heads, kv_heads, head_dim, prompt, page_size, greedy):
    ref, fc = tiny_pair(arch, heads, kv_heads, head_dim)
    ids = torch.randint(1, 256, (1, prompt), generator=torch.Generator().manual_seed(1))
    pages = -(-(prompt + NEW) // page_size)
    cache = make_cache(fc, topk_pages=pages, page_size=page_size, rerank_interval=4)
    _compare(ref, fc, ids, None, cache, greedy, atol=2e-4)
    # the budget really covered everything and stable heads really were offloaded
    report = cache.memory_report()
    assert report["host_kv_bytes"] > 0


@pytest.mark.parametrize("profile_kind,sketch_bits", [("mixed", 0), ("all_stable", 0), ("all_unstable", 0), ("mixed", 2)])
def test_full_budget_left_padded_batch(profile_kind, sketch_bits, greedy):
    from flexicache_hf import HeadProfile

    ref, fc = tiny_pair("llama", 6, 2, 64)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 256, (3, 70), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in ((0, 0), (1, 13), (2, 40)):  # left padding of different lengths, one crossing 2 pages
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    c = fc.config
    profile = {
        "mixed": None,
        "all_stable": HeadProfile.all_stable(c.num_hidden_layers, c.num_key_value_heads),
        "all_unstable": HeadProfile.all_unstable(c.num_hidden_layers, c.num_key_value_heads),
    }[profile_kind]
    knobs = dict(topk_pages=9, page_size=16, rerank_interval=3, sketch_bits=sketch_bits)
    if profile is not None:
        knobs["profile"] = profile
    cache = make_cache(fc, **knobs)
    _compare(ref, fc, ids, mask, cache, greedy, atol=2e-4)


def test_full_budget_fp64_many_reranks(greedy):
    """fp64 rules out float noise: every logit matches to 1e-10 through 64 steps with reranks every step."""
    ref, fc = tiny_pair("llama", 8, 2, 32, dtype=torch.float64, layers=3)
    ids = torch.randint(1, 256, (2, 50), generator=torch.Generator().manual_seed(3))
    cache = make_cache(fc, topk_pages=32, page_size=4, rerank_interval=1)
    _compare(ref, fc, ids, None, cache, greedy, atol=1e-10)
