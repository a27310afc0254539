"""Why compiled and eager bf16 steps part at a tight budget (tests/test_compile.py's tiny model, 2 pages of 4).

Eager bf16 twice, the second run with the K handed to update() moved by one bf16 ulp at a random 10% of its
elements (what inductor's other rounding of rotary and norms does), teacher forced on the first run's tokens;
the fraction of steps whose logits move by more than 0.03 of their scale, at the tight and at a full budget.

    .venv/bin/python experiments/bf16_tie_sensitivity.py
"""
import os, sys, torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import tiny_pair, make_cache
from test_compile import _inputs, _generate, Forced, KNOBS
from flexicache_hf.layer import FlexiCacheLayer
torch.set_num_threads(1)
_, fc = tiny_pair("llama", 6, 2, 32, layers=2, dtype=torch.bfloat16)
ids, mask = _inputs("cpu")
orig = FlexiCacheLayer.update
g = torch.Generator().manual_seed(0)
def perturbed(self, k, v, *a, **kw):
    flip = torch.rand(k.shape, generator=g) < 0.1
    up = torch.nextafter(k, torch.full_like(k, float("inf")))
    return orig(self, torch.where(flip, up, k), v, *a, **kw)
for knobs, label in ((KNOBS, "tight"), (dict(topk_pages=64, page_size=4, rerank_interval=3), "full")):
    e = Forced(); eager = _generate(fc, make_cache(fc, **knobs), ids, mask, False, logits_processor=[e])
    FlexiCacheLayer.update = perturbed
    f = Forced(eager[:, ids.shape[1]:]); _generate(fc, make_cache(fc, **knobs), ids, mask, False, logits_processor=[f])
    FlexiCacheLayer.update = orig
    a, b = torch.stack(e.logits), torch.stack(f.logits)
    d = (a - b).abs().flatten(1).amax(-1) / a.abs().amax()
    print(label, "steps > 0.03:", (d > 0.03).float().mean().item(), "max", d.max().item(), [round(x, 2) for x in d.tolist()])
