"""Print the tight-budget comparison (issue 20) from a `flexicache eval` results.json: mean task score (%) per
(length, task) for every (method, budget), the mean over the tasks, and each FlexiCache method's gap to the page
oracle at the same budget (docs/accuracy.md, "Tight budgets").

    python experiments/tight_budget_table.py runs/tight4k/results.json
"""

from __future__ import annotations

import collections
import json
import sys


def main(path: str) -> None:
    try:
        recs = json.load(open(path))["records"]
    except FileNotFoundError:
        print(f"no {path} yet: nothing finished")
        return
    score = collections.defaultdict(dict)  # (length, task, method, budget) -> {sample: score}
    for r in recs:
        score[(r["length"], r["task"], r["method"], r["budget"])][r["sample"]] = r["score"]
    cols = sorted({(r["method"], r["budget"]) for r in recs}, key=lambda c: (c[1] or 0, c[0] != "oracle_pages", c[0]))
    for length in sorted({r["length"] for r in recs}):
        tasks = sorted({r["task"] for r in recs if r["length"] == length})
        print(f"\n### {length} tokens (mean score %, samples in brackets)\n")
        print("| task | " + " | ".join(f"{m}@{b or 'all'}" for m, b in cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        means = {c: [] for c in cols}
        for t in tasks:
            cells = []
            for c in cols:
                s = score.get((length, t, *c), {})
                if s:
                    means[c].append(100 * sum(s.values()) / len(s))
                cells.append(f"{100 * sum(s.values()) / len(s):.1f} ({len(s)})" if s else "-")
            print(f"| {t} | " + " | ".join(cells) + " |")
        print("| **mean** | " + " | ".join(f"**{sum(v) / len(v):.1f}**" if v else "-" for v in means.values()) + " |")
        for m, b in cols:
            o = means.get(("oracle_pages", b))
            if m.startswith("flexicache") and o and means[(m, b)] and len(o) == len(means[(m, b)]):
                gap = sum(means[(m, b)]) / len(means[(m, b)]) - sum(o) / len(o)
                print(f"{m}@{b}: {gap:+.1f} points vs the page oracle (target: within 2)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tight4k/results.json")
