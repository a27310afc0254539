"""Why page selection falls behind the page oracle at tight budgets (issue 20), CPU, fp32, one thread.

For each (task, sample) of the eval harness (the same prompts as `flexicache eval`, same seed): one dense
prefill, then greedy decoding under several *driving* modes, each simulated by an attention function over
the dense K/V (decode steps only; prefill is dense, as in every method):

  dense              every key
  oracle             every KV head, every step: its K pages of highest true attention mass (+ the current page),
                     exactly eval/peers.oracle_page_attention
  flexi[:<scorer>]   FlexiCache's schedule with a scorer object (flexicache_hf.scorers; default: the cache's
                     default): the profile's unstable heads re-select every step (+ the current page); the
                     stable heads select at the first decode step and every 16 steps after (a periodic rerank
                     serves from the next step on) and attend to their selection + every page from the
                     selection's current page on. The scorer's own `select` runs on metadata made by its own
                     `summarise` from the dense keys, as the cache does, so the simulation gives the cache's
                     tokens (checked against results.json with --check). `flexi:oracle` ranks by true mass
                     (FlexiCache's schedule, the oracle's choice: what staleness alone costs).
  options, appended with '|': `|profile=all_unstable` (or all_stable) instead of the model's profile;
                     `|rerank=0,1,2,4,8,16` the decode steps at which stable heads (re)select (default: every
                     16 from step 0), e.g. `flexi|rerank=0,1,2,3,4,6,8,16,32,48`; `|add=7.2,17.1` makes
                     these (layer.head) unstable too; `|warmup=16` re-selects the stable heads with immediate
                     effect at each of the first 16 decode steps (the cache's default warm-up).

At every decode step of the *flexi* run, for every layer and KV head and every page holding an answer token
(the needle's value in the prompt), it records the page's true attention mass (softmax over all keys, summed
over the GQA group, divided by the group size: a share in [0, 1]), its rank by true mass, its rank under the
scorer's estimate (for SketchMass: the predicted mass of ops.page_mass_ref), and whether the flexi run and the
oracle attend to it. Missed needles are the (step, head) pairs where the oracle keeps a needle page carrying
>= --min-mass of the head's attention and the flexi run does not; printed as a table, worst first.

    python experiments/tight_budget_diag.py --tasks niah_single_story,niah_single_logs --samples 3 \\
        --budget 256 --modes dense,oracle,flexi --check runs/tight4k/results.json

`--modes` takes scorer expressions too, e.g. `flexi:SketchMass(2)`, `flexi:MinMaxBound()` (separated by ';'
when they contain commas: --sep ';'). Output: a JSON per sample under --out, and the tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from flexicache_hf import ops, scorers  # noqa: E402
from flexicache_hf.compat import cache_kwargs  # noqa: E402
from flexicache_hf.config import FlexiCacheConfig  # noqa: E402
from flexicache_hf.eval.tasks import make_sample  # noqa: E402
from flexicache_hf.models import load_model  # noqa: E402

NEG = float("-inf")
ATTN = "fc_tight_diag"


def scorer_from(expr: str | None):
    if expr == "oracle":
        return TrueMass()
    if not expr:
        return FlexiCacheConfig().scorer
    return eval(expr, {"Proto": Proto, **{k: getattr(scorers, k) for k in dir(scorers) if not k.startswith("_")}})


class Sim:
    """The state of one simulated decode (module-level: the attention function reads it)."""

    mode = "dense"
    scorer = None
    unstable: set = set()
    unstable_default: set = set()
    rerank_steps = None  # None: every `interval` steps; else the set of steps at which stable heads re-select
    K = 16
    PS = 16
    interval = 16
    warmup = 0  # the first `warmup` decode steps: stable heads re-select with immediate effect (the cache's warm-up)
    step = 0
    meta: dict = {}  # layer -> (pages summarised, kmin, kmax, codes) for that scorer
    stable: dict = {}  # layer -> {"sel": bool [H, P], "tail": first page of the tail, "pending": (sel, tail) | None}
    needle_pages: list = []
    mass = None
    record = None
    probe_meta: dict = {}
    probes: list = []  # (name, scorer) ranked at every recorded step beside the driving one (not driving)  # list of per-step, per-layer records, or None


def true_mass(q, keys, scale, PS):
    """q [H, G, D], keys [H, T, D] -> per-page share of attention [H, Pall] (sum over the group / G) and the
    per-query-head softmax [H, G, T]."""
    H, G, D = q.shape
    T = keys.shape[1]
    probs = torch.softmax(torch.einsum("hgd,htd->hgt", q.float(), keys.float()) * scale, -1)
    Pall = -(-T // PS)
    pm = torch.nn.functional.pad(probs, (0, Pall * PS - T)).view(H, G, Pall, PS).sum(-1)
    return pm.sum(1) / G, probs


def topk_bool(scores, k):
    """scores [H, P] -> bool [H, P], the k highest (ties: the lower page, as ops.topk_pages_ref)."""
    P = scores.shape[-1]
    if P <= k:
        return torch.ones_like(scores, dtype=torch.bool)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)


def ranks(scores, pages):
    """0-based rank (descending, stable) of each page in `pages` in each row of scores [H, P] -> [H, len]."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    pos = torch.empty_like(order)
    pos.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    return pos[:, pages]


