"""Kernel timeline of one layer's sparse decode step, replayed from a CUDA graph (H100).

    python benchmarks/timeline.py --shape 32768x8

For each variant of the step, 30 copies are captured in one graph and replayed under torch.profiler;
the printout gives, for the median step, every kernel's start and end (us) relative to the step's
first kernel, so gaps between dependent launches and overlap under programmatic dependent launch
(PDL) can be seen, not guessed from totals.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_kernels as B  # noqa: E402  (maps the package on a bare checkout)

from flexicache_hf.kernels import _util  # noqa: E402

COPIES = 30


def kernels_of(fn):
    """Replay `fn` x COPIES from one CUDA graph under the profiler: [(name, start_us, end_us)]."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(COPIES):
            fn()
    g.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    ks = [(e["name"], float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
          if e.get("cat") == "kernel"]
    return sorted(ks, key=lambda k: k[1])


def report(label, fn, detail=True):
    ks = kernels_of(fn)
    per = len(ks) // COPIES
    steps = [ks[i * per:(i + 1) * per] for i in range(COPIES)]
    spans = [st[-1][2] - st[0][1] for st in steps]  # first start to last end (steps may overlap)
    period = (steps[-1][0][1] - steps[1][0][1]) / (COPIES - 2)
    mid = steps[sorted(range(1, COPIES), key=lambda i: spans[i])[COPIES // 2]]
    t0 = mid[0][1]
    print(f"\n== {label}: {per} kernels per step; step period {period:.1f} us, "
          f"median span {statistics.median(spans[1:]):.1f} us")
    for name, a, b in mid if detail else []:
        print(f"  {a - t0:7.1f} .. {b - t0:7.1f}  ({b - a:5.1f})  {name[:70]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="32768x8")
    ap.add_argument("--variants", action="store_true", help="also time launch-knob variants of the step")
    args = ap.parse_args()
    ctx, batch = (int(x) for x in args.shape.split("x"))
    print(f"{torch.cuda.get_device_name()}; ctx {ctx} batch {batch}")
    L = B.Layer(ctx, batch)
    for pdl in (False, True):
        _util.PDL = pdl
        report(f"PDL {'on' if pdl else 'off'}, stable rows first (the cache)", L.sparse_step)
        report(f"PDL {'on' if pdl else 'off'}, unstable rows first",
               lambda: B.K.paged_decode_attention(L.q, [L.group_u(L.select()), L.group_s()], L.valid, L.scale))
    _util.PDL = False
    report("parts: stable attention alone", L.attend_stable)
    report("parts: selection alone", L.select)
    if args.variants:  # launch knobs, judged inside the whole step (L2-cold, as in a model) rather than alone
        from flexicache_hf.kernels import attention as KA, scores as KSC
        for pdl in (False, True):
            _util.PDL = pdl
            for pps in (2, 3, 8):
                for bp, w in ((32, 4), (16, 2)):
                    old = KA.PROGRAMS_PER_SM, KSC.BLOCK_P, KSC.NUM_WARPS
                    KA.PROGRAMS_PER_SM, KSC.BLOCK_P, KSC.NUM_WARPS = pps, bp, w
                    report(f"PDL {pdl}: attention programs/SM {pps}, scores {bp} pages x {w} warps",
                           L.sparse_step, detail=False)
                    KA.PROGRAMS_PER_SM, KSC.BLOCK_P, KSC.NUM_WARPS = old

if __name__ == "__main__":
    main()
