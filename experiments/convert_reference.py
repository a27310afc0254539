"""Convert the FlexiCache paper's published unstable-head sets into shipped HeadProfile JSON files.

    python experiments/convert_reference.py [--src ../shared/data/reference_unstable_heads.json] [--out profiles/]

The source (`{model_id: {"unstable-M-profile-TASK-topk-K": [[layer, kv_head], ...]}}`) holds four sets
per model: tasks gov_report and paper_assistant, K = 64 and 128 pages. One file per model; its profile
is the gov_report, K = 64 set (the reference's default budget), and metadata["variants"] keeps all four
(`find_profile(..., task=, topk_pages=)` picks one), with their pairwise overlaps. Shapes are the real
models' (checked against the sets' largest indices), and config_fingerprint is what their HF configs
say, for `profiles_registry`'s fallback match. Reproducible: same input, same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# outside this repository: the project's shared folder beside the checkout (hence not an installed module)
DEFAULT_SRC = os.path.join(HERE, "..", "..", "shared", "data", "reference_unstable_heads.json")
DEFAULT_OUT = os.path.join(HERE, "..", "profiles")
DEFAULT_TASK, DEFAULT_TOPK = "gov_report", 64

# model id -> (file name, HF config facts of the real model)
MODELS = {
    "meta-llama/Llama-3.1-8B-Instruct": ("llama-3.1-8b-instruct.json", dict(
        model_type="llama", num_hidden_layers=32, num_key_value_heads=8, num_attention_heads=32,
        hidden_size=4096, vocab_size=128256)),
    "mistralai/Mistral-7B-Instruct-v0.2": ("mistral-7b-instruct-v0.2.json", dict(
        model_type="mistral", num_hidden_layers=32, num_key_value_heads=8, num_attention_heads=32,
        hidden_size=4096, vocab_size=32000)),
    "mistralai/Mistral-Small-24B-Instruct-2501": ("mistral-small-24b-instruct-2501.json", dict(
        model_type="mistral", num_hidden_layers=40, num_key_value_heads=8, num_attention_heads=32,
        hidden_size=5120, vocab_size=131072)),
    "Qwen/Qwen2.5-32B-Instruct": ("qwen2.5-32b-instruct.json", dict(
        model_type="qwen2", num_hidden_layers=64, num_key_value_heads=8, num_attention_heads=40,
        hidden_size=5120, vocab_size=152064)),
}
KEY = re.compile(r"^unstable-(\d+)-profile-(.+)-topk-(\d+)$")


def convert(src: str, out_dir: str) -> list[str]:
    sys.path.insert(0, os.path.join(HERE, ".."))
    from flexicache_hf.profiles import HeadProfile

    with open(src, encoding="utf-8") as f:
        data = json.load(f)
    unknown = set(data) - set(MODELS)
    if unknown:
        raise SystemExit(f"{src} holds models this script does not know the shapes of: {sorted(unknown)}")
    written = []
    for model_id, sets in data.items():
        fname, fp = MODELS[model_id]
        L, H = fp["num_hidden_layers"], fp["num_key_value_heads"]
        variants = {}
        for key, pairs in sorted(sets.items()):
            m = KEY.match(key)
            if not m:
                raise SystemExit(f"{model_id}: unexpected key {key!r}")
            count, task, topk = int(m.group(1)), m.group(2), int(m.group(3))
            if len(pairs) != count or len({tuple(p) for p in pairs}) != count:
                raise SystemExit(f"{model_id} {key}: {len(pairs)} pairs, expected {count} distinct")
            if max(p[0] for p in pairs) >= L or max(p[1] for p in pairs) >= H:
                raise SystemExit(f"{model_id} {key}: an index is out of range for {L} layers x {H} KV heads")
            variants[f"{task}-topk-{topk}"] = {"task": task, "topk_pages": topk, "source_key": key,
                                              "unstable": sorted([int(a), int(b)] for a, b in pairs)}
        default = variants[f"{DEFAULT_TASK}-topk-{DEFAULT_TOPK}"]
        names = sorted(variants)
        overlap = {f"{a} vs {b}": round(len({tuple(p) for p in variants[a]["unstable"]} &
                                             {tuple(p) for p in variants[b]["unstable"]}) / len(default["unstable"]), 4)
                   for i, a in enumerate(names) for b in names[i + 1:]}
        profile = HeadProfile(L, H, [tuple(p) for p in default["unstable"]], {
            "model_id": model_id,
            "source": "FlexiCache paper artifact (arXiv 2511.00868): published unstable-head set "
                      f"{default['source_key']!r}, converted by experiments/convert_reference.py",
            "page_size": 16,
            "topk_pages": DEFAULT_TOPK,
            "task": DEFAULT_TASK,
            "unstable_count": len(default["unstable"]),
            "unstable_fraction": round(len(default["unstable"]) / (L * H), 4),
            "config_fingerprint": fp,
            "variants": variants,
            "variant_overlap": overlap,
        })
        path = os.path.join(out_dir, fname)
        profile.save(path)
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", default=DEFAULT_SRC)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    for path in convert(args.src, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
