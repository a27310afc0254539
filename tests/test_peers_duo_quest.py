"""The DuoAttention-style peer (duo_attention) and Quest (quest) of eval/methods.py and eval/peers.py, on
tiny random models (conftest): Duo's GPU K/V bytes equal FlexiCache's at the same budget, both peers equal
dense at the full budget, and Quest's page selection (FlexiCache with every head unstable) equals Quest
written from its paper (peers.quest_page_attention)."""

import pytest
import torch

from conftest import profile_for, tiny_pair
from flexicache_hf import HeadProfile, ops
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.eval import methods as M
from flexicache_hf.eval import peers, presets, runner

PS = 4  # page size of the tiny tests


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny3():
    """3 KV heads per layer (GQA 2), 3 layers; prompts long enough for several windows."""
    _, fc = tiny_pair("qwen2", heads=6, kv_heads=3, head_dim=16, layers=3, seed=5)
    torch.manual_seed(2)
    return fc, torch.randint(1, 256, (1, 150))


def _ctx(model, profile=None, max_new=32):
    return M.Context(model, profile if profile is not None else profile_for(model), page_size=PS, max_new_tokens=max_new)


@torch.no_grad()
def _step(model, cache, tok, pos):
    return model(input_ids=torch.tensor([[tok]]), **cache_kwargs(cache), position_ids=torch.tensor([[pos]])).logits[:, -1].float()


@torch.no_grad()
def _decode(model, cache, prefill, steps, tokens=None):
    """Logits of `steps` greedy (or forced) decode steps, the prefill's logits first."""
    out, nxt = [prefill.last_logits], int(prefill.last_logits.argmax())
    for t in range(steps):
        out.append(_step(model, cache, nxt if tokens is None else tokens[t], prefill.length + t))
        nxt = int(out[-1].argmax())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------
def test_registered_and_in_the_presets():
    reg = M.registry()
    assert isinstance(reg["duo_attention"], M.DuoAttention) and isinstance(reg["quest"], M.Quest)
    quest = reg["quest"]
    assert isinstance(quest, M.FlexiCacheMethod) and quest.profile == "all_unstable" and quest.sketch_bits == 0
    assert [m.name for m in M.get_methods(["duo_attention", "quest"])] == ["duo_attention", "quest"]
    # --sketch-bits renames FlexiCache's methods, never the peers: Quest keeps the paper's bound
    assert [m.name for m in M.get_methods(["duo_attention", "quest"], sketch_bits=2)] == ["duo_attention", "quest"]
    for name in ("cpu", "full"):
        for job in presets.get_preset(name)["jobs"]:
            assert {"duo_attention", "quest", "snapkv", "streamingllm"} <= set(job["methods"])
            assert {"duo_attention", "quest"} <= set(job["fidelity"]["methods"])
    # the ci preset stays as fast as it was (tests/test_eval.py runs it)
    assert presets.get_preset("ci")["jobs"][0]["methods"] == ["dense", "flexicache", "streamingllm", "snapkv"]


def test_duo_window_is_flexicache_stable_slots(tiny):
    model, _ = tiny
    duo = M.DuoAttention()
    ctx16 = M.Context(model, profile_for(model), page_size=16)
    assert duo.window(ctx16, 256, 4000) == 256 + 16 + 16  # top-K pages, the current page, the rerank tail
    assert duo.window(ctx16, 1024, 4000) == 1024 + 32
    assert duo.window(_ctx(model), 8, 70) == 8 + PS + 16  # rerank 16 = 4 pages of 4
    with pytest.raises(ValueError):
        duo.window(ctx16, 100, 4000)  # budgets in whole pages, as FlexiCache's


# ---------------------------------------------------------------------------------------------------
# DuoAttention-style peer
# ---------------------------------------------------------------------------------------------------
def _profiles(model):
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    return {
        "mixed": profile_for(model),
        "layer_all_or_none": HeadProfile(L, H, [(0, h) for h in range(H)]),  # layer 0 all retrieval, others none
        "all_stable": HeadProfile.all_stable(L, H),
    }


