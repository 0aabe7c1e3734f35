"""Every use of wrapt in tlshim lives here (wrapt 2.0 renamed the proxy base)."""

import wrapt

ObjectProxy = getattr(wrapt, "BaseObjectProxy", None) or wrapt.ObjectProxy


def wrap_callable(wrapped, wrapper):
    """A wrapt FunctionWrapper: ``wrapper(wrapped, instance, args, kwargs)`` runs instead of ``wrapped``."""
    return wrapt.FunctionWrapper(wrapped, wrapper)


def is_wrapper(obj) -> bool:
    return isinstance(obj, wrapt.FunctionWrapper)


def wrap_attribute(owner, name, wrapper):
    """Replace ``owner.<name>`` (an entry of ``vars(owner)``: a function, classmethod, ...) by a
    FunctionWrapper around it; returns the original, which ``setattr(owner, name, original)`` puts back."""
    original = vars(owner)[name]
    setattr(owner, name, wrapt.FunctionWrapper(original, wrapper))
    return original
