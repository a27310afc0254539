"""Accuracy-retention harness (installed as flexicache_hf.eval)."""