@pytest.mark.parametrize("kind", ["mixed", "layer_all_or_none", "all_stable"])
@pytest.mark.parametrize("budget", [8, 16, 40])
def test_duo_gpu_bytes_equal_flexicache(tiny3, kind, budget):
    """Duo's K/V bytes = FlexiCache's GPU K/V bytes at the same budget (same profile), within one page of
    one head, after the prompt and at every decode step."""
    model, ids = tiny3
    ctx = _ctx(model, _profiles(model)[kind])
    prefill = runner.run_prefill(model, ids)
    fc = M.get_methods(["flexicache"])[0].make_cache(ctx, budget, prefill)
    duo = M.DuoAttention().make_cache(ctx, budget, prefill)
    D = model.config.head_dim
    page = 2 * PS * D * 4  # K and V of one page of one head, fp32
    window = M.DuoAttention().window(ctx, budget, prefill.length)
    assert prefill.length > window  # the streaming heads did evict
    n_stream = sum(len(layer.streaming) for layer in duo.layers)
    assert n_stream == sum(len(layer.memory.stable_heads) for layer in fc.layers)
    nxt = int(prefill.last_logits.argmax())
    for t in range(25):
        target = fc.memory_report()["gpu_kv_bytes"]
        assert abs(duo.kv_bytes() - target) <= page, (t, duo.kv_bytes(), target)
        assert M.cache_kv_bytes(duo) == duo.kv_bytes()  # what results.json records
        _step(model, duo, nxt, prefill.length + t)
        nxt = int(_step(model, fc, nxt, prefill.length + t).argmax())
    if n_stream:  # the streaming heads hold the window, far less than dense
        dense = M.cache_kv_bytes(M.Dense().make_cache(ctx, None, prefill))
        assert duo.kv_bytes() < dense


