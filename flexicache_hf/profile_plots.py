"""Pictures of a head profile: instability per layer x KV head, and RCO against the step offset.

matplotlib (the `eval` extra) is imported only when a picture is drawn, with the Agg backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

from flexicache_hf.profiles import HeadProfile
from flexicache_hf.stability import WINDOW, rco_by_offset

if TYPE_CHECKING:
    from flexicache_hf.profile_recorder import StabilityRecords


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stability_heatmap(profile: HeadProfile, path, title: str | None = None) -> None:
    """Instability (mean 1 - TS) per layer x KV head, unstable heads of the profile marked (viz.stability_heatmap).
    A profile without metadata["instability"] (e.g. the paper's) is drawn as its unstable mask."""
    from flexicache_hf import viz

    viz.save(viz.stability_heatmap(profile, title=title), path)


def plot_rco_curves(
    records: StabilityRecords,
    heads: Iterable[tuple[int, int]],
    path,
    method: str = "attention",
    max_offset: int | None = None,
    title: str | None = None,
    profile: HeadProfile | None = None,
) -> None:
    """RCO(s, s+d) averaged over reference steps s and samples, vs the step offset d, for a few heads.

    The kind of the paper's Figure 1: stable heads keep a high overlap with their set of d steps ago,
    unstable heads lose it within a few steps. The dashed line marks the last offset inside a chunk
    (W - 1 = 15). With `profile`, each label says whether the profile counts the head as unstable.
    """
    plt = _plt()
    steps = min(S.shape[0] for S in records.topk[method])
    max_offset = max_offset or min(64, steps - 1)
    curves = []
    for S, N in zip(records.topk[method], records.num_pages):
        curves.append(rco_by_offset(S.long(), N, records.topk_pages, max_offset))
    curve = torch.stack(curves).nanmean(0)  # [max_offset, L, H]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    d = list(range(1, max_offset + 1))
    unstable = set(profile.unstable) if profile is not None else set()
    for l, h in heads:
        tag = "" if profile is None else (" (unstable)" if (l, h) in unstable else " (stable)")
        ax.plot(d, curve[:, l, h].numpy(), label=f"layer {l}, KV head {h}{tag}")
    ax.axvline(WINDOW - 1, color="grey", ls="--", lw=0.8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step offset d = t - s")
    ax.set_ylabel("RCO(s, s+d), mean over s")
    ax.set_title(title or f"Random-corrected overlap of top-{records.topk_pages} pages ({method})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def pick_curve_heads(profile: HeadProfile, n: int = 2) -> list[tuple[int, int]]:
    """The n most stable, the median and the n most unstable heads by metadata["instability"]."""
    inst = torch.tensor(profile.metadata["instability"]).flatten()
    order = torch.argsort(inst).tolist()
    H = profile.num_kv_heads
    picked = order[:n] + [order[len(order) // 2]] + order[-n:]
    return [(i // H, i % H) for i in dict.fromkeys(picked)]
