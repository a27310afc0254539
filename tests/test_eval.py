"""The accuracy-retention harness (flexicache_hf.eval): tasks, metrics, peers, methods, runner, CLI, lm-eval.

Tiny random models (conftest) check the mechanics exactly; SmolLM2 runs the `ci` preset end to end.
"""

import copy
import json
import math

import pytest
import torch

from conftest import profile_for
from flexicache_hf import MinMaxBound
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.config import DEFAULT_SKETCH_BITS
from flexicache_hf.eval import methods as M
from flexicache_hf.eval import peers, runner, tasks

# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def _ctx(model, max_new=32):
    return M.Context(model, profile_for(model), page_size=4, max_new_tokens=max_new)


@torch.no_grad()
def _decode_logits(model, cache, prefill, steps, tokens=None):
    """Logits of `steps` greedy (or forced `tokens`) decode steps on `cache`, positions explicit."""
    out = [prefill.last_logits]
    nxt = int(prefill.last_logits.argmax())
    for t in range(steps):
        tok = nxt if tokens is None else tokens[t]
        o = model(input_ids=torch.tensor([[tok]]), **cache_kwargs(cache), position_ids=torch.tensor([[prefill.length + t]]))
        out.append(o.logits[:, -1].float())
        nxt = int(out[-1].argmax())
    return torch.cat(out)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------
# metrics: evaluate modules loaded by local path
# ---------------------------------------------------------------------------------------------------
def test_metrics_are_local_evaluate_modules():
    m = runner.load_metrics()
    r = m["string_match_recall"].compute(
        predictions=["the numbers are 123 and 456.", "nothing"], references=[["123", "456", "789", "000"], ["1"]]
    )
    assert r["string_match_recall"] == pytest.approx((2 / 4 + 0) / 2)
    c = m["contains_match"].compute(
        predictions=[' "utf-8".', 'expression  ":" expression', "no"],
        references=[["'utf-8'"], ['expression ":" expression'], ["yes"]],
    )
    assert c["contains_match"] == pytest.approx(2 / 3)
    assert runner.score(m, "string_match_recall", "ABC", ["abc"]) == 1.0  # case-insensitive


# ---------------------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["streamingllm", "snapkv", "flexicache", "quest", "flexicache_no_rerank", "oracle_pages",
                                    "sketch_mass_pages"])
