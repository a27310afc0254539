"""FlexiCacheConfig: the method's knobs, validated once at construction."""

from __future__ import annotations

import dataclasses
import math


# The accepted sketch widths and rankings: the config checks them, the command lines offer them.
SKETCH_BITS = (0, 1, 2, 4)
SKETCH_SCORES = ("mass", "max")


@dataclasses.dataclass(frozen=True)
class FlexiCacheConfig:
    """Knobs of FlexiCache. Defaults are the paper's (REFERENCE.md section 2).

    Args:
        page_size: tokens per page; a positive power of two.
        topk_pages: pages each head attends to at decode (besides the current page and the tail).
        rerank_interval: stable heads re-select their pages every this many decode steps.
        host_headroom_pages: extra pages reserved (GPU buffers and pinned host pool) beyond the first
            forward's tokens, so that decoding grows them rarely (they still grow on demand, by doubling;
            nothing is dropped).
        max_cache_len: the most tokens a sequence will hold (prompt + new tokens), if known: the buffers and
            the pinned host pool are then sized once, at the first forward. With chunked prefill this avoids
            growing (and re-pinning) them chunk after chunk. None: first forward + host_headroom_pages.
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
    """

    page_size: int = 16
    topk_pages: int = 64
    rerank_interval: int = 16
    host_headroom_pages: int = 128
    max_cache_len: int | None = None
    calibration_steps: int = 32
    auto_unstable: float = 0.25
    score_spread: float = 1.0
    sketch_bits: int = 0
    sketch_score: str = "mass"
    use_kernels: bool | str = "auto"

    def __post_init__(self):
        def bad(name, value, rule):
            raise ValueError(f"FlexiCacheConfig.{name}={value!r} is invalid: {rule}")

        for name in ("page_size", "topk_pages", "rerank_interval", "host_headroom_pages", "calibration_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                bad(name, value, "it must be an int")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            bad("page_size", self.page_size, "it must be a positive power of two, e.g. 16")
        if self.topk_pages < 1:
            bad("topk_pages", self.topk_pages, "it must be >= 1, e.g. 64 (a 1024-token budget with 16-token pages)")
        if self.rerank_interval < 1:
            bad("rerank_interval", self.rerank_interval, "it must be >= 1 (1 re-ranks stable heads every step)")
        if self.host_headroom_pages < 0:
            bad("host_headroom_pages", self.host_headroom_pages, "it must be >= 0")
        if self.max_cache_len is not None and (isinstance(self.max_cache_len, bool) or not isinstance(self.max_cache_len, int)
                                               or self.max_cache_len < 1):
            bad("max_cache_len", self.max_cache_len, "give the prompt + new tokens per sequence (an int >= 1), or None")
        if self.calibration_steps < 16:
            bad("calibration_steps", self.calibration_steps, "it must be >= 16 (stability is measured over 16-step chunks), e.g. 32")
        if isinstance(self.auto_unstable, bool) or not (0 < self.auto_unstable <= 1 or float(self.auto_unstable).is_integer()):
            bad("auto_unstable", self.auto_unstable, "give a fraction in (0, 1], e.g. 0.25, or a head count")
        if isinstance(self.score_spread, bool) or not isinstance(self.score_spread, (int, float)) or not 0 <= self.score_spread <= 1:
            bad("score_spread", self.score_spread, "give a number in [0, 1]: 1.0 is the MinMax bound (the default)")
        if not isinstance(self.sketch_bits, int) or isinstance(self.sketch_bits, bool) or self.sketch_bits not in SKETCH_BITS:
            bad("sketch_bits", self.sketch_bits, "use 0 (MinMax bound only), 1, 2 or 4 bits per key channel")
        if self.sketch_bits and self.score_spread != 1.0:
            bad("score_spread", self.score_spread, "it shapes the MinMax bound, which sketch_bits replaces; "
                "leave score_spread at 1.0 when sketch_bits > 0")
        if self.sketch_score not in SKETCH_SCORES:
            bad("sketch_score", self.sketch_score, 'use "mass" (rank pages by predicted attention mass) or "max" '
                "(by the best sketched q.k)")
        if self.use_kernels not in ("auto", True, False):
            bad("use_kernels", self.use_kernels, 'use "auto", True or False')

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
