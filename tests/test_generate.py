"""generate() with a FlexiCache: the property "full budget equals dense" over architectures x generate modes,
and the features that hold below full budget.

Full budget equals dense: with a budget that covers the whole context (topk_pages >= every page), FlexiCache
is dense attention. For every case: the same tokens as the HF sdpa twin of the model (same weights), the
logits within float noise (fp32 2e-4, fp64 1e-10; CUDA graphs 1e-4 relative too), every K/V update()
received still bit-exact where updates are not reordered (Recorder), the paged layers exactly the model's
full-attention layers, and the stable heads really offloaded: the host pool holds every full page of every
stable head, and nothing where the profile has no stable head.

The matrix: every architecture greedily; every mode on tiny Llama; a few modes on other architectures.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

from conftest import Recorder, make_cache, profile_for, tiny_pair
from flexicache_hf import FlexiCacheLayer, HeadProfile, disable_cuda_graphs, enable_cuda_graphs
from flexicache_hf.compat import CACHE_KWARG, cache_kwargs

F64 = torch.float64
NEW = 64
GREEDY = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)


def _ids(b, n, seed):
    return torch.randint(1, 256, (b, n), generator=torch.Generator().manual_seed(seed))


def _left_padded(lengths, seed, device="cpu"):
    """A batch of prompts of these lengths, left-padded to the longest (pad id 0)."""
    T = max(lengths)
    ids = _ids(len(lengths), T, seed)
    mask = torch.ones_like(ids)
    for b, n in enumerate(lengths):
        ids[b, : T - n], mask[b, : T - n] = 0, 0
    return ids.to(device), mask.to(device)


# ------------------------------------------------------------------------------------------------
# architectures
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    model: dict  # tiny_pair's arguments
    prompt: int  # the greedy mode's prompt length
    page_size: int  # the greedy mode's page size


ARCHS = {
    "llama": Arch(dict(arch="llama"), 40, 8),  # tiny_pair's default: 6 heads, 2 KV heads (group 3), head_dim 32
    "llama-mha": Arch(dict(arch="llama", heads=3, kv_heads=3, head_dim=64), 61, 16),  # GQA group 1
    "llama-g3-d80": Arch(dict(arch="llama", heads=6, kv_heads=2, head_dim=80), 77, 16),  # group 3, head_dim 80
    "mistral-mqa": Arch(dict(arch="mistral", heads=7, kv_heads=1, head_dim=128), 45, 8),  # group 7, MQA
    "qwen2-bias": Arch(dict(arch="qwen2", heads=14, kv_heads=2, head_dim=64), 100, 16),  # group 7, q/k/v biases
    "qwen3-qknorm": Arch(dict(arch="qwen3", heads=8, kv_heads=4, head_dim=64), 33, 4),  # q/k norms
    # alternating full / sliding-window layers (as Gemma 2/3 and Qwen with sliding layers): the full layers are
    # paged, the sliding ones stay transformers' dense window; generation runs far beyond the 16-token window
    "qwen2-hybrid": Arch(dict(arch="qwen2", layers=4, dtype=F64, sliding_window=16, use_sliding_window=True,
                              layer_types=["full_attention", "sliding_attention"] * 2), 40, 4),
}


# ------------------------------------------------------------------------------------------------
# one case: a model pair, a cache factory, and what the mode compares
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    arch: str
    mode: str
    profile: str = "mixed"  # mixed (conftest.profile_for) | all_stable | all_unstable | auto (online calibration)
    sketch_bits: int = 0
    sketch_score: str = "mass"
    dtype: torch.dtype | None = None  # overrides the mode's and the architecture's

    def __str__(self):
        parts = [self.arch, self.mode] + ([self.profile] if self.profile != "mixed" else [])
        if self.sketch_bits:
            parts.append(f"sketch{self.sketch_bits}-{self.sketch_score}")
        if self.dtype is not None:
            parts.append(str(self.dtype).removeprefix("torch."))
        return "-".join(parts)


class Setup:
    """The dense and flexicache twins of a case's model, and its full-budget caches (each with a Recorder)."""

    def __init__(self, case: Case, model: dict, device="cpu"):
        self.case, self.arch = case, ARCHS[case.arch]
        kwargs = {**model, **self.arch.model}  # the architecture decides; the mode fills in what it leaves open
        if case.dtype is not None:
            kwargs["dtype"] = case.dtype
        self.dtype = kwargs.get("dtype", torch.float32)
        ref, fc = tiny_pair(**kwargs)
        self.ref, self.fc = ref.to(device), fc.to(device)
        self.made = []  # (cache, page_size, recorder or None)

    def dense(self):
        return DynamicCache(config=self.ref.config)

    @property
    def tol(self) -> dict:
        return dict(atol=1e-10 if self.dtype == F64 else 2e-4, rtol=0)

    def cache(self, tokens: int, page_size: int, rerank: int, record=True, **knobs):
        """A cache whose budget covers `tokens` tokens: topk_pages = every page."""
        c, cfg = self.case, self.fc.config
        L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
        profile = {"mixed": profile_for(self.fc), "all_stable": HeadProfile.all_stable(L, H),
                   "all_unstable": HeadProfile.all_unstable(L, H), "auto": "auto"}[c.profile]
        if c.profile == "auto":
            knobs.setdefault("calibration_steps", 16)
        cache = make_cache(self.fc, profile=profile, topk_pages=-(-tokens // page_size), page_size=page_size,
                           rerank_interval=rerank, sketch_bits=c.sketch_bits, sketch_score=c.sketch_score, **knobs)
        self.made.append((cache, page_size, Recorder(cache) if record else None))
        return cache


@dataclass
class Compared:
    """What a mode ran: the dense and FlexiCache outputs (tensors of tokens or generate() outputs), and the
    caches they left (a DynamicCache and a FlexiCache), whose K/V must agree as closely as the logits."""

    ref: object
    fc: object
    caches: tuple | None = None


# ------------------------------------------------------------------------------------------------
# generate modes: each runs dense and FlexiCache and returns what to compare; mode-specific checks inline
# ------------------------------------------------------------------------------------------------
def mode_greedy(s: Setup):
    a = s.arch
    ids = _ids(1, a.prompt, 1)
    cache = s.cache(a.prompt + NEW, a.page_size, rerank=4)
    calibrating = pytest.warns(UserWarning, match="stability cannot be measured") if s.case.profile == "auto" \
        else contextlib.nullcontext()
    with calibrating:  # profile="auto" at full budget: every page is selected, so it keeps every head unstable
        out = s.fc.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY, **cache_kwargs(cache))
    if s.case.profile == "auto":
        c = s.fc.config
        assert len(cache.profile.unstable) == c.num_hidden_layers * c.num_key_value_heads
    dense = s.dense()
    a = s.ref.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY, **cache_kwargs(dense))
    return [Compared(a, out, (dense, cache))]


