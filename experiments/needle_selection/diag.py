"""Per-step page-selection diagnostics for niah_single @4096 on SmolLM2-135M-Instruct (CPU, fp32).

For each sample: one dense prefill (DynamicCache), then greedy decoding under several *driving* modes,
each simulated with a custom attention function over the dense K/V (decode steps only; prefill is dense):

  dense    : every key
  quest    : (a) every KV head re-selects top-K pages every step by max over its group's query heads of the
             Quest bound sum_d max(q_d kmax_d, q_d kmin_d) (ops.page_scores_ref), + the current page
  stable   : the quest selection of the first decode step, kept; + every page from that step's current
             page on (pages created since) -- FlexiCache's stable heads without rerank
  union    : (b) union over the group's query heads of each head's own top-K by its own bound
  qnorm    : (c) bounds divided by each query head's ||q|| before the max over the group
  oracle   : (d) top-K pages by true attention mass (softmax over all keys), summed over the group

At every decode step (whatever the driving mode) and for every layer / KV head, everything is also
*measured* for every variant from that step's queries: true attention mass per page per query head, the
Quest bound per page per query head, the needle page's rank under each score, and whether each variant's
selection holds the needle page.  The prefill's last query (the one that produces the first answer token,
always dense) is recorded as step 0.

Also runs the repository's own FlexiCache `quest` and `flexicache_all_stable` methods (budget 1024) for the
reference answers.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

torch.set_num_threads(1)

import flexicache_hf  # noqa: F401  registers "flexicache"
from flexicache_hf import ops
from flexicache_hf.attention import flexicache_attention
from flexicache_hf.cache import FlexiKV
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.eval import methods as M
from flexicache_hf.eval.tasks import make_sample
from flexicache_hf.models import load_smollm2
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PS = 16
K = 64
NEG = float("-inf")
VARIANTS = ("quest", "union", "qnorm", "oracle", "stable")


class State:
    mode = "dense"
    record = False
    steps: list = []  # per step: list over layers of dicts
    cur: list | None = None
    stable_sel: dict = {}  # layer -> (bool [Hkv, P0] selection, first current page)
    needle_pages: list = []


S = State()


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [..., P] -> bool [..., P], the k highest (ties: lower page first, like topk_pages_ref)."""
    P = scores.shape[-1]
    if P <= k:
        return torch.ones_like(scores, dtype=torch.bool)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    m = torch.zeros_like(scores, dtype=torch.bool)
    m.scatter_(-1, order, True)
    return m