def test_duo_keeps_retrieval_heads_whole_and_streaming_heads_windowed(tiny3):
    """After the prompt and 20 steps: retrieval heads hold every K/V the layer was given; streaming heads
    their first sinks and the newest tokens of exactly the window, bit-exact."""
    model, ids = tiny3
    ctx = _ctx(model)
    prefill = runner.run_prefill(model, ids)
    method = M.DuoAttention()
    duo = method.make_cache(ctx, 8, prefill)
    window = method.window(ctx, 8, prefill.length)
    sink = min(method.n_sink, window // 4)
    given = [[kv] for kv in prefill.kv]  # every K/V each layer received: the prompt's, then one per step

    def recording(layer, i):
        update = layer.update

        def rec(k, v, *args, **kwargs):
            given[i].append((k.clone(), v.clone()))
            return update(k, v, *args, **kwargs)

        return rec

    for i, layer in enumerate(duo.layers):
        layer.update = recording(layer, i)
    _decode(model, duo, prefill, 20)
    T = prefill.length + 20
    for layer, kv in zip(duo.layers, given):
        keys, values = torch.cat([k for k, _ in kv], 2), torch.cat([v for _, v in kv], 2)
        assert keys.shape[2] == T == layer.get_seq_length() and layer.kept_tokens() == (T, window)
        assert layer.sink_k.shape[2] == sink
        r, s = layer.retrieval, layer.streaming
        assert torch.equal(layer.rk, keys[:, r]) and torch.equal(layer.rv, values[:, r])
        assert torch.equal(layer.sink_k, keys[:, s, :sink]) and torch.equal(layer.sink_v, values[:, s, :sink])
        assert torch.equal(layer.keys, keys[:, s, T - (window - sink):])
        assert torch.equal(layer.values, values[:, s, T - (window - sink):])


def test_duo_attention_equals_reference(tiny3):
    """A decode step: retrieval heads' output = dense attention over everything, streaming heads' = dense
    attention over their sinks + window (computed here by masking dense's keys)."""
    model, ids = tiny3
    ctx = _ctx(model)
    prefill = runner.run_prefill(model, ids)
    method = M.DuoAttention()
    duo = method.make_cache(ctx, 8, prefill)
    window = method.window(ctx, 8, prefill.length)
    sink = min(method.n_sink, window // 4)
    layer = duo.layers[1]
    B, Hkv, T, D = prefill.kv[1][0].shape
    G = model.config.num_attention_heads // Hkv
    k_new, v_new = torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D)
    q = torch.randn(B, Hkv * G, 1, D)
    layer.update(k_new, v_new)
    module = model.model.layers[1].self_attn
    got, _ = layer.attend(module, q, None, scaling=0.25)
    keys = torch.cat([prefill.kv[1][0], k_new], 2)
    values = torch.cat([prefill.kv[1][1], v_new], 2)
    visible = torch.ones(Hkv, T + 1, dtype=torch.bool)
    for h in layer.streaming:
        visible[h] = False
        visible[h, :sink] = True
        visible[h, T + 1 - (window - sink):] = True
    logits = torch.einsum("bhgd,bhtd->bhgt", q.view(B, Hkv, G, D), keys) * 0.25
    probs = logits.masked_fill(~visible[None, :, None], float("-inf")).softmax(-1)
    want = torch.einsum("bhgt,bhtd->bhgd", probs, values).reshape(B, 1, Hkv * G, D)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_duo_shared_prefill_equals_real_prefill(tiny):
    """Seeding Duo from the shared dense prefill is exactly a prefill through its cache."""
    model, ids = tiny
    ctx = _ctx(model)
    prefill = runner.run_prefill(model, ids)
    m = M.DuoAttention()
    c1, l1 = runner.method_cache(m, ctx, 8, prefill, model, shared_prefill=True)
    c2, l2 = runner.method_cache(m, ctx, 8, prefill, model, shared_prefill=False)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0)
    assert c1.kv_bytes() == c2.kv_bytes()
    torch.testing.assert_close(_decode(model, c1, prefill, 16), _decode(model, c2, prefill, 16), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# both peers: full budget = dense; a small budget is not
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["duo_attention", "quest"])
@pytest.mark.parametrize("fixture", ["tiny", "tiny3"])
def test_full_budget_equals_dense(request, method, fixture):
    model, ids = request.getfixturevalue(fixture)
    ctx = _ctx(model)
    prefill = runner.run_prefill(model, ids)
    dense = _decode(model, M.Dense().make_cache(ctx, None, prefill), prefill, 20)
    got = _decode(model, M.get_methods([method])[0].make_cache(ctx, None, prefill), prefill, 20)
    assert torch.equal(got.argmax(-1), dense.argmax(-1))  # the same greedy tokens
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=0)


def test_small_budget_differs_from_dense(tiny3):
    model, ids = tiny3
    ctx = _ctx(model)
    prefill = runner.run_prefill(model, ids)
    dense = _decode(model, M.Dense().make_cache(ctx, None, prefill), prefill, 10)
    forced = dense.argmax(-1)[:-1].tolist()
    for m in M.get_methods(["duo_attention", "quest"]):
        got = _decode(model, m.make_cache(ctx, 8, prefill), prefill, 10, tokens=forced)
        assert (got[1:] - dense[1:]).abs().max() > 1e-3, m.name


# ---------------------------------------------------------------------------------------------------
# Quest
# ---------------------------------------------------------------------------------------------------
def test_quest_gpu_bytes_are_the_whole_context(tiny):
    """Quest attends to the budget but keeps every K/V on the GPU: its recorded bytes are dense's."""
    model, ids = tiny
    ctx = _ctx(model)
    prefill = runner.run_prefill(model, ids)
    quest = M.get_methods(["quest"])[0].make_cache(ctx, 8, prefill)
    dense = M.Dense().make_cache(ctx, None, prefill)
    assert M.cache_kv_bytes(quest) == M.cache_kv_bytes(dense)
    report = quest.memory_report()
    assert report["host_kv_bytes"] == 0 and report["stable_gpu_kv_bytes"] == 0 and report["metadata_bytes"] > 0
    fc = M.get_methods(["flexicache"])[0].make_cache(ctx, 8, prefill)
    assert M.cache_kv_bytes(fc) < M.cache_kv_bytes(quest)