def mode_padded_batch(s: Setup):
    """Left padding of different lengths, one crossing two pages: padding is never selected nor attended."""
    ids = _ids(3, 70, 2)
    mask = torch.ones_like(ids)
    for row, pad in ((0, 0), (1, 13), (2, 40)):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    cache, dense = s.cache(70 + NEW, 16, rerank=3), s.dense()
    gen = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    a = s.ref.generate(ids, **gen, **cache_kwargs(dense))
    return [Compared(a, s.fc.generate(ids, **gen, **cache_kwargs(cache)), (dense, cache))]


def mode_rerank_every_step(s: Setup):
    """fp64 rules out float noise: every logit matches to 1e-10 through 64 steps with reranks every step."""
    ids = _ids(2, 50, 3)
    cache, dense = s.cache(50 + NEW, 4, rerank=1), s.dense()
    gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    a = s.ref.generate(ids, **gen, **cache_kwargs(dense))
    return [Compared(a, s.fc.generate(ids, **gen, **cache_kwargs(cache)), (dense, cache))]


def mode_sampling(s: Setup):
    ids = _ids(2, 40, 10)
    gen = dict(do_sample=True, top_k=20, temperature=0.9, max_new_tokens=40, return_dict_in_generate=True,
               output_logits=True)
    cache, dense = s.cache(80, 8, rerank=3), s.dense()
    torch.manual_seed(0)
    a = s.ref.generate(ids, **gen, **cache_kwargs(dense))
    torch.manual_seed(0)
    return [Compared(a, s.fc.generate(ids, **gen, **cache_kwargs(cache)), (dense, cache))]


