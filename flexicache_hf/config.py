"""FlexiCacheConfig: the method's knobs, validated once at construction."""

from __future__ import annotations

import dataclasses
import math
import numbers


# The accepted sketch widths and rankings: the config checks them, the command lines offer them.
SKETCH_BITS = (0, 1, 2, 4)
SKETCH_SCORES = ("mass", "max")
# The default scorer: 2-bit key sketches ranked by the attention mass they predict (docs/method.md, "Key
# sketches"). The paper's MinMax bound alone (sketch_bits=0, or scorer=MinMaxBound()) keeps far less of
# dense's accuracy on the small models we can run (docs/accuracy.md).
DEFAULT_SKETCH_BITS = 2
# Upper bounds of the knobs (tokens per sequence: 16M; pages of 256 tokens; a rerank at least every 4096 steps)
MAX_TOKENS = 1 << 24
MAX_PAGES = MAX_TOKENS
MAX_PAGE_SIZE = 256
MAX_RERANK_INTERVAL = 4096
MAX_WARMUP_STEPS = 4096


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
        warmup_steps: during this many decode steps after a prefill (any multi-token forward), stable heads
            re-select at every step with immediate effect (the new pages are copied up before the step's
            attention, as at the first step); after them, the periodic rerank every rerank_interval steps.
            At tight budgets the heads that copy an answer need its page only once the answer starts, after
            the first step's selection (docs/accuracy.md, "Tight budgets", "Warm-up"). 0: select at the first
            step only.
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
        scorer: how pages are summarised when they fill and ranked for a query (flexicache_hf.scorers):
            SketchMass(2), the default: every token's key kept at 2 bits per channel inside its page's
            min/max box, pages ranked by the attention mass the sketched keys predict (each query head's
            softmax over the candidates, summed over the GQA group). SketchMax(bits): ranked by the best
            sketched q.k. MinMaxBound(spread): the paper's (Quest's) bound from kmin/kmax alone, for
            reproduction. Also by name: "sketch_mass", "sketch_max", "minmax". Why the sketch is the default
            and what it costs (1/16 of the page K/V bytes more metadata at 2 bits, a few % of decode time):
            docs/method.md, "Key sketches", and docs/accuracy.md.
        sketch_bits, sketch_score, score_spread: a shorthand for the scorer, when `scorer` is not given:
            sketch_bits 1, 2 or 4 -> SketchMass(bits) (sketch_score "mass") or SketchMax(bits) ("max");
            sketch_bits 0, or score_spread alone -> MinMaxBound(score_spread or 1.0). Nothing: SketchMass(2).
            Key sketches need head_dim * bits divisible by 8. After construction both fields describe the
            scorer in use.
        use_kernels: "auto" uses the Triton kernels on CUDA tensors and the PyTorch references
            elsewhere; True forces kernels (error if unavailable); False forces the references.
        scorer: how pages are summarised and ranked, an object: MinMaxBound(spread), SketchMax(bits) or
            SketchMass(bits) (flexicache_hf.scorers), or its name ("minmax", "sketch_max", "sketch_mass").
            None: built from the shorthand above (sketch_bits, sketch_score, score_spread).
    """

    page_size: int = 16
    topk_pages: int = 64
    rerank_interval: int = 16
    warmup_steps: int = 16
    host_headroom_pages: int = 16
    max_cache_len: int | None = None
    calibration_steps: int = 32
    auto_unstable: float | int = 0.25
    score_spread: float | None = None
    sketch_bits: int | None = None
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
            ("warmup_steps", 0, MAX_WARMUP_STEPS, "e.g. 16 (0: stable heads select at the first decode step only, "
             "then every rerank_interval steps)"),
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
        spread, bits = self.score_spread, self.sketch_bits
        if spread is not None and (isinstance(spread, bool) or not isinstance(spread, numbers.Real) or not 0 <= spread <= 1):
            bad("score_spread", spread, "give a number in [0, 1]: 1.0 is the MinMax bound")
        if bits is not None and (not _is_int(bits) or bits not in SKETCH_BITS):
            bad("sketch_bits", bits, "use 0 (MinMax bound only), 1, 2 or 4 bits per key channel")
        if bits and spread not in (None, 1.0):
            bad("score_spread", spread, "it shapes the MinMax bound, which sketch_bits replaces; "
                "leave score_spread unset when sketch_bits > 0")
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
        from flexicache_hf.scorers import SCORERS, MinMaxBound, SketchMass, SketchMax

        scorer, bits = self.scorer, self.sketch_bits
        if scorer is None:
            if bits is None:  # score_spread alone names the bound; nothing names the default
                bits = 0 if self.score_spread is not None else DEFAULT_SKETCH_BITS
            if not bits:
                scorer = MinMaxBound(float(1.0 if self.score_spread is None else self.score_spread))
            else:
                scorer = (SketchMass if self.sketch_score == "mass" else SketchMax)(bits)
        elif (self.sketch_bits, self.score_spread, self.sketch_score) != (None, None, "mass"):
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
        object.__setattr__(self, "score_spread", getattr(scorer, "spread", 1.0))
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
