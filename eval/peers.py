"""Baselines written for Transformers 5.x (kvpress pins transformers < 5.3): StreamingLLM and SnapKV
(eviction), a DuoAttention-style split (retrieval heads full, streaming heads sink + window: `DuoLayer`),
a reference Quest written from its paper (`quest_page_attention`, the check of the "quest" method), and
the page-selection oracle (a ceiling, not a method anyone can run).

Both are `transformers.Cache`s of `EvictionLayer`s. A layer keeps two parts per KV head:

    fixed   tokens that stay for good (StreamingLLM: the first `n_sink` tokens, the attention sinks;
            SnapKV: the prompt tokens its observation window voted for, chosen per KV head)
    recent  a sliding window of the newest tokens, at most `budget - 1 - len(fixed)` between steps

so at every decode step attention sees exactly `budget` tokens per KV head (the kept ones plus the new
token): the same budget semantics as FlexiCache's `topk_pages * page_size`. Prefill is dense for every
method (eviction happens after it). The logical length (`get_seq_length`) keeps counting every token, so
RoPE positions of new tokens stay right; keys are stored post-RoPE, so evicting needs no re-rotation.
With `budget > context`, nothing is evicted and the layer returns exactly the dense K/V (same order).

SnapKV (Li et al. 2024, arXiv 2404.14469) here: the last `window` prompt queries (post-RoPE) score every
prompt key with softmax attention (causal within the window), averaged over the query heads of each KV
head's GQA group and summed over the window, average-pooled over `kernel` neighbouring tokens; per KV head
the top `budget - 1 - window` prompt tokens before the window are kept, plus the window. During decode the
window slides (the selected prompt tokens stay): the cache stays at the budget.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from flexicache_hf import ops
from flexicache_hf.layer import FlexiKV


class EvictionLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, budget: int, n_sink: int = 0):
        super().__init__()
        if budget < 2:
            raise ValueError(f"budget must be >= 2 tokens, got {budget}")
        self.budget, self.n_sink = budget, n_sink
        self.fixed_k = self.fixed_v = None
        self.length = 0  # logical: every token ever given to update()

    # ---- state -------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        self.fixed_k = key_states.new_zeros(B, H, 0, D)
        self.fixed_v = value_states.new_zeros(B, H, 0, D)
        self.keys, self.values = self.fixed_k.clone(), self.fixed_v.clone()  # the recent part
        self.is_initialized = True

    def seed(self, fixed_k, fixed_v, recent_k, recent_v, length: int) -> None:
        """Start from an already-compressed prompt (the runner's shared prefill)."""
        self.lazy_initialization(recent_k, recent_v)
        self.fixed_k, self.fixed_v = fixed_k, fixed_v
        self.keys, self.values = recent_k, recent_v
        self.length = length
        self._trim()

    @property
    def recent_cap(self) -> int:
        return max(0, self.budget - 1 - self.fixed_k.shape[2])

    def _trim(self) -> None:
        cap = self.recent_cap
        if self.keys.shape[2] > cap:
            self.keys = self.keys[:, :, self.keys.shape[2] - cap:]
            self.values = self.values[:, :, self.values.shape[2] - cap:]

    def kept_tokens(self) -> int:
        return (self.fixed_k.shape[2] + self.keys.shape[2]) if self.is_initialized else 0

    # ---- CacheLayerMixin ---------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.length == 0 and self.n_sink:  # a prefill through this cache: the first tokens become sinks
            s = min(self.n_sink, key_states.shape[2])
            self.fixed_k, self.fixed_v = key_states[:, :, :s], value_states[:, :, :s]
            rest_k, rest_v = key_states[:, :, s:], value_states[:, :, s:]
        else:
            rest_k, rest_v = key_states, value_states
        self.length += key_states.shape[2]
        self.keys = torch.cat([self.keys, rest_k], dim=2)
        self.values = torch.cat([self.values, rest_v], dim=2)
        full_k = torch.cat([self.fixed_k, self.keys], dim=2)
        full_v = torch.cat([self.fixed_v, self.values], dim=2)
        self._trim()  # evict after attending: this step saw budget tokens (or all, during a prefill)
        return full_k, full_v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kept_tokens() + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.fixed_k = self.fixed_v = self.keys = self.values = None
        self.length, self.is_initialized = 0, False

    def reorder_cache(self, beam_idx) -> None:
        if self.is_initialized:
            idx = beam_idx.to(self.device)
            self.fixed_k, self.fixed_v = self.fixed_k.index_select(0, idx), self.fixed_v.index_select(0, idx)
            self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)

    def kv_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.fixed_k, self.fixed_v, self.keys, self.values))


