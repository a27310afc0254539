"""What the cache holds, in use and reserved, against dense: SmolLM2 on any device, defaults unless told.

    python benchmarks/memory_report.py [--tokens 2697] [--new 16] [--device cpu] [--max-cache-len]

Prints memory_report()'s figures in MiB: bytes in use (K/V on the device, metadata, host pool) and bytes the
cache's tensors hold allocated (reserved), next to what a DynamicCache holds for the same tokens. On CUDA it
also prints what the allocator frees when the cache is dropped (the reserved figure, measured another way).
"""

from __future__ import annotations

import argparse
import gc

import torch

import flexicache_hf
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.demo import passkey_prompt
from flexicache_hf.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2697)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-cache-len", action="store_true", help="size the buffers once from prompt + new tokens")
    args = ap.parse_args()
    model, tok = load_model("smollm2", dtype=torch.float32, attn_implementation="flexicache")
    model.to(args.device)
    prompt, _ = passkey_prompt(tok, args.tokens, 0.35, 0)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).to(args.device)
    n = ids.input_ids.shape[1]
    knobs = {"max_cache_len": n + args.new} if args.max_cache_len else {}
    base = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    cache = flexicache_hf.FlexiCache(model.config, **knobs)
    with torch.no_grad():
        model.generate(**ids, **cache_kwargs(cache), max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
    r = cache.memory_report()
    mib = lambda x: f"{x / 2**20:.1f}"  # noqa: E731
    print(f"SmolLM2-135M fp32 on {args.device}, {n} + {args.new} tokens, scorer {cache.config.scorer}, {knobs or 'defaults'}")
    print("| | MiB |\n|---|---|")
    print(f"| dense K/V (DynamicCache) | {mib(r['dense_kv_bytes'])} |")
    print(f"| device, in use: K/V + metadata | {mib(r['gpu_kv_bytes'] + r['metadata_bytes'])} |")
    print(f"| device, reserved | {mib(r['gpu_reserved_bytes'])} |")
    print(f"| host pool, in use / reserved | {mib(r['host_kv_bytes'])} / {mib(r['host_reserved_bytes'])} |")
    print(f"| device saving vs dense, reserved | {1 - r['gpu_reserved_bytes'] / r['dense_kv_bytes']:.0%} |")
    if args.device == "cuda":
        cache.join_promotions()
        held = torch.cuda.memory_allocated()
        del cache
        gc.collect()
        print(f"| allocator: freed when the cache went (held above the model: {mib(held - base)}) | "
              f"{mib(held - torch.cuda.memory_allocated())} |")


if __name__ == "__main__":
    main()