def metadata(layer, keys, P):
    """kmin, kmax, codes of pages [0, P) of one layer, rows = KV heads, made by the scorer's summarise."""
    done, kmin, kmax, codes = Sim.meta.get(layer, (0, None, None, None))
    if P > done:
        PS = Sim.PS
        k = keys[None, :, done * PS:P * PS]
        valid = torch.ones(1, k.shape[2], dtype=torch.bool)
        a, b, c = Sim.scorer.summarise(k, valid, PS, use_kernels=False)
        kmin = a[0] if kmin is None else torch.cat([kmin, a[0]], 1)
        kmax = b[0] if kmax is None else torch.cat([kmax, b[0]], 1)
        if c is not None:
            codes = c[0] if codes is None else torch.cat([codes, c[0]], 1)
        Sim.meta[layer] = (P, kmin, kmax, codes)
    return kmin, kmax, codes


@dataclass(frozen=True)
class Proto(scorers.SketchMass):
    """Candidate changes to SketchMass, reference path only (probes): `sink` first pages and `recent` newest
    candidate pages always kept (inside K); `debias` x the quantisation-noise correction of the predicted logits:
    each sketched logit has error variance var = scale^2 sum_d q_d^2 w_d^2 / (12 * 4^bits) (w: the page's box
    width, uniform error within a level), which inflates the page's predicted exp-mass by exp(var / 2) on
    average; the lse is lowered by debias * var / 2."""

    sink: int = 0
    recent: int = 0
    debias: float = 0.0

    def select(self, q, kmin, kmax, codes, page_valid, current, k, heads, scale, append_current, use_kernels):
        if heads is not None:
            q = q[:, heads].reshape(-1, *q.shape[2:])
        N, P = kmin.shape[:2]
        pos = torch.arange(P)
        cand = page_valid[torch.arange(N) // (N // page_valid.shape[0]), :P] & (pos < current)
        lse = ops.page_lse_ref(q, kmin, kmax, codes, scale)
        if self.debias:
            w2 = (kmax.float() - kmin.float()) ** 2  # [N, P, D]
            var = scale**2 * torch.einsum("ngd,npd->ngp", q.float() ** 2, w2) / (12 * 4**self.bits)
            lse = lse - self.debias * var / 2
        score = ops.page_mass_ref(lse.masked_fill(~cand[:, None], NEG))
        forced = cand & ((pos < self.sink) | (pos >= current - self.recent))
        score = torch.where(forced, torch.full_like(score, float("inf")), score)
        ids = ops.topk_pages_ref(score, min(k, P))
        if append_current:
            ids = torch.cat([ids, current.view(1, 1).to(ids.dtype).expand(N, 1)], 1)
        return ids


class TrueMass:
    """Not a scorer: the true attention mass (FlexiCache's schedule with the oracle's ranking, `flexi:oracle`)."""

    sketch_bits = 0

    def summarise(self, keys, valid, page_size, use_kernels=False):
        return ops.page_minmax_ref(keys, valid, page_size) + (None,)


def scorer_select(q, kmin, kmax, codes, cur, scale, mass=None):
    """bool [H, cur]: the scorer's top-K candidate pages (its own select, reference path)."""
    H = q.shape[0]
    if isinstance(Sim.scorer, TrueMass):
        return topk_bool(mass[:, :cur], Sim.K)
    ids = Sim.scorer.select(q, kmin, kmax, codes, torch.ones(1, cur, dtype=torch.bool), torch.tensor([cur]),
                            Sim.K, None, scale, False, False)
    sel = torch.zeros(H, cur + 1, dtype=torch.bool)
    sel.scatter_(1, ids.clamp(min=0).long() * (ids >= 0) + cur * (ids < 0), True)  # -1 -> the dummy column cur
    return sel[:, :cur]


def estimate(q, kmin, kmax, codes, cur, scale):
    """The scorer's per-page ranking score [H, cur] (what its select ranks by, where it has one)."""
    s = Sim.scorer
    if isinstance(s, TrueMass):
        return Sim.mass[:, :cur]
    if hasattr(s, "page_scores"):
        return s.page_scores(q, kmin, kmax, codes, cur, scale)
    cand = torch.ones(q.shape[0], cur, dtype=torch.bool)
    if isinstance(s, scorers.SketchMass):
        return ops.page_mass_ref(ops.page_lse_ref(q, kmin, kmax, codes, scale).masked_fill(~cand[:, None], NEG))
    if isinstance(s, scorers.SketchMax):
        return ops.page_scores_ref(q, kmin, kmax, codes=codes)
    return ops.page_scores_ref(q, kmin, kmax, s.spread)


def diag_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    if query.shape[2] > 1 or Sim.mode == "dense":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = module.layer_idx
    _, Hq, _, D = query.shape
    H, T = key.shape[1], key.shape[2]
    G, PS = Hq // H, Sim.PS
    scale = scaling if scaling is not None else module.scaling
    q, keys = query[0, :, 0].reshape(H, G, D), key[0]
    cur = (T - 1) // PS  # the newest token's page; candidates are the full pages before it
    mass, probs = true_mass(q, keys, scale, PS)
    Sim.mass = mass
    oracle = topk_bool(mass[:, :cur], Sim.K)
    if Sim.mode == "oracle":
        vis = oracle
    else:
        kmin, kmax, codes = metadata(layer, keys, cur)
        sel = scorer_select(q, kmin, kmax, codes, cur, scale, mass)
        vis = sel.clone()
        st = Sim.stable.get(layer)
        first = st is None
        due = Sim.step % Sim.interval == 0 if Sim.rerank_steps is None else Sim.step in Sim.rerank_steps
        if first or due or Sim.step < Sim.warmup:  # stable heads' (re)selection
            new = {"sel": sel, "tail": cur}
            if first or Sim.step < Sim.warmup:
                st = Sim.stable[layer] = {**new, "pending": None}
            else:
                st["pending"] = new  # serves from the next step on
        elif st["pending"] is not None:
            st.update(st.pop("pending"))
            st["pending"] = None
        for h in range(H):
            if (layer, h) not in Sim.unstable:
                row = torch.zeros(cur, dtype=torch.bool)
                row[: st["sel"].shape[1]] = st["sel"][h]
                row[st["tail"]:] = True
                vis[h] = row
        if Sim.record is not None:
            est = estimate(q, kmin, kmax, codes, cur, scale)
            rec = {}
            for p in Sim.needle_pages:
                if p >= cur:
                    continue
                rec[p] = {
                    "mass": mass[:, p].tolist(), "rank_true": ranks(mass[:, :cur], [p])[:, 0].tolist(),
                    "rank_est": ranks(est, [p])[:, 0].tolist(), "est": est[:, p].tolist(),
                    "kept": vis[:, p].tolist(), "oracle": oracle[:, p].tolist(),
                }
            # share of the true attention the visible set holds (current page included), flexi vs oracle
            cov = lambda v: (mass[:, :cur] * v).sum(-1) + mass[:, cur:].sum(-1)  # noqa: E731
            rec["cov"] = cov(vis).tolist()
            rec["cov_oracle"] = cov(oracle).tolist()
            rec["cov_fresh"] = cov(sel).tolist()  # the scorer's selection made at this step (no staleness)
            rec["probe"] = {}
            for name, pr in Sim.probes:
                driving = Sim.scorer
                Sim.scorer = pr
                m_ = Sim.meta
                Sim.meta = Sim.probe_meta.setdefault(name, {})
                a, b, c = metadata(layer, keys, cur)
                ps_ = scorer_select(q, a, b, c, cur, scale, mass)
                Sim.probe_meta[name], Sim.meta, Sim.scorer = Sim.meta, m_, driving
                rec["probe"][name] = {"cov": cov(ps_).tolist(),
                                      "needle": {p: ps_[:, p].tolist() for p in Sim.needle_pages if p < cur}}
            Sim.record[-1][layer] = rec
    visible = torch.cat([vis, torch.ones(H, -(-T // PS) - cur, dtype=torch.bool)], 1).repeat_interleave(PS, 1)[:, :T]
    logits = torch.einsum("hgd,htd->hgt", q.float(), keys.float()) * scale
    p = torch.softmax(logits.masked_fill(~visible[:, None], NEG), -1)
    out = torch.einsum("hgt,htd->hgd", p, value[0].float())
    return out.reshape(1, 1, Hq, D).to(query.dtype), None


AttentionInterface.register(ATTN, diag_attention)
AttentionMaskInterface.register(ATTN, sdpa_mask)


def answer_pages(tok, prompt, answers, PS):
    """Pages of the prompt holding the answer strings' tokens (each answer's last occurrence)."""
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    pages = {}
    for a in answers:
        j = prompt.rfind(a)
        if j < 0:
            continue
        toks = [i for i, (s, e) in enumerate(enc.offset_mapping) if s < j + len(a) and e > j]
        pages[a] = sorted({i // PS for i in toks})
    return torch.tensor([enc.input_ids]), pages


@torch.no_grad()
def decode(model, kv, first_logits, prompt_len, n_new, eos, stop):
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(kv):
        cache.update(k.clone(), v.clone(), i)
    Sim.meta, Sim.stable, Sim.probe_meta = {}, {}, {}
    tokens = []
    nxt = int(first_logits.argmax())
    for step in range(n_new):
        tokens.append(nxt)
        if nxt in eos or stop(tokens) or step == n_new - 1:
            break
        Sim.step = step
        if Sim.record is not None:
            Sim.record.append([None] * model.config.num_hidden_layers)
        out = model(input_ids=torch.tensor([[nxt]]), **cache_kwargs(cache), use_cache=True,
                    position_ids=torch.tensor([[prompt_len + step]]))
        nxt = int(out.logits[0, -1].argmax())
    return tokens


def missed_table(rec_steps, unstable, min_mass, K, limit=12):
    """Rows (step, layer, head, page, kind, mass, true rank, scorer rank) where the oracle keeps a needle page
    with >= min_mass and the flexi run does not, heaviest first."""
    rows = []
    for s, layers in enumerate(rec_steps):
        for L, rec in enumerate(layers):
            if not rec:
                continue
            for p, r in rec.items():
                if not isinstance(p, int):
                    continue
                for h, m in enumerate(r["mass"]):
                    if m >= min_mass and r["oracle"][h] and not r["kept"][h]:
                        rows.append((s, L, h, p, "unstable" if (L, h) in unstable else "stable", m,
                                     r["rank_true"][h], r["rank_est"][h]))
    rows.sort(key=lambda x: -x[5])
    return rows[:limit], len(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default="niah_single_story")
    ap.add_argument("--samples", default="0")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--modes", default="dense,oracle,flexi")
    ap.add_argument("--sep", default=",")
    ap.add_argument("--profile", default=None, help="all_unstable, all_stable, or a JSON path (default: the shipped one)")
    ap.add_argument("--probes", default="", help="';'-separated scorer expressions ranked beside the driving flexi "
                    "run at every step (coverage of true attention and needle pages kept, not driving)")
    ap.add_argument("--min-mass", type=float, default=0.1)
    ap.add_argument("--check", default=None, help="results.json of flexicache eval: compare the dense/oracle/flexi tokens")
    ap.add_argument("--check-method", default="flexicache_sketch2mass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/tight_diag")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from flexicache_hf.eval.runner import blank_line_stopper, eos_ids
    from flexicache_hf.profiles import HeadProfile
    from flexicache_hf.profiles_registry import find_profile

    model, tok = load_model(args.model, torch.float32, attn_implementation=ATTN)
    L = model.config.num_hidden_layers
    H = model.config.num_key_value_heads
    prof = find_profile(model.config)
    if args.profile == "all_unstable":
        prof = HeadProfile.all_unstable(L, H)
    elif args.profile == "all_stable":
        prof = HeadProfile.all_stable(L, H)
    elif args.profile:
        prof = HeadProfile.load(args.profile)
    unstable = {tuple(x) for x in prof.unstable}
    Sim.unstable, Sim.PS, Sim.K = unstable, args.page_size, args.budget // args.page_size
    eos, stop = eos_ids(model, tok), blank_line_stopper(tok)
    Sim.probes = [(e, scorer_from(e)) for e in args.probes.split(";") if e]
    check = {}
    if args.check:
        for r in json.load(open(args.check))["records"]:
            check[(r["task"], r["sample"], r["method"], r["budget"])] = r["tokens"]
    summary = []
    for task in args.tasks.split(","):
        for sample in (int(s) for s in args.samples.split(",")):
            row = make_sample(tok, task, args.length, args.seed, sample)
            ids, pages = answer_pages(tok, row["prompt"], row["answers"], args.page_size)
            Sim.needle_pages = sorted({p for ps in pages.values() for p in ps})
            t = time.time()
            cache = DynamicCache(config=model.config)
            Sim.mode = "dense"
            with torch.no_grad():
                out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
            kv = [(layer.keys, layer.values) for layer in cache.layers]
            first = out.logits[0, -1].float()
            print(f"\n== {task} #{sample}: {ids.shape[1]} tokens, answers {row['answers']} on pages {pages} "
                  f"(prefill {time.time() - t:.0f}s)", flush=True)
            res = {"task": task, "sample": sample, "answers": row["answers"], "pages": pages, "runs": {}}
            for mode in args.modes.split(args.sep):
                head, *opts = mode.split("|")
                opts = dict(o.split("=", 1) for o in opts)
                kind, _, expr = head.partition(":")
                Sim.mode = kind
                Sim.unstable = {"all_unstable": {(a, b) for a in range(L) for b in range(H)}, "all_stable": set()}.get(
                    opts.get("profile"), unstable)
                if "add" in opts:  # extra unstable heads, e.g. |add=7.2,17.1
                    Sim.unstable = Sim.unstable | {tuple(map(int, x.split("."))) for x in opts["add"].split(",")}
                Sim.rerank_steps = {int(x) for x in opts["rerank"].split(",")} if "rerank" in opts else None
                Sim.warmup = int(opts.get("warmup", 0))
                Sim.scorer = scorer_from(expr) if kind == "flexi" else None
                Sim.record = [] if kind == "flexi" else None
                t = time.time()
                toks = decode(model, kv, first, ids.shape[1], row["max_new_tokens"], eos, stop)
                text = tok.decode(toks, skip_special_tokens=True)
                sc = sum(a.lower() in text.lower() for a in row["answers"]) / len(row["answers"])
                ref = {"dense": "dense", "oracle": "oracle_pages", "flexi": args.check_method}.get(kind)
                budget = None if kind == "dense" else args.budget
                agree = ""
                if check and not expr and not opts and (task, sample, ref, budget) in check:
                    agree = " [= eval]" if check[(task, sample, ref, budget)] == toks else " [DIFFERS from eval]"
                print(f"  {mode:28s} score {sc:.2f} {text.strip()[:60]!r} ({time.time() - t:.0f}s){agree}", flush=True)
                run = {"tokens": toks, "text": text, "score": sc}
                if kind == "flexi":
                    run["steps"] = [[{str(k): v for k, v in (r or {}).items()} for r in s] for s in Sim.record]
                    rows, n = missed_table(Sim.record, Sim.unstable, args.min_mass, Sim.K)
                    cov = torch.tensor([[r["cov"] for r in s] for s in Sim.record])  # [steps, L, H]
                    cov_o = torch.tensor([[r["cov_oracle"] for r in s] for s in Sim.record])
                    cov_f = torch.tensor([[r["cov_fresh"] for r in s] for s in Sim.record])
                    print(f"    attention share held (mean over steps, layers, heads): {cov.mean():.3f}, fresh selection "
                          f"{cov_f.mean():.3f}, oracle {cov_o.mean():.3f}; missed needle (step, head) pairs with mass >= "
                          f"{args.min_mass}: {n}")
                    for name, _ in Sim.probes:
                        pc = torch.tensor([[r["probe"][name]["cov"] for r in s] for s in Sim.record])
                        miss = sum(1 for s_ in Sim.record for r in s_ for p, x in r.items() if isinstance(p, int)
                                   for h, m in enumerate(x["mass"])
                                   if m >= args.min_mass and x["oracle"][h] and not r["probe"][name]["needle"][p][h])
                        print(f"    probe {name:40s} fresh share {pc.mean():.4f}  needle misses (fresh) {miss}")
                    if rows:
                        print("    step layer.head kind      page  mass  rank(true) rank(scorer)")
                        for s, Ly, h, p, k, m, rt, re in rows:
                            print(f"    {s:4d} {Ly:5d}.{h} {k:9s} {p:5d} {m:5.2f} {rt:10d} {re:12d}")
                    summary.append({"task": task, "sample": sample, "mode": mode, "score": sc, "missed": n,
                                    "rows": rows, "cov": float(cov.mean()), "cov_oracle": float(cov_o.mean())})
                else:
                    summary.append({"task": task, "sample": sample, "mode": mode, "score": sc})
                res["runs"][mode] = run
            with open(os.path.join(args.out, f"{task}_s{sample}_b{args.budget}.json"), "w") as f:
                json.dump(res, f)
    with open(os.path.join(args.out, f"summary_b{args.budget}.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
