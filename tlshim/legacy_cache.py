"""The v4 KV-cache API that v4-era remote code (OpenELM) calls, on every transformers version.

Such code converts every cache it is handed with ``DynamicCache.from_legacy_cache`` and hands back
``to_legacy_cache()`` (both gone in 5.0, OPENELM.md P7; from 4.56 ``from_legacy_cache`` cannot copy the
cache ``generate`` builds with empty layers); its ``prepare_inputs_for_generation`` reads
``cache.seen_tokens`` (gone in 4.54) and ``cache.get_max_length()`` (gone in 4.49, back in 5.x with
-1 for "no maximum" where v4 said None, which that code would take as a length and cut the
attention mask with). ``tlshim.loading.finish_loading`` gives the remote code's own module
``LegacyDynamicCache`` as its ``DynamicCache`` (never transformers' class) and hands its
``prepare_inputs_for_generation`` the cache as a ``V4CacheView``.

Cache objects are kept, never converted: ``from_legacy_cache`` of a cache is that cache, and
``to_legacy_cache()`` returns the cache object itself (v5 has no legacy format), which ``generate``
then carries to the next step; a legacy tuple handed in is read into a new cache.
"""

from __future__ import annotations

from transformers.cache_utils import Cache, DynamicCache

from ._wrapt import ObjectProxy


class V4CacheView(ObjectProxy):
    """A transformers cache, answering the v4 calls with their v4 meanings."""

    @property
    def seen_tokens(self) -> int:
        return self.__wrapped__.get_seq_length()

    def get_max_length(self):
        """The cache's capacity, None when unbounded (a dynamic cache)."""
        cache = self.__wrapped__
        read = getattr(cache, "get_max_cache_shape", None) or cache.get_max_length
        value = read()
        return None if value is None or value < 0 else value

    def to_legacy_cache(self):
        return self.__wrapped__


def v4_cache(cache):
    """``cache`` with the v4 API (a Cache not already viewed gets a ``V4CacheView``; anything else as is)."""
    if isinstance(cache, Cache) and type(cache) is not V4CacheView:
        return V4CacheView(cache)
    return cache


class LegacyDynamicCache(DynamicCache):
    """``DynamicCache`` as v4-era remote code names it: ``from_legacy_cache`` takes None, a legacy tuple
    of per-layer ``(keys, values)``, or a cache object (kept, not copied)."""

    @classmethod
    def from_legacy_cache(cls, past_key_values=None):
        if isinstance(past_key_values, Cache):
            return v4_cache(past_key_values)
        cache = DynamicCache()
        for layer_idx, (keys, values) in enumerate(past_key_values or ()):
            cache.update(keys, values, layer_idx)
        return V4CacheView(cache)
