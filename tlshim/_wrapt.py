"""Every use of wrapt in tlshim lives here (wrapt 2.0 renamed the proxy base)."""

import wrapt

ObjectProxy = getattr(wrapt, "BaseObjectProxy", None) or wrapt.ObjectProxy


class _Wrapper(wrapt.FunctionWrapper):
    """Copying or pickling it raises ``wrapper.copy_error()`` (wrapt's own error names no culprit)."""

    def __reduce_ex__(self, protocol):
        raise self._self_wrapper.copy_error()

    def __deepcopy__(self, memo):
        raise self._self_wrapper.copy_error()


def wrap_callable(wrapped, wrapper):
    """A wrapt FunctionWrapper: ``wrapper(wrapped, instance, args, kwargs)`` runs instead of ``wrapped``;
    ``wrapper.copy_error()`` is what copying or pickling it raises."""
    return _Wrapper(wrapped, wrapper)


def is_wrapper(obj) -> bool:
    return isinstance(obj, wrapt.FunctionWrapper)


def wrap_attribute(owner, name, wrapper):
    """Replace ``owner.<name>`` (an entry of ``vars(owner)``: a function, classmethod, ...) by a
    FunctionWrapper around it; returns the original, which ``setattr(owner, name, original)`` puts back."""
    original = vars(owner)[name]
    setattr(owner, name, wrapt.FunctionWrapper(original, wrapper))
    return original
