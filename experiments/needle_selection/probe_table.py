"""Compact table from bound_probe.json: the query head of each group with the largest needle mass, per step."""
import json
d = json.load(open("runs/needle_selection/bound_probe.json"))
for s, res in d.items():
    print(f"\n### sample {s}")
    print("| head | step (produces) | q head g | needle mass | own-bound rank | needle true max q.k | best other page true max q.k | needle bound | 64th bound | needle slack | median slack other pages |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    by = {}
    for r in res:
        key = (r["layer"], r["head"], r["step"])
        if key not in by or r["mass"] > by[key]["mass"]:
            by[key] = r
    for (L, h, st), r in sorted(by.items()):
        print(f"| {L}.{h} | {st} ({r['produced']}) | {r['g']} | {r['mass']:.2f} | {r['rank']} | {r['needle_true']} | {r['true_max_other']} | {r['needle_bound']} | {r['bound_64']} | {r['slack_needle']} | {r['slack_other_median']} |")
