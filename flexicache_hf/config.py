"""FlexiCacheConfig: the method's knobs, validated once at construction."""

from __future__ import annotations

import dataclasses
import math
import numbers


# The accepted sketch widths and rankings: the config checks them, the command lines offer them.
SKETCH_BITS = (0, 1, 2, 4)
SKETCH_SCORES = ("mass", "max")
# Upper bounds of the knobs (tokens per sequence: 16M; pages of 256 tokens; a rerank at least every 4096 steps)
MAX_TOKENS = 1 << 24
MAX_PAGES = MAX_TOKENS
MAX_PAGE_SIZE = 256
MAX_RERANK_INTERVAL = 4096


def _is_int(value) -> bool:
    """An int (numpy's included), never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class FlexiCacheConfig:
    """Knobs of FlexiCache. Defaults are the paper's (docs/method.md, "Knobs").

    Args:
        page_size: tokens per page; a positive power of two.
        topk_pages: pages each head attends to at decode (besides the current page and the tail).
        rerank_interval: stable heads re-select their pages every this many decode steps.
        host_headroom_pages: the least headroom, in pages, reserved (GPU buffers, page metadata and the
            pinned host pool) beyond the tokens held: each reservation adds an eighth of the context or
            this many pages, whichever is more, so that decoding grows buffers rarely while what is
            reserved stays close to what is used (memory_report's *_reserved_bytes). Nothing is dropped.
        max_cache_len: the most tokens a sequence will hold (prompt + new tokens), if known: the buffers and
            the pinned host pool are then sized once, at the first forward. With chunked prefill this avoids
            growing (and re-pinning) them chunk after chunk. None: sized from the first forward, grown
            on demand.
        calibration_steps: with profile="auto", decode steps during which every head is unstable while
            its page selections are recorded, before the split is decided (two 16-step chunks by default).
        auto_unstable: with profile="auto", the fraction (or count) of KV heads kept unstable.
        score_spread: weight of the key box's half-width in a page's score, q.c + score_spread * |q|.r
            (ops.page_scores_ref). 1.0 is Quest's MinMax upper bound, the reference; smaller values rank
            pages closer to their true attention on small models (docs/accuracy.md, "page scoring").
        sketch_bits: 0 (the default) scores pages by the MinMax bound alone. 1, 2 or 4: also keep every
            token's key quantised to that many bits per channel inside its page's min/max box, and score a
            page by its best sketched q.k (ops.page_scores_ref). 2 bits rank pages as well as the exact
            keys would (captured attention mass 0.948 vs 0.949 on SmolLM2, bound 0.919) and keep far more of
            dense's accuracy on small models (docs/accuracy.md, "Per-token key sketch"), for
            page_size * head_dim * sketch_bits / 8 more bytes of GPU metadata per page and head (2 bits,
            pages of 16, bf16: as much again as kmin + kmax, 1/16 of the page's K/V) and 2-9% longer decode
            steps (docs/performance.md). Needs head_dim * sketch_bits divisible by 8.
        sketch_score: how sketched keys rank pages (with sketch_bits > 0). "mass" (the default): by the
            attention mass they predict, each query head's softmax over the candidate pages summed over the
            GQA group (ops.page_mass_ref), the oracle's criterion estimated: pages holding several relevant
            tokens outrank a page with one. "max": by the best sketched q.k (ops.page_scores_ref).
        use_kernels: "auto" uses the Triton kernels on CUDA tensors and the PyTorch references
            elsewhere; True forces kernels (error if unavailable); False forces the references.
        scorer: how pages are summarised and ranked, an object: MinMaxBound(spread), SketchMax(bits) or
            SketchMass(bits) (flexicache_hf.decode), or its name ("minmax", "sketch_max", "sketch_mass").
            None: built from the shorthand above (sketch_bits, sketch_score, score_spread).
    """

    page_size: int = 16
    topk_pages: int = 64
    rerank_interval: int = 16
    host_headroom_pages: int = 16
    max_cache_len: int | None = None
    calibration_steps: int = 32
    auto_unstable: float | int = 0.25
    score_spread: float = 1.0
    sketch_bits: int = 0
    sketch_score: str = "mass"
    use_kernels: bool | str = "auto"
    scorer: object = None

    def __post_init__(self):
        def bad(name, value, rule):
            raise ValueError(f"FlexiCacheConfig.{name}={value!r} is invalid: {rule}")

        # upper bounds: far above any real use, low enough that a typo fails here, not in the allocator
        for name, lo, hi, example in (
            ("page_size", 1, MAX_PAGE_SIZE, "e.g. 16"),
            ("topk_pages", 1, MAX_PAGES, "e.g. 64 (a 1024-token budget with 16-token pages)"),
            ("rerank_interval", 1, MAX_RERANK_INTERVAL, "e.g. 16 (1 re-ranks stable heads every step)"),
            ("host_headroom_pages", 0, MAX_PAGES, "e.g. 16"),
            ("calibration_steps", 16, MAX_RERANK_INTERVAL, "e.g. 32 (stability is measured over 16-step chunks)"),
        ):
            value = getattr(self, name)
            if not _is_int(value) or not lo <= value <= hi:
                bad(name, value, f"it must be an int in [{lo}, {hi}], {example}")
        if self.page_size & (self.page_size - 1):
            bad("page_size", self.page_size, "it must be a power of two, e.g. 16")
        if self.max_cache_len is not None and (not _is_int(self.max_cache_len) or not 1 <= self.max_cache_len <= MAX_TOKENS):
            bad("max_cache_len", self.max_cache_len,
                f"give the prompt + new tokens per sequence (an int in [1, {MAX_TOKENS}]), or None")
        u = self.auto_unstable
        if _is_int(u):
            if u < 1:
                bad("auto_unstable", u, "a head count must be >= 1; or give a fraction in (0, 1], e.g. 0.25")
        elif isinstance(u, bool) or not isinstance(u, numbers.Real) or not 0 < u <= 1:
            bad("auto_unstable", u, "give a fraction in (0, 1] (a float, e.g. 0.25) or a head count (an int >= 1)")
        if isinstance(self.score_spread, bool) or not isinstance(self.score_spread, numbers.Real) or not 0 <= self.score_spread <= 1:
            bad("score_spread", self.score_spread, "give a number in [0, 1]: 1.0 is the MinMax bound (the default)")
        if not _is_int(self.sketch_bits) or self.sketch_bits not in SKETCH_BITS:
            bad("sketch_bits", self.sketch_bits, "use 0 (MinMax bound only), 1, 2 or 4 bits per key channel")
        if self.sketch_bits and self.score_spread != 1.0:
            bad("score_spread", self.score_spread, "it shapes the MinMax bound, which sketch_bits replaces; "
                "leave score_spread at 1.0 when sketch_bits > 0")
        if self.sketch_score not in SKETCH_SCORES:
            bad("sketch_score", self.sketch_score, 'use "mass" (rank pages by predicted attention mass) or "max" '
                "(by the best sketched q.k)")
        if not isinstance(self.use_kernels, (bool, str)) or self.use_kernels not in ("auto", True, False):
            bad("use_kernels", self.use_kernels, 'use "auto", True or False')
        object.__setattr__(self, "scorer", self._resolve_scorer(bad))
        # numpy ints are ints; store plain Python ints so the config compares, hashes and prints plainly
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if _is_int(value):
                object.__setattr__(self, f.name, int(value))

    def _resolve_scorer(self, bad):
        """The scorer object: `scorer` as given, or built from the shorthand (score_spread, sketch_bits,
        sketch_score); sketch_bits then follows the scorer, so the two never disagree."""
        from flexicache_hf.decode import SCORERS, MinMaxBound, SketchMass, SketchMax

        scorer = self.scorer
        if scorer is None:
            if not self.sketch_bits:
                scorer = MinMaxBound(float(self.score_spread))
            else:
                scorer = (SketchMass if self.sketch_score == "mass" else SketchMax)(self.sketch_bits)
        elif (self.sketch_bits, self.score_spread, self.sketch_score) != (0, 1.0, "mass"):
            bad("scorer", scorer, "pass either scorer= or its shorthand (sketch_bits, sketch_score, score_spread), not both")
        elif isinstance(scorer, str):
            if scorer not in SCORERS:
                bad("scorer", scorer, f"use one of {sorted(SCORERS)} or an object such as SketchMass(2)")
            scorer = SCORERS[scorer]()
        if not isinstance(scorer, (MinMaxBound, SketchMax)):
            bad("scorer", scorer, "use MinMaxBound(), SketchMax(bits) or SketchMass(bits) from flexicache_hf")
        if isinstance(scorer, MinMaxBound) and not (isinstance(scorer.spread, numbers.Real) and 0 <= scorer.spread <= 1):
            bad("scorer", scorer, "MinMaxBound.spread must be a number in [0, 1] (1.0: the bound)")
        if isinstance(scorer, SketchMax) and (not _is_int(scorer.bits) or scorer.bits not in SKETCH_BITS[1:]):
            bad("scorer", scorer, "a key sketch has 1, 2 or 4 bits per channel")
        object.__setattr__(self, "sketch_bits", scorer.sketch_bits)
        return scorer

    @property
    def budget_tokens(self) -> int:
        return self.topk_pages * self.page_size

    @property
    def tail_pages(self) -> int:
        """Most pages a stable head can create between two reranks (they stay resident until the next)."""
        return math.ceil(self.rerank_interval / self.page_size)

    @property
    def resident_slots(self) -> int:
        """GPU page slots per stable head: its top-K, the current page and the tail since the last rerank."""
        return self.topk_pages + 1 + self.tail_pages
