"""The methods compared, as small objects that make the cache of one request (kvpress style).

Every method turns a shared dense prefill (`Prefill`: the prompt's K/V per layer, the last prompt
queries, the logits of the last prompt token) into the `past_key_values` the decode steps run on, at a
budget in tokens per KV head visible to decode attention:

| name | cache | budget |
|---|---|---|
| dense | `DynamicCache` | none (everything) |
| flexicache | FlexiCache, the model's head profile, rerank every 16 steps | topk_pages = budget / page_size |
| flexicache_no_rerank | same, stable heads never re-select after the first decode step (they keep that selection plus every page created since) | same |
| flexicache_all_stable | every head stable (rerank every 16) | same |
| quest | every head unstable: re-select every step (Quest-style, nothing offloaded: GPU bytes = dense's) | same (attended tokens) |
| flexicache_random_unstable | as many unstable heads as the profile, drawn at random (seeded) | same |
| streamingllm | 4 sink tokens + the newest tokens | budget tokens |
| snapkv | SnapKV prefill eviction (window 32, pooling 5), the window slides during decode | budget tokens |
| duo_attention | DuoAttention-style: the profile's unstable heads keep every token, the others sinks + recent tokens | the window that gives FlexiCache's GPU K/V bytes at this budget |
| oracle_pages | every head, every step: the top-K pages by true attention mass (+ the current page), computed from all keys: the ceiling of any page selector, not a method | as flexicache |
| oracle_pages_pooled | the same, but the layer's KV heads share their budget: the K x heads pages of highest mass in the layer, however many per head (a diagnostic of per-head budgets) | as flexicache, per head on average |
| oracle_pages_p90 / _p95 / _p96 / _p97 / _p98 | a top-p budget: each head, each step, its pages of highest true mass until they (with the current page) hold 90 / 95 / ... / 98% of its attention, at most 4 x K (a diagnostic of adaptive budgets) | its own: fidelity records report `pages_per_head` |
| sketch_mass_pages | every head, every step: the top-K pages by the mass the 2-bit key sketches predict (what the default scorer would pick with nothing stale) | as flexicache |
| sketch_mass_pages_p95 / _p96 / _p97 | the top-p budget on the sketches' predicted mass instead of the true one: an adaptive budget a real selector could run | its own, as above |
| sketch_mass_pages_p90_f50 / _p95_f50 | the same, but every head takes at least K / 2 pages (a floor under the estimate's coverage) | its own, as above |
| oracle_pages_pooled_f50 / sketch_mass_pages_pooled_f50 | every head its K / 2 best pages (true / sketch-predicted mass), the layer's other K / 2 x heads pages pooled by mass: an adaptive budget at exactly K per head on average | as flexicache |

FlexiCache attends, besides its top-K pages, to the page holding the newest token (up to page_size - 1
older tokens) and stable heads to the pages created since their last rerank (<= rerank_interval
tokens): at most ~2 pages more than the peers' budget. That is the method as specified; the tables say so.

A budget of None is "full": FlexiCache with enough pages for the whole context (it must then equal dense).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from flexicache_hf.eval import peers


@dataclass
class Prefill:
    """One prompt, run once densely; every method starts from it."""

    input_ids: torch.Tensor  # [1, T]
    kv: list  # [(keys, values)] per layer, [1, H_kv, T, D], post-RoPE
    queries: list | None  # per layer [1, Hq, w, D], the last prompt queries (post-RoPE), or None
    last_logits: torch.Tensor  # [1, vocab] logits after the last prompt token
    seconds: float = 0.0

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


@dataclass
class Context:
    """What methods need to know about the model being evaluated."""

    model: object
    profile: object  # the model's HeadProfile (shipped or temporary)
    page_size: int = 16
    max_new_tokens: int = 64  # for the "full" budget

    @property
    def config(self):
        return self.model.config

    @property
    def shape(self) -> tuple[int, int]:
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        return text.num_hidden_layers, (getattr(text, "num_key_value_heads", None) or text.num_attention_heads)

    def topk_pages(self, budget: int | None, prompt_len: int) -> int:
        """Pages per head for a budget in tokens (FlexiCache and the page oracle); None: the whole context."""
        if budget is None:
            return math.ceil((prompt_len + self.max_new_tokens + 1) / self.page_size)
        if budget % self.page_size:
            raise ValueError(f"budget {budget} is not a multiple of the page size {self.page_size}")
        return budget // self.page_size

    @property
    def scaling(self) -> float:
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return head_dim ** -0.5


class Method:
    name: str = "method"
    uses_budget: bool = True

    def make_cache(self, ctx: Context, budget: int | None, prefill: Prefill):
        """A cache holding the prompt, ready for decode steps."""
        raise NotImplementedError

    def empty_cache(self, ctx: Context, budget: int | None, prompt_len: int):
        """A cache for a plain model(...)/generate() prefill (used when the shared prefill cannot seed it)."""
        raise NotImplementedError(f"{self.name} can only start from the shared prefill")

    def describe(self) -> dict:
        return {"name": self.name, "class": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


@dataclass
class Dense(Method):
    name: str = "dense"
    uses_budget: bool = False

    def make_cache(self, ctx, budget, prefill):
        cache = DynamicCache(config=ctx.config)
        for i, (k, v) in enumerate(prefill.kv):
            cache.update(k, v, i)  # DynamicLayer concatenates onto an empty tensor: a copy
        return cache

    def empty_cache(self, ctx, budget, prompt_len):
        return DynamicCache(config=ctx.config)


@dataclass
class FlexiCacheMethod(Method):
    """FlexiCache with a head profile: "model" (the model's), "all_stable", "all_unstable" or "random"."""

    name: str = "flexicache"
    profile: str = "model"
    rerank_interval: int | None = 16  # None: never re-rank (an interval longer than the whole decode)
    seed: int = 0
    score_spread: float = 1.0  # FlexiCacheConfig.score_spread (1.0: the MinMax bound)
    sketch_bits: int = 0  # FlexiCacheConfig.sketch_bits (0: no key sketch)
    sketch_score: str = "mass"  # FlexiCacheConfig.sketch_score

    def head_profile(self, ctx: Context):
        from flexicache_hf.profiles import HeadProfile

        L, H = ctx.shape
        if self.profile == "model":
            return ctx.profile
        if self.profile == "all_stable":
            return HeadProfile.all_stable(L, H)
        if self.profile == "all_unstable":
            return HeadProfile.all_unstable(L, H)
        if self.profile == "random":
            pairs = [(l, h) for l in range(L) for h in range(H)]
            chosen = random.Random(self.seed).sample(pairs, len(ctx.profile.unstable))
            return HeadProfile(L, H, chosen, {"source": f"random unstable set, seed {self.seed}, size of the model profile"})
        raise ValueError(f"unknown profile kind {self.profile!r}")

    def empty_cache(self, ctx, budget, prompt_len):
        from flexicache_hf import FlexiCache

        # "never": FlexiCache sizes stable heads' GPU slots for the pages created between two reranks,
        # so the interval is the decode length + 1 (the first decode step selects, none after)
        interval = self.rerank_interval if self.rerank_interval is not None else ctx.max_new_tokens + 1
        return FlexiCache(
            ctx.config, profile=self.head_profile(ctx), topk_pages=ctx.topk_pages(budget, prompt_len),
            page_size=ctx.page_size, rerank_interval=interval, score_spread=self.score_spread,
            sketch_bits=self.sketch_bits, sketch_score=self.sketch_score,
            max_cache_len=prompt_len + ctx.max_new_tokens + 1,  # buffers and pinned pool sized once per request
        )

    def make_cache(self, ctx, budget, prefill):
        cache = self.empty_cache(ctx, budget, prefill.length)
        layers = getattr(cache, "layers", [])
        if not layers or not all(hasattr(layer, "rebuild") for layer in layers):
            raise NotImplementedError("this FlexiCache cannot be seeded from a prefill")
        # `rebuild` is what FlexiCacheLayer.crop uses to re-page a context: the same storage rules as a
        # prefill (tests/test_eval.py checks that the seeded cache decodes exactly like a real prefill)
        for layer, (k, v) in zip(layers, prefill.kv):
            layer.rebuild(k, v, torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device))
        return cache


