"""Shipped head profiles (JSON), installed as package data of flexicache_hf.shipped_profiles."""
