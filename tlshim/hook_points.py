"""HookPoint: one named place in the model's own forward where hook functions see the activation."""

from __future__ import annotations

import re

from .errors import HookShapeError

_LAYER = re.compile(r"^blocks\.(\d+)\.")


class HookPoint:
    """A named activation. ``fn(tensor, hook)`` returns None or a same-shaped replacement.

    Not an nn.Module: it lives in its module's ``__dict__`` so named_modules and state_dict stay as they are.
    Its sites (the module wrappers that fire it) are switched on only while it holds a hook.
    """

    def __init__(self, name: str, sites=()):
        self.name = name
        self.ctx: dict = {}
        self.fwd_hooks: list = []
        self.bwd_hooks: list = []
        self._permanent: set = set()
        self._sites = tuple(sites)

    def __repr__(self):
        return f"HookPoint({self.name!r})"

    def layer(self) -> int:
        match = _LAYER.match(self.name)
        if match is None:
            raise ValueError(f"{self.name} is not inside a block, so it has no layer index")
        return int(match.group(1))

    @property
    def active(self) -> bool:
        return bool(self.fwd_hooks or self.bwd_hooks)

    def add_hook(self, fn, dir: str = "fwd", is_permanent: bool = False, prepend: bool = False):
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        was_active = self.active
        hooks = self.fwd_hooks if dir == "fwd" else self.bwd_hooks
        hooks.insert(0, fn) if prepend else hooks.append(fn)
        if is_permanent:
            self._permanent.add(id(fn))
        if not was_active:
            for site in self._sites:
                site.acquire()

    def remove_hooks(self, dir: str = "both", including_permanent: bool = False):
        was_active = self.active
        for kind in ("fwd", "bwd"):
            if dir in (kind, "both"):
                hooks = self.fwd_hooks if kind == "fwd" else self.bwd_hooks
                hooks[:] = [fn for fn in hooks if not including_permanent and id(fn) in self._permanent]
        if including_permanent:
            self._permanent.clear()
        if was_active and not self.active:
            for site in self._sites:
                site.release()

    def remove_hook(self, fn, dir: str = "fwd"):
        """Remove one hook function added with add_hook (a no-op if it is gone already)."""
        was_active = self.active
        hooks = self.fwd_hooks if dir == "fwd" else self.bwd_hooks
        for i, held in enumerate(hooks):
            if held is fn:
                del hooks[i]
                break
        if was_active and not self.active:
            for site in self._sites:
                site.release()

    def clear_context(self):
        self.ctx = {}

    def fire(self, tensor):
        """Run the forward hooks on ``tensor``; returns what flows on downstream."""
        for fn in self.fwd_hooks:
            out = fn(tensor, hook=self)
            if out is not None:
                if not hasattr(out, "shape") or out.shape != tensor.shape:
                    found = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
                    raise HookShapeError(
                        f"hook {getattr(fn, '__name__', fn)!r} on {self.name} returned {found}, "
                        f"expected a tensor of shape {tuple(tensor.shape)}"
                    )
                tensor = out
        if self.bwd_hooks and tensor.requires_grad:
            tensor.register_hook(self._run_backward)
        return tensor

    def _run_backward(self, grad):
        for fn in self.bwd_hooks:
            out = fn(grad, hook=self)
            if out is not None:
                if out.shape != grad.shape:
                    raise HookShapeError(
                        f"backward hook on {self.name} returned shape {tuple(out.shape)}, "
                        f"expected {tuple(grad.shape)}"
                    )
                grad = out
        return grad
