"""What differs between the transformers versions we support (>= 5.17, < 6), decided in one place.

transformers 5.24 renamed the cache keyword of `generate()` and of model forwards from `past_key_values` to
`cache` (the old name warns from 5.24 and leaves model forwards at 5.40). Our own calls pass the name the
installed version prefers; code that receives a call's keywords accepts either.
"""

from __future__ import annotations

import transformers
from packaging.version import Version

TRANSFORMERS = Version(transformers.__version__)
CACHE_KWARG = "cache" if TRANSFORMERS >= Version("5.24.0.dev0") else "past_key_values"
CACHE_KWARGS = ("cache", "past_key_values")


def cache_kwargs(cache) -> dict:
    """`{name: cache}` under the keyword the installed transformers prefers, for generate() and forward()."""
    return {CACHE_KWARG: cache}


def find_cache(kwargs: dict):
    """The cache a generate()/forward() call's keywords carry, under either name (None if none)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(output):
    """The cache a model output carries: `.cache` from 5.24, `.past_key_values` before."""
    for name in CACHE_KWARGS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None
