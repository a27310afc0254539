"""How much true attention mass each page scorer's top-K captures, against the oracle (CPU, fp32).

Teacher-forced dense decoding through CPython's language reference (the fidelity text of
`flexicache eval`) after a long prompt. At every `--every`-th decode step, for every layer and KV head, the
pages are ranked by several scores computed from the step's queries, the top-K full pages (plus the
current page, as FlexiCache attends) are kept, and the softmax mass of the whole context that falls on
them is measured (mean over the GQA group's query heads). The model itself always runs dense, so every
scorer sees the same queries.

Scorers (all a max over the GQA group's query heads, as docs/method.md, "Page selection", specifies for MinMax):
  minmax      Quest's bound sum_d max(q_d kmax_d, q_d kmin_d) = q.c + |q|.r  (c = (kmax+kmin)/2, r = (kmax-kmin)/2)
  minmax_l<x> q.c + x |q|.r: the bound with the page's spread weighted by x (x = 0: the box's centre)
  mean        q . mean of the page's keys (needs one more vector per page)
  minmax_lse  the MinMax bounds of the group's query heads pooled by logsumexp (in softmax units), not max
  sketch<b>b  best q.k over the page's keys quantised to b bits per channel inside its min/max box
  sketch2b_lse_max / sketch2b_mass  the page's logsumexp of sketched logits (max over the group) / its
              softmax mass over sketched keys, summed over the group (the oracle's criterion, estimated)
  exactmax    the page's true largest q.k (the best a per-token max can do)
  oracle      the true mass itself (the ceiling)

    python experiments/selector_probe.py --model smollm2 --prompt 4096 --steps 256 --every 8
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from flexicache_hf.compat import cache_kwargs, output_cache
from flexicache_hf.eval.runner import fidelity_text
from flexicache_hf.models import load_model

LAMBDAS = (1.0, 0.5, 0.25, 0.0)


class Probe:
    active = False
    ps = 16
    k = 64
    cov: dict = {}  # scorer -> list of per-(step, layer) [Hkv] coverage tensors


def scores_for(q, keys, ps, scale):
    """q [Hkv, G, D], keys [Hkv, P*ps, D] (full pages only) -> {scorer: [Hkv, P]}."""
    Hkv, G, D = q.shape
    P = keys.shape[1] // ps
    pk = keys.view(Hkv, P, ps, D)
    kmin, kmax, kmean = pk.amin(2), pk.amax(2), pk.mean(2)
    c, r = (kmax + kmin) / 2, (kmax - kmin) / 2
    centre = torch.einsum("hgd,hpd->hgp", q, c)
    spread = torch.einsum("hgd,hpd->hgp", q.abs(), r)
    out = {("minmax" if lam == 1.0 else f"minmax_l{lam:g}"): (centre + lam * spread).amax(1) for lam in LAMBDAS}
    out["mean"] = torch.einsum("hgd,hpd->hgp", q, kmean).amax(1)
    # the group's bounds pooled as softmax logits would be (a sum over the group, not the max)
    out["minmax_lse"] = ((centre + spread) * scale).logsumexp(1)
    # per-token key sketches inside the page's box: b bits per channel, the box split into 2^b levels
    for bits in (1, 2):
        n = 2 ** bits
        lvl = ((pk - kmin[:, :, None]) / (kmax - kmin).clamp_min(1e-12)[:, :, None] * n).floor().clamp(0, n - 1)
        khat = kmin[:, :, None] + (lvl + 0.5) / n * (kmax - kmin)[:, :, None]  # each level's midpoint
        logits = torch.einsum("hgd,hptd->hgpt", q, khat)  # [Hkv, G, P, ps]
        out[f"sketch{bits}b"] = logits.amax(-1).amax(1)
        if bits == 2:
            # the page's attention mass as the sketched keys estimate it: softmax over every sketched token of
            # each query head, summed over the page and the group (the oracle's criterion, on sketched keys)
            lse = (logits * scale).logsumexp(-1)  # [Hkv, G, P]
            out["sketch2b_lse_max"] = lse.amax(1)
            out["sketch2b_mass"] = (lse - lse.logsumexp(-1, keepdim=True)).exp().sum(1)
    out["exactmax"] = torch.einsum("hgd,hptd->hgpt", q, pk).amax(-1).amax(1)
    return out


def probe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    if Probe.active and query.shape[2] == 1:
        scale = scaling if scaling is not None else module.scaling
        B, Hq, _, D = query.shape
        Hkv, T = key.shape[1], key.shape[2]
        G, ps = Hq // Hkv, Probe.ps
        q = query[0, :, 0].float().view(Hkv, G, D)
        k = key[0].float()
        probs = (torch.einsum("hgd,htd->hgt", q, k) * scale).softmax(-1)  # [Hkv, G, T]
        cur = (T - 1) // ps
        mass = F.pad(probs, (0, (cur + 1) * ps - T)).view(Hkv, G, cur + 1, ps).sum(-1)  # [Hkv, G, cur+1]
        if cur > Probe.k:
            cand = {**scores_for(q, k[:, : cur * ps], ps, scale), "oracle": mass[:, :, :cur].sum(1)}
            for name, s in cand.items():
                keep = torch.zeros(Hkv, cur + 1, dtype=torch.bool)
                keep.scatter_(1, s.topk(Probe.k, dim=-1).indices, True)
                keep[:, cur] = True
                Probe.cov.setdefault(name, []).append((mass * keep[:, None]).sum(-1).mean(1))  # [Hkv]
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--every", type=int, default=8, help="analyse every n-th decode step")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--topk-pages", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the summary as JSON here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    Probe.ps, Probe.k = a.page_size, a.topk_pages
    AttentionInterface.register("selector_probe", probe_attention)
    model, tok = load_model(a.model, dtype=torch.float32, attn_implementation="selector_probe")
    ids = fidelity_text(tok, "docs", a.prompt + a.steps)[None]
    t0 = time.perf_counter()
    out = model(input_ids=ids[:, : a.prompt], use_cache=True)
    cache = output_cache(out)
    for t in range(a.steps):
        Probe.active = t % a.every == 0
        pos = a.prompt + t
        model(input_ids=ids[:, pos:pos + 1], **cache_kwargs(cache), use_cache=True, position_ids=torch.tensor([[pos]]))
    summary = {"model": a.model, "prompt": a.prompt, "steps": a.steps, "every": a.every, "page_size": a.page_size,
               "topk_pages": a.topk_pages, "seconds": round(time.perf_counter() - t0, 1), "scorers": {}}
    oracle = torch.stack(Probe.cov["oracle"])  # [n, Hkv]
    print(f"{a.model}: {a.steps} steps after {a.prompt} tokens, every {a.every}th analysed, K = {a.topk_pages} pages of {a.page_size}")
    print(f"| scorer | mean captured mass | missed mass vs oracle's | head-steps capturing < 90% of the oracle's |")
    print("|---|---|---|---|")
    for name, covs in Probe.cov.items():
        c = torch.stack(covs)
        missed = float((1 - c).mean()) / max(float((1 - oracle).mean()), 1e-9)
        low = float((c < 0.9 * oracle).float().mean())
        summary["scorers"][name] = {"captured": float(c.mean()), "missed_vs_oracle": missed, "frac_below_90pct_oracle": low}
        print(f"| {name} | {float(c.mean()):.4f} | {missed:.2f}x | {100 * low:.1f}% |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
