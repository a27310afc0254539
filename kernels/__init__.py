"""Triton kernels of the decode path (installed as ``flexicache_hf.kernels``).

Each public function has exactly the signature and semantics of its PyTorch reference in
``flexicache_hf.ops`` (``<name>_ref``); ``ops`` dispatches here for CUDA tensors. The modules import
nothing from the cache: inputs are plain tensors, page pools and index tables.
"""

AVAILABLE = False

if __name__ == "flexicache_hf.kernels":
    try:  # the kernels are optional: without Triton, ops falls back to the references
        import triton  # noqa: F401

        AVAILABLE = True
    except ImportError:  # pragma: no cover - depends on the install
        pass
# else: this folder was imported as a top-level ``kernels`` because the repo root is on sys.path
# (``python -m pytest`` from the root). transformers probes Hugging Face's ``kernels`` package by
# importing that name; staying inert here keeps the probe negative and keeps it from importing Triton
# (which must be imported after TRITON_INTERPRET is set, in the CPU tests).

if AVAILABLE:
    from .attention import paged_decode_attention
    from .copy import copy_pages
    from .summary import page_summary, summarise_page
    from .promote import plan_promotion
    from .scores import page_scores
    from .select import select_pages

__all__ = ["AVAILABLE", "page_summary", "summarise_page", "page_scores", "select_pages", "paged_decode_attention",
           "copy_pages", "plan_promotion"]