class EvictionCache(Cache):
    """A cache of `EvictionLayer`s; `kept_tokens()` per layer, `kv_bytes()` in total."""

    def __init__(self, num_layers: int, budget: int, n_sink: int = 0):
        super().__init__(layers=[EvictionLayer(budget, n_sink) for _ in range(num_layers)])
        self.budget = budget

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers)


def _num_layers(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text.num_hidden_layers


def streaming_llm_cache(config, budget: int, n_sink: int = 4, prefill_kv=None) -> EvictionCache:
    """StreamingLLM (Xiao et al. 2023): `n_sink` first tokens + the newest `budget - n_sink` tokens.

    prefill_kv: [(keys, values)] per layer of an uncompressed prompt to start from (else empty: a prefill
    through the cache evicts after attending densely).
    """
    cache = EvictionCache(_num_layers(config), budget, n_sink)
    if prefill_kv is not None:
        for layer, (k, v) in zip(cache.layers, prefill_kv):
            s = min(n_sink, k.shape[2], budget - 1)
            layer.seed(k[:, :, :s], v[:, :, :s], k[:, :, s:], v[:, :, s:], k.shape[2])
    return cache


def snapkv_scores(query_window: torch.Tensor, keys: torch.Tensor, scaling: float, kernel: int = 5) -> torch.Tensor:
    """SnapKV votes [B, H_kv, T - w] for the prompt tokens before the observation window.

    query_window: [B, Hq, w, D] the last w prompt queries (post-RoPE); keys: [B, H_kv, T, D] (post-RoPE).
    """
    B, Hq, w, D = query_window.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    q = query_window.float().view(B, Hkv, G, w, D)
    logits = torch.einsum("bhgwd,bhtd->bhgwt", q, keys.float()) * scaling
    # causal inside the window: query i (position T - w + i) sees keys <= T - w + i
    pos_q = torch.arange(T - w, T, device=keys.device)[:, None]
    pos_k = torch.arange(T, device=keys.device)[None, :]
    logits = logits.masked_fill(pos_k > pos_q, float("-inf"))
    probs = logits.softmax(-1).mean(2).sum(2)  # mean over the GQA group, sum over the window: [B, Hkv, T]
    votes = probs[..., : T - w]
    if kernel > 1 and votes.shape[-1] > 0:
        votes = F.avg_pool1d(votes.reshape(B * Hkv, 1, -1), kernel, stride=1, padding=kernel // 2, count_include_pad=False)
        votes = votes.view(B, Hkv, -1)[..., : T - w]
    return votes


def snapkv_cache(config, budget: int, prefill_kv, query_windows, scaling: float, window: int = 32, kernel: int = 5) -> EvictionCache:
    """SnapKV-style prefill eviction at `budget` tokens per KV head, from a shared prefill.

    prefill_kv: [(keys, values)] per layer [B, H_kv, T, D]; query_windows: per layer [B, Hq, >= w, D], the
    last prompt queries (post-RoPE), as captured by `capture_query_windows`.
    """
    cache = EvictionCache(_num_layers(config), budget)
    for layer, (k, v), qw in zip(cache.layers, prefill_kv, query_windows):
        T = k.shape[2]
        w = min(window, T, budget - 1)
        keep = budget - 1 - w  # prompt tokens before the window that stay
        if T - w <= keep:  # everything fits: no selection (exactly dense)
            layer.seed(k[:, :, : T - w], v[:, :, : T - w], k[:, :, T - w:], v[:, :, T - w:], T)
            continue
        votes = snapkv_scores(qw[:, :, -w:], k, scaling, kernel)
        idx = votes.topk(keep, dim=-1).indices.sort(-1).values  # keep prompt order
        gather = idx[..., None].expand(-1, -1, -1, k.shape[-1])
        layer.seed(k.gather(2, gather), v.gather(2, gather), k[:, :, T - w:], v[:, :, T - w:], T)
    return cache


class capture_query_windows:
    """Context manager: while active, every attention module's forward records its last `window` queries
    (post-RoPE, [B, Hq, window, D]) in `self.queries[layer_idx]`, recomputed from the module's own q_proj
    (and q_norm, if any) and the rotary embedding the model passes it. Llama/Mistral/Qwen2/Qwen3 layouts.
    """

    def __init__(self, model, window: int):
        self.model, self.window = model, window
        self.queries: dict[int, torch.Tensor] = {}
        self.handles = []

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        w = min(self.window, hidden.shape[1])
        h = hidden[:, -w:]
        head_dim = module.head_dim
        q = module.q_proj(h).view(h.shape[0], w, -1, head_dim)
        if hasattr(module, "q_norm"):
            q = module.q_norm(q)
        q = q.transpose(1, 2)
        rope = sys.modules[type(module).__module__].apply_rotary_pos_emb
        q, _ = rope(q, q, cos[:, -w:], sin[:, -w:])
        self.queries[module.layer_idx] = q.detach()

    def __enter__(self):
        for module in self.model.modules():
            if hasattr(module, "q_proj") and hasattr(module, "layer_idx"):
                self.handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))
        if not self.handles:
            raise RuntimeError("no attention module with q_proj and layer_idx found: SnapKV needs a Llama/Qwen-style model")
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False

    def ordered(self, num_layers: int) -> list[torch.Tensor]:
        return [self.queries[i] for i in range(num_layers)]


