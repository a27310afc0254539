"""Why the MinMax bound ranks the needle page low for some heads: per query head, the needle page's
true max logit and bound vs the other pages' bounds / true max logits (slack = bound - true max q.k),
on the dense greedy trajectory of niah_single @4096, sample 0 and 1. Logits are unscaled q.k."""
import json
import sys

import torch

torch.set_num_threads(1)
import flexicache_hf  # noqa: F401
from flexicache_hf import ops
from flexicache_hf.attention import flexicache_attention
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.models import load_smollm2
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from diag import needle_sample  # noqa: E402  (same folder; its own attention is re-registered below)

PS, K = 16, 64
HEADS = [(17, 1), (18, 2), (19, 1), (20, 1), (21, 2), (23, 0)]
CAP = {}


def att(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    if query.shape[2] == 1 and CAP.get("on"):
        CAP.setdefault(module.layer_idx, []).append((query[0, :, 0].clone(), key[0].clone()))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)


AttentionInterface.register("flexicache", att)
model, tok = load_smollm2(torch.float32, attn_implementation="flexicache")
out_all = {}
for sample in [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "0,1").split(",")]:
    CAP.clear()
    _, v, _, _, ids, digit_pos = needle_sample(tok, sample)
    npg = digit_pos[0] // PS
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        nxt = int(out.logits[0, -1].argmax())
        toks = [nxt]
        CAP["on"] = True
        for step in range(8):
            out = model(input_ids=torch.tensor([[nxt]]), **cache_kwargs(cache), use_cache=True,
                        position_ids=torch.tensor([[ids.shape[1] + step]]))
            nxt = int(out.logits[0, -1].argmax())
            toks.append(nxt)
    pieces = [tok.decode([t]) for t in toks]
    print(f"\n### sample {sample}: needle page {npg}, tokens {pieces}")
    res = []
    for L, h in HEADS:
        for i, (q, k) in enumerate(CAP[L]):
            T = k.shape[1]
            P = (T - 1) // PS
            kk = k[h, : P * PS]  # [P*PS, D]
            kmin, kmax = ops.page_minmax_ref(kk[None, None], torch.ones(1, P * PS, dtype=torch.bool), PS)
            kmin, kmax = kmin[0, 0], kmax[0, 0]  # [P, D]
            for g in range(3):
                qq = q[h * 3 + g]
                logit = (kk @ qq).view(P, PS)  # unscaled
                tmax = logit.amax(-1)
                contrib = torch.maximum(qq * kmax, qq * kmin)  # [P, D]
                b = contrib.sum(-1)
                probs = torch.softmax(torch.cat([kk @ qq, k[h, P * PS:] @ qq]) / 8.0, 0)
                mass = probs[: P * PS].view(P, PS).sum(-1)[npg].item()
                order = torch.argsort(b, descending=True, stable=True)
                rank = (order == npg).nonzero().item()
                others = torch.ones(P, dtype=torch.bool)
                others[npg] = False
                slack = b - tmax
                # channel decomposition of the slack of the rank-0 page (token t* = its argmax)
                top = order[0].item()
                tstar = logit[top].argmax().item()
                cs = contrib[top] - qq * kk[top * PS + tstar]
                topch = torch.argsort(cs, descending=True)[:4].tolist()
                rec = dict(layer=L, head=h, g=g, step=i, produced=pieces[i + 1], mass=round(mass, 3), rank=rank,
                           needle_true=round(tmax[npg].item(), 1), needle_bound=round(b[npg].item(), 1),
                           bound_top=round(b[top].item(), 1), true_top=round(tmax[top].item(), 1), top_page=top,
                           bound_64=round(b[order[K - 1]].item(), 1),
                           true_max_other=round(tmax[others].max().item(), 1),
                           slack_needle=round(slack[npg].item(), 1),
                           slack_other_median=round(slack[others].median().item(), 1),
                           slack_top_channels=[(c, round(cs[c].item(), 1), round(qq[c].item(), 2)) for c in topch],
                           slack_top_total=round(cs.sum().item(), 1), qnorm=round(qq.norm().item(), 1))
                res.append(rec)
    for r in res:
        if r["mass"] >= 0.3 or r["rank"] >= 64:
            print(r)
    out_all[sample] = res
import os  # noqa: E402

os.makedirs("runs/needle_selection", exist_ok=True)
json.dump(out_all, open("runs/needle_selection/bound_probe.json", "w"))
