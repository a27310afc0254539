"""generate() features at full budget must equal dense sdpa: sampling, streaming, beams, assisted
decoding, multi-turn reuse and chunked prefill. fp64 tiny models keep float noise out of the way."""

import pytest
import torch
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

from conftest import Recorder, make_cache, tiny_pair

F64 = dict(dtype=torch.float64)


def _ids(b, n, seed):
    return torch.randint(1, 256, (b, n), generator=torch.Generator().manual_seed(seed))


def _full(fc, tokens, **kw):
    return make_cache(fc, topk_pages=-(-tokens // 8), page_size=8, rerank_interval=3, **kw)


def test_sampling_matches_dense():
    ref, fc = tiny_pair(**F64)
    ids = _ids(2, 40, 10)
    torch.manual_seed(0)
    a = ref.generate(ids, do_sample=True, top_k=20, temperature=0.9, max_new_tokens=40)
    torch.manual_seed(0)
    b = fc.generate(ids, do_sample=True, top_k=20, temperature=0.9, max_new_tokens=40, past_key_values=_full(fc, 80))
    assert torch.equal(a, b)


def test_streaming_yields_the_generated_tokens():
    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.append(value.view(-1).tolist())

        def end(self):
            self.ended = True

    _, fc = tiny_pair()
    ids = _ids(1, 30, 11)
    streamer = Collect()
    out = fc.generate(ids, max_new_tokens=20, do_sample=False, streamer=streamer, past_key_values=_full(fc, 50))
    streamed = [t for chunk in streamer.tokens[1:] for t in chunk]  # first put() is the prompt
    assert streamed == out[0, 30:].tolist() and streamer.ended


@pytest.mark.parametrize("sketch_bits", [0, 2])
def test_beam_search_matches_dense(sketch_bits):
    """sketch 2: beams reorder the key sketches with the rest of the page metadata."""
    ref, fc = tiny_pair(**F64)
    ids = _ids(2, 33, 12)
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=24, do_sample=False, early_stopping=False)
    a = ref.generate(ids, **kw)
    b = fc.generate(ids, past_key_values=_full(fc, 60, sketch_bits=sketch_bits), **kw)
    assert torch.equal(a, b)


def test_assisted_decoding_matches_greedy():
    ref, fc = tiny_pair(**F64)
    _, assistant = tiny_pair(layers=1, seed=3, **F64)
    ids = _ids(1, 37, 13)
    a = ref.generate(ids, max_new_tokens=30, do_sample=False)
    cache = _full(fc, 70)
    b = fc.generate(ids, max_new_tokens=30, do_sample=False, assistant_model=assistant, past_key_values=cache)
    assert torch.equal(a, b)
    assert cache.get_seq_length() == b.shape[1] - 1


def test_multi_turn_reuse_matches_dense():
    ref, fc = tiny_pair(**F64)
    turn1, turn2 = _ids(1, 41, 14), _ids(1, 19, 15)
    dense, flexi = DynamicCache(config=ref.config), _full(fc, 160)
    a1 = ref.generate(turn1, max_new_tokens=20, do_sample=False, past_key_values=dense)
    b1 = fc.generate(turn1, max_new_tokens=20, do_sample=False, past_key_values=flexi)
    assert torch.equal(a1, b1)
    a2 = ref.generate(torch.cat([a1, turn2], 1), max_new_tokens=25, do_sample=False, past_key_values=dense)
    b2 = fc.generate(torch.cat([b1, turn2], 1), max_new_tokens=25, do_sample=False, past_key_values=flexi)
    assert torch.equal(a2, b2)


def test_chunked_prefill_matches_dense_forward():
    ref, fc = tiny_pair(**F64)
    ids = _ids(1, 90, 16)
    cache = _full(fc, 100)
    with torch.no_grad():
        expect = ref(ids).logits
        got = [fc(ids[:, i : i + 23], past_key_values=cache, use_cache=True).logits for i in range(0, 90, 23)]
    torch.testing.assert_close(torch.cat(got, 1), expect, atol=1e-10, rtol=0)


def test_chunked_prefill_generate_with_max_cache_len_never_grows():
    """generate(prefill_chunk_size=...) at a sparse budget, buffers sized once by max_cache_len: the same tokens
    as without chunking, every K/V exact, and no buffer was ever replaced."""
    _, fc = tiny_pair(**F64)
    ids = _ids(2, 97, 18)
    knobs = dict(topk_pages=3, page_size=8, rerank_interval=4)
    whole = fc.generate(ids, max_new_tokens=25, do_sample=False, past_key_values=make_cache(fc, **knobs))
    cache = make_cache(fc, max_cache_len=97 + 25, **knobs)
    rec = Recorder(cache)
    chunked = fc.generate(ids, max_new_tokens=25, do_sample=False, past_key_values=cache, prefill_chunk_size=20)
    assert torch.equal(chunked, whole)
    assert rec.all_exact()
    assert all(layer.memory.version == 0 for layer in cache.layers)  # no buffer was replaced