# ---------------------------------------------------------------------------------------------------
# the page-selection oracle
# ---------------------------------------------------------------------------------------------------
def oracle_page_attention(query, keys, values, scale: float, topk_pages: int, page_size: int, mask=None,
                          sketch_bits: int = 0, pool_heads: bool = False, coverage: float = 0.0, counts=None,
                          floor: float = 0.0):
    """Decode attention over each KV head's `topk_pages` pages of highest *true* attention mass, plus the
    page holding the newest token (FlexiCache's budget rule). The mass of a page is the softmax weight of
    its keys over the whole context, summed over the query heads of the GQA group. No cheaper selector
    can pick better pages by that measure, so its accuracy is the ceiling of page selection at that budget.

    With sketch_bits > 0 the mass is the one the cache's key sketches predict (ops.page_sketch_ref: the
    full pages' keys quantised inside their min/max boxes; the newest page exact): what ranking pages by
    sketched mass, instead of FlexiCache's best sketched q.k, would select (every head, every step).

    With pool_heads the layer's KV heads share one budget: the `topk_pages * Hkv` pages of highest mass
    among all of them (each head's masses sum to G, so they compare), however they fall per head. It asks
    whether a per-head budget, not the total, is what caps the per-head oracle (a diagnostic, not a method).
    With `floor` f as well, each head first takes its f x `topk_pages` best pages and the rest of the layer's
    budget is pooled: the average stays exactly `topk_pages`, and no head gets fewer than f x `topk_pages`.

    With coverage p > 0 the budget adapts (a top-p budget): each head, at each step, takes its pages of highest
    mass until they and the current page hold p of its attention, at most 4 x `topk_pages`, and with `floor` f at
    least its f x `topk_pages` best pages whatever they hold. Its average page count, not `topk_pages`, is then
    its budget: `counts` (a list [pages, head-steps]), if given, adds them up.

    query [B, Hq, 1, D], keys/values [B, Hkv, T, D]; mask: None, or HF's sdpa mask [B, 1, 1, T] (bool:
    True attends; float: additive). Returns [B, 1, Hq, D] like sdpa_attention_forward. fp32 inside.
    """
    B, Hq, _, D = query.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    logits = torch.einsum("bhgd,bhtd->bhgt", query.float().view(B, Hkv, G, D), keys.float()) * scale
    if mask is not None:
        m = mask[:, :, -1:, -T:]  # [B, 1, 1, T]
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
    P = math.ceil(T / page_size)
    current = P - 1  # the newest token's page: always attended, never competes
    rank = logits
    if sketch_bits:
        full = (T // page_size) * page_size
        valid = torch.ones(B, full, dtype=torch.bool, device=keys.device)
        if mask is not None:
            valid = m[:, 0, 0, :full] if m.dtype == torch.bool else m[:, 0, 0, :full] == 0
        k = keys.float()
        kmin, kmax = ops.page_minmax_ref(k[:, :, :full], valid, page_size)
        codes = ops.page_sketch_ref(k[:, :, :full], valid, kmin, kmax, page_size, sketch_bits)
        khat = torch.cat([ops.sketch_keys_ref(kmin, kmax, codes).flatten(2, 3).float(), k[:, :, full:]], 2)
        rank = torch.einsum("bhgd,bhtd->bhgt", query.float().view(B, Hkv, G, D), khat) * scale
        rank = rank.masked_fill(torch.isneginf(logits), float("-inf"))  # the same tokens masked
    mass = F.pad(rank.softmax(-1).sum(2), (0, P * page_size - T)).view(B, Hkv, P, page_size).sum(-1)
    chosen = torch.zeros(B, Hkv, P, dtype=torch.bool, device=keys.device)
    chosen[..., current] = True
    k = min(topk_pages, current)
    if k and coverage:
        order = mass[..., :current].sort(-1, descending=True)
        total = mass.sum(-1, keepdim=True)  # G per head, less what the mask hides
        held = mass[..., current:current + 1] + order.values.cumsum(-1) - order.values  # before taking each page
        rank = torch.arange(current, device=keys.device)
        take = ((held < coverage * total) | (rank < floor * k)) & (rank < 4 * k)
        chosen[..., :current].scatter_(-1, order.indices, take)
        if counts is not None:
            counts[0] += int(take.sum())
            counts[1] += take.shape[0] * take.shape[1]
    elif k and pool_heads:
        # each head its floor x k best pages first; the layer's remaining k x Hkv pages go to the heaviest
        # pages left among all heads (a budget whose total per layer is fixed, so its shapes can be)
        base = min(int(floor * k), k)
        if base:
            chosen[..., :current].scatter_(-1, mass[..., :current].topk(base, dim=-1).indices, True)
        flat = mass[..., :current].masked_fill(chosen[..., :current], float("-inf")).reshape(B, Hkv * current)
        picked = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, flat.topk((k - base) * Hkv, dim=-1).indices, True)
        chosen[..., :current] |= picked.view(B, Hkv, current)
    elif k:
        chosen.scatter_(-1, mass[..., :current].topk(k, dim=-1).indices, True)
    visible = chosen.repeat_interleave(page_size, dim=-1)[..., :T]  # [B, Hkv, T]
    probs = logits.masked_fill(~visible[:, :, None, :], float("-inf")).softmax(-1)
    out = torch.einsum("bhgt,bhtd->bhgd", probs, values.float())
    return out.reshape(B, 1, Hq, D).to(query.dtype)


