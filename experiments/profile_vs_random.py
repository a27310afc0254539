"""Does the measured head profile beat random unstable sets of its size? Long-generation fidelity (CPU).

FlexiCache with the model's shipped profile against FlexiCache with `--seeds` random unstable sets of the
same size (and every-head-stable), all in lockstep with dense on the same teacher-forced text, through the
harness's `run_fidelity`. One random set is one draw: several seeds say whether the profile's edge is larger
than the spread between random sets.

    python experiments/profile_vs_random.py --model smollm2 --prompt 2048 --steps 1024 --budget 1024 --seeds 4
"""

from __future__ import annotations

import argparse
import statistics

import torch

import flexicache_hf  # noqa: F401  registers attn_implementation="flexicache"
from flexicache_hf.eval import methods as M
from flexicache_hf.eval import runner
from flexicache_hf.models import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/profile_vs_random")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, dtype=torch.float32, attn_implementation="flexicache")
    store = runner.ResultStore(f"{a.out}/{a.model}")
    profile = runner.resolve_profile(model, tok)
    methods = [M.FlexiCacheMethod(), M.FlexiCacheMethod(name="flexicache_all_stable", profile="all_stable")]
    methods += [M.FlexiCacheMethod(name=f"random_seed{s}", profile="random", seed=s) for s in range(a.seeds)]
    runner.run_fidelity(model, tok, methods, [a.budget], store, profile, prompt_tokens=a.prompt, steps=a.steps)
    rows = {r["method"]: r for r in store.data["fidelity"] if r["length"] == a.prompt and r["budget"] == a.budget}
    print(f"{runner.model_name(model)}: {a.steps} teacher-forced steps after {a.prompt} tokens, budget {a.budget}, "
          f"{len(profile.unstable)} unstable heads")
    print("| method | top-1 agreement % | mean KL (nats) | perplexity ratio |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {100 * r['top1_agreement']:.1f} | {r['mean_kl']:.4f} | {r['ppl_ratio']:.3f} |")
    rand = [rows[n] for n in rows if n.startswith("random_seed")]
    if rand:
        agree = [100 * r["top1_agreement"] for r in rand]
        kl = [r["mean_kl"] for r in rand]
        print(f"| random sets: mean (min-max) | {statistics.mean(agree):.1f} ({min(agree):.1f}-{max(agree):.1f}) | "
              f"{statistics.mean(kl):.4f} ({min(kl):.4f}-{max(kl):.4f}) | |")


if __name__ == "__main__":
    main()