def mode_beams(s: Setup):
    """Beams reorder every row of the cache (K/V, slots, host pool, page metadata and key sketches)."""
    ids = _ids(2, 33, 12)
    gen = dict(num_beams=3, num_return_sequences=2, max_new_tokens=24, do_sample=False, early_stopping=False,
               return_dict_in_generate=True, output_scores=True)
    cache, dense = s.cache(60, 8, rerank=3, record=False), s.dense()  # rows are reordered: no Recorder
    a = s.ref.generate(ids, **gen, **cache_kwargs(dense))
    b = s.fc.generate(ids, **gen, **cache_kwargs(cache))
    torch.testing.assert_close(b.sequences_scores, a.sequences_scores, **s.tol)
    return [Compared(a.sequences, b.sequences, (dense, cache))]


def mode_assisted(s: Setup):
    """Assisted decoding crops the cache after every rejected draft (crop re-pages the kept prefix)."""
    _, assistant = tiny_pair(layers=1, seed=3, dtype=s.dtype)
    ids = _ids(1, 37, 13)
    dense = s.dense()
    a = s.ref.generate(ids, max_new_tokens=30, do_sample=False, **cache_kwargs(dense))
    cache = s.cache(70, 8, rerank=3, record=False)  # crops drop received K/V: no Recorder
    b = s.fc.generate(ids, max_new_tokens=30, do_sample=False, assistant_model=assistant, **cache_kwargs(cache))
    assert cache.get_seq_length() == b.shape[1] - 1
    return [Compared(a, b, (dense, cache))]


def mode_multi_turn(s: Setup):
    """A second turn on the same cache: several query tokens on a non-empty cache, then decoding."""
    turn1, turn2 = _ids(1, 41, 14), _ids(1, 19, 15)
    dense, flexi = s.dense(), s.cache(160, 8, rerank=3)
    gen = dict(do_sample=False, **{k: v for k, v in GREEDY.items() if k != "do_sample"})
    a1 = s.ref.generate(turn1, max_new_tokens=20, **gen, **cache_kwargs(dense))
    b1 = s.fc.generate(turn1, max_new_tokens=20, **gen, **cache_kwargs(flexi))
    assert torch.equal(a1.sequences, b1.sequences)
    a2 = s.ref.generate(torch.cat([a1.sequences, turn2], 1), max_new_tokens=25, **gen, **cache_kwargs(dense))
    b2 = s.fc.generate(torch.cat([b1.sequences, turn2], 1), max_new_tokens=25, **gen, **cache_kwargs(flexi))
    return [Compared(a1, b1), Compared(a2, b2, (dense, flexi))]


def mode_chunked_prefill(s: Setup):
    """Chunked forwards of the prompt: every position's logits equal a dense forward of the whole prompt; then
    generate(prefill_chunk_size=...) equals dense generation."""
    ids = _ids(1, 90, 16)
    cache = s.cache(100, 8, rerank=3)
    with torch.no_grad():
        expect = s.ref(ids).logits
        got = [s.fc(ids[:, i : i + 23], use_cache=True, **cache_kwargs(cache)).logits for i in range(0, 90, 23)]
    torch.testing.assert_close(torch.cat(got, 1), expect, **s.tol)
    gen = dict(max_new_tokens=25, min_new_tokens=25, **GREEDY)
    cache, dense = s.cache(90 + 25, 8, rerank=3), s.dense()
    b = s.fc.generate(ids, prefill_chunk_size=20, **gen, **cache_kwargs(cache))
    return [Compared(s.ref.generate(ids, **gen, **cache_kwargs(dense)), b, (dense, cache))]


def mode_streaming(s: Setup):
    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens.append(value.view(-1).tolist())

        def end(self):
            self.ended = True

    ids = _ids(1, 30, 11)
    streamer = Collect()
    gen = dict(max_new_tokens=20, **GREEDY)
    cache, dense = s.cache(50, 8, rerank=3), s.dense()
    out = s.fc.generate(ids, streamer=streamer, **gen, **cache_kwargs(cache))
    streamed = [t for chunk in streamer.tokens[1:] for t in chunk]  # the first put() is the prompt
    assert streamed == out.sequences[0, 30:].tolist() and streamer.ended
    return [Compared(s.ref.generate(ids, **gen, **cache_kwargs(dense)), out, (dense, cache))]