class OracleLayer(DynamicLayer):
    """Keeps every K/V (like DynamicCache); a one-token step attends through `oracle_page_attention`,
    a multi-token forward densely (sdpa), as FlexiCache does. Needs attn_implementation="flexicache"."""

    def __init__(self, topk_pages: int, page_size: int, sketch_bits: int = 0, pool_heads: bool = False,
                 coverage: float = 0.0, floor: float = 0.0):
        super().__init__()
        self.topk_pages, self.page_size, self.sketch_bits, self.pool_heads = topk_pages, page_size, sketch_bits, pool_heads
        self.coverage, self.floor, self.counts = coverage, floor, [0, 0]  # counts: pages chosen, head-steps (a top-p budget's average)

    def update(self, key_states, value_states, *args, **kwargs):
        self._kv = super().update(key_states, value_states, *args, **kwargs)
        return FlexiKV(self), FlexiKV(self)

    def attend(self, module, query, attention_mask, scaling=None, dropout=0.0, **kwargs):
        keys, values = self._kv
        self._kv = None
        scale = scaling if scaling is not None else module.scaling
        if query.shape[2] > 1:
            return sdpa_attention_forward(module, query, keys, values, attention_mask, dropout=dropout, scaling=scale, **kwargs)
        return oracle_page_attention(query, keys, values, scale, self.topk_pages, self.page_size, attention_mask,
                                     self.sketch_bits, self.pool_heads, self.coverage, self.counts,
                                     self.floor), None


