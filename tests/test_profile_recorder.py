"""flexicache_hf.profile_recorder: the recording attention is plain attention, records only the decode steps of
the recorder a forward carries, and keeps page sets of the documented shapes."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_pair
from flexicache_hf import profile_recorder as rec_mod
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.profile_text import TextWindow

LAYERS, KV_HEADS, PROMPT, STEPS = 2, 2, 64, 6
NO_OLD_CACHE_KEYWORD = pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only cost, badly so on a busy CPU
    ref, _ = tiny_pair(layers=LAYERS, kv_heads=KV_HEADS)
    yield ref
    torch.set_num_threads(threads)


def _ids(n, seed=3):
    return torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _decode(model, name, ids, recorder=None):
    """Prefill PROMPT tokens, then STEPS one-token forwards under attention `name`; their logits."""
    from transformers import DynamicCache

    with torch.inference_mode(), rec_mod.attn_implementation(model, name):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[None, :PROMPT], **cache_kwargs(cache))
        outs = []
        for t in range(STEPS):
            extra = {} if recorder is None else {rec_mod.RECORDER_KWARG: recorder}
            if recorder is not None:
                recorder.step = t
            outs.append(model(input_ids=ids[None, PROMPT + t : PROMPT + t + 1], **cache_kwargs(cache), **extra).logits)
    return torch.cat(outs)


@NO_OLD_CACHE_KEYWORD
def test_recorder_attention_matches_sdpa(model):
    rec_mod.register_attention()
    ids = _ids(PROMPT + STEPS)
    ref = _decode(model, "sdpa", ids)
    rec = rec_mod.PageRecorder(LAYERS, KV_HEADS, STEPS, 16, 2, "sum")
    got = _decode(model, rec_mod.ATTN_NAME, ids, rec)
    assert torch.allclose(ref, got, atol=1e-4)
    # 64 prompt tokens + t: the newest token is on page 4, candidates are pages 0..3
    assert rec.num_pages.tolist() == [4] * STEPS
    assert rec.observed == STEPS * LAYERS
    assert ((rec.topk["attention"] >= 0) & (rec.topk["attention"] < 4)).all()
    assert model.config._attn_implementation == "sdpa"  # restored


@NO_OLD_CACHE_KEYWORD
def test_recorder_is_the_one_the_forward_carries(model):
    """No module state: a forward without a recorder records nothing, two recorders keep their own steps."""
    rec_mod.register_attention()
    assert not hasattr(rec_mod, "_ACTIVE")
    ids_a, ids_b = _ids(PROMPT + STEPS, seed=1), _ids(PROMPT + STEPS, seed=2)
    a = rec_mod.PageRecorder(LAYERS, KV_HEADS, STEPS, 16, 2)
    b = rec_mod.PageRecorder(LAYERS, KV_HEADS, STEPS, 16, 2)
    _decode(model, rec_mod.ATTN_NAME, ids_a)  # no recorder: plain attention
    _decode(model, rec_mod.ATTN_NAME, ids_a, a)
    _decode(model, rec_mod.ATTN_NAME, ids_b, b)
    assert a.observed == b.observed == STEPS * LAYERS
    a2 = rec_mod.PageRecorder(LAYERS, KV_HEADS, STEPS, 16, 2)
    _decode(model, rec_mod.ATTN_NAME, ids_a, a2)
    assert torch.equal(a.topk["attention"], a2.topk["attention"])  # the same text records the same sets


@pytest.fixture(scope="module")
def records(model):
    g = torch.Generator().manual_seed(0)
    windows = [TextWindow(f"random-{i}", "random", 0, torch.randint(1, 256, (100 + 20,), generator=g)) for i in range(2)]
    return rec_mod.record_stability(model, None, windows=windows, prompt_tokens=100, decode_steps=20,
                                    page_size=16, topk_pages=3, progress=False)


@NO_OLD_CACHE_KEYWORD
def test_records_shapes(records):
    assert len(records.topk["attention"]) == 2 and len(records.samples) == 2
    assert records.topk["minmax"][0].shape == (20, LAYERS, KV_HEADS, 3)
    assert records.num_pages[0].tolist() == [(100 + t) // 16 for t in range(20)]
    assert (records.captured_mass["attention"][0] >= records.captured_mass["minmax"][0] - 1e-5).all()  # oracle
    assert records.instability()[0].shape == (1, LAYERS, KV_HEADS)  # one full 16-step chunk of 20 steps


def test_records_save_load(records, tmp_path):
    records.save(tmp_path / "r.pt")
    back = rec_mod.StabilityRecords.load(tmp_path / "r.pt")
    assert torch.equal(back.topk["attention"][1], records.topk["attention"][1])
    assert back.topk_pages == 3