def mode_cuda_graphs(s: Setup):
    """Decode steps replayed from CUDA graphs (Triton kernels), a left-padded batch."""
    ids, mask = _left_padded((150, 121), 7, "cuda")
    gen = dict(attention_mask=mask, max_new_tokens=40, min_new_tokens=40, **GREEDY)
    dense = s.dense()
    a = s.ref.generate(ids, **gen, **cache_kwargs(dense))
    enable_cuda_graphs(s.fc)
    try:
        cache = s.cache(190, 8, rerank=3, record=False, use_kernels=True)  # replays bypass update()
        out = s.fc.generate(ids, **gen, **cache_kwargs(cache))
    finally:
        disable_cuda_graphs(s.fc)
    assert cache.decode_graphs is not None and cache.decode_graphs.replays > 0  # steps were really replayed
    return [Compared(a, out, (dense, cache))]


# mode -> (function, model settings the architecture leaves open); fp64 where float noise could flip a token
MODES = {
    "greedy": (mode_greedy, {}),
    "padded-batch": (mode_padded_batch, dict(head_dim=64)),
    "rerank-every-step": (mode_rerank_every_step, dict(dtype=F64, heads=8, layers=3)),
    "sampling": (mode_sampling, dict(dtype=F64)),
    "beams": (mode_beams, dict(dtype=F64)),
    "assisted": (mode_assisted, dict(dtype=F64)),
    "multi-turn": (mode_multi_turn, dict(dtype=F64)),
    "chunked-prefill": (mode_chunked_prefill, dict(dtype=F64)),
    "streaming": (mode_streaming, {}),
    "cuda-graphs": (mode_cuda_graphs, {}),
}

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
CASES = (
    # every architecture, greedy
    [Case(arch, "greedy") for arch in ARCHS]
    # every mode on tiny Llama
    + [Case("llama", "padded-batch", profile, bits, score) for profile, bits, score in [
        ("mixed", 0, "mass"), ("all_stable", 0, "mass"), ("all_unstable", 0, "mass"),
        ("mixed", 2, "mass"), ("mixed", 2, "max"), ("all_stable", 1, "mass")]]
    + [Case("llama", "greedy", "auto", dtype=F64)]
    + [Case("llama", mode) for mode in ("rerank-every-step", "sampling", "assisted", "multi-turn", "chunked-prefill",
                                        "streaming")]
    + [Case("llama", "beams"), Case("llama", "beams", sketch_bits=2)]
    + [pytest.param(Case("llama", "cuda-graphs"), marks=CUDA, id="llama-cuda-graphs"),
       pytest.param(Case("llama", "cuda-graphs", sketch_bits=2), marks=CUDA, id="llama-cuda-graphs-sketch2-mass")]
    # a few modes on other architectures
    + [Case("qwen3-qknorm", "beams"), Case("mistral-mqa", "padded-batch", "all_stable"),
       Case("qwen2-hybrid", "multi-turn"), Case("qwen2-hybrid", "padded-batch"), Case("qwen2-bias", "sampling"),
       Case("llama-g3-d80", "chunked-prefill", sketch_bits=2)]
)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_full_budget_equals_dense(case):
    fn, model = MODES[case.mode]
    s = Setup(case, model, device="cuda" if case.mode == "cuda-graphs" else "cpu")
    tol = s.tol if case.mode != "cuda-graphs" else dict(atol=1e-4, rtol=1e-4)
    compared = fn(s)
    for c in compared:
        _assert_same_output(c, tol)
    assert any(c.caches for c in compared)
    assert s.made
    for cache, page_size, rec in s.made:
        _assert_cache_holds_everything(s.fc, cache, page_size, rec)


