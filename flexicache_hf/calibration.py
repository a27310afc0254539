"""profile="auto": calibrate the stable/unstable split online, from the first decode steps of a request.

For the first `steps` decode steps every KV head is unstable (all pages on the GPU, top-K re-selected at
every step, exactly Quest-style) and its top-K page set is recorded. Then the heads are classified with
the offline tool's own measures (RCO, TS over 16-step chunks, consensus of the per-chunk least stable
sets; docs/method.md, "Profiling"), the chosen number stays unstable, and every layer re-pages itself with
the new split: the stable heads' full pages go to the host pool once, and they re-select at the next step.

Cost: during calibration the GPU holds the whole KV (like dense); the switch copies the stable heads' KV
to the host once and re-pages each layer (one pass over the layer's KV). The split it decides is the
cache's from then on (`FlexiCache.reset()` keeps it: head stability is the model's); a calibration that a
request ended before it decided starts afresh with the next request.
"""

from __future__ import annotations

import warnings

import torch

from flexicache_hf.profiles import HeadProfile


class OnlineCalibration:
    """Records the top-K page sets of the layers `layers` (the cache's FlexiCache layers; sliding-window
    layers have no pages) of a model of `num_layers` x `num_kv_heads`, then classifies their heads:
    `unstable` of them stay unstable (a count, already checked against the number of heads)."""

    def __init__(self, num_layers: int, num_kv_heads: int, layers: list[int], steps: int, unstable: int, topk_pages: int):
        self.num_layers, self.num_kv_heads, self.layers = num_layers, num_kv_heads, list(layers)
        self.steps, self.unstable, self.topk = steps, unstable, topk_pages
        self.sets: dict[int, list[torch.Tensor]] = {i: [] for i in self.layers}  # per layer: [B, H, K] per step
        self.pages: list[int] = []  # candidate pages N(t) per step (same for every layer)
        self.result: HeadProfile | None = None
        self.finish = None  # set by the owning FlexiCache: classify, then re-page every layer

    @property
    def active(self) -> bool:
        return self.result is None

    @property
    def last_layer(self) -> int:
        return self.layers[-1]

    def record(self, layer_idx: int, selected: torch.Tensor, n_candidates: int) -> None:
        K = self.topk
        if selected.shape[-1] < K:  # fewer pages than K: pad (the step will not count, N <= K)
            selected = torch.nn.functional.pad(selected, (0, K - selected.shape[-1]), value=-1)
        self.sets[layer_idx].append(selected.detach().cpu())
        if layer_idx == self.layers[0]:
            self.pages.append(n_candidates)

    def ready(self) -> bool:
        return self.active and len(self.sets[self.last_layer]) >= self.steps

    def classify(self) -> HeadProfile:
        from flexicache_hf.stability import classify_heads, temporal_stability

        H, L, n = self.num_kv_heads, self.num_layers, len(self.layers)
        N = torch.tensor(self.pages[: self.steps])
        per_layer = []
        for i in self.layers:
            S = torch.stack(self.sets[i][: self.steps])  # [steps, B, H, K]
            per_layer.append(1 - temporal_stability(S, N, self.topk))  # [chunks, B, H]
        inst = torch.stack(per_layer, dim=-2)  # [chunks, B, layers, H]
        source = {"source": f"online calibration over {self.steps} decode steps"}
        if inst.numel() == 0 or torch.isnan(inst).all():
            # the one case without a measurement: no chunk started with more than K candidate pages
            warnings.warn(
                f"profile='auto': the context never exceeded topk_pages={self.topk} pages at the start of a "
                f"16-step chunk of the {self.steps} calibration steps (largest: {int(N.max())} pages), so "
                "stability cannot be measured; every head stays unstable",
                stacklevel=2,
            )
            return HeadProfile(L, H, [(l, h) for l in self.layers for h in range(H)], source)
        samples = [inst[:, b].reshape(inst.shape[0], n * H) for b in range(inst.shape[1])]
        result = classify_heads(samples, self.unstable)
        unstable = [(self.layers[i // H], i % H) for i in result.unstable]
        meta = {"heldout_recall": result.heldout_recall, "instability": result.instability.view(n, H).tolist(),
                "layers": self.layers, **source}
        return HeadProfile(L, H, unstable, meta)
