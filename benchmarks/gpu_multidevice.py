"""FlexiCache on a model split across devices with accelerate's device_map, against the same model on one
device: same greedy tokens at full budget and at a small budget, no data loss, memory report per device.

    python benchmarks/gpu_multidevice.py            # GPU 0 + CPU (one GPU is enough)
    python benchmarks/gpu_multidevice.py --gpus 2   # layers over two GPUs
"""

from __future__ import annotations

import argparse

import torch

import flexicache_hf
from flexicache_hf import FlexiCache
from flexicache_hf.demo import passkey_prompt
from flexicache_hf.models import load_smollm2


def split_map(num_layers: int, devices: list) -> dict:
    per = -(-num_layers // len(devices))
    dm = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0], "model.norm": devices[-1], "lm_head": devices[-1]}
    dm.update({f"model.layers.{i}": devices[i // per] for i in range(num_layers)})
    return dm


def run(model, ids, **knobs):
    cache = FlexiCache(model.config, **knobs)
    got = {}
    inner = cache.update

    def update(k, v, i, *a, **kw):
        got.setdefault(i, []).append((k.clone(), v.clone()))
        return inner(k, v, i, *a, **kw)

    cache.update = update
    with torch.no_grad():
        out = model.generate(**ids, past_key_values=cache, max_new_tokens=48, min_new_tokens=48, do_sample=False)
    exact = all(torch.equal(torch.cat([p[0] for p in got[i]], 2), cache.full_kv(i)[0]) for i in got)
    return out.cpu(), cache.memory_report(), exact


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=1)
    args = ap.parse_args(argv)
    devices = [f"cuda:{i}" for i in range(args.gpus)] if args.gpus > 1 else ["cuda:0", "cpu"]
    model, tok = load_smollm2(torch.float32, attn_implementation="flexicache")
    prompt, key = passkey_prompt(tok, 2000, 0.4, 3)
    single = model.to("cuda:0")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).to("cuda:0")
    n = ids.input_ids.shape[1]
    budgets = {"full": dict(topk_pages=-(-(n + 48) // 16)), "small": dict(topk_pages=16, page_size=8)}
    ref = {name: run(single, ids, **kn) for name, kn in budgets.items()}
    del single, model
    torch.cuda.empty_cache()
    model, _ = load_smollm2(torch.float32, attn_implementation="flexicache")
    from accelerate import dispatch_model

    split = dispatch_model(model, device_map=split_map(model.config.num_hidden_layers, devices))
    print(f"| budget | same tokens as one device | full_kv exact | GPU KV bytes by device | answer |")
    print("|---|---|---|---|---|")
    for name, kn in budgets.items():
        out, rep, exact = run(split, ids, **kn)
        same = torch.equal(out, ref[name][0])
        per_dev = {d: r["gpu_kv_bytes"] for d, r in rep["by_device"].items()}
        answer = tok.decode(out[0, n:], skip_special_tokens=True)[:30]
        print(f"| {name} | {same} | {exact and ref[name][2]} | {per_dev} | {answer!r} (key {key}) |")


if __name__ == "__main__":
    main()