def rank_of(scores: torch.Tensor, page: int) -> torch.Tensor:
    """0-based rank of `page` in each row of scores [..., P] (descending, stable)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return (order == page).float().argmax(-1)


def analyse(layer: int, q: torch.Tensor, k: torch.Tensor, scale: float):
    """q [Hq, D] (one query per head), k [Hkv, T, D] (includes the newest token at T-1).
    Returns (record dict, {variant: bool [Hkv, P] selection over candidate pages}, current page)."""
    Hq, D = q.shape
    Hkv, T, _ = k.shape
    G = Hq // Hkv
    cur = (T - 1) // PS
    P = cur  # candidate pages: the full pages before the current one
    logits = (q.view(Hkv, G, D) @ k.transpose(1, 2)) * scale  # [Hkv, G, T]
    probs = torch.softmax(logits.float(), dim=-1)
    pad = (cur + 1) * PS - T
    pm = torch.nn.functional.pad(probs, (0, pad)).view(Hkv, G, cur + 1, PS).sum(-1)  # [Hkv, G, cur+1]
    kmin, kmax = ops.page_minmax_ref(k[None, :, : P * PS], torch.ones(1, P * PS, dtype=torch.bool), PS)
    kmin, kmax = kmin[0], kmax[0]  # [Hkv, P, D]
    qg = q.view(Hkv, G, 1, D)
    bound = torch.maximum(qg * kmax[:, None], qg * kmin[:, None]).sum(-1)  # [Hkv, G, P]
    # sanity: the max over the group equals the repository's reference
    ref = ops.page_scores_ref(q.view(Hkv, G, D), kmin, kmax)
    assert torch.allclose(ref, bound.amax(1), atol=1e-4), "bound mismatch"
    qn = q.view(Hkv, G, D).norm(dim=-1)  # [Hkv, G]
    quest_s = bound.amax(1)
    qnorm_s = (bound / qn[..., None]).amax(1)
    oracle_s = pm[:, :, :P].sum(1)
    sel = {
        "quest": topk_mask(quest_s, K),
        "union": topk_mask(bound, K).any(1),
        "qnorm": topk_mask(qnorm_s, K),
        "oracle": topk_mask(oracle_s, K),
    }
    if layer in S.stable_sel:
        s0, c0 = S.stable_sel[layer]
        st = torch.zeros(Hkv, P, dtype=torch.bool)
        st[:, : s0.shape[1]] = s0
        st[:, c0:] = True  # pages created since the selection
        sel["stable"] = st
    rec = {"T": T, "cur": cur, "qnorm": qn.tolist()}
    # mass of the needle page(s), per query head, and ranks of the needle page under each score
    for npg in S.needle_pages:
        if npg >= P:
            continue
        rec[f"mass_{npg}"] = pm[:, :, npg].tolist()  # [Hkv][G]
        rec[f"rank_true_perq_{npg}"] = rank_of(pm[:, :, :P], npg).tolist()  # [Hkv][G]
        rec[f"rank_bound_perq_{npg}"] = rank_of(bound, npg).tolist()  # [Hkv][G]
        rec[f"rank_quest_{npg}"] = rank_of(quest_s, npg).tolist()  # [Hkv]
        rec[f"rank_qnorm_{npg}"] = rank_of(qnorm_s, npg).tolist()
        rec[f"rank_oracle_{npg}"] = rank_of(oracle_s, npg).tolist()
        rec[f"kept_{npg}"] = {v: s[:, npg].tolist() for v, s in sel.items()}
    # how much true attention mass each variant's selection (+ current page) captures, per query head
    for v, s in sel.items():
        full = torch.cat([s, torch.ones(Hkv, 1, dtype=torch.bool)], 1)  # + current page
        rec[f"cov_{v}"] = (pm * full[:, None]).sum(-1).tolist()  # [Hkv][G]
    rec["nsel_union"] = sel["union"].sum(-1).tolist()
    # the largest competing page under the quest bound (rank 0) and its true mass
    top = quest_s.argmax(-1)
    rec["quest_top_page"] = top.tolist()
    return rec, sel, cur


def diag_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    if isinstance(key, FlexiKV):
        return flexicache_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = module.layer_idx
    B, Hq, qlen, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    scale = scaling if scaling is not None else D ** -0.5
    if qlen > 1:  # prefill: dense; record the last query's view (step 0)
        if S.record:
            rec, sel, cur = analyse(layer, query[0, :, -1], key[0], scale)
            S.cur[layer] = rec
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    rec, sel, cur = analyse(layer, query[0, :, 0], key[0], scale)
    if layer not in S.stable_sel:  # first decode step: the stable heads' selection (quest bound)
        S.stable_sel[layer] = (sel["quest"].clone(), cur)
        rec2, sel, cur = analyse(layer, query[0, :, 0], key[0], scale)
        rec = rec2
    if S.record:
        S.cur[layer] = rec
    T = key.shape[2]
    # mode "base" or "base+L.h=variant+L.h=variant" (per-head overrides; variant may be "dense")
    base, *ovr = S.mode.split("+")
    ovr = dict((tuple(map(int, a.split("=")[0].split("."))), a.split("=")[1]) for a in ovr)
    chosen = [ovr.get((layer, h), base) for h in range(Hkv)]
    if all(c == "dense" for c in chosen):
        keep = torch.ones(Hkv, T, dtype=torch.bool)
    else:
        rows = [sel[c][h] if c != "dense" else torch.ones(cur, dtype=torch.bool) for h, c in enumerate(chosen)]
        pages = torch.cat([torch.stack(rows), torch.ones(Hkv, (T + PS - 1) // PS - cur, dtype=torch.bool)], 1)
        keep = pages.repeat_interleave(PS, dim=1)[:, :T]
    logits = (query[0].view(Hkv, G, D) @ key[0].transpose(1, 2)) * scale  # [Hkv, G, T]
    logits = logits.masked_fill(~keep[:, None], NEG)
    probs = torch.softmax(logits.float(), -1).to(value.dtype)
    out = probs @ value[0]  # [Hkv, G, D]
    return out.reshape(1, Hq, 1, D).transpose(1, 2).contiguous(), None


AttentionInterface.register("flexicache", diag_attention)


def needle_sample(tok, sample: int):
    """niah_single at 4096 tokens, sample `sample`: (prompt, answer, the answer's offset in the prompt,
    the tokenizer encoding with offsets, input ids [1, T], token positions of the answer's digits)."""
    row = make_sample(tok, "niah_single", 4096, 0, sample)
    p, v = row["prompt"], row["answers"][0]
    j = p.find(v)
    enc = tok(p, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([enc.input_ids])
    digit_pos = [i for i, (a, b) in enumerate(enc.offset_mapping) if a < j + len(v) and b > j]
    return p, v, j, enc, ids, digit_pos


def clone_cache(cfg, kv):
    c = DynamicCache(config=cfg)
    for i, (k, v) in enumerate(kv):
        c.update(k.clone(), v.clone(), i)
    return c


@torch.no_grad()
def decode(model, cache, first_logits, prompt_len, n_new, eos, record=True):
    tokens, steps = [], []
    nxt = int(first_logits.argmax())
    S.stable_sel = {}
    for step in range(n_new):
        tokens.append(nxt)
        if nxt in eos or step == n_new - 1:
            break
        S.record = record
        S.cur = [None] * model.config.num_hidden_layers
        out = model(input_ids=torch.tensor([[nxt]]), **cache_kwargs(cache), use_cache=True,
                    position_ids=torch.tensor([[prompt_len + step]]))
        steps.append(S.cur)
        nxt = int(out.logits[0, -1].argmax())
    S.record = False
    return tokens, steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", default="0,1")
    ap.add_argument("--new", type=int, default=12)
    ap.add_argument("--modes", default="dense,quest,stable,union,qnorm,oracle")
    ap.add_argument("--sep", default=",")
    ap.add_argument("--keep-steps", type=int, default=1)
    ap.add_argument("--repo-methods", default="quest,flexicache_all_stable,flexicache")
    ap.add_argument("--out", default="runs/needle_selection/results")
    args = ap.parse_args()
    import os

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    t0 = time.time()
    model, tok = load_smollm2(torch.float32, attn_implementation="flexicache")
    eos = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    print(f"loaded {time.time() - t0:.1f}s", flush=True)
    for sample in [int(s) for s in args.samples.split(",")]:
        p, v, j, enc, ids, digit_pos = needle_sample(tok, sample)
        S.needle_pages = sorted({i // PS for i in digit_pos})
        jk = p.rfind("One of the special magic numbers", 0, j)
        needle_pos = [i for i, (a, b) in enumerate(enc.offset_mapping) if a < j + len(v) + 1 and b > jk]
        print(f"sample {sample}: {ids.shape[1]} tokens, answer {v}, digit positions {digit_pos}, "
              f"needle sentence tokens {needle_pos[0]}-{needle_pos[-1]}, pages {S.needle_pages}", flush=True)
        # dense prefill, recording the last query (step 0)
        t = time.time()
        S.stable_sel = {}
        S.record, S.cur = True, [None] * model.config.num_hidden_layers
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        step0 = S.cur
        S.record = False
        first = out.logits[0, -1].float()
        kv = [(l.keys, l.values) for l in cache.layers]
        print(f"  prefill {time.time() - t:.1f}s", flush=True)
        res = {"sample": sample, "answer": v, "prompt_tokens": ids.shape[1], "digit_pos": digit_pos,
               "needle_sentence": [needle_pos[0], needle_pos[-1]], "needle_pages": S.needle_pages,
               "step0": step0, "runs": {}, "repo": {}}
        for mode in args.modes.split(args.sep):
            t = time.time()
            S.mode = mode
            toks, steps = decode(model, clone_cache(model.config, kv), first, ids.shape[1], args.new, eos)
            text = tok.decode(toks, skip_special_tokens=True)
            res["runs"][mode] = {"tokens": toks, "pieces": [tok.decode([x]) for x in toks], "text": text, "steps": steps if args.keep_steps else None}
            print(f"  {mode:7s} {text!r}  ({time.time() - t:.1f}s)", flush=True)
        S.mode = "dense"
        # the repository's own caches (ops reference path on CPU), budget 1024
        if args.repo_methods:
            from flexicache_hf.profiles_registry import find_profile
            reg = M.registry()
            ctx = M.Context(model, find_profile(model.config), page_size=PS, max_new_tokens=24)
            pre = M.Prefill(ids, kv, None, first[None], 0.0)
            for name in args.repo_methods.split(","):
                t = time.time()
                cache = reg[name].make_cache(ctx, 1024, pre)
                toks = []
                nxt = int(first.argmax())
                with torch.no_grad():
                    for step in range(args.new):
                        toks.append(nxt)
                        if nxt in eos or step == args.new - 1:
                            break
                        o = model(input_ids=torch.tensor([[nxt]]), **cache_kwargs(cache), use_cache=True,
                                  position_ids=torch.tensor([[ids.shape[1] + step]]))
                        nxt = int(o.logits[0, -1].argmax())
                res["repo"][name] = {"tokens": toks, "text": tok.decode(toks, skip_special_tokens=True)}
                print(f"  repo {name:22s} {res['repo'][name]['text']!r}  ({time.time() - t:.1f}s)", flush=True)
        with open(f"{args.out}_s{sample}.json", "w") as f:
            json.dump(res, f)
    print(f"done {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
