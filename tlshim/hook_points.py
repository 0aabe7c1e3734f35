"""HookPoint: one named place in the model's own forward where hook functions see the activation.

Who sees a hook: one added with ``add_hook`` is model-wide (every thread's forwards fire it, as in
TransformerLens); hooks added by ``run_with_cache``, ``run_with_hooks`` and ``hooks()`` are scoped to
the calling thread and asyncio task (a context variable), so concurrent calls on one model each get
what they would get alone. A module's forward is wrapped while any thread holds a hook on one of its
points; the wrapper fires only the hooks the calling thread may see.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import re
import threading

import torch

from .errors import HookOutputError, HookShapeError

_LAYER = re.compile(r"^blocks\.(\d+)\.")
_ORDER = itertools.count(1)
#: {HookPoint: (Hook, ...)} of the calling thread / task; replaced, never changed in place, so a task
#: that copied the context (asyncio, ``asyncio.to_thread``) keeps the hooks it saw when it started
_SCOPED: contextvars.ContextVar = contextvars.ContextVar("tlshim_scoped_hooks", default={})
#: the scope a hook function runs in: no hook is active inside it (the key None hides model-wide
#: hooks), so a forward of the same model run by a hook is a plain one unless it adds its own hooks
_INSIDE_HOOK = {None: ()}
#: guards each point's registration count and the wrapping and unwrapping of module forwards
LOCK = threading.RLock()
#: (batch, pos) of the running decoder layer that works on (batch * pos, d) rows (OPT's MLP), while hooked:
#: a point there fires as (batch, pos, ...), as its name says
ROWS: contextvars.ContextVar = contextvars.ContextVar("tlshim_rows", default=None)


class Hook:
    """One registration of a hook function; removing it removes exactly this one (TransformerLens's LensHandle)."""

    __slots__ = ("point", "fn", "dir", "permanent", "scoped", "order", "removed", "source")

    def __init__(self, point, fn, dir="fwd", permanent=False, prepend=False, scoped=False, source=None, order=None):
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        if not callable(fn):
            raise TypeError(
                f"the hook for {point.name} must be a function fn(tensor, hook) returning None or a tensor, "
                f"got {type(fn).__name__} {fn!r:.60}"
            )
        self.point, self.fn, self.dir, self.permanent, self.scoped = point, fn, dir, permanent, scoped
        self.order = order if order is not None else -next(_ORDER) if prepend else next(_ORDER)
        self.removed = False
        self.source = source  # the original a replayed copy (gradient checkpointing) answers for

    def __repr__(self):
        return f"Hook({self.point.name!r}, {getattr(self.fn, '__name__', self.fn)!r}, {self.dir!r})"

    def remove(self):
        remove_all([self])


class HookPoint:
    """A named activation. ``fn(tensor, hook)`` returns None or a same-shaped replacement.

    Not an nn.Module: it lives in its module's ``__dict__`` so named_modules and state_dict stay as they are.
    Its sites (the module wrappers that fire it) are switched on only while it holds a hook.
    """

    def __init__(self, name: str, sites=()):
        self.name = name
        self.ctx: dict = {}
        self._hooks: tuple = ()  # model-wide registrations, in firing order (replaced, never changed in place)
        self._count = 0  # registrations anywhere: model-wide and every thread's scoped ones
        self._sites = tuple(sites)

    def __repr__(self):
        return f"HookPoint({self.name!r})"

    def __getstate__(self):
        if self._count:
            raise TypeError(
                f"{self.name} holds hooks; deepcopy, pickle or torch.save the model when no hook is active "
                "(outside run_with_hooks / run_with_cache / hooks(), after reset_hooks(including_permanent=True))"
            )
        return dict(vars(self))

    def layer(self) -> int:
        match = _LAYER.match(self.name)
        if match is None:
            raise ValueError(f"{self.name} is not inside a block, so it has no layer index")
        return int(match.group(1))

    @property
    def active(self) -> bool:
        """Whether a hook fires here for the calling thread / task."""
        scoped = _SCOPED.get()
        return self in scoped or (bool(self._hooks) and None not in scoped)

    def _visible(self):
        """The hooks that fire here for the calling thread / task: model-wide and its own, in the order
        added (removed ones may still be listed: a scoped hook removed from another context)."""
        current = _SCOPED.get()
        scoped, shared = current.get(self, ()), () if None in current else self._hooks
        return sorted((*shared, *scoped), key=_order) if scoped and shared else scoped or shared

    def registrations(self, dir: str = "both") -> list:
        """The live hooks of direction ``dir`` that fire here for the calling thread / task."""
        return [hook for hook in self._visible() if dir in (hook.dir, "both") and not hook.removed]

    @property
    def fwd_hooks(self) -> list:
        return self.registrations("fwd")

    @property
    def bwd_hooks(self) -> list:
        return self.registrations("bwd")

    def add_hook(self, fn, dir: str = "fwd", is_permanent: bool = False, prepend: bool = False) -> Hook:
        """A model-wide hook (fires in every thread's forwards) until removed or reset."""
        hook = Hook(self, fn, dir, is_permanent, prepend)
        with LOCK:
            self._acquire()
            self._hooks = _inserted(self._hooks, hook)
        return hook

    def remove_hooks(self, dir: str = "both", including_permanent: bool = False):
        """Remove this point's model-wide hooks and the calling thread's own of direction ``dir``
        (permanent ones only with ``including_permanent``)."""
        remove_all([hook for hook in self.registrations(dir) if including_permanent or not hook.permanent])

    def remove_hook(self, fn, dir: str = "fwd"):
        """Remove the first registration of ``fn`` visible here (a no-op if there is none)."""
        remove_all([hook for hook in self.registrations(dir) if hook.fn is fn][:1])

    def clear_context(self):
        self.ctx = {}

    def _acquire(self):
        if self._count == 0:
            done = []
            try:
                for site in self._sites:
                    site.acquire()
                    done.append(site)
            except BaseException:
                for site in reversed(done):
                    site.release()
                raise
        self._count += 1

    def _release(self):
        self._count -= 1
        if self._count == 0:
            _all(self._sites, "release")

    def fire(self, tensor):
        """Run the forward hooks on ``tensor``; returns what flows on downstream."""
        rows = ROWS.get()
        if rows is not None and tensor.dim() == 2 and tensor.shape[0] == rows[0] * rows[1]:
            view = tensor.view(*rows, -1)
            out = self.fire(view)
            return tensor if out is view else out.reshape(tensor.shape)
        backward = []
        for hook in self._visible():
            if hook.removed:
                continue
            if hook.dir == "bwd":
                backward.append(hook)
                continue
            out = _call(hook, tensor, self)
            if out is not None:
                tensor = _checked(hook, out, tensor, "returned")
        if backward and tensor.requires_grad:
            # the backward hooks active in this forward, still registered when the gradient arrives
            tensor.register_hook(functools.partial(_run_backward, self, backward))
        return tensor


def _run_backward(point, hooks, grad):
    for hook in hooks:
        if (hook.source or hook).removed:
            continue
        out = _call(hook, grad, point)
        if out is not None:
            grad = _checked(hook, out, grad, "returned as gradient")
    return grad


def _call(hook, tensor, point):
    """Run one hook function with every hook inactive (a forward it runs is not hooked by its caller's hooks)."""
    if getattr(hook.fn, "sees_caller_hooks", False):  # an SAE splice fires its stages' hooks (tlshim.saes)
        return hook.fn(tensor, hook=point)
    token = _SCOPED.set(_INSIDE_HOOK)
    try:
        return hook.fn(tensor, hook=point)
    finally:
        _SCOPED.reset(token)


def _checked(hook, out, expected, verb):
    """``out`` if it can stand in for ``expected`` (a tensor of its shape, dtype and device), else a clear error."""
    fn = getattr(hook.fn, "__qualname__", None) or repr(hook.fn)
    where = f"hook {fn!r} on {hook.point.name} {verb}"
    if not torch.is_tensor(out):
        raise HookOutputError(
            f"{where} a {type(out).__name__}, expected None or a torch.Tensor of shape "
            f"{tuple(expected.shape)}, {expected.dtype}, on {expected.device}"
        )
    if out.shape != expected.shape:
        raise HookShapeError(f"{where} shape {tuple(out.shape)}, expected a tensor of shape {tuple(expected.shape)}")
    if out.dtype != expected.dtype or out.device != expected.device:
        raise HookOutputError(
            f"{where} a {out.dtype} tensor on {out.device}, expected {expected.dtype} on {expected.device} "
            f"(return value.to(tensor.dtype) or build it with torch.zeros_like(tensor))"
        )
    return out


def _order(hook):
    return hook.order


def _inserted(hooks: tuple, hook) -> tuple:
    return (hook, *hooks) if hook.order < 0 else (*hooks, hook)


def _acquire_all(hooks):
    """Switch on the sites of each hook's point (all or none)."""
    with LOCK:
        done = []
        try:
            for hook in hooks:
                hook.point._acquire()
                done.append(hook)
        except BaseException:
            _all([hook.point for hook in done], "_release")
            raise


def _merged(mapping, hooks) -> dict:
    mapping = dict(mapping)
    for hook in hooks:
        mapping[hook.point] = mapping.get(hook.point, ()) + (hook,)
    return mapping


def add_scoped(entries, prepend=False) -> list:
    """Add ``(point, fn, dir)`` hooks that fire only in the calling thread / asyncio task; returns them."""
    hooks = [Hook(point, fn, dir, prepend=prepend, scoped=True) for point, fn, dir in entries]
    _acquire_all(hooks)
    _SCOPED.set(_merged(_SCOPED.get(), hooks))
    return hooks


def scope():
    """The calling thread / task's own hooks, to replay later with ``replayed``."""
    return _SCOPED.get()


@contextlib.contextmanager
def replayed(snapshot):
    """The hooks of ``snapshot`` (a ``scope()``), active again in the calling thread for a block: a
    checkpointed layer recomputed during backward sees the hooks its forward saw, even after the
    run_with_hooks that added them has returned."""
    clones = [
        Hook(hook.point, hook.fn, hook.dir, scoped=True, source=hook.source or hook, order=hook.order)
        for point, held in snapshot.items() if point is not None for hook in held
    ]
    _acquire_all(clones)
    token = _SCOPED.set(_merged({None: ()} if None in snapshot else {}, clones))
    try:
        yield
    finally:
        _SCOPED.reset(token)
        remove_all(clones)


def remove_all(hooks):
    """Remove each registration in ``hooks`` (already removed ones are skipped). Every one is removed
    even when unwrapping a module raises; the first such error is raised afterwards."""
    with LOCK:
        live = [hook for hook in hooks if not hook.removed]
        for hook in live:
            hook.removed = True
        scoped = {id(hook) for hook in live if hook.scoped}
        if scoped:  # those of the calling context go from its mapping (others are only marked removed)
            mapping = {}
            for point, held in _SCOPED.get().items():
                kept = tuple([hook for hook in held if id(hook) not in scoped])
                if kept or point is None:
                    mapping[point] = kept
            _SCOPED.set(mapping)
        for point in {hook.point: None for hook in live if not hook.scoped}:
            point._hooks = tuple(hook for hook in point._hooks if not hook.removed)
        _all([hook.point for hook in live], "_release")


def foreign_hooks(points) -> int:
    """How many hooks on ``points`` belong to other threads or tasks (not model-wide, not the caller's)."""
    current = _SCOPED.get()
    return sum(
        point._count - len(point._hooks) - sum(not hook.removed for hook in current.get(point, ())) for point in points
    )


def _all(objects, method):
    """Call ``method`` of every object; raise the first error afterwards."""
    error = None
    for obj in objects:
        try:
            getattr(obj, method)()
        except BaseException as err:  # noqa: PERF203
            error = error or err
    if error is not None:
        raise error
