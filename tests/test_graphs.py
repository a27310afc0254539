"""CUDA-graph decode steps (graphs.py): a replayed step must equal the eager step exactly.

On the CPU only the pass-through is checked (nothing is captured there); the GPU cases run on the GPU
machine (`pytest tests/test_graphs.py`)."""

import pytest
import torch

from conftest import Recorder, make_cache, tiny_pair
from flexicache_hf import disable_cuda_graphs, enable_cuda_graphs
from flexicache_hf.compat import CACHE_KWARG, CACHE_KWARGS, TRANSFORMERS

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _generate(model, cache, ids, mask, new, keyword=CACHE_KWARG, **kw):
    """generate() without its own compilation: on CUDA a FlexiCache is compileable, and the reference runs here
    must be the eager step (enable_cuda_graphs turns compilation off by itself)."""
    kw.setdefault("disable_compile", True)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **{keyword: cache}, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, return_dict_in_generate=True, output_logits=True, **kw)


def _with_graphs(model, knobs, ids, mask, new):
    """(output, cache) of a generate() with CUDA-graph decode steps and a fresh cache."""
    enable_cuda_graphs(model)
    try:
        cache = make_cache(model, **knobs)
        return _generate(model, cache, ids, mask, new), cache
    finally:
        disable_cuda_graphs(model)


def _batch(device, lengths=(150, 121), vocab=256, seed=7):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=g)
    mask = torch.ones_like(ids)
    for b, n in enumerate(lengths):  # left padding
        ids[b, : T - n], mask[b, : T - n] = 0, 0
    return ids.to(device), mask.to(device)


def test_graphs_pass_through_off_cuda():
    _, fc = tiny_pair("llama", 6, 2, 32, layers=2)
    ids, mask = _batch("cpu")
    eager = _generate(fc, make_cache(fc, topk_pages=3, page_size=8, rerank_interval=3), ids, mask, 12)
    enable_cuda_graphs(fc)
    try:
        assert enable_cuda_graphs(fc) is fc  # idempotent
        cache = make_cache(fc, topk_pages=3, page_size=8, rerank_interval=3)
        out = _generate(fc, cache, ids, mask, 12)
        assert cache.decode_graphs is None  # nothing captured off CUDA
    finally:
        disable_cuda_graphs(fc)
    assert "forward" not in fc.__dict__
    assert torch.equal(out.sequences, eager.sequences)
    for a, b in zip(out.logits, eager.logits):
        assert torch.equal(a, b)


@cuda
@pytest.mark.parametrize("arch,heads,kv_heads,ps,K,R,bits,rank", [
    ("llama", 6, 2, 8, 3, 3, 0, "mass"), ("qwen2", 8, 1, 16, 2, 5, 0, "mass"), ("mistral", 12, 2, 4, 5, 1, 0, "mass"),
    ("llama", 6, 2, 8, 3, 3, 2, "mass"), ("llama", 6, 2, 8, 3, 3, 2, "max"),
])
def test_graph_replay_equals_eager(arch, heads, kv_heads, ps, K, R, bits, rank):
    """Sparse budget, left-padded batch, page fills, reranks and promotions inside replayed steps: the same
    tokens and logits as the eager path, and every K/V still recoverable bit-exactly. bits 2: the key
    sketches are written (page fills) and read (selection, by predicted mass or best q.k) inside the
    replayed steps."""
    _, fc = tiny_pair(arch, heads, kv_heads, 32, layers=3)
    fc = fc.cuda()
    ids, mask = _batch("cuda")
    knobs = dict(topk_pages=K, page_size=ps, rerank_interval=R, use_kernels=True, sketch_bits=bits, sketch_score=rank)
    eager_cache = make_cache(fc, **knobs)
    rec = Recorder(eager_cache)
    eager = _generate(fc, eager_cache, ids, mask, 70)
    assert rec.all_exact()
    out, cache = _with_graphs(fc, knobs, ids, mask, 70)
    assert cache.decode_graphs is not None and cache.decode_graphs.replays > 40  # steps were really replayed
    assert torch.equal(out.sequences, eager.sequences)
    for a, b in zip(out.logits, eager.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    _assert_same_kv(cache, eager_cache)  # replays bypass update(), so compare with the recorded eager run


def _assert_same_kv(cache, reference):
    for i in range(len(cache.layers)):
        for got, want in zip(cache.full_kv(i), reference.full_kv(i)):
            assert torch.equal(got, want), f"layer {i}: K/V differ from the eager run"


@cuda
def test_graphs_survive_buffer_growth():
    """Decoding past the reserved capacity grows the buffers eagerly; stale graphs are dropped, not replayed.
    Headroom 8 pages: the buffers grow twice in 60 steps, and between growths each step kind is seen, captured
    and replayed (a graph is replayed from its third step of a kind with the same buffers; with 2 pages the
    buffers and the host pool, which grow by an eighth or the headroom, were replaced too often for any replay)."""
    _, fc = tiny_pair("llama", 6, 2, 32, layers=2)
    fc = fc.cuda()
    ids, mask = _batch("cuda", lengths=(40, 33))
    knobs = dict(topk_pages=2, page_size=4, rerank_interval=2, host_headroom_pages=8, use_kernels=True)
    eager_cache = make_cache(fc, **knobs)
    eager = _generate(fc, eager_cache, ids, mask, 60)
    out, cache = _with_graphs(fc, knobs, ids, mask, 60)
    g = cache.decode_graphs
    assert g.captures > len(g.graphs) and g.replays > 0  # graphs were dropped at growth, then made again
    assert torch.equal(out.sequences, eager.sequences)
    _assert_same_kv(cache, eager_cache)


@cuda
def test_reset_starts_a_new_pool_when_tensors_outlive_the_graphs():
    """A long generation past the reserved capacity (Qwen, 8-token pages, 2,048 steps) failed at the next
    capture with PyTorch's INTERNAL ASSERT use_count > 0: every graph of the pool had been dropped while a
    tensor allocated during a capture was still alive. After reset() capturing works again."""
    from flexicache_hf.graphs import _CacheGraphs

    g = _CacheGraphs()
    old = g.pool
    graph = torch.cuda.CUDAGraph()
    x = torch.ones(1024, device="cuda")
    with torch.cuda.graph(graph, pool=g.pool):
        kept = x * 2  # allocated from the pool, and kept past its graph
    graph.replay()  # a capture only records: the replay computes `kept`
    g.graphs["step"] = (graph, {}, kept)
    del graph
    g.reset()
    assert not g.graphs and g.pool != old
    again = torch.cuda.CUDAGraph()
    with torch.cuda.graph(again, pool=g.pool):
        y = kept + 1
    again.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.full_like(x, 3.0))


