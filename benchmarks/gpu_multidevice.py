"""FlexiCache on a model split across devices with accelerate's device_map, against the same model on one
device: same greedy tokens at full budget and at a small budget, no data loss, memory report per device.

    python benchmarks/gpu_multidevice.py            # GPU 0 + CPU-offloaded layers (one GPU is enough)
    python benchmarks/gpu_multidevice.py --gpus 2   # layers over two GPUs

A randomly initialised Llama (seeded) stands in for a real model: the test is that placement changes
nothing, which does not depend on the weights.
"""

from __future__ import annotations

import argparse
import copy

import torch
from accelerate import dispatch_model
from transformers import LlamaConfig, LlamaForCausalLM

import flexicache_hf  # noqa: F401
from flexicache_hf import FlexiCache, HeadProfile
from flexicache_hf.testing import UpdateRecorder


def model_on(device_map, cfg, state):
    model = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="flexicache", dtype=torch.float32)
    model.load_state_dict(state)
    model.eval()
    if isinstance(device_map, str):
        return model.to(device_map)
    # main_device="cpu" makes the CPU-mapped layers run on the CPU (accelerate's default would only keep
    # their weights there and run them on the GPU), so their cache pages live on the CPU too
    main = "cpu" if "cpu" in device_map.values() else None
    return dispatch_model(model, device_map=device_map, main_device=main)


def split_map(num_layers: int, devices: list) -> dict:
    per = -(-num_layers // len(devices))
    dm = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0], "model.norm": devices[-1], "lm_head": devices[-1]}
    dm.update({f"model.layers.{i}": devices[i // per] for i in range(num_layers)})
    return dm


def run(model, ids, profile, **knobs):
    cache = FlexiCache(model.config, profile=profile, **knobs)
    rec = UpdateRecorder(cache)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=48,
                             min_new_tokens=48, do_sample=False, pad_token_id=0)
    return out.cpu(), cache.memory_report(), rec.all_exact()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=1)
    args = ap.parse_args(argv)
    devices = [f"cuda:{i}" for i in range(args.gpus)] if args.gpus > 1 else ["cuda:0", "cpu"]
    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, initializer_range=0.1)
    torch.manual_seed(0)
    state = LlamaForCausalLM(cfg).state_dict()
    profile = HeadProfile(8, 4, [(l, l % 4) for l in range(8)])  # 25% unstable
    ids = torch.randint(0, 4096, (2, 1500), generator=torch.Generator().manual_seed(1)).to("cuda:0")
    budgets = {"full": dict(topk_pages=-(-(1500 + 48) // 16)), "small (8 pages of 16)": dict(topk_pages=8)}
    single = model_on("cuda:0", cfg, state)
    ref = {name: run(single, ids, profile, **kn) for name, kn in budgets.items()}
    del single
    split = model_on(split_map(8, devices), cfg, state)
    print(f"devices: {devices} ({torch.cuda.get_device_name(0)})")
    print("| budget | same greedy tokens as one device | full_kv bit-exact | GPU KV bytes by device | host KV bytes by device |")
    print("|---|---|---|---|---|")
    for name, kn in budgets.items():
        out, rep, exact = run(split, ids, profile, **kn)
        same = torch.equal(out, ref[name][0])
        gpu = {d: r["gpu_kv_bytes"] for d, r in rep["by_device"].items()}
        host = {d: r["host_kv_bytes"] for d, r in rep["by_device"].items()}
        print(f"| {name} | {same} | {exact and ref[name][2]} | {gpu} | {host} |")


if __name__ == "__main__":
    main()