def oracle_cache(config, topk_pages: int, page_size: int, prefill_kv=None, sketch_bits: int = 0,
                 pool_heads: bool = False, coverage: float = 0.0, floor: float = 0.0) -> Cache:
    """A cache of `OracleLayer`s, seeded with an uncompressed prompt if given."""
    cache = Cache(layers=[OracleLayer(topk_pages, page_size, sketch_bits, pool_heads, coverage, floor)
                          for _ in range(_num_layers(config))])
    if prefill_kv is not None:
        for layer, (k, v) in zip(cache.layers, prefill_kv):
            DynamicLayer.update(layer, k, v)  # concatenation onto an empty tensor: a copy
    return cache


# ---------------------------------------------------------------------------------------------------
# DuoAttention-style peer: retrieval heads keep everything, streaming heads sink + recent window
# ---------------------------------------------------------------------------------------------------
class DuoLayer(CacheLayerMixin):
    """One layer of a DuoAttention-style cache (Xiao et al. 2024, arXiv 2410.10819): the retrieval heads
    (here: the head profile's unstable heads) keep every token; each streaming head keeps its first
    `n_sink` tokens and its newest `window - n_sink`, `window` tokens in all (fewer while the context is
    shorter). Streaming heads evict *before* attending: a decode step appends the new token, drops the
    oldest recent one and attends to exactly `window` tokens, so the bytes held never exceed `window`
    tokens per streaming head, between steps or during one. Retrieval heads attend to the whole context.

    A multi-token forward on an empty layer (a prefill through this cache) is exactly HF's sdpa over every
    head; the streaming heads evict after it. Later multi-token forwards are not supported (the eval never
    makes them). Needs attn_implementation="flexicache" (the attention is the layer's `attend`)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, retrieval_heads, num_kv_heads: int, window: int, n_sink: int = 64):
        super().__init__()
        if window < 2:
            raise ValueError(f"window must be >= 2 tokens, got {window}")
        self.retrieval = sorted(set(retrieval_heads))
        self.streaming = [h for h in range(num_kv_heads) if h not in set(self.retrieval)]
        self.num_kv_heads, self.window, self.n_sink = num_kv_heads, window, min(n_sink, window - 1)
        self.length = 0
        self.pending = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, _, _, D = key_states.shape
        empty = lambda heads: key_states.new_zeros(B, len(heads), 0, D)  # noqa: E731
        self.r_idx = torch.tensor(self.retrieval, dtype=torch.long, device=self.device)
        self.s_idx = torch.tensor(self.streaming, dtype=torch.long, device=self.device)
        self.rk, self.rv = empty(self.retrieval), empty(self.retrieval)  # [B, Hr, T, D]
        self.sink_k, self.sink_v = empty(self.streaming), empty(self.streaming)  # [B, Hs, <= n_sink, D]
        self.keys, self.values = empty(self.streaming), empty(self.streaming)  # the recent window [B, Hs, r, D]
        self.is_initialized = True

    def _append(self, key_states, value_states) -> None:
        """Store new tokens; streaming heads then keep their sinks and the newest `window - n_sink`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k_r, v_r = key_states.index_select(1, self.r_idx), value_states.index_select(1, self.r_idx)
        k_s, v_s = key_states.index_select(1, self.s_idx), value_states.index_select(1, self.s_idx)
        self.rk, self.rv = torch.cat([self.rk, k_r], 2), torch.cat([self.rv, v_r], 2)
        free = self.n_sink - self.sink_k.shape[2]  # sinks are the first tokens of the sequence
        if free > 0:
            self.sink_k, self.sink_v = torch.cat([self.sink_k, k_s[:, :, :free]], 2), torch.cat([self.sink_v, v_s[:, :, :free]], 2)
            k_s, v_s = k_s[:, :, free:], v_s[:, :, free:]
        cap = self.window - self.sink_k.shape[2]  # >= 1: n_sink < window
        self.keys, self.values = torch.cat([self.keys, k_s], 2)[:, :, -cap:], torch.cat([self.values, v_s], 2)[:, :, -cap:]
        self.length += key_states.shape[2]

    def seed(self, keys, values) -> None:
        """Start from an uncompressed prompt (the runner's shared prefill)."""
        self._append(keys, values)

    def update(self, key_states, value_states, *args, **kwargs):
        start, n = self.length, key_states.shape[2]
        if n > 1 and start > 0:
            raise NotImplementedError("DuoLayer: a multi-token forward on a non-empty cache (chunked prefill)")
        self._append(key_states.detach(), value_states.detach())
        self.pending = (key_states, value_states) if start == 0 else ()  # a prefill attends densely
        return FlexiKV(self), FlexiKV(self)

    def attend(self, module, query, attention_mask, scaling=None, dropout=0.0, **kwargs):
        pending, self.pending = self.pending, None
        sdpa = lambda q, k, v, m: sdpa_attention_forward(  # noqa: E731
            module, q, k, v, m, dropout=dropout, scaling=scaling, **kwargs)[0]
        if pending:  # prefill: HF's sdpa over the whole prompt, every head
            return sdpa(query, *pending, attention_mask), None
        B, Hq, _, D = query.shape
        G = Hq // self.num_kv_heads
        out = query.new_empty(B, 1, Hq, D)
        mask = attention_mask[..., -self.length:] if isinstance(attention_mask, torch.Tensor) else None
        s, r = self.sink_k.shape[2], self.keys.shape[2]
        s_mask = None if mask is None else torch.cat([mask[..., :s], mask[..., self.length - r:]], -1)
        for idx, k, v, m in ((self.r_idx, self.rk, self.rv, mask),
                             (self.s_idx, torch.cat([self.sink_k, self.keys], 2), torch.cat([self.sink_v, self.values], 2), s_mask)):
            if len(idx):
                q_heads = (idx.view(-1, 1) * G + torch.arange(G, device=idx.device)).view(-1)
                out[:, :, q_heads] = sdpa(query.index_select(1, q_heads), k, v, m)
        return out, None

    def kept_tokens(self) -> tuple[int, int]:
        """(tokens per retrieval head, tokens per streaming head) held now."""
        return (self.rk.shape[2], self.sink_k.shape[2] + self.keys.shape[2]) if self.is_initialized else (0, 0)

    def kv_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.rk, self.rv, self.sink_k, self.sink_v, self.keys, self.values))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length, self.pending, self.is_initialized = 0, None, False


