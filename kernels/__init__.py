"""Triton kernels (installed as flexicache_hf.kernels)."""
