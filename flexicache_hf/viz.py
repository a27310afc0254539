"""Pictures of what the cache does (matplotlib: `pip install 'flexicache-hf[viz]'`).

    memory_chart(cache.memory_report())            bytes on the device and in the host pool vs dense
    page_selection_chart(recorder, needle_pages)   the pages each KV head selects over the decode steps
    stability_heatmap(cache.profile)               which heads are unstable, and how unstable each head is
    write_pictures(dir, ...)                       the three as PNGs (what `flexicache demo --plots DIR` writes)

Each function returns a matplotlib `Figure` with labelled axes, a title and a legend. Figures are drawn on the
Agg canvas and never touch pyplot's global state, so they work headless (files) and in notebooks (with
`%matplotlib inline` a returned figure is shown once). matplotlib is imported only when a picture is drawn.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flexicache_hf.profiles import HeadProfile

INSTALL_HINT = "pip install 'flexicache-hf[viz]'  (or: pip install matplotlib)"
MIB = 2**20
COLORS = {"dense": "#9e9e9e", "unstable": "#e6550d", "stable": "#3182bd", "metadata": "#31a354",
          "host": "#756bb1", "needle": "#d62728", "rerank": "#444444"}


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"flexicache_hf.viz draws with matplotlib, which is not installed: {INSTALL_HINT}") from e
    return Figure, FigureCanvasAgg


def require_matplotlib() -> None:
    """Raise the ImportError naming the install command if matplotlib is missing (checked before long work)."""
    _matplotlib()


def new_figure(width: float, height: float, rows: int = 1, **kwargs):
    """(figure, axes): a Figure on the Agg canvas (files without a display; pyplot's state untouched)."""
    Figure, Canvas = _matplotlib()
    fig = Figure(figsize=(width, height), layout="constrained")
    Canvas(fig)
    axes = fig.subplots(rows, 1, squeeze=False, **kwargs)[:, 0]
    return fig, (axes[0] if rows == 1 else list(axes))


def save(fig, path, dpi: int = 130) -> Path:
    """Write `fig` as a PNG (the Agg canvas)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


# ---------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------
def memory_chart(report: dict, *, device: str = "GPU", tokens: int | None = None, title: str | None = None):
    """`cache.memory_report()` as bars in MiB: dense's K/V, FlexiCache on the device (unstable heads' pages,
    stable heads' slots, page metadata; stacked, in use) and its host pool; an outline shows what each part
    holds reserved (allocated, headroom included)."""
    _matplotlib()
    from matplotlib.patches import Patch

    fig, ax = new_figure(7.5, 4.6)
    r = {k: v / MIB for k, v in report.items() if isinstance(v, (int, float))}
    x = [0, 1, 2]
    ax.bar(x[0], r["dense_kv_bytes"], 0.6, color=COLORS["dense"], label="dense: every K/V (DynamicCache)")
    bottom = 0.0
    for key, name in (("unstable_gpu_kv_bytes", "unstable heads: every page"),
                      ("stable_gpu_kv_bytes", "stable heads: slots (top-K, newest pages)"),
                      ("metadata_bytes", "page metadata (min/max, sketches)")):
        color = COLORS["unstable" if key.startswith("unstable") else "stable" if key.startswith("stable") else "metadata"]
        ax.bar(x[1], r[key], 0.6, bottom=bottom, color=color, label=name)
        bottom += r[key]
    ax.bar(x[2], r["host_kv_bytes"], 0.6, color=COLORS["host"], label="stable heads: every full page (host pool)")
    for i, (reserved, used) in ((1, (r["gpu_reserved_bytes"], bottom)), (2, (r["host_reserved_bytes"], r["host_kv_bytes"]))):
        ax.bar(x[i], reserved, 0.6, fill=False, edgecolor="black", linestyle="--", linewidth=1.2)
        ax.annotate(f"{used:.1f} in use\n{reserved:.1f} reserved", (x[i], max(reserved, used)), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    dense = r["dense_kv_bytes"]
    ax.annotate(f"{dense:.1f}", (x[0], dense), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    if dense:
        saved = 1 - r["gpu_reserved_bytes"] / dense
        ax.annotate(f"reserved: {saved:.0%} below dense" if saved >= 0 else f"reserved: {-saved:.0%} above dense",
                    (x[1], max(r["gpu_reserved_bytes"], bottom)), ha="center", va="bottom", fontsize=9,
                    fontweight="bold", xytext=(0, 26), textcoords="offset points")
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Patch(fill=False, edgecolor="black", linestyle="--", label="reserved (allocated, headroom included)"))
    ax.legend(handles=handles, fontsize=7.5, loc="upper right")
    ax.set_xticks(x, [f"dense\n(on the {device})", f"FlexiCache\non the {device}", "FlexiCache\nhost pool"])
    ax.set_xlabel("where the KV cache lives")
    ax.set_ylabel("MiB")
    ax.set_ylim(0, max(dense, r["gpu_reserved_bytes"], r["host_reserved_bytes"]) * 1.55 or 1)
    held = f" holding {tokens:,} tokens" if tokens else ""
    ax.set_title(title or f"KV cache memory{held}: FlexiCache vs dense")
    return fig


# ---------------------------------------------------------------------------------------------------
# page selection
# ---------------------------------------------------------------------------------------------------
def pick_heads(recorder, needle_pages=None, n: int = 2, profile: HeadProfile | None = None) -> list[tuple[int, int]]:
    """n unstable and n stable heads worth looking at: with `needle_pages`, those that hold the needle's
    pages most often, else the most and least moving ones. The split is the profile's if given, else the one
    the recorder sees (stable heads select only at reranks)."""
    unstable, stable = _split(recorder, profile)

    def rank(heads):
        if needle_pages:
            return sorted(heads, key=lambda h: (-recorder.hits(*h, needle_pages), -recorder.turnover(*h)))
        return sorted(heads, key=lambda h: -recorder.turnover(*h))

    return rank(unstable)[:n] + rank(stable)[:n]


def _split(recorder, profile):
    heads = recorder.heads()
    if profile is not None:
        bad = set(profile.unstable)
        return [h for h in heads if h in bad], [h for h in heads if h not in bad]
    return recorder.unstable_heads(), recorder.stable_heads()


def page_selection_chart(recorder, needle_pages=None, heads=None, *, batch: int = 0, profile: HeadProfile | None = None,
                         rerank_interval: int | None = None, title: str | None = None):
    """The pages each of a few KV heads selects over the decode steps (one panel per head, page id against
    decode step): an unstable head re-selects every step, so its set moves; a stable head selects at a rerank
    (dotted lines) and holds that set still until the next one. `needle_pages` (page ids) are marked.
    `heads` defaults to pick_heads(recorder, needle_pages)."""
    _matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    heads = list(heads) if heads is not None else pick_heads(recorder, needle_pages, profile=profile)
    steps = recorder.positions()
    if not heads or not steps:
        raise ValueError("nothing recorded: attach a recorder with cache.record_selections() before decoding")
    unstable, _ = _split(recorder, profile)
    pages = max(recorder.num_pages(), max(needle_pages or [0]) + 1)
    fig, axes = new_figure(9, 1.9 * len(heads) + 1.1, rows=len(heads), sharex=True)
    axes = axes if isinstance(axes, list) else [axes]
    needle = sorted(set(needle_pages or []))
    for ax, (layer, head) in zip(axes, heads):
        kind = "unstable" if (layer, head) in unstable else "stable"
        _, held = recorder.selection_matrix(layer, head, batch, pages)
        for p in needle:  # a faint band under the picture: the needle's row, selected or not
            ax.axhspan(p - 0.5, p + 0.5, color=COLORS["needle"], alpha=0.15, lw=0, zorder=0)
        ax.imshow(held.T.numpy(), aspect="auto", origin="lower", interpolation="nearest", zorder=1,
                  cmap=ListedColormap([(1, 1, 1, 0), COLORS[kind]]), vmin=0, vmax=1,
                  extent=(-0.5, len(steps) - 0.5, -0.5, pages - 0.5))
        if kind == "stable":
            chosen = set(recorder.selection_positions(layer, head))
            for i, p in enumerate(steps):
                if p in chosen:
                    ax.axvline(i - 0.5, color=COLORS["rerank"], ls=":", lw=1, zorder=2)
        if needle:  # a marker at every step that holds a needle page
            at = held[:, needle].nonzero().tolist()
            if at:
                xs, ys = zip(*((i, needle[j]) for i, j in at))
                ax.scatter(xs, ys, marker="x", s=22, color=COLORS["needle"], lw=1.2, zorder=3)
            ax.text(1.005, needle[0], f"needle\n({recorder.hits(layer, head, needle, batch):.0%})", color=COLORS["needle"],
                    fontsize=7, va="center", transform=ax.get_yaxis_transform())
        ax.set_ylim(-0.5, pages - 0.5)
        ax.set_ylabel("page id", fontsize=8)
        ax.set_title(f"layer {layer}, KV head {head}: {kind}", fontsize=9, loc="left")
    axes[-1].set_xlabel(f"decode step (the first decodes token {steps[0]}; pages of {recorder.page_size} tokens)")
    every = f"every {rerank_interval} steps" if rerank_interval else "at a rerank"
    handles = [Patch(color=COLORS["unstable"], label="selected (unstable head: re-selects every step)"),
               Patch(color=COLORS["stable"], label=f"held (stable head: re-selects {every}, holds between)"),
               Line2D([], [], color=COLORS["rerank"], ls=":", label="rerank of a stable head")]
    if needle:
        handles.append(Line2D([], [], color=COLORS["needle"], marker="x", lw=6, alpha=0.6,
                              label="the needle's page (x: held at that step; % of steps)"))
    fig.legend(handles=handles, fontsize=7.5, loc="outside lower center", ncol=2, frameon=False)
    fig.suptitle(title or "Pages each KV head selects over the decode steps", fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------------------
# head stability
# ---------------------------------------------------------------------------------------------------
def stability_heatmap(profile: HeadProfile, *, title: str | None = None):
    """Instability (mean 1 - TS, docs/method.md "Profiling") per layer x KV head, the profile's unstable heads
    marked. A profile without measured instability (the paper's) is drawn as its unstable mask. The same
    picture as profile_plots.plot_stability_heatmap (`flexicache profile --plots`), with a legend."""
    _matplotlib()
    from matplotlib.lines import Line2D

    L, H = profile.num_layers, profile.num_kv_heads
    inst = profile.metadata.get("instability")
    if inst is not None:
        grid, label = torch.tensor(inst, dtype=torch.float32), "instability (1 - TS)"
    else:
        grid, label = torch.zeros(L, H), "unstable in the profile (1) or not (0)"
        for layer, head in profile.unstable:
            grid[layer, head] = 1
    fig, ax = new_figure(min(16, max(6, 0.32 * L + 2)), max(2.6, 0.45 * H + 1.9))
    im = ax.imshow(grid.T.numpy(), aspect="auto", cmap="viridis", origin="lower", interpolation="nearest")
    handles = []
    if profile.unstable:
        ls, hs = zip(*profile.unstable)
        handles.append(ax.scatter(ls, hs, s=14, c="red", marker="o", label=f"unstable in the profile ({len(profile.unstable)} "
                                  f"of {L * H}): every page on the GPU, re-selects every step"))
    handles.append(Line2D([], [], ls="", marker="s", markerfacecolor="none", color="grey",
                          label="the others: stable (top-K pages on the GPU, every page in the host pool)"))
    fig.legend(handles=handles, fontsize=7.5, loc="outside lower center", ncol=1, frameon=False)
    ax.set_xlabel("layer")
    ax.set_ylabel("KV head")
    ax.set_yticks(range(H))
    ax.set_xticks(range(0, L, max(1, L // 16)))
    fig.colorbar(im, ax=ax, label=label, pad=0.01)
    m = profile.metadata
    what = f" (measured on top-{m.get('topk_pages')} sets of {m.get('page_size')}-token pages)" if m.get("topk_pages") else ""
    ax.set_title(title or f"{m.get('model_id') or profile.model_id or 'model'}: head instability{what}", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------
def write_pictures(directory, *, report: dict | None = None, recorder=None, profile: HeadProfile | None = None,
                   needle_pages=None, device: str = "GPU", rerank_interval: int | None = None,
                   tokens: int | None = None) -> list[Path]:
    """The pictures of whatever is given, as PNGs in `directory`: memory.png, page_selection.png,
    head_stability.png. Returns the paths written."""
    _matplotlib()
    directory = Path(directory)
    written = []
    if report is not None:
        written.append(save(memory_chart(report, device=device, tokens=tokens), directory / "memory.png"))
    if recorder is not None and recorder.positions():
        fig = page_selection_chart(recorder, needle_pages, profile=profile, rerank_interval=rerank_interval)
        written.append(save(fig, directory / "page_selection.png"))
    if profile is not None:
        written.append(save(stability_heatmap(profile), directory / "head_stability.png"))
    return written
