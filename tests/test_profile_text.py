"""flexicache_hf.profile_text: the profiling corpus is CPython's own text, cut into deterministic windows."""

from __future__ import annotations

import torch

from flexicache_hf import profile_text


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_cpython_text_windows_deterministic():
    tok = _CharTokenizer()
    a = profile_text.cpython_text_windows(tok, 3, 5000, seed=7)
    b = profile_text.cpython_text_windows(tok, 3, 5000, seed=7)
    assert [w.kind for w in a] == ["prose", "code", "prose"]
    assert all(w.input_ids.shape == (5000,) for w in a)
    assert all(torch.equal(x.input_ids, y.input_ids) and x.name == y.name for x, y in zip(a, b))
    c = profile_text.cpython_text_windows(tok, 3, 5000, seed=8)
    assert any(not torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, c))
    assert profile_text.cpython_documents("prose") and profile_text.cpython_documents("code")