def _scalars(obj) -> dict:
    found = {k: v for k, v in vars(obj).items() if isinstance(v, (int, bool)) and not k.startswith("_")}
    if "_length" in vars(obj):  # the memory's length (a property over _length)
        found["length"] = obj.length
    return found


def test_a_replay_advances_every_python_side_number():
    """A replayed step runs no Python but `count_replayed_step`: every int/bool attribute that an eager decode
    step changes (layer, memory, slots and host pool) must be changed identically by it alone."""
    import types

    from flexicache_hf import FlexiCacheLayer

    _, fc = tiny_pair("llama", 6, 2, 32, layers=2)
    ids, mask = _batch("cpu", lengths=(61, 44))
    cache = make_cache(fc, topk_pages=2, page_size=4, rerank_interval=3, host_headroom_pages=1)
    before, checked = {}, []
    update = FlexiCacheLayer.update

    def state(layer):
        m = layer.memory
        return _scalars(layer), _scalars(m), _scalars(m.stable) if m.stable is not None else None

    def spy_update(self, k, *args, **kwargs):
        if k.shape[2] == 1 and self.length > 0 and self.step_key() is not None:  # a step graphs would replay
            before[self.layer_idx] = (self.decode_flags(), *state(self))
        return update(self, k, *args, **kwargs)

    decode = FlexiCacheLayer._decode

    def spy_decode(self, query, scale, flags):
        out = decode(self, query, scale, flags)
        if self.layer_idx not in before:
            return out
        want_flags, layer_state, mem_state, slots_state = before.pop(self.layer_idx)
        shadow = types.SimpleNamespace(**layer_state, memory=types.SimpleNamespace(**mem_state))
        FlexiCacheLayer.count_replayed_step(shadow)
        assert want_flags == flags
        got = state(self)
        assert {k: getattr(shadow, k) for k in got[0]} == got[0]
        assert vars(shadow.memory) == got[1]
        assert slots_state == got[2]  # the slots and host pool change no Python-side number
        checked.append(flags)
        return out

    FlexiCacheLayer.update, FlexiCacheLayer._decode = spy_update, spy_decode
    try:
        _generate(fc, cache, ids, mask, 30)
    finally:
        FlexiCacheLayer.update, FlexiCacheLayer._decode = update, decode
    kinds = set(checked)
    assert len(checked) >= 40 and any(f.fill for f in kinds) and any(f.rerank for f in kinds)
    assert any(f.new_page for f in kinds)


