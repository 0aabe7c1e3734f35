"""Qwen3 from 5.24: the decoder layer hands the attention module its KV cache as `cache`
(`past_key_values` before), so hook_rot_k fires, through the cache, on the new keys only."""

from dataclasses import replace

from .v4_51 import SPEC as BEFORE

SPEC = replace(BEFORE, versions=">=5.24,<6", cache_kwargs=("cache",))