def test_full_budget_equals_dense(tiny, method):
    model, ids = tiny
    ctx = _ctx(model)
    prefill = runner.run_prefill(model, ids, query_window=8)
    dense = _decode_logits(model, M.Dense().make_cache(ctx, None, prefill), prefill, 20)
    m = M.get_methods([method])[0]
    if isinstance(m, M.SnapKV):
        m.window = 8
    got = _decode_logits(model, m.make_cache(ctx, None, prefill), prefill, 20)
    assert torch.equal(got.argmax(-1), dense.argmax(-1))
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", [0, 2])
@pytest.mark.parametrize("T,ps,k,G", [(37, 4, 3, 1), (64, 16, 2, 5), (9, 4, 5, 3), (50, 8, 1, 2)])
def test_oracle_pages_picks_the_heaviest_pages(T, ps, k, G, bits):
    """Brute force, one head at a time: the pages of highest softmax mass summed over the group, plus the
    newest token's page, and attention restricted to them. Odd lengths, partial pages, GQA 1 and 5, a
    left-padding mask (the first 3 keys of batch row 1 are padding). bits 2: the mass is computed over the
    full pages' sketched keys (the newest page exact); attention still reads the exact keys."""
    from flexicache_hf import ops

    g = torch.Generator().manual_seed(T + ps)
    B, Hkv, D = 2, 3, 8
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    keys, values = torch.randn(B, Hkv, T, D, generator=g) * 2, torch.randn(B, Hkv, T, D, generator=g)
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[1, ..., :3] = False
    got = peers.oracle_page_attention(q, keys, values, 0.3, k, ps, mask, sketch_bits=bits)
    P = -(-T // ps)
    full = (T // ps) * ps
    ranked = keys.clone()
    if bits:
        kmin, kmax = ops.page_minmax_ref(keys[:, :, :full], mask[:, 0, 0, :full], ps)
        codes = ops.page_sketch_ref(keys[:, :, :full], mask[:, 0, 0, :full], kmin, kmax, ps, bits)
        ranked[:, :, :full] = ops.sketch_keys_ref(kmin, kmax, codes).flatten(2, 3)
        assert not torch.equal(ranked, keys)
    for b in range(B):
        for h in range(Hkv):
            logits = q[b, h * G:(h + 1) * G, 0] @ keys[b, h].T * 0.3  # [G, T]
            logits[:, ~mask[b, 0, 0]] = float("-inf")
            rank = q[b, h * G:(h + 1) * G, 0] @ ranked[b, h].T * 0.3
            rank[:, ~mask[b, 0, 0]] = float("-inf")
            w = rank.softmax(-1).sum(0)
            mass = [float(w[p * ps:(p + 1) * ps].sum()) for p in range(P - 1)]
            pages = sorted(range(P - 1), key=lambda p: -mass[p])[:k] + [P - 1]
            keep = torch.zeros(T, dtype=torch.bool)
            for p in pages:
                keep[p * ps:(p + 1) * ps] = True
            want = logits.masked_fill(~keep, float("-inf")).softmax(-1) @ values[b, h]
            torch.testing.assert_close(got[b, 0, h * G:(h + 1) * G], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("floor", [0.0, 0.5])
def test_pooled_oracle_shares_the_budget_across_heads(floor):
    """pool_heads: the k * Hkv pages of highest mass in the layer (brute force over every (head, page)),
    however many fall on one head, after each head's floor * k best; the newest page always; with one KV head
    it equals the per-head oracle."""
    g = torch.Generator().manual_seed(7)
    B, Hkv, G, D, T, ps, k = 2, 3, 2, 8, 45, 4, 2
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    keys, values = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    keys[:, 0] *= 4  # head 0's attention is peaked: its heaviest pages outweigh the other heads' pages
    got = peers.oracle_page_attention(q, keys, values, 0.3, k, ps, pool_heads=True, floor=floor)
    P = -(-T // ps)
    logits = torch.einsum("bhgd,bhtd->bhgt", q.view(B, Hkv, G, D), keys) * 0.3
    w = logits.softmax(-1).sum(2)  # [B, Hkv, T]
    base = int(floor * k)
    for b in range(B):
        mass = {(h, p): float(w[b, h, p * ps:(p + 1) * ps].sum()) for h in range(Hkv) for p in range(P - 1)}
        top = [hp for h in range(Hkv) for hp in sorted([hp for hp in mass if hp[0] == h], key=lambda hp: -mass[hp])[:base]]
        top += sorted([hp for hp in mass if hp not in top], key=lambda hp: -mass[hp])[:(k - base) * Hkv]
        per_head = [sum(x == h for x, _ in top) for h in range(Hkv)]
        assert per_head != [k] * Hkv and min(per_head) >= base  # the case tests pooling (and the floor)
        for h in range(Hkv):
            keep = torch.zeros(T, dtype=torch.bool)
            for p in [p for x, p in top if x == h] + [P - 1]:
                keep[p * ps:(p + 1) * ps] = True
            want = logits[b, h].masked_fill(~keep, float("-inf")).softmax(-1) @ values[b, h]
            torch.testing.assert_close(got[b, 0, h * G:(h + 1) * G], want, atol=1e-5, rtol=1e-5)
    one = (q[:, :G], keys[:, :1], values[:, :1], 0.3, k, ps)
    torch.testing.assert_close(peers.oracle_page_attention(*one, pool_heads=True, floor=floor),
                               peers.oracle_page_attention(*one))


@pytest.mark.parametrize("floor", [0.0, 2.5])  # 2.5 x k: above what p alone takes for some heads
def test_top_p_oracle_takes_pages_until_their_mass_covers_p(floor):
    """coverage p: per head, the fewest pages of highest mass that, with the newest page, hold p of its
    attention (brute force), at most 4 x k and at least floor x k; `counts` adds up the pages taken and the
    head-steps."""
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, D, T, ps, k, p = 2, 2, 3, 8, 61, 4, 3, 0.7
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    keys, values = 2 * torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    counts = [0, 0]
    got = peers.oracle_page_attention(q, keys, values, 0.3, k, ps, coverage=p, counts=counts, floor=floor)
    P = -(-T // ps)
    logits = torch.einsum("bhgd,bhtd->bhgt", q.view(B, Hkv, G, D), keys) * 0.3
    w = logits.softmax(-1).sum(2)  # [B, Hkv, T], G per head
    taken = 0
    for b in range(B):
        for h in range(Hkv):
            mass = [float(w[b, h, i * ps:(i + 1) * ps].sum()) for i in range(P)]
            pages, held = [P - 1], mass[P - 1]
            for r, i in enumerate(sorted(range(P - 1), key=lambda i: -mass[i])):
                if r >= 4 * k or (held >= p * G and r >= floor * k):
                    break
                pages.append(i)
                held += mass[i]
            taken += len(pages) - 1
            keep = torch.zeros(T, dtype=torch.bool)
            for i in pages:
                keep[i * ps:(i + 1) * ps] = True
            want = logits[b, h].masked_fill(~keep, float("-inf")).softmax(-1) @ values[b, h]
            torch.testing.assert_close(got[b, 0, h * G:(h + 1) * G], want, atol=1e-5, rtol=1e-5)
    assert counts == [taken, B * Hkv] and 0 < taken < B * Hkv * 4 * k  # the case adapts, below the cap
    dense = (logits.softmax(-1) @ values).reshape(B, 1, Hkv * G, D)  # p = 1 and a cap above the context: dense
    torch.testing.assert_close(peers.oracle_page_attention(q, keys, values, 0.3, P, ps, coverage=1.0), dense,
                               atol=1e-5, rtol=1e-5)


def test_streaming_llm_keeps_sinks_and_recent_window(tiny):
    model, ids = tiny
    prefill = runner.run_prefill(model, ids)
    budget, T = 16, ids.shape[1]
    cache = peers.streaming_llm_cache(model.config, budget, n_sink=4, prefill_kv=prefill.kv)
    for layer, (k, _) in zip(cache.layers, prefill.kv):
        assert layer.kept_tokens() == budget - 1
        assert torch.equal(layer.fixed_k, k[:, :, :4])
        assert torch.equal(layer.keys, k[:, :, T - (budget - 1 - 4):])
        assert layer.get_seq_length() == T
        assert layer.get_mask_sizes(1) == (budget, 0)
    seen = []
    orig = cache.layers[0].update

    def spy(k, v, *a, **kw):
        full_k, _ = orig(k, v, *a, **kw)
        seen.append((full_k.shape[2], k.clone()))
        return full_k, _

    cache.layers[0].update = spy
    _decode_logits(model, cache, prefill, 10)
    assert [n for n, _ in seen] == [budget] * 10  # every decode step attends to exactly `budget` tokens
    layer = cache.layers[0]
    assert layer.get_seq_length() == T + 10
    assert torch.equal(layer.keys[:, :, -10:], torch.cat([k for _, k in seen], 2))  # newest kept, in order


def test_eviction_prefill_through_empty_cache_matches_seeded(tiny):
    """A streamingLLM cache filled by a real prefill (dense, then evict) decodes like the seeded one."""
    model, ids = tiny
    prefill = runner.run_prefill(model, ids)
    seeded = peers.streaming_llm_cache(model.config, 24, prefill_kv=prefill.kv)
    empty = peers.streaming_llm_cache(model.config, 24)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **cache_kwargs(empty))
    torch.testing.assert_close(out.logits[:, -1].float(), prefill.last_logits, atol=1e-5, rtol=0)
    a = _decode_logits(model, seeded, prefill, 8)
    b = _decode_logits(model, empty, prefill, 8)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_snapkv_votes_match_eager_attention(tiny):
    """The captured window queries reproduce the model's own attention weights (RoPE included)."""
    model, ids = tiny
    w = 8
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager(input_ids=ids, output_attentions=True).attentions  # per layer [1, Hq, T, T]
    prefill = runner.run_prefill(model, ids, query_window=w)
    ctx = _ctx(model)
    T = ids.shape[1]
    for layer_idx, ((k, _), q) in enumerate(zip(prefill.kv, prefill.queries)):
        votes = peers.snapkv_scores(q, k, ctx.scaling, kernel=1)
        a = att[layer_idx][0, :, T - w:, :].float()  # [Hq, w, T]
        expect = a.view(2, 3, w, T).mean(1).sum(1)[:, : T - w]
        torch.testing.assert_close(votes[0], expect, atol=1e-5, rtol=1e-4)


def test_snapkv_keeps_top_voted_tokens_per_head(tiny):
    model, ids = tiny
    w, budget = 8, 24
    prefill = runner.run_prefill(model, ids, query_window=w)
    ctx = _ctx(model)
    cache = peers.snapkv_cache(model.config, budget, prefill.kv, prefill.queries, ctx.scaling, window=w, kernel=5)
    T = ids.shape[1]
    for layer, (k, _), q in zip(cache.layers, prefill.kv, prefill.queries):
        assert layer.kept_tokens() == budget - 1
        assert torch.equal(layer.keys, k[:, :, T - w:])  # the observation window stays
        votes = peers.snapkv_scores(q, k, ctx.scaling, kernel=5)
        for h in range(k.shape[1]):
            top = set(votes[0, h].topk(budget - 1 - w).indices.tolist())
            kept = {int(i) for i in range(T - w) if any(torch.equal(k[0, h, i], x) for x in layer.fixed_k[0, h])}
            assert kept == top
    # heads choose differently (per-head selection, not one shared set)
    fk = cache.layers[0].fixed_k[0]
    assert not torch.equal(fk[0], fk[1])


# ---------------------------------------------------------------------------------------------------
# FlexiCache methods
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["flexicache", "flexicache_all_stable", "quest", "flexicache_no_rerank", "streamingllm"])
def test_shared_prefill_equals_real_prefill(tiny, method):
    """Seeding a cache from the shared dense prefill is exactly a prefill through that cache."""
    model, ids = tiny
    ctx = _ctx(model)
    prefill = runner.run_prefill(model, ids)
    m = M.get_methods([method])[0]
    c1, l1 = runner.method_cache(m, ctx, 16, prefill, model, shared_prefill=True)
    c2, l2 = runner.method_cache(m, ctx, 16, prefill, model, shared_prefill=False)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0)
    a = _decode_logits(model, c1, prefill, 24)
    b = _decode_logits(model, c2, prefill, 24)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_ablation_profiles(tiny):
    model, _ = tiny
    ctx = _ctx(model)
    L, H = ctx.shape
    reg = M.registry()
    assert reg["flexicache"].head_profile(ctx) is ctx.profile
    assert reg["flexicache_all_stable"].head_profile(ctx).unstable == []
    assert len(reg["quest"].head_profile(ctx).unstable) == L * H
    r1 = reg["flexicache_random_unstable"].head_profile(ctx)
    r2 = M.registry()["flexicache_random_unstable"].head_profile(ctx)
    assert len(r1.unstable) == len(ctx.profile.unstable) and r1.unstable == r2.unstable  # same size, seeded
    assert ctx.topk_pages(64, 100) == 16
    assert ctx.topk_pages(None, 100) == math.ceil((100 + 32 + 1) / 4)
    with pytest.raises(ValueError):
        ctx.topk_pages(30, 100)  # not a page multiple
    assert set(M.METHOD_NAMES) == {
        "dense", "flexicache", "flexicache_no_rerank", "flexicache_all_stable", "quest", "flexicache_all_unstable",
        "flexicache_random_unstable", "streamingllm", "snapkv", "oracle_pages", "sketch_mass_pages",
        "oracle_pages_pooled", "oracle_pages_pooled_f50", "sketch_mass_pages_pooled_f50", "duo_attention", "oracle_pages_p90", "oracle_pages_p95", "oracle_pages_p96",
        "oracle_pages_p97", "oracle_pages_p98", "sketch_mass_pages_p95", "sketch_mass_pages_p96", "sketch_mass_pages_p97",
        "sketch_mass_pages_p90_f50", "sketch_mass_pages_p95_f50",
    }
    spread = M.get_methods(["flexicache", "quest", "oracle_pages", "snapkv"], score_spread=0.5)
    assert [m.name for m in spread] == ["flexicache_spread0.5", "quest", "oracle_pages", "snapkv"]  # Quest: its bound
    assert spread[0].score_spread == 0.5 and spread[0].empty_cache(ctx, 64, 100).config.score_spread == 0.5
    sketch = M.get_methods(["flexicache", "oracle_pages"], sketch_bits=2)
    assert [m.name for m in sketch] == ["flexicache_sketch2mass", "oracle_pages"]
    cfg = sketch[0].empty_cache(ctx, 64, 100).config
    assert cfg.sketch_bits == 2 and cfg.sketch_score == "mass"
    best_qk = M.get_methods(["flexicache_all_unstable"], sketch_bits=1, sketch_score="max")[0]
    assert best_qk.name == "flexicache_all_unstable_sketch1" and best_qk.empty_cache(ctx, 64, 100).config.sketch_score == "max"
    assert M.get_methods(["quest"], sketch_bits=2)[0].empty_cache(ctx, 64, 100).config.scorer == MinMaxBound()


def test_small_budget_differs_from_dense(tiny):
    """The budget is real: at 8 tokens of a 70-token context every method departs from dense somewhere."""
    model, ids = tiny
    ctx = _ctx(model)
    prefill = runner.run_prefill(model, ids, query_window=4)
    dense = _decode_logits(model, M.Dense().make_cache(ctx, None, prefill), prefill, 12)
    forced = dense.argmax(-1)[:-1].tolist()
    for m in M.get_methods(["flexicache", "quest", "streamingllm", "snapkv"]):
        if isinstance(m, M.SnapKV):
            m.window = 4
        got = _decode_logits(model, m.make_cache(ctx, 8, prefill), prefill, 12, tokens=forced)
        assert (got[1:] - dense[1:]).abs().max() > 1e-3, m.name


# ---------------------------------------------------------------------------------------------------
# results store
# ---------------------------------------------------------------------------------------------------
def test_result_store_resumes(tmp_path):
    s = runner.ResultStore(tmp_path)
    rec = {"model": "m", "task": "t", "length": 8, "sample": 0, "method": "dense", "budget": None, "prompt_sha": "a", "score": 1.0}
    s.add(rec)
    s.add(dict(rec, method="flexicache", budget=256))
    s2 = runner.ResultStore(tmp_path)
    assert s2.has(("m", "t", 8, 0, "dense", "full"), "a")
    assert s2.has(("m", "t", 8, 0, "flexicache", "256"), "a")
    assert not s2.has(("m", "t", 8, 0, "flexicache", "256"), "b")  # another prompt: redo
    assert not s2.has(("m", "t", 8, 0, "flexicache", "512"))
    s2.add(dict(rec, score=0.0))  # replaces, never duplicates
    assert len(json.loads((tmp_path / "results.json").read_text())["records"]) == 2
    assert not runner.ResultStore(tmp_path, resume=False).has(("m", "t", 8, 0, "dense", "full"))


# ---------------------------------------------------------------------------------------------------
# SmolLM2: tasks, the ci preset, lm-eval
# ---------------------------------------------------------------------------------------------------
def test_tasks_fit_the_length_and_hold_their_answers(smollm2):
    _, tok = smollm2
    ds = tasks.build_dataset(tok, tasks.ALL_TASKS, [1024], samples=1, seed=0)
    assert type(ds).__name__ == "Dataset" and len(ds) == len(tasks.ALL_TASKS)
    for row in ds:
        n = len(tok(row["prompt"], add_special_tokens=False).input_ids)
        assert n == row["prompt_tokens"] and 0.8 * 1024 <= n <= 1024, (row["task"], n)
        context = row["prompt"].rsplit(row["answer_prefix"], 1)[0]
        for a in row["answers"]:
            assert a in context, (row["task"], a)  # every answer is in the text the model reads
        assert row["prompt"].endswith(row["answer_prefix"])
    again = tasks.build_dataset(tok, tasks.ALL_TASKS, [1024], samples=1, seed=0)
    assert tasks.dataset_fingerprint(ds) == tasks.dataset_fingerprint(again)  # deterministic
    other = tasks.build_dataset(tok, ["niah_single"], [1024], samples=1, seed=1)
    assert other[0]["answers"] != ds[0]["answers"]
    # the constant of qa_code is assigned exactly once in its context
    qa = [r for r in ds if r["task"] == "qa_code"][0]
    name = json.loads(qa["meta"])["constant"]
    assert tasks._assign_count(name, qa["prompt"].rsplit(qa["answer_prefix"], 1)[0]) == 1


def test_ci_preset(smollm2, tmp_path):
    """`flexicache eval --preset ci`: dense solves every task; at the full budget FlexiCache generates exactly
    dense's tokens (the peers: test_full_budget_equals_dense); fidelity at the full budget is exact; a rerun
    resumes (skips everything)."""
    from flexicache_hf import eval_cli
    from flexicache_hf.eval.presets import CI_TASKS

    threads = torch.get_num_threads()
    fc = M.get_methods(["flexicache"], sketch_bits=DEFAULT_SKETCH_BITS)[0].name  # the default scorer's name
    try:
        assert eval_cli.main(["--preset", "ci", "--out", str(tmp_path), "--quiet", "--threads", str(threads)]) == 0
        data = json.loads((tmp_path / "results.json").read_text())
        recs = {(r["task"], r["method"], runner.budget_key(r["budget"])): r for r in data["records"]}
        assert {t for t, _, _ in recs} == set(CI_TASKS)
        for task in CI_TASKS:
            dense = recs[(task, "dense", "full")]
            assert dense["score"] == 1.0, (task, dense["prediction"], dense["answers"])
            assert recs[(task, fc, "full")]["tokens"] == dense["tokens"], task
            assert recs[(task, fc, "full")]["prediction"] == dense["prediction"]
            for m in (fc, "streamingllm", "snapkv"):
                assert (task, m, "256") in recs
        # budgets are real: at 256 tokens the peers keep 256 - 1 tokens per head after the prompt
        r = recs[(CI_TASKS[0], "streamingllm", "256")]
        assert r["kv_bytes_after_prefill"] == 30 * 3 * 255 * 64 * 4 * 2
        fid = {(f["method"], runner.budget_key(f["budget"])): f for f in data["fidelity"]}
        assert fid[(fc, "full")]["top1_agreement"] == 1.0
        assert fid[(fc, "full")]["mean_kl"] < 1e-6
        # fp32 rounding only: selected pages are attended best first, dense sums them in context order
        assert fid[(fc, "full")]["ppl_ratio"] == pytest.approx(1.0, abs=1e-5)
        assert fid[(fc, "256")]["mean_kl"] > 0  # 256 of ~536 tokens: not dense any more
        assert (tmp_path / "report.md").exists() and (tmp_path / "score_vs_budget.png").exists()
        assert f"| {fc} |" in (tmp_path / "report.md").read_text()
        n = len(data["records"])
        assert eval_cli.main(["--preset", "ci", "--out", str(tmp_path), "--quiet", "--no-fidelity"]) == 0
        data2 = json.loads((tmp_path / "results.json").read_text())
        assert len(data2["records"]) == n and data2["runs"][-1]["stats"]["tasks"]["records"] == 0
    finally:
        torch.set_num_threads(threads)


def test_lm_eval_model_type(smollm2):
    """`--model flexicache` in lm-eval: the generation equals the harness runner's for the same sample."""
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import flexicache_hf.eval.lm_eval_adapter as A

    assert A.register() is not None
    tm = TaskManager(include_path=A.TASKS_DIR, metadata={"lengths": [512], "samples": 1})
    res = lm_eval.simple_evaluate(
        model="flexicache", model_args="pretrained=smollm2,method=flexicache,budget=256,device=cpu",
        tasks=["flexicache_qa_code"], task_manager=tm, limit=1, log_samples=True, batch_size=1,
    )
    sample = res["samples"]["flexicache_qa_code"][0]
    response = sample["resps"][0][0]
    # the same sample through the harness runner, same method and budget, no stop rule but EOS
    model, tok = smollm2
    row = tasks.make_sample(tok, "qa_code", 512, 0, 0)
    assert sample["doc"]["prompt"] == row["prompt"]
    ids = tok(row["prompt"], return_tensors="pt", add_special_tokens=False).input_ids
    prefill = runner.run_prefill(model, ids)
    ctx = M.Context(model, runner.resolve_profile(model, tok), max_new_tokens=row["max_new_tokens"])
    method = M.get_methods(["flexicache"], sketch_bits=DEFAULT_SKETCH_BITS)[0]  # the adapter passes the default scorer
    cache, first = runner.method_cache(method, ctx, 256, prefill, model)
    toks = runner.greedy_decode(model, cache, first, prefill.length, row["max_new_tokens"], runner.eos_ids(model, tok))
    assert response == tok.decode(toks, skip_special_tokens=True)
    assert res["results"]["flexicache_qa_code"]["score,none"] == runner.score(runner.load_metrics(), "contains_match", response, row["answers"])


def test_cwe_scales_past_its_word_list(smollm2):
    """cwe at 16k tokens (its 292-word list fills only ~7k): the prompt fits, and the 10 common words are
    strictly the most frequent entries of the list."""
    import collections
    import re

    _, tok = smollm2
    row = tasks.make_sample(tok, "cwe", 16384, 0, 0)
    assert 0.8 * 16384 <= row["prompt_tokens"] <= 16384
    counts = collections.Counter(re.findall(r"\d+\. (\S+)", row["prompt"].rsplit("Question:", 1)[0]))
    common = set(row["answers"])
    assert len(common) == 10 and common <= set(counts)
    assert min(counts[w] for w in common) > max(c for w, c in counts.items() if w not in common)


def test_report_retention_uses_the_same_samples_as_dense():
    """A method that ran on fewer samples than dense is compared with dense on its own samples."""
    from flexicache_hf.eval import report

    def rec(task, sample, method, budget, score):
        return dict(model="m", length=100, task=task, sample=sample, method=method, budget=budget,
                    score=score, prompt_tokens=90)

    records = [rec(t, s, "dense", None, d) for t in ("a", "b") for s, d in ((0, 1.0), (1, 0.0))]
    records += [rec(t, 0, "flexicache", 64, 0.5) for t in ("a", "b")]  # sample 0 only: dense scored 1.0 there
    records += [rec(t, s, "snapkv", 64, 0.0) for t in ("a", "b") for s in (0, 1)]
    text, summary = report.task_tables(records)
    assert "| flexicache | 50.0 (0.50) [1 of 2 samples] |" in text  # not 50 / 50 = 1.00 against every sample
    assert "| snapkv | 0.0 (0.00) |" in text
    assert summary[("m", 100)]["flexicache"]["64"] == 50.0
