"""profile="auto": calibrate the stable/unstable split online, from the first decode steps of a request.

For the first `steps` decode steps every KV head is unstable (all pages on the GPU, top-K re-selected at
every step, exactly Quest-style) and its MinMax top-K page set is recorded. Then the heads are classified
with the offline tool's own measures (RCO, TS over 16-step chunks, consensus of the per-chunk least stable
sets; REFERENCE.md section 3), the chosen fraction stays unstable, and every layer re-pages itself with
the new split: the stable heads' full pages go to the host pool once, and they re-select at the next step.

Cost: during calibration the GPU holds the whole KV (like dense); the switch copies the stable heads' KV
to the host once and re-pages each layer (one pass over the layer's KV).
"""

from __future__ import annotations

import warnings

import torch

from flexicache_hf.profiles import HeadProfile


class OnlineCalibration:
    def __init__(self, num_layers: int, num_kv_heads: int, steps: int, unstable: float | int, topk_pages: int):
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.steps, self.unstable, self.topk = steps, unstable, topk_pages
        self.sets: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # per layer: [B, H, K] per step
        self.pages: list[int] = []  # candidate pages N(t) per step (same for every layer)
        self.result: HeadProfile | None = None
        self.finish = None  # set by the owning FlexiCache: classify, then re-page every layer

    @property
    def active(self) -> bool:
        return self.result is None

    def record(self, layer_idx: int, selected: torch.Tensor, n_candidates: int) -> None:
        K = self.topk
        if selected.shape[-1] < K:  # fewer pages than K: pad (the step will not count, N <= K)
            selected = torch.nn.functional.pad(selected, (0, K - selected.shape[-1]), value=-1)
        self.sets[layer_idx].append(selected.detach().cpu())
        if layer_idx == 0:
            self.pages.append(n_candidates)

    def ready(self) -> bool:
        return self.active and len(self.sets[-1]) >= self.steps

    def classify(self) -> HeadProfile:
        from flexicache_hf.profiling import classify_heads, temporal_stability

        N = torch.tensor(self.pages[: self.steps])
        per_layer = []
        for layer_sets in self.sets:
            S = torch.stack(layer_sets[: self.steps])  # [steps, B, H, K]
            per_layer.append(1 - temporal_stability(S, N, self.topk))  # [chunks, B, H]
        inst = torch.stack(per_layer, dim=-2)  # [chunks, B, layers, H]
        L, H = self.num_layers, self.num_kv_heads
        samples = [inst[:, b].reshape(inst.shape[0], L * H) for b in range(inst.shape[1])]
        try:
            result = classify_heads(samples, self.unstable)
            unstable = [(i // H, i % H) for i in result.unstable]
            meta = {"heldout_recall": result.heldout_recall, "instability": result.instability.view(L, H).tolist()}
        except ValueError:
            warnings.warn(
                f"profile='auto': the context never exceeded topk_pages={self.topk} pages during the "
                f"{self.steps} calibration steps, so stability cannot be measured; every head stays unstable",
                stacklevel=2,
            )
            unstable, meta = [(l, h) for l in range(L) for h in range(H)], {}
        self.sets = [[] for _ in range(L)]
        return HeadProfile(L, H, unstable, {"source": f"online calibration over {self.steps} decode steps", **meta})
