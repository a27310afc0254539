"""The README's snippet runs as written (a tiny model stands in for `name`), and on transformers >= 5.24 no
FutureWarning comes from it: it passes the cache as `cache=` there."""

import re
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny_pair
from flexicache_hf.compat import CACHE_KWARG


def test_readme_snippet_runs_without_future_warnings(tmp_path):
    if CACHE_KWARG != "cache":
        pytest.skip("the snippet's cache= needs transformers >= 5.24 (past_key_values= below, as it says)")
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"```python\n(import flexicache_hf.*?)```", text, re.S).group(1)
    _, fc = tiny_pair()
    fc.save_pretrained(tmp_path)
    scope = {"name": str(tmp_path), "ids": torch.randint(1, 256, (1, 40)), "layer": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        exec(compile(snippet.replace("max_new_tokens=512", "max_new_tokens=8"), "README.md", "exec"), scope)
    assert scope["out"].shape == (1, 48)
    assert scope["cache"].get_seq_length() == 47
