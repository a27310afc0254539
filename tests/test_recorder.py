"""SelectionRecorder (cache.record_selections): unstable heads are seen every decode step, stable heads only at
their reranks; recording changes no token; without a recorder (or after detaching it) nothing is recorded."""

import importlib.util
import pathlib

import pytest
import torch

from conftest import make_cache, profile_for, tiny_pair
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.recorder import SelectionRecorder

pytestmark = pytest.mark.usefixtures("one_thread")

PAGE, K, R, NEW = 4, 3, 4, 11  # 10 decode steps: reranks at steps 0, 4, 8


@pytest.fixture(scope="module")
def model():
    _, fc = tiny_pair("llama", heads=4, kv_heads=2, head_dim=16, layers=2, seed=5)
    return fc


def _generate(model, cache, batch=1, prompt=37):
    torch.manual_seed(2)
    ids = torch.randint(1, 256, (batch, prompt))
    with torch.no_grad():
        out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=NEW, do_sample=False)
    return ids.shape[1], out[:, prompt:]


def _cache(model, warmup_steps=0):
    # no warm-up by default here: these tests check the periodic schedule (stable heads select at reranks)
    return make_cache(model, page_size=PAGE, topk_pages=K, rerank_interval=R, warmup_steps=warmup_steps)


def test_unstable_heads_every_step_stable_heads_only_at_reranks(model):
    cache = _cache(model)
    rec = cache.record_selections()
    assert isinstance(rec, SelectionRecorder) and all(layer.recorder is rec for layer in cache.flexi_layers)
    n, _ = _generate(model, cache, batch=2)
    steps = list(range(n, n + NEW - 1))  # the first new token comes from the prefill
    assert rec.positions() == steps
    unstable = set(profile_for(model).unstable)
    assert unstable and len(unstable) < 4  # a mixed profile: both kinds are checked
    for layer in range(2):
        for head in range(2):
            seen = rec.selection_positions(layer, head)
            if (layer, head) in unstable:
                assert seen == steps
            else:
                assert seen == [p for p in steps if (p - n) % R == 0] == [n, n + 4, n + 8]
            for position, pages in rec.selections[(layer, head)]:
                assert pages.shape == (2, K) and pages.device.type == "cpu"
                assert pages.max() < position // PAGE  # full pages before the current one only
    assert set(rec.unstable_heads()) == unstable
    assert set(rec.stable_heads()) == {(l, h) for l in range(2) for h in range(2)} - unstable
    assert rec.num_pages() == steps[-1] // PAGE + 1


def test_the_warm_up_selects_stable_heads_at_every_step_then_at_reranks(model):
    cache = _cache(model, warmup_steps=3)
    rec = cache.record_selections()
    n, _ = _generate(model, cache)
    stable = sorted({(l, h) for l in range(2) for h in range(2)} - set(profile_for(model).unstable))
    assert rec.selection_positions(*stable[0]) == [n, n + 1, n + 2, n + 4, n + 8]


def test_selection_matrix_holds_a_stable_heads_set_between_reranks(model):
    cache = _cache(model)
    rec = cache.record_selections()
    n, _ = _generate(model, cache)
    (layer, head), = [h for h in rec.stable_heads() if h == (0, 1)]
    steps, held = rec.selection_matrix(layer, head)
    assert held.shape == (NEW - 1, rec.num_pages()) and held.dtype == torch.bool
    assert (held.sum(1) == K).all()
    for i, p in enumerate(steps):
        if (p - n) % R:  # between reranks: the set of the step before
            assert torch.equal(held[i], held[i - 1])
        assert sorted(held[i].nonzero().flatten().tolist()) == sorted(
            dict(rec.pages_at(layer, head))[max(q for q in rec.selection_positions(layer, head) if q <= p)])
    assert 0 <= rec.turnover(layer, head) <= 1
    page = int(held[0].nonzero()[0])
    assert rec.hits(layer, head, [page]) > 0 and rec.hits(layer, head, [10**6]) == 0


def test_recording_changes_no_token(model):
    _, plain = _generate(model, _cache(model))
    cache = _cache(model)
    cache.record_selections()
    _, recorded = _generate(model, cache)
    assert torch.equal(plain, recorded)


def test_nothing_is_recorded_without_a_recorder(model, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("record() was called with no recorder attached")

    monkeypatch.setattr(SelectionRecorder, "record", fail)
    cache = _cache(model)
    assert all(layer.recorder is None for layer in cache.flexi_layers)
    _generate(model, cache)
    cache = _cache(model)
    rec = cache.record_selections()
    assert cache.record_selections(False) is False
    assert all(layer.recorder is None for layer in cache.flexi_layers)
    _generate(model, cache)
    assert rec.positions() == []


def test_a_given_recorder_is_used_and_clear_forgets(model):
    mine = SelectionRecorder(PAGE)
    cache = _cache(model)
    assert cache.record_selections(mine) is mine
    _generate(model, cache)
    assert mine.positions() and "steps" in repr(mine)
    mine.clear()
    assert mine.heads() == [] and mine.num_pages() == 0


def test_minus_one_padding_is_dropped():
    rec = SelectionRecorder(16)
    rec.record(0, 40, [0, 1], torch.tensor([[[0, 1, -1], [1, -1, -1]]]))
    assert rec.pages_at(0, 0) == [(40, [0, 1])] and rec.pages_at(0, 1) == [(40, [1])]
    _, held = rec.selection_matrix(0, 1)
    assert held.tolist() == [[False, True, False]]


def test_the_overhead_benchmark_runs_on_the_cpu(tmp_path):
    """benchmarks/recorder_overhead.py at smoke size: off makes no record() call, on does."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "recorder_overhead.py"
    spec = importlib.util.spec_from_file_location("recorder_overhead", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--device", "cpu", "--layers", "1", "--context", "96", "--steps", "6", "--rounds", "1",
                      "--json", str(tmp_path / "r.json")])
    assert out["record_calls_while_off"] == 0 and out["record_calls_while_on"] > 0
    assert set(out["ms_per_step"]["eager"]) == {"off", "off after on", "on"}
    assert (tmp_path / "r.json").exists()
