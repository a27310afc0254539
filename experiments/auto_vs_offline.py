"""profile="auto" against the shipped offline SmolLM2 profile: overlap of the unstable sets at the same M.

    python experiments/auto_vs_offline.py [--samples 2] [--sketch-bits 2]   (CPU, ~15 s per sample after loading)

With --sketch-bits the calibration's page selections (and the split they decide) come from the key
sketches ranked by predicted mass, closer to the attention-mass ranking the offline profile is made with.
"""
import argparse, torch, time, warnings
import flexicache_hf
from flexicache_hf import FlexiCache
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.models import load_smollm2
from flexicache_hf.profiles_registry import find_profile
from flexicache_hf.profile_text import cpython_text_windows
ap = argparse.ArgumentParser()
ap.add_argument("--samples", type=int, default=2)
ap.add_argument("--sketch-bits", type=int, default=0)
args = ap.parse_args()
model, tok = load_smollm2(attn_implementation="flexicache")
offline = set(find_profile(model.config).unstable)
M = len(offline)
for i, w in enumerate(cpython_text_windows(tok, samples=args.samples, num_tokens=3072, seed=11)):
    ids = w.input_ids[:3072].unsqueeze(0)
    t = time.time()
    cache = FlexiCache(model.config, profile="auto", topk_pages=32, page_size=16, calibration_steps=32, auto_unstable=M,
                       sketch_bits=args.sketch_bits)
    with torch.no_grad():
        model.generate(ids, **cache_kwargs(cache), max_new_tokens=40, min_new_tokens=40, do_sample=False)
    auto = set(cache.profile.unstable)
    print(f"sample {i}: auto vs offline overlap at M={M}: {len(auto & offline) / M:.2f} (chance {M / 90:.2f}); {time.time() - t:.0f} s incl. prefill", flush=True)