class DuoCache(Cache):
    """A cache of `DuoLayer`s; `kv_bytes()` in total (everything it holds is on the accelerator)."""

    def __init__(self, profile, window: int, n_sink: int = 64):
        super().__init__(layers=[DuoLayer(profile.unstable_heads(l), profile.num_kv_heads, window, n_sink)
                                 for l in range(profile.num_layers)])
        self.profile, self.window = profile, window

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers)


def duo_attention_cache(profile, window: int, n_sink: int = 64, prefill_kv=None) -> DuoCache:
    """DuoAttention-style cache: the profile's unstable heads are retrieval heads (full context), the
    others streaming heads (`n_sink` sinks + recent tokens, `window` in all); seeded with an uncompressed
    prompt if given."""
    cache = DuoCache(profile, window, n_sink)
    if prefill_kv is not None:
        for layer, (k, v) in zip(cache.layers, prefill_kv):
            layer.seed(k, v)
    return cache


# ---------------------------------------------------------------------------------------------------
# Quest, written from the paper: a reference for the "quest" method (FlexiCache, every head unstable)
# ---------------------------------------------------------------------------------------------------
def quest_page_attention(query, keys, values, scale: float, topk_pages: int, page_size: int, mask=None,
                         return_pages: bool = False):
    """Quest (Tang et al. 2024, arXiv 2406.10774) at one decode step, written here independently of
    FlexiCache's code: every full page before the newest token's is summarised by the channel-wise min and
    max of its keys; its score for a query q is the upper bound sum_d max(q_d kmin_d, q_d kmax_d) of q.k
    over the page, the max over the query heads of the KV head's GQA group (Quest is per head; FlexiCache's
    GQA rule); each KV head attends to its `topk_pages` best pages plus the page holding the newest token.
    Padding (mask) is left out of the min/max and of attention; a page with no valid token is no candidate.

    query [B, Hq, 1, D], keys/values [B, Hkv, T, D]; mask None or HF's sdpa mask [B, 1, 1, T]. Returns
    attention [B, 1, Hq, D] (fp32 inside), and with return_pages also the chosen pages [B, Hkv, P] (bool).
    """
    B, Hq, _, D = query.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    valid = torch.ones(B, T, dtype=torch.bool, device=keys.device)
    if mask is not None:
        m = mask[:, 0, -1, -T:]
        valid = m if m.dtype == torch.bool else m == 0
    current = (T - 1) // page_size  # the page of the newest token
    full = current * page_size  # the candidates: every (full) page before it
    q = query.float().view(B, Hkv, G, D)
    k = keys[:, :, :full].float().view(B, Hkv, current, page_size, D)
    v_ok = valid[:, :full].view(B, 1, current, page_size, 1)
    kmin = k.masked_fill(~v_ok, float("inf")).amin(3)  # [B, Hkv, P, D]
    kmax = k.masked_fill(~v_ok, float("-inf")).amax(3)
    bound = torch.maximum(q[:, :, :, None] * kmax[:, :, None], q[:, :, :, None] * kmin[:, :, None]).sum(-1)
    score = bound.amax(2).masked_fill(~v_ok.any(3)[:, :, :, 0], float("-inf"))  # [B, Hkv, P]
    chosen = torch.zeros(B, Hkv, current + 1, dtype=torch.bool, device=keys.device)
    chosen[..., current] = True
    n = min(topk_pages, current)
    if n:
        top = score.topk(n, dim=-1)
        chosen[..., :current].scatter_(-1, top.indices, ~torch.isneginf(top.values))
    visible = chosen.repeat_interleave(page_size, dim=-1)[..., :T] & valid[:, None]  # [B, Hkv, T]
    logits = torch.einsum("bhgd,bhtd->bhgt", q, keys.float()) * scale
    probs = logits.masked_fill(~visible[:, :, None], float("-inf")).softmax(-1)
    out = torch.einsum("bhgt,bhtd->bhgd", probs, values.float()).reshape(B, 1, Hq, D).to(query.dtype)
    return (out, chosen) if return_pages else out


class QuestLayer(OracleLayer):
    """Keeps every K/V (like DynamicCache); a one-token step attends through `quest_page_attention`, a
    multi-token forward densely. `self.chosen` holds the last step's chosen pages [B, Hkv, P]."""

    def attend(self, module, query, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if query.shape[2] > 1:
            return super().attend(module, query, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        keys, values = self._kv
        self._kv = None
        scale = scaling if scaling is not None else module.scaling
        out, self.chosen = quest_page_attention(query, keys, values, scale, self.topk_pages, self.page_size,
                                                attention_mask, return_pages=True)
        return out, None


def quest_cache(config, topk_pages: int, page_size: int, prefill_kv=None) -> Cache:
    """A cache of `QuestLayer`s (the reference Quest), seeded with an uncompressed prompt if given."""
    cache = Cache(layers=[QuestLayer(topk_pages, page_size) for _ in range(_num_layers(config))])
    if prefill_kv is not None:
        for layer, (k, v) in zip(cache.layers, prefill_kv):
            DynamicLayer.update(layer, k, v)
    return cache