def _assert_same_output(c: Compared, tol):
    tokens = lambda out: out if isinstance(out, torch.Tensor) else out.sequences  # noqa: E731
    assert torch.equal(tokens(c.ref), tokens(c.fc))
    if not isinstance(c.ref, torch.Tensor):
        assert len(c.ref.logits) == len(c.fc.logits)
        for step, (a, b) in enumerate(zip(c.ref.logits, c.fc.logits)):
            torch.testing.assert_close(b, a, **tol, msg=lambda m: f"step {step}: {m}")
    if c.caches is not None:  # the paged layers hold the K/V of the dense cache (rows in the same order)
        dense, flexi = c.caches
        assert flexi.get_seq_length() == dense.get_seq_length()
        for i, layer in enumerate(flexi.layers):
            if isinstance(layer, FlexiCacheLayer):
                fk, fv = flexi.full_kv(i)
                torch.testing.assert_close(fk, dense.layers[i].keys, **tol, msg=lambda m: f"layer {i} keys: {m}")
                torch.testing.assert_close(fv, dense.layers[i].values, **tol, msg=lambda m: f"layer {i} values: {m}")


def _assert_cache_holds_everything(fc, cache, page_size, rec):
    cfg = fc.config
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    assert [isinstance(layer, FlexiCacheLayer) for layer in cache.layers] == [t == "full_attention" for t in layer_types]
    paged = [(i, layer) for i, layer in enumerate(cache.layers) if isinstance(layer, FlexiCacheLayer)]
    if rec is not None:  # every K/V update() received, bit for bit
        for i, _ in paged:
            k, v = rec.kv(i)
            fk, fv = cache.full_kv(i)
            assert torch.equal(fk, k) and torch.equal(fv, v), f"layer {i}"
    # the split is the profile's, and the host pool holds every full page of every stable head
    prof = cache.profile
    assert [layer.unstable for _, layer in paged] == [prof.unstable_heads(i) for i, _ in paged]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    es = torch.finfo(fc.dtype).bits // 8
    host = sum(2 * layer.memory.batch * len(layer.stable) * (layer.length // page_size) * page_size * head_dim * es
               for _, layer in paged)
    has_stable = any(layer.stable for _, layer in paged)
    report = cache.memory_report()
    assert report["host_kv_bytes"] == host and (host > 0) == has_stable
    assert has_stable == (prof is not None and any(len(prof.unstable_heads(i)) < cfg.num_key_value_heads for i, _ in paged))


# ------------------------------------------------------------------------------------------------
# below full budget
# ------------------------------------------------------------------------------------------------
def test_chunked_prefill_generate_with_max_cache_len_never_grows():
    """generate(prefill_chunk_size=...) at a sparse budget, buffers sized once by max_cache_len: the same tokens
    as without chunking, every K/V exact, and no buffer was ever replaced."""
    _, fc = tiny_pair(dtype=F64)
    ids = _ids(2, 97, 18)
    knobs = dict(topk_pages=3, page_size=8, rerank_interval=4)
    whole = fc.generate(ids, max_new_tokens=25, do_sample=False, **cache_kwargs(make_cache(fc, **knobs)))
    cache = make_cache(fc, max_cache_len=97 + 25, **knobs)
    rec = Recorder(cache)
    chunked = fc.generate(ids, max_new_tokens=25, do_sample=False, prefill_chunk_size=20, **cache_kwargs(cache))
    assert torch.equal(chunked, whole)
    assert rec.all_exact()
    assert all(layer.memory.version == 0 for layer in cache.layers)  # no buffer was replaced


def test_the_old_cache_keyword_is_an_error_under_pytest(pytestconfig):
    """pyproject's filterwarnings turns transformers' deprecation of past_key_values= (from 5.24) into an error, so
    neither our code nor a test can use the old name unnoticed; before 5.24 it is the keyword, and passes."""
    if not any("past_key_values" in f for f in pytestconfig.getini("filterwarnings")):
        pytest.skip("run outside the repository: pyproject.toml's filterwarnings is not in force")
    _, fc = tiny_pair()
    ids = _ids(1, 8, 0)
    if CACHE_KWARG == "cache":
        with pytest.raises(FutureWarning, match="past_key_values` is deprecated"):
            fc.generate(ids, max_new_tokens=2, past_key_values=make_cache(fc))
        with pytest.raises(FutureWarning, match="past_key_values` is deprecated"), torch.no_grad():
            fc(ids, past_key_values=make_cache(fc), use_cache=True)
    else:
        fc.generate(ids, max_new_tokens=2, past_key_values=make_cache(fc))
