"""The stable heads' warm-up (FlexiCacheConfig.warmup_steps) at tight budgets: `flexicache eval` with extra
methods `flexicache_w<W>` (FlexiCache with warmup_steps=W, everything else the cache's defaults), and the
pages each request's promotions copy host -> GPU.

    python experiments/tight_budget_warmup.py --warmups 0,16,32 -- --preset cpu --model smollm2 --threads 1 \\
        --lengths 4096 --samples 4 --tasks niah_single_story,niah_single_logs,niah_multivalue,niah_single_csv \\
        --methods dense,oracle_pages --budgets 256,512,1024 --no-fidelity --out runs/warmup4k

Everything after `--` is `flexicache eval`'s command line; the `flexicache_w<W>` methods are appended to its
--methods (the command line's default scorer renames them `flexicache_w<W>_sketch2mass`). With
warmup_steps=0 the method is the cache before the warm-up existed (its tokens equal `flexicache_sketch2mass`
of an earlier run). A resumed run skips the records results.json already has (copy an earlier run's
results.json into --out to reuse its dense and oracle records).

Promotions: every call of the stable heads' promotion (ops.plan_promotion) is counted per request
(one (method, budget, prompt) cache): calls, and pages copied (one page of one stable KV head of one row; a
SmolLM2 page is 16 tokens x 64 channels x K and V = 8 KiB in fp32), split into the first decode step's,
the rest of the warm-up's and the periodic reranks'. Written to <out>/promotions.json and summarised.

If flexicache_hf/layer.py does not pass `cfg.warmup_steps` to DecodeFlags.at (the eager step kind), this
script makes it do so, so the eager step (the one the CPU eval runs) has the warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
from collections import defaultdict

import torch


def patch_eager_flags():
    from flexicache_hf import layer as layer_mod
    from flexicache_hf.decode import DecodeFlags

    if "warmup_steps" in inspect.getsource(layer_mod.FlexiCacheLayer.decode_flags):
        return False

    def decode_flags(self):
        m = self.memory
        return DecodeFlags.at(m.length, m.selected_at, self.cfg.page_size, self.cfg.rerank_interval,
                              m.stable is not None, self.cfg.warmup_steps)

    layer_mod.FlexiCacheLayer.decode_flags = decode_flags
    return True


class Counter:
    """Promotions of the current request, by kind of step."""

    requests: list = []
    current = None


def patch_promotions():
    from flexicache_hf import ops

    plan = ops.plan_promotion

    def counted(sp, selected, current_page, active=None, use_kernels="auto"):
        src, dst = plan(sp, selected, current_page, active, use_kernels)
        rec = Counter.current
        if rec is not None:
            if active is not None and not bool(active.all()):
                return src, dst
            mem = rec["memory"][id(sp)]  # the layer whose slot table this is
            since = mem.length - mem.selected_at  # the step's (a promotion runs before next_position)
            kind = "first" if since == 0 else "warmup" if since < rec["warmup"] else "rerank"
            rec["calls"][kind] += 1
            rec["pages"][kind] += int((src >= 0).sum())
        return src, dst

    ops.plan_promotion = counted


def make_methods(warmups):
    from flexicache_hf.eval import methods as M

    @dataclasses.dataclass
    class WarmupFlexiCache(M.FlexiCacheMethod):
        warmup_steps: int = 0

        def empty_cache(self, ctx, budget, prompt_len):
            from flexicache_hf import FlexiCache

            return FlexiCache(
                ctx.config, profile=self.head_profile(ctx), topk_pages=ctx.topk_pages(budget, prompt_len),
                page_size=ctx.page_size, rerank_interval=self.rerank_interval, warmup_steps=self.warmup_steps,
                score_spread=self.score_spread, sketch_bits=self.sketch_bits, sketch_score=self.sketch_score,
                max_cache_len=prompt_len + ctx.max_new_tokens + 1,
            )

        def make_cache(self, ctx, budget, prefill):
            cache = super().make_cache(ctx, budget, prefill)
            mems = [lay.memory for lay in cache.layers]
            Counter.current = {"method": self.name, "budget": budget, "prompt_len": prefill.length,
                               "warmup": self.warmup_steps,
                               "memory": {id(m.stable.slot_page): m for m in mems if m.stable is not None},
                               "stable_heads": sum(len(m.stable_heads) for m in mems),
                               "calls": defaultdict(int), "pages": defaultdict(int)}
            Counter.requests.append(Counter.current)
            return cache

    base = M.registry

    def registry():
        reg = base()
        for w in warmups:
            m = WarmupFlexiCache(name=f"flexicache_w{w}", warmup_steps=w)
            reg[m.name] = m
        return reg

    M.registry = registry
    return [f"flexicache_w{w}" for w in warmups]


def summarise(out):
    rows = defaultdict(list)
    for r in Counter.requests:
        rows[(r["method"], r["budget"])].append(r)
    summary = []
    for (method, budget), rs in sorted(rows.items(), key=lambda x: (x[0][1], x[0][0])):
        n = len(rs)
        mean = lambda key, kind: sum(r[key][kind] for r in rs) / n  # noqa: E731
        row = {"method": method, "budget": budget, "requests": n, "stable_heads": rs[0]["stable_heads"]}
        for kind in ("first", "warmup", "rerank"):
            row[f"calls_{kind}"] = mean("calls", kind)
            row[f"pages_{kind}"] = mean("pages", kind)
        summary.append(row)
        print(f"{method:28s} @{budget}: {n} requests; pages copied per request: first step {row['pages_first']:.0f}, "
              f"warm-up {row['pages_warmup']:.0f}, periodic reranks {row['pages_rerank']:.0f} "
              f"(promotion calls per layer-step: {row['calls_first']:.0f} / {row['calls_warmup']:.0f} / "
              f"{row['calls_rerank']:.0f})")
    with open(os.path.join(out, "promotions.json"), "w") as f:
        json.dump({"summary": summary,
                   "requests": [{k: v for k, v in r.items() if k != "memory"} for r in Counter.requests]},
                  f, indent=1)


def main():
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmups", default="0,16,32")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    warmups = [int(w) for w in args.warmups.split(",")]
    patched = patch_eager_flags()
    print(f"[warmup] eager DecodeFlags {'patched to pass' if patched else 'already passes'} cfg.warmup_steps", flush=True)
    patch_promotions()
    names = make_methods(warmups)
    i = rest.index("--methods")
    rest[i + 1] = ",".join([rest[i + 1], *names])
    out = rest[rest.index("--out") + 1]
    from flexicache_hf.eval_cli import main as eval_main

    torch.set_num_threads(1)
    try:
        return eval_main(rest)
    finally:
        os.makedirs(out, exist_ok=True)
        summarise(out)


if __name__ == "__main__":
    sys.exit(main())
