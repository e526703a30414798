"""Moved to :mod:`segmask.serving.prefix_cache`; this path keeps working for one release."""

import warnings

from segmask.serving.prefix_cache import (
    Entry,
    Hit,
    PrefixCache,
    cache_nbytes,
    sliced,
    stack_left_padded,
    whole_segments_length,
)

warnings.warn("segmask.prefix_cache moved to segmask.serving.prefix_cache", DeprecationWarning, stacklevel=2)

__all__ = [
    "Entry",
    "Hit",
    "PrefixCache",
    "cache_nbytes",
    "sliced",
    "stack_left_padded",
    "whole_segments_length",
]
