"""Per-instance subclasses: how weight properties reach a live module without touching its class.

The subclass keeps the original class's name, module and qualname (so ``save_pretrained`` writes the
same ``architectures`` and remote code is found as before) and pickles by rebuilding itself.
"""

from __future__ import annotations


def patched_class(base: type, mixin: type, spec) -> type:
    namespace = {
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__reduce_ex__": _reduce_patched,
        "_tlshim_base": base,
        "_tlshim_mixin": mixin,
        "_tlshim_spec": spec,
    }
    if hasattr(mixin, "_tlshim_overrides"):  # methods that must come before the base class's (ModelAPI's __call__)
        namespace.update(mixin._tlshim_overrides(base))
    return type(base.__name__, (base, mixin), namespace)


def _reduce_patched(self, protocol):
    cls = type(self)
    return _rebuild_patched, (cls._tlshim_base, cls._tlshim_mixin, cls._tlshim_spec), dict(vars(self))


def _rebuild_patched(base, mixin, spec):
    cls = patched_class(base, mixin, spec)
    return cls.__new__(cls)
