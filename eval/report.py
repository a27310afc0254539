"""Markdown tables and plots from results.json.

    write_report(out_dir) -> report.md, score_vs_budget.png, fidelity.png (when there are fidelity records)

Scores are percentages (metric x 100), averaged over samples, then over tasks (every task weighs the
same). "retention" is a method's mean score divided by dense's on the same (task, sample) pairs.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from flexicache_hf.eval.methods import METHOD_NAMES

ORDER = {name: i for i, name in enumerate(METHOD_NAMES)}


def _bkey(b) -> str:
    return "full" if b is None else str(b)


def _budget_sort(keys):
    return sorted(keys, key=lambda k: (k == "full", int(k) if k != "full" else 0))


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _fmt(x, digits=1):
    return "–" if x != x else f"{x:.{digits}f}"


def load(out_dir) -> dict:
    """<out_dir>/results.json; a ValueError naming the file, and what to do, if it is not a results file
    (cut short by a full disk or a copy, or edited: ResultStore itself replaces it atomically)."""
    path = Path(out_dir) / "results.json"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:  # not JSON (json.JSONDecodeError), not UTF-8 (UnicodeDecodeError)
        problem = str(e)
    else:
        if isinstance(data, dict):
            return data
        problem = f"a JSON {type(data).__name__}, not an object"
    raise ValueError(f"{path} is not a readable results file ({problem}): delete it, or rerun the eval with "
                     "--no-resume to start a fresh one")


def _matched(cell, tasks, method, budget):
    """(method's mean score, dense's mean score on the same (task, sample) pairs, samples per task): means over
    samples, then over the tasks the method ran. Retention must compare like with like: results.json may hold
    more samples of dense than of a method (a later run with --samples 10 of some methods only)."""
    got, ref, counts = [], [], set()
    for t in tasks:
        ours, dense = cell.get((t, method, budget), {}), cell.get((t, "dense", "full"), {})
        common = [s for s in ours if s in dense]
        if common:
            got.append(_mean(ours[s] for s in common))
            ref.append(_mean(dense[s] for s in common))
            counts.add(len(common))
    return _mean(got), _mean(ref), len(got), counts


def _cell_text(v, ref, counts, n_samples) -> str:
    text = f"{_fmt(v)} ({_fmt(v / ref if ref else float('nan'), 2)})"
    if counts and max(counts) < n_samples:  # fewer samples than the table's: say so
        text += f" [{max(counts)} of {n_samples} samples]"
    return text


def task_tables(records: list[dict]) -> tuple[str, dict]:
    """Markdown for every (model, length); returns (text, summary[(model, length)][method][budget] = mean %)."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["model"], r["length"])].append(r)
    lines, summary = [], {}
    for (model, length), recs in sorted(groups.items()):
        cell = defaultdict(dict)  # (task, method, budget) -> {sample: score %}
        for r in recs:
            cell[(r["task"], r["method"], _bkey(r["budget"]))][r["sample"]] = 100.0 * r["score"]
        tasks = sorted({r["task"] for r in recs})
        methods = sorted({r["method"] for r in recs}, key=lambda m: ORDER.get(m, 99))
        budgets = _budget_sort({_bkey(r["budget"]) for r in recs if r["method"] != "dense"})
        samples = sorted({r["sample"] for r in recs})
        prompt = _mean(r["prompt_tokens"] for r in recs)
        dense_task = {t: _mean(cell.get((t, "dense", "full"), {}).values()) for t in tasks}
        dense_mean = _mean(v for v in dense_task.values() if v == v)
        summ = {}
        lines.append(f"### {model}, {length}-token prompts (mean {prompt:.0f} tokens), {len(tasks)} tasks x {len(samples)} samples\n")
        lines.append("Mean score (%) over tasks; in brackets the retention vs dense (method / dense on the same "
                     "samples); [n of N samples] where a method ran on fewer samples than the table.\n")
        lines.append("| method | " + " | ".join(budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        for m in methods:
            if m == "dense":
                lines.append(f"| dense (no budget) | " + " | ".join(_fmt(dense_mean) for _ in budgets) + " |")
                summ["dense"] = {b: dense_mean for b in budgets}
                continue
            row, summ[m] = [], {}
            for b in budgets:
                v, ref, n_tasks, counts = _matched(cell, tasks, m, b)
                if not n_tasks:
                    row.append("–")
                    continue
                summ[m][b] = v
                row.append(_cell_text(v, ref, counts, len(samples)))
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines.append("")
        solved = [t for t in tasks if dense_task[t] == dense_task[t] and dense_task[t] >= 50.0]
        if solved and len(solved) < len(tasks):
            d_solved = _mean(dense_task[t] for t in solved)
            lines.append(f"Only the {len(solved)} tasks dense solves (dense >= 50%: {', '.join(solved)}): mean score (%) "
                         f"and retention; dense {_fmt(d_solved)}.\n")
            lines.append("| method | " + " | ".join(budgets) + " |")
            lines.append("|---|" + "---|" * len(budgets))
            for m in methods:
                if m == "dense":
                    continue
                row = []
                for b in budgets:
                    v, ref, n_tasks, counts = _matched(cell, solved, m, b)
                    row.append(_cell_text(v, ref, counts, len(samples)) if n_tasks == len(solved) else "–")
                lines.append(f"| {m} | " + " | ".join(row) + " |")
            lines.append("")
        summary[(model, length)] = summ
        for b in budgets:
            present = [m for m in methods if m == "dense" or any(cell.get((t, m, b)) for t in tasks)]
            lines.append(f"<details><summary>per task, budget {b} (score %, mean over samples)</summary>\n")
            lines.append("| task | " + " | ".join(present) + " |")
            lines.append("|---|" + "---|" * len(present))
            for t in tasks:
                vals = [_fmt(_mean(cell.get((t, m, "full" if m == "dense" else b), {}).values())) for m in present]
                lines.append(f"| {t} | " + " | ".join(vals) + " |")
            lines.append("\n</details>\n")
    return "\n".join(lines), summary


def fidelity_tables(records: list[dict]) -> str:
    groups = defaultdict(list)
    for r in records:
        groups[(r["model"], r["task"], r["length"])].append(r)
    lines = []
    for (model, task, length), recs in sorted(groups.items()):
        budgets = _budget_sort({_bkey(r["budget"]) for r in recs})
        methods = sorted({r["method"] for r in recs}, key=lambda m: ORDER.get(m, 99))
        steps = recs[0]["steps"]
        lines.append(f"### {model}, {task}: {steps} teacher-forced steps after a {length}-token prompt "
                     f"(dense perplexity {recs[0]['ppl_dense']:.3f})\n")
        lines.append("top-1 agreement with dense (%) / mean KL(dense || method) (nats) / perplexity ratio (method / dense)\n")
        lines.append("| method | " + " | ".join(budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        by = {(r["method"], _bkey(r["budget"])): r for r in recs}
        for m in methods:
            cells = []
            for b in budgets:
                r = by.get((m, b))
                cells.append("–" if r is None else f"{100 * r['top1_agreement']:.1f} / {r['mean_kl']:.4f} / {r['ppl_ratio']:.3f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_scores(summary: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(summary)
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys) + 2.5, 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        summ = summary[key]
        for m, vals in sorted(summ.items(), key=lambda kv: ORDER.get(kv[0], 99)):
            numeric = [(int(b), v) for b, v in vals.items() if b != "full" and v == v]
            if m == "dense":
                if vals:
                    ax.axhline(next(iter(vals.values())), color="black", linestyle="--", label="dense")
                continue
            if numeric:
                numeric.sort()
                ax.plot([b for b, _ in numeric], [v for _, v in numeric], marker="o", label=m,
                        color=plt.get_cmap("tab10")(ORDER.get(m, 9) % 10))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (KV tokens per head visible at decode)")
        ax.set_ylabel("mean score (%)")
        ax.set_title(f"{key[0]}, {key[1]} tokens")
        ax.grid(alpha=0.3)
    _save(fig, axes, path)


def _save(fig, axes, path) -> None:
    """One legend beside the last panel, then write and close the figure."""
    import matplotlib.pyplot as plt

    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fidelity(records: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in records:
        groups[(r["model"], r["task"], r["length"])].append(r)
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups) + 2.5, 4.2), squeeze=False)
    colors = plt.get_cmap("tab10")
    styles = ["--", "-", ":", "-."]
    for ax, (key, recs) in zip(axes[0], sorted(groups.items())):
        budgets = sorted({r["budget"] for r in recs if r["budget"] is not None})
        for r in sorted(recs, key=lambda r: (ORDER.get(r["method"], 99), _bkey(r["budget"]))):
            if r["budget"] is None:
                continue
            xs = [min((i + 1) * r["curve_every"], r["steps"]) for i in range(len(r["agreement_curve"]))]
            ax.plot(xs, [100 * y for y in r["agreement_curve"]], marker=".", color=colors(ORDER.get(r["method"], 9) % 10),
                    linestyle=styles[budgets.index(r["budget"]) % len(styles)], label=f"{r['method']} @ {_bkey(r['budget'])}")
        ax.set_xlabel("decode step (teacher-forced)")
        ax.set_ylabel("top-1 agreement with dense (%), per window")
        ax.set_title(f"{key[0]}, {key[1]}, prompt {key[2]}")
        ax.grid(alpha=0.3)
    _save(fig, axes, path)


def write_report(out_dir) -> Path:
    out = Path(out_dir)
    data = load(out)
    text, summary = task_tables(data["records"])
    parts = ["# FlexiCache accuracy retention\n"]
    for run in data.get("runs", []):
        parts.append(f"- run `{run.get('command', '')}`: {run.get('wall_s', 0):.0f} s wall, {run.get('env', {}).get('device', '')}, "
                     f"{run.get('env', {}).get('dtype', '')}, {run.get('env', {}).get('threads', '')} threads, "
                     f"profile: {run.get('profile_source', '')}")
    parts.append("")
    if data["records"]:
        parts.append("## Tasks\n")
        parts.append(text)
        plot_scores(summary, out / "score_vs_budget.png")
        parts.append("![score vs budget](score_vs_budget.png)\n")
    if data.get("fidelity"):
        parts.append("## Long-generation fidelity\n")
        parts.append(fidelity_tables(data["fidelity"]))
        plot_fidelity(data["fidelity"], out / "fidelity.png")
        parts.append("![fidelity](fidelity.png)\n")
    path = out / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
