"""Draw decode speed and GPU KV memory against context from `gpu_e2e.py --sweep ... --json FILE`.

    python benchmarks/plot_e2e.py FILE docs/e2e_vs_context.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    rows = data["sweep"]
    ctx = [r["ctx"] // 1024 for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("dense", "HF dense (eager)"), ("flexicache_graphs", "FlexiCache (CUDA-graph decode)")):
        a.plot(ctx, [1000 / r[key]["decode_ms"] for r in rows], "o-", label=label)
        b.plot(ctx, [r[key]["gpu_kv_gib"] for r in rows], "o-", label=label)
    b.plot(ctx, [r["flexicache_graphs"]["host_kv_gib"] for r in rows], "o--", label="FlexiCache host (pinned) KV")
    a.set(xlabel="context (k tokens)", ylabel="decode tokens/s (batch 1)", title="Decode throughput")
    b.set(xlabel="context (k tokens)", ylabel="GiB", title="KV memory")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Llama-3.1-8B-shaped bf16, random weights, {data['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
