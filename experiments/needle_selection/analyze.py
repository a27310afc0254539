"""Tables from results_s{0,1}.json (diag.py). Usage: analyze.py [--thr 0.1] [--traj dense]"""
import argparse
import json

ap = argparse.ArgumentParser()
ap.add_argument("--thr", type=float, default=0.1)
ap.add_argument("--traj", default="dense")
ap.add_argument("--samples", default="0,1")
args = ap.parse_args()
VARS = ("quest", "union", "qnorm", "oracle", "stable")

for s in [int(x) for x in args.samples.split(",")]:
    r = json.load(open(f"runs/needle_selection/results_s{s}.json"))
    npg = r["needle_pages"][0]
    run = r["runs"][args.traj]
    pieces = run["pieces"]
    ans = r["answer"]
    print(f"\n## sample {s}: answer {ans}, needle digits at tokens {r['digit_pos']} -> page {npg}; "
          f"trajectory '{args.traj}': {pieces}")
    # steps: index i = the model call fed pieces[i], which produced pieces[i+1]
    steps = run["steps"]
    ans_steps = [i for i in range(len(steps)) if i + 1 < len(pieces) and pieces[i + 1].strip().isdigit()]
    print("answer steps (step i produces token i+1):", [(i, pieces[i + 1]) for i in ans_steps])
    heads = {}
    for i in ans_steps:
        for L, rec in enumerate(steps[i]):
            for h in range(3):
                m = rec[f"mass_{npg}"][h]
                if max(m) >= args.thr:
                    heads.setdefault((L, h), []).append(i)
    print(f"\n(layer, kv head) with max-over-group needle-page mass >= {args.thr} at some answer step: {len(heads)}")
    print("| layer.head | steps | needle mass (max over q heads) per answer step | quest rank per step | "
          + " | ".join(f"{v} kept" for v in VARS) + " | q-norms (min-max over group) | max/min |")
    print("|---|---|---|---|" + "---|" * len(VARS) + "---|---|")
    misses = {v: 0 for v in VARS}
    tot = 0
    for (L, h), st in sorted(heads.items()):
        masses, ranks, kept = [], [], {v: [] for v in VARS}
        qn_lo, qn_hi, ratio = 1e9, 0, 0
        for i in ans_steps:
            rec = steps[i][L]
            masses.append(max(rec[f"mass_{npg}"][h]))
            ranks.append(rec[f"rank_quest_{npg}"][h])
            for v in VARS:
                k = rec[f"kept_{npg}"].get(v, [None] * 3)[h]
                kept[v].append(k)
                if max(rec[f"mass_{npg}"][h]) >= args.thr and k is not None:
                    misses[v] += (not k)
            qn = rec["qnorm"][h]
            qn_lo, qn_hi = min(qn_lo, min(qn)), max(qn_hi, max(qn))
            ratio = max(ratio, max(qn) / min(qn))
        tot += sum(1 for i in ans_steps if max(steps[i][L][f"mass_{npg}"][h]) >= args.thr)
        fmt = lambda xs: "".join("-" if x is None else ("Y" if x else "n") for x in xs)
        print(f"| {L}.{h} | {len(st)} | {' '.join(f'{m:.2f}' for m in masses)} | {' '.join(map(str, ranks))} | "
              + " | ".join(fmt(kept[v]) for v in VARS) + f" | {qn_lo:.1f}-{qn_hi:.1f} | {ratio:.2f} |")
    print(f"\n(head, answer step) pairs with needle mass >= {args.thr}: {tot}; needle page NOT kept:",
          ", ".join(f"{v} {misses[v]}" for v in VARS))
