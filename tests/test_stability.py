"""flexicache_hf.stability: RCO and TS as defined (docs/method.md, "Profiling"), the consensus of unstable heads
and its held-out recall, and the module's promise to import nothing heavy."""

from __future__ import annotations

import ast
import math

import pytest
import torch

from flexicache_hf import stability


# ------------------------------------------------------------------------------------------------
# RCO and TS
# ------------------------------------------------------------------------------------------------
def test_rco_identical_is_one_and_disjoint_is_zero():
    S = torch.tensor([[0, 3, 5, 9], [1, 2, 7, 8]])
    assert torch.allclose(stability.rco(S, S, 4, 20), torch.ones(2))
    assert torch.equal(stability.rco(S[:1], S[1:], 4, 20), torch.zeros(1))


def test_rco_known_overlap():
    # K = 4 of N = 8: chance overlap is K/N = 1/2; 3 shared pages: (3/4 - 1/2) / (1 - 1/2) = 0.5
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 7])
    assert stability.rco(a, b, 4, 8).item() == pytest.approx(0.5)
    # 2 of 4 shared with N = 16: (1/2 - 1/4) / (3/4) = 1/3
    assert stability.rco(a, torch.tensor([9, 0, 12, 1]), 4, 16).item() == pytest.approx(1 / 3)
    # below chance clamps to 0
    assert stability.rco(a, torch.tensor([0, 9, 10, 11]), 4, 8).item() == 0.0


def test_rco_bool_masks_match_index_sets():
    g = torch.Generator().manual_seed(0)
    N, K = 40, 8
    a = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(50)])
    b = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(50)])
    ma = torch.zeros(50, N, dtype=torch.bool).scatter_(1, a, True)
    mb = torch.zeros(50, N, dtype=torch.bool).scatter_(1, b, True)
    assert torch.allclose(stability.rco(a, b, K, N), stability.rco(ma, mb, K, N))


def test_rco_random_sets_are_about_zero():
    g = torch.Generator().manual_seed(1)
    N, K = 128, 16
    a = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(2000)])
    b = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(2000)])
    assert stability.rco(a, b, K, N).mean().item() < 0.06  # E[max(0, X)] with X centred on 0


def test_rco_steps_with_too_few_pages_are_nan():
    a = torch.tensor([0, 1, 2, 3])
    assert math.isnan(stability.rco(a, a, 4, 4).item())
    assert math.isnan(stability.rco(a, a, 4, 3).item())
    assert stability.rco(a, a, 4, 5).item() == pytest.approx(1.0)


def test_temporal_stability_chunks_and_ignored_steps():
    K, steps = 4, 40
    S = torch.tensor([0, 1, 2, 3]).expand(steps, 2, K).clone()  # two heads, every step the same set
    S[:, 1] = torch.stack([torch.arange(4) + 4 * (t % 5) for t in range(steps)])  # head 1: new set each step
    N = torch.full((steps,), 20)
    ts = stability.temporal_stability(S, N, K)
    assert ts.shape == (2, 2)  # 40 steps: chunks at 0 and 16; the trailing 8 steps are dropped
    assert torch.allclose(ts[:, 0], torch.ones(2))
    # head 1: within a chunk, t shares the set of s only when t = s (mod 5): t = s+5, s+10, s+15
    assert torch.allclose(ts[:, 1], torch.full((2,), 3 / 15))
    assert stability.temporal_stability(S, N, K, drop_last=False).shape == (3, 2)

    # steps with N <= K do not count, even if their sets would change the mean
    S2, N2 = S.clone(), N.clone()
    S2[5, 0], N2[5] = torch.tensor([7, 8, 9, 10]), 4
    assert torch.allclose(stability.temporal_stability(S2, N2, K)[:, 0], torch.ones(2))
    # a chunk whose reference step does not count gets NaN
    N2[16] = 3
    assert torch.isnan(stability.temporal_stability(S2, N2, K)[1]).all()


def test_temporal_stability_uses_later_step_page_count():
    # K = 2; the set keeps 1 of 2 pages; N grows 4 -> 8 at the second step: RCO = (1/2 - 2/8)/(1 - 2/8) = 1/3
    S = torch.tensor([[0, 1], [1, 2]] + [[1, 2]] * 14)
    N = torch.tensor([4, 8] + [8] * 14)
    ts = stability.temporal_stability(S, N, 2)
    expected = (1 / 3 + 14 * (1 / 3)) / 15
    assert ts.item() == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------
# classification
# ------------------------------------------------------------------------------------------------
def test_resolve_count():
    assert stability.resolve_count(0.25, 256) == 64
    assert stability.resolve_count(0.25, 90) == 23  # 22.5 rounds half up
    assert stability.resolve_count(7, 90) == 7
    assert stability.resolve_count(64.0, 256) == 64
    assert stability.resolve_count(1.0, 10) == 10
    for bad in (0, 0.0, 1.5, 300, -1, True):
        with pytest.raises(ValueError):
            stability.resolve_count(bad, 256)


def test_classify_finds_planted_heads_in_noisy_chunks():
    g = torch.Generator().manual_seed(0)
    L, H, chunks, samples = 6, 4, 8, 3
    planted = [(0, 1), (2, 3), (3, 0), (5, 2), (5, 3), (1, 1)]  # 6 = 25% of 24
    inst = []
    for _ in range(samples):
        x = torch.rand(chunks, L, H, generator=g) * 0.5
        for l, h in planted:
            x[:, l, h] += 0.35
        inst.append(x)
    c = stability.classify_heads(inst, 0.25)
    assert c.M == 6
    assert [(i // H, i % H) for i in c.unstable] == sorted(planted)
    assert c.chunks == chunks * samples
    assert 0.6 < c.heldout_recall <= 1.0 and c.heldout_recall > c.chance_recall
    assert c.chance_recall == pytest.approx(0.25)


def test_classify_recall_definition():
    # 4 heads, M = 1; chunk sets (one sample): c0 {0}, c1 {0}, c2 {0}, c3 {1}
    # even chunks (0, 2) -> consensus {0}; odd chunks (1, 3) recall it 1 and 0 -> mean 0.5, min 0
    inst = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0], [0.1, 0.9, 0.0, 0.0]])
    c = stability.classify_heads([inst], 1)
    assert c.unstable == [0]
    assert c.heldout_recall == pytest.approx(0.5)
    assert c.heldout_recall_min == 0.0
    # swapped: odd chunks {0}, {1} tie at frequency 1/2 -> higher mean instability (head 0: 0.5 vs 0.5 ...)
    assert c.heldout_recall_swapped in (1.0, 0.0)
    assert c.frequency.tolist() == [0.75, 0.25, 0.0, 0.0]
    assert c.insample_recall == pytest.approx(0.75)  # {0} recalls 3 of the 4 chunks' sets
    # NaN chunks (no counting step) are dropped
    inst2 = torch.cat([inst, torch.full((2, 4), float("nan"))])
    assert stability.classify_heads([inst2], 1).chunks == 4


def test_stability_imports_only_torch():
    """The arithmetic profile="auto" imports at run time: no transformers, plotting, text corpus or model code."""
    tree = ast.parse(open(stability.__file__, encoding="utf-8").read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "math", "dataclasses", "typing", "torch"}, imported
