"""A/B of the FlexiCache decode step between two installs (e.g. before and after a refactor), one GPU.

    PYTHONPATH=/tmp/site_a python benchmarks/ab_decode.py --benchmarks A/benchmarks --label before
    PYTHONPATH=/tmp/site_b python benchmarks/ab_decode.py --benchmarks B/benchmarks --label after

Each run loads the Llama-3.1-8B-shaped random model of that tree's gpu_e2e.py and times generate()-path
decode steps with CUDA-graph replay (gpu_e2e.bench, 64 pages of 16, R = 16) at each shape, --repeats
times; prints one JSON line per shape (median ms/token of each repeat). Run the two labels alternately in
one device call and compare medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--benchmarks", required=True, help="the benchmarks/ folder whose gpu_e2e.py to use")
    ap.add_argument("--label", required=True)
    ap.add_argument("--shapes", nargs="*", default=["32768x1", "32768x8"])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, args.benchmarks)
    import gpu_e2e  # noqa: E402

    from flexicache_hf import FlexiCache

    model = gpu_e2e.llama8b(32)
    for shape in args.shapes:
        ctx, batch = (int(x) for x in shape.split("x"))
        make = lambda: FlexiCache(model.config, topk_pages=64, page_size=16, rerank_interval=16)  # noqa: E731
        runs = [gpu_e2e.bench(model, make, ctx, batch, args.new, graphs=True) for _ in range(args.repeats)]
        print(json.dumps({"label": args.label, "shape": shape, "decode_ms": [round(r["decode_ms"], 3) for r in runs],
                          "median_ms": round(statistics.median(r["decode_ms"] for r in runs), 3),
                          "mean_ms": [round(r["decode_mean_ms"], 2) for r in runs]}), flush=True)


if __name__ == "__main__":
    main()