def _as_mask(table, pages):
    """Page ids [B, H, k] (-1: none) -> [B, H, pages] bool."""
    out = torch.zeros(*table.shape[:-1], pages + 1, dtype=torch.bool)
    out.scatter_(-1, torch.where(table >= 0, table, pages), True)
    return out[..., :pages]


class _Recorder:
    """Stands in for a FlexiCache layer's online calibration: sees every unstable page table."""

    last_layer = -1

    def __init__(self):
        self.tables = []

    def record(self, layer, table, full_pages):
        self.tables.append((layer, table.clone()))

    def ready(self):
        return False


@pytest.mark.parametrize("fixture,budget", [("tiny", 8), ("tiny", 16), ("tiny3", 12), ("tiny3", 40)])
def test_quest_selection_equals_flexicache_all_unstable(request, fixture, budget):
    """At every decode step, every layer and KV head: the pages FlexiCache with every head unstable (the
    "quest" method) selects are the pages Quest written from its paper selects, and the outputs agree."""
    model, ids = request.getfixturevalue(fixture)
    ctx = _ctx(model)
    prefill = runner.run_prefill(model, ids)
    fc = M.get_methods(["quest"])[0].make_cache(ctx, budget, prefill)
    rec = _Recorder()
    for layer in fc.layers:
        layer.calibration = rec
    ref = peers.quest_cache(model.config, budget // PS, PS, prefill.kv)
    nxt = int(prefill.last_logits.argmax())
    compared = 0
    for t in range(24):
        rec.tables.clear()
        a = _step(model, fc, nxt, prefill.length + t)
        b = _step(model, ref, nxt, prefill.length + t)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert [layer for layer, _ in rec.tables] == list(range(len(ref.layers)))
        for (_, table), layer in zip(rec.tables, ref.layers):
            chosen = layer.chosen[..., :-1]  # the current page aside: both always attend to it
            assert torch.equal(_as_mask(table, chosen.shape[-1]), chosen), t
            assert int(chosen.sum(-1).min()) == min(budget // PS, chosen.shape[-1])
            compared += 1
        nxt = int(a.argmax())
    assert compared == 24 * len(ref.layers)


@pytest.mark.parametrize("T,ps,k,G", [(37, 4, 3, 1), (64, 16, 2, 5), (9, 4, 5, 3), (50, 8, 1, 2)])
def test_quest_reference_matches_the_ops_selection_with_padding(T, ps, k, G):
    """The reference's pages = ops.select_pages_ref on the cache's MinMax metadata (ops.page_minmax_ref),
    with left padding (the first 3 keys of row 1, and a whole padded page in row 1 when ps = 4)."""
    g = torch.Generator().manual_seed(T * 7 + ps)
    B, Hkv, D = 2, 3, 8
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    keys, values = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[1, ..., : (ps + 3 if ps == 4 else 3)] = False
    out, chosen = peers.quest_page_attention(q, keys, values, 0.3, k, ps, mask, return_pages=True)
    current = (T - 1) // ps
    full = current * ps
    valid = mask[:, 0, 0]
    kmin, kmax = ops.page_minmax_ref(keys[:, :, :full], valid[:, :full], ps)
    page_valid = valid[:, :full].view(B, current, ps).any(-1)
    ids = ops.select_pages_ref(q.view(B, Hkv, G, D), kmin.flatten(0, 1), kmax.flatten(0, 1), page_valid,
                               torch.tensor([current]), k, heads=torch.arange(Hkv)).view(B, Hkv, -1)
    want = torch.cat([_as_mask(ids, current), torch.ones(B, Hkv, 1, dtype=torch.bool)], -1)
    assert torch.equal(chosen, want)
    # attention: softmax over the chosen pages' valid tokens only
    visible = chosen.repeat_interleave(ps, -1)[..., :T] & valid[:, None]
    logits = torch.einsum("bhgd,bhtd->bhgt", q.view(B, Hkv, G, D), keys) * 0.3
    probs = logits.masked_fill(~visible[:, :, None], float("-inf")).softmax(-1)
    torch.testing.assert_close(out, torch.einsum("bhgt,bhtd->bhgd", probs, values).reshape(B, 1, Hkv * G, D))
