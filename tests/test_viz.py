"""flexicache_hf.viz: every picture is a Figure with a title, labelled axes and a legend, showing the numbers it
was given; PNGs are written headless; a missing matplotlib names the install command."""

import sys

import pytest
import torch

pytest.importorskip("matplotlib")

from flexicache_hf import viz  # noqa: E402
from flexicache_hf.profiles import HeadProfile  # noqa: E402
from flexicache_hf.profiles_registry import find_profile  # noqa: E402
from flexicache_hf.recorder import SelectionRecorder  # noqa: E402

MIB = 2**20
REPORT = dict(gpu_kv_bytes=40 * MIB, unstable_gpu_kv_bytes=30 * MIB, stable_gpu_kv_bytes=10 * MIB,
              host_kv_bytes=90 * MIB, metadata_bytes=12 * MIB, dense_kv_bytes=128 * MIB,
              gpu_reserved_bytes=60 * MIB, host_reserved_bytes=100 * MIB, by_device={"cpu": {}})


def _recorder(steps=40, start=1000, page=16, R=16):
    """Layer 0: head 0 unstable (a moving set, always page 5), head 1 stable (a set per rerank)."""
    rec = SelectionRecorder(page)
    g = torch.Generator().manual_seed(0)
    for i, p in enumerate(range(start, start + steps)):
        pages = p // page
        moving = torch.cat([torch.tensor([5]), torch.randperm(pages, generator=g)[:3] + 6]).clamp(max=pages - 1)
        rec.record(0, p, [0], moving.view(1, 1, 4))
        if i % R == 0:
            rec.record(0, p, [1], (torch.arange(4) + 10 * (i // R)).view(1, 1, 4))
    return rec


def _check(fig, title_words=()):
    """A title, x and y labels on some axes, a legend somewhere; returns every title text."""
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    titles = [ax.get_title() for ax in axes] + [ax.get_title("left") for ax in axes]
    titles += [fig._suptitle.get_text()] if fig._suptitle is not None else []
    assert any(titles), "no title"
    assert any(ax.get_xlabel() for ax in axes), "no x label"
    assert all(ax.get_ylabel() for ax in axes), "an axes without a y label"
    legends = [ax.get_legend() for ax in axes if ax.get_legend() is not None] + list(fig.legends)
    assert legends and all(lg.get_texts() for lg in legends), "no legend"
    text = " ".join(titles)
    for word in title_words:
        assert word in text
    return text


def _png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    return data


def test_memory_chart_draws_the_report(tmp_path):
    fig = viz.memory_chart(REPORT, device="GPU", tokens=2936)
    _check(fig, ["2,936 tokens", "dense"])
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 3) for p in ax.patches)
    # dense, three stacked parts, the host pool, two reserved outlines: the report in MiB
    assert heights == sorted([128, 30, 10, 12, 90, 60, 100])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("reserved" in t for t in labels) and any("host pool" in t for t in labels)
    assert any("53% below dense" in t.get_text() for t in ax.texts)  # 1 - 60/128
    _png(viz.save(fig, tmp_path / "m.png"))


def test_page_selection_chart_moves_holds_and_marks_the_needle(tmp_path):
    rec = _recorder()
    assert rec.unstable_heads() == [(0, 0)] and rec.stable_heads() == [(0, 1)]
    fig = viz.page_selection_chart(rec, needle_pages=[5], rerank_interval=16)
    _check(fig, ["unstable", "stable", "Pages each KV head"])
    assert [ax.get_title("left") for ax in fig.axes] == ["layer 0, KV head 0: unstable", "layer 0, KV head 1: stable"]
    unstable_ax, stable_ax = fig.axes
    # the stable head: a dotted line at each of its 3 reranks; the needle marked where it is held
    assert len([ln for ln in stable_ax.lines if ln.get_linestyle() == ":"]) == 3
    marks = unstable_ax.collections[-1].get_offsets()
    assert len(marks) == 40 and set(marks[:, 1].tolist()) == {5}  # held at every step
    assert not stable_ax.collections  # never held by the stable head
    assert "needle" in " ".join(t.get_text() for t in fig.legends[0].get_texts())
    _png(viz.save(fig, tmp_path / "p.png"))


def test_page_selection_chart_needs_a_recording():
    with pytest.raises(ValueError, match="record_selections"):
        viz.page_selection_chart(SelectionRecorder(16))


def test_pick_heads_prefers_the_heads_that_hold_the_needle():
    rec = _recorder()
    rec.record(0, 1000, [2], torch.tensor([[[1, 2, 3, 4]]]))  # a second stable head, never on page 10
    assert viz.pick_heads(rec, needle_pages=[10], n=1) == [(0, 0), (0, 1)]
    profile = HeadProfile(1, 3, [(0, 1)])  # the profile's split wins over what the recorder saw
    assert viz.pick_heads(rec, n=1, profile=profile) == [(0, 1), (0, 0)]


@pytest.mark.parametrize("model_id", ["HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Llama-3.1-8B-Instruct"])
def test_stability_heatmap_of_shipped_profiles(tmp_path, model_id):
    profile = find_profile(model_id)
    fig = viz.stability_heatmap(profile)
    _check(fig, ["head instability"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "layer" and ax.get_ylabel() == "KV head"
    marked = ax.collections[0].get_offsets()
    assert sorted(map(tuple, marked.tolist())) == sorted(profile.unstable)
    _png(viz.save(fig, tmp_path / "h.png"))


def test_write_pictures_writes_three_pngs(tmp_path):
    profile = HeadProfile(1, 2, [(0, 0)], {"model_id": "toy", "instability": [[0.9, 0.1]]})
    paths = viz.write_pictures(tmp_path / "out", report=REPORT, recorder=_recorder(), profile=profile,
                               needle_pages=[5], device="CPU")
    assert [p.name for p in paths] == ["memory.png", "page_selection.png", "head_stability.png"]
    for p in paths:
        _png(p)


def test_a_missing_matplotlib_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'flexicache-hf\[viz\]'"):
        viz.memory_chart(REPORT)
    with pytest.raises(ImportError, match="flexicache-hf"):
        viz.require_matplotlib()