@cuda
@pytest.mark.parametrize("graphs", [True, False])
def test_pdl_equals_stream_order(graphs, monkeypatch):
    """Programmatic dependent launch only lets the decode chain's kernels start early; each waits before it
    reads a predecessor's output or writes. So with it on, every logit must be bit-identical to plain
    stream order: a missing wait shows up here as a race. Long prompts (over 512 pages of 4 tokens: the
    top-k chunk pass runs), a left-padded batch, reranks, promotions, graph replays and eager steps."""
    from flexicache_hf.kernels import _util

    if not _util.pdl(torch.device("cuda")).get("PDL"):
        monkeypatch.setattr(_util, "PDL", True)
        if not _util.pdl(torch.device("cuda"))["PDL"]:
            pytest.skip("programmatic dependent launch needs Hopper or later and Triton >= 3.3")
    _, fc = tiny_pair("llama", 8, 2, 64, layers=3)
    fc = fc.cuda()
    ids, mask = _batch("cuda", lengths=(2300, 2061, 1777))
    knobs = dict(topk_pages=9, page_size=4, rerank_interval=4, use_kernels=True)
    runs = {}
    for pdl in (True, False):
        monkeypatch.setattr(_util, "PDL", pdl)
        if graphs:
            runs[pdl], _ = _with_graphs(fc, knobs, ids, mask, 48)
        else:
            runs[pdl] = _generate(fc, make_cache(fc, **knobs), ids, mask, 48)
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for a, b in zip(runs[True].logits, runs[False].logits):
        assert torch.equal(a, b)


@cuda
def test_no_garbage_collection_during_capture():
    """No garbage collection may run while a decode step is captured: it may destroy an unreachable earlier
    cache's CUDA graphs, which CUDA forbids while a stream captures (the capture is invalidated and the
    process aborts: seen once in ~3 GPU eval runs). With a collection due at nearly every allocation,
    gc.callbacks must see none during a capture, and the replays must still match the eager run."""
    import gc

    _, fc = tiny_pair("llama", 6, 2, 32, layers=2)
    fc = fc.cuda()
    ids, mask = _batch("cuda")
    knobs = dict(topk_pages=3, page_size=8, rerank_interval=3, use_kernels=True)
    eager = _generate(fc, make_cache(fc, **knobs), ids, mask, 24)
    seen = []

    def spy(phase, info):
        if phase == "start":
            seen.append(torch.cuda.is_current_stream_capturing())

    threshold = gc.get_threshold()
    gc.callbacks.append(spy)
    gc.set_threshold(1)
    try:
        out, cache = _with_graphs(fc, knobs, ids, mask, 24)
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(spy)
    assert cache.decode_graphs.captures > 0 and len(seen) > 0  # collections ran, around the captures
    assert not any(seen), "a garbage collection ran during a CUDA-graph capture"
    assert torch.equal(out.sequences, eager.sequences)


# the old name warns from 5.24, which pyproject's filterwarnings turns into an error: here it is meant
OLD_NAME_ON_PURPOSE = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")


@cuda
@pytest.mark.parametrize("keyword", [pytest.param(k, marks=OLD_NAME_ON_PURPOSE) if k == "past_key_values" else k
                                     for k in CACHE_KWARGS])
def test_graphs_replay_whichever_keyword_carries_the_cache(keyword):
    """transformers 5.24 renamed generate()'s and forward's past_key_values to cache: decode steps must be
    replayed (counted) under the name the installed version passes, with the tokens of the eager run."""
    if keyword == "cache" and CACHE_KWARG != "cache":
        pytest.skip(f"transformers {TRANSFORMERS} has no cache= keyword")
    _, fc = tiny_pair("llama", 8, 2, 64, layers=2, dtype=torch.bfloat16)
    fc.cuda()
    ids, mask = _batch("cuda")
    knobs = dict(topk_pages=3, page_size=8, rerank_interval=4)
    eager = _generate(fc, make_cache(fc, **knobs), ids, mask, 40)
    enable_cuda_graphs(fc)
    try:
        cache = make_cache(fc, **knobs)
        out = _generate(fc, cache, ids, mask, 40, keyword=keyword)
    finally:
        disable_cuda_graphs(fc)
    print(f"transformers {TRANSFORMERS}, {keyword}=: {cache.decode_graphs.replays} replays, "
          f"{cache.decode_graphs.captures} captures")
    # 39 decode steps: each step kind runs eagerly once, is captured once, and is replayed from then on; the
    # warm-up's re-selecting steps add kinds (7 captures here), so about two thirds of the steps are replays
    assert cache.decode_graphs.replays > 20
    assert torch.equal(out.sequences, eager.sequences)