@dataclass
class Quest(FlexiCacheMethod):
    """Quest (Tang et al. 2024) as FlexiCache with every head unstable: every KV head re-selects its top-K
    pages at every decode step by the MinMax bound (the max over its GQA group) and attends to them plus
    the current page; nothing is offloaded. Its *attended* tokens are the budget (as FlexiCache's unstable
    heads); its GPU bytes are the whole context, as Quest's are: `memory_report()["gpu_kv_bytes"]` (what
    results.json records) is every K/V of every head, the dense cache's bytes, plus the page metadata
    (reported apart). `peers.quest_page_attention` is Quest written from the paper, independently of
    FlexiCache's code; tests/test_peers_duo_quest.py checks that both select the same pages. It always
    ranks by Quest's bound (--sketch-bits and --score-spread leave it alone); "flexicache_all_unstable" is the
    same policy with FlexiCache's scorer (earlier runs' quest_sketch<b> results are that method)."""

    name: str = "quest"
    profile: str = "all_unstable"


@dataclass
class DuoAttention(Method):
    """DuoAttention-style peer (Xiao et al. 2024) at FlexiCache's GPU bytes: the head profile's unstable
    heads are the retrieval heads and keep every token (full attention); the stable heads are streaming
    heads and keep `n_sink` sink tokens + the newest tokens, `window` in all (peers.DuoLayer).

    How the GPU bytes are equalised: FlexiCache at budget b keeps, per layer, every token of its unstable
    heads on the GPU and, per stable head, `resident_slots` = b / page_size + 1 + ceil(rerank_interval /
    page_size) page slots (its top-K, the current page, the pages made before the next rerank); the rest
    of a stable head's context is in host memory. This peer uses the same split of heads, so its retrieval
    heads hold exactly the bytes of FlexiCache's unstable heads, and gives each streaming head a window of
    `resident_slots * page_size` tokens (b + 32 at pages of 16 and rerank 16), the bytes of its GPU slots:
    the K/V bytes it holds (`kv_bytes()`, recorded as kv_bytes_after_prefill) equal FlexiCache's
    `gpu_kv_bytes` at every step once the context exceeds the window. Not counted on either side:
    FlexiCache's page metadata (kmin/kmax of every page, 1/page_size of the K bytes; `metadata_bytes`)
    and its host copy. Retrieval heads attend to everything, so the attended budget is not equal: that is
    the design. Sinks: min(n_sink, window // 4) (DuoAttention's setting is 64 sinks + 256 recent tokens).
    The budget must be whole pages, as FlexiCache's."""

    name: str = "duo_attention"
    n_sink: int = 64
    rerank_interval: int = 16  # that of the FlexiCache it is equalised with (FlexiCacheMethod's default)

    def window(self, ctx: Context, budget: int | None, prompt_len: int) -> int:
        """Tokens per streaming head: the GPU slots of one FlexiCache stable head at this budget."""
        from flexicache_hf.config import FlexiCacheConfig

        cfg = FlexiCacheConfig(page_size=ctx.page_size, topk_pages=ctx.topk_pages(budget, prompt_len),
                               rerank_interval=self.rerank_interval)
        return cfg.resident_slots * cfg.page_size

    def _cache(self, ctx, budget, prompt_len, prefill_kv=None):
        window = self.window(ctx, budget, prompt_len)
        return peers.duo_attention_cache(ctx.profile, window, min(self.n_sink, window // 4), prefill_kv)

    def make_cache(self, ctx, budget, prefill):
        return self._cache(ctx, budget, prefill.length, prefill.kv)

    def empty_cache(self, ctx, budget, prompt_len):
        return self._cache(ctx, budget, prompt_len)


@dataclass
class StreamingLLM(Method):
    name: str = "streamingllm"
    n_sink: int = 4

    def make_cache(self, ctx, budget, prefill):
        budget = budget if budget is not None else prefill.length + ctx.max_new_tokens + 1
        return peers.streaming_llm_cache(ctx.config, budget, self.n_sink, prefill_kv=prefill.kv)

    def empty_cache(self, ctx, budget, prompt_len):
        budget = budget if budget is not None else prompt_len + ctx.max_new_tokens + 1
        return peers.streaming_llm_cache(ctx.config, budget, self.n_sink)


@dataclass
class SnapKV(Method):
    name: str = "snapkv"
    window: int = 32
    kernel: int = 5

    def make_cache(self, ctx, budget, prefill):
        budget = budget if budget is not None else prefill.length + ctx.max_new_tokens + 1
        if prefill.queries is None:
            raise ValueError("SnapKV needs the prompt's last queries: run the prefill with query capture")
        return peers.snapkv_cache(ctx.config, budget, prefill.kv, prefill.queries, ctx.scaling, self.window, self.kernel)


@dataclass
class OraclePages(Method):
    """The page-selection ceiling: FlexiCache's budget, pages chosen by their true attention mass. With
    sketch_bits ("sketch_mass_pages"), by the mass their key sketches predict: a diagnostic of ranking by
    sketched mass (every head, every step, full-precision attention over the chosen pages)."""

    name: str = "oracle_pages"
    sketch_bits: int = 0
    pool_heads: bool = False  # "oracle_pages_pooled": the layer's heads share one budget (peers.oracle_page_attention)
    coverage: float = 0.0  # "oracle_pages_p90": a top-p budget per head and step, capped at 4x (its average is reported)
    floor: float = 0.0  # with coverage or pool_heads: at least floor x K pages per head and step ("..._f50")

    def empty_cache(self, ctx, budget, prompt_len):
        return self._cache(ctx, ctx.topk_pages(budget, prompt_len))

    def make_cache(self, ctx, budget, prefill):
        return self._cache(ctx, ctx.topk_pages(budget, prefill.length), prefill.kv)

    def _cache(self, ctx, topk_pages, prefill_kv=None):
        return peers.oracle_cache(ctx.config, topk_pages, ctx.page_size, prefill_kv, sketch_bits=self.sketch_bits,
                                  pool_heads=self.pool_heads, coverage=self.coverage, floor=self.floor)


def registry() -> dict[str, Method]:
    """Every method by name (fresh objects)."""
    return {
        m.name: m
        for m in (
            Dense(),
            FlexiCacheMethod(),
            FlexiCacheMethod(name="flexicache_no_rerank", rerank_interval=None),
            FlexiCacheMethod(name="flexicache_all_stable", profile="all_stable"),
            Quest(),
            FlexiCacheMethod(name="flexicache_all_unstable", profile="all_unstable"),
            FlexiCacheMethod(name="flexicache_random_unstable", profile="random", seed=0),
            StreamingLLM(),
            SnapKV(),
            DuoAttention(),
            OraclePages(),
            OraclePages(name="sketch_mass_pages", sketch_bits=2),
            OraclePages(name="oracle_pages_pooled", pool_heads=True),
            OraclePages(name="oracle_pages_pooled_f50", pool_heads=True, floor=0.5),
            OraclePages(name="sketch_mass_pages_pooled_f50", sketch_bits=2, pool_heads=True, floor=0.5),
            *(OraclePages(name=f"oracle_pages_p{round(100 * p)}", coverage=p) for p in (0.9, 0.95, 0.96, 0.97, 0.98)),
            *(OraclePages(name=f"sketch_mass_pages_p{round(100 * p)}", sketch_bits=2, coverage=p)
              for p in (0.95, 0.96, 0.97)),
            *(OraclePages(name=f"sketch_mass_pages_p{round(100 * p)}_f50", sketch_bits=2, coverage=p, floor=0.5)
              for p in (0.9, 0.95)),
        )
    }


METHOD_NAMES = tuple(registry())


def get_methods(names, score_spread: float = 1.0, sketch_bits: int = 0, sketch_score: str = "mass") -> list[Method]:
    """The methods by name. With score_spread != 1 (or sketch_bits > 0) every FlexiCache method but Quest (the
    paper's peer: its bound) uses it and is renamed `<name>_spread<x>` (`<name>_sketch<b>mass` ranking pages
    by predicted mass, `<name>_sketch<b>` by the best sketched q.k), so a name always says its scorer and
    results never mix in a resumed results.json. The command line passes the cache's default scorer
    (--sketch-bits 2): "flexicache_sketch2mass"; "flexicache" is the MinMax bound (--sketch-bits 0)."""
    reg = registry()
    unknown = [n for n in names if n not in reg]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(reg)}")
    out = [reg[n] for n in names]
    for m in (m for m in out if isinstance(m, FlexiCacheMethod) and not isinstance(m, Quest)):
        if score_spread != 1.0:
            m.score_spread, m.name = score_spread, f"{m.name}_spread{score_spread:g}"
        if sketch_bits:
            suffix = "mass" if sketch_score == "mass" else ""
            m.sketch_bits, m.sketch_score, m.name = sketch_bits, sketch_score, f"{m.name}_sketch{sketch_bits}{suffix}"
    return out


def cache_kv_bytes(cache) -> int | None:
    """Bytes of K/V the cache keeps on the accelerator (FlexiCache: GPU-resident, not host)."""
    if hasattr(cache, "memory_report"):
        return int(cache.memory_report()["gpu_kv_bytes"])
    if hasattr(cache, "kv_bytes"):
        return int(cache.kv_bytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
