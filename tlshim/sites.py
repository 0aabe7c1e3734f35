"""Sites: the HF modules whose forward tlshim wraps, only while one of their hook points holds a hook.

An idle installed model has no wrapper at all, so it runs the model's own forward at native speed.
A site wraps the instance's ``forward`` through its ``__dict__`` (over an accelerate wrapper if one is
there) and gives exactly that entry back when its last hook point goes idle.
"""

from __future__ import annotations

import contextvars

import torch

from . import checkpointing
from ._wrapt import wrap_callable
from .errors import ConflictError

_MISSING = object()
#: {LayerSite: _LayerCall} of the decoder-layer forwards of this thread / task that carry a resid_mid hook
_LAYER_CALLS: contextvars.ContextVar = contextvars.ContextVar("tlshim_layer_calls", default={})


def split_heads(tensor, n_heads):
    return tensor.view(*tensor.shape[:-1], n_heads, tensor.shape[-1] // n_heads)


def fire_points(points, tensor):
    """Fire each active (HookPoint, n_heads) in turn; n_heads views the last axis as heads."""
    for point, n_heads in points:
        if point.active:
            if n_heads is None:
                tensor = point.fire(tensor)
            else:
                tensor = point.fire(split_heads(tensor, n_heads)).reshape(tensor.shape)
    return tensor


def first_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def with_first_input(args, kwargs, value):
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def with_first_output(out, value):
    """``out`` with ``value`` first; a list stays a list (OpenAI GPT's blocks return one)."""
    if isinstance(out, list):
        return [value, *out[1:]]
    return (value, *out[1:]) if isinstance(out, tuple) else value


class Site:
    """One module's forward, wrapped while any hook point that needs it is active.

    in_points fire on the module's first input, out_points on its first output, in order.
    """

    def __init__(self, module, path: str):
        self.module = module
        self.path = path
        self.in_points: list = []
        self.out_points: list = []
        self._users = 0
        self._wrapper = None
        self._saved = _MISSING

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r}, users={self._users})"

    #: inside a decoder layer: (that layer, its LayerSite) and (the module holding the layers, None), whose
    #: checkpoint functions replay this thread's hooks when a checkpointed layer is recomputed (checkpointing.py)
    checkpoint_owners = ()

    #: a float the block multiplies this module's output by before adding it (Granite's residual_multiplier):
    #: the out points fire on that product, what is added (fire_scaled); None: on the output itself
    factor = None

    #: re-finds the module by path at each first acquire (set by the planner), so a module that
    #: peft swapped in (a LoRA layer around the original) is the one wrapped and its output is seen
    locate = None

    def acquire(self):
        if self._users == 0:
            if self.locate is not None:
                self.module = self.locate()
            entries = self.module.__dict__
            # accelerate's hook calls module._old_forward between loading offloaded weights and
            # putting them back: wrapping there lets a hook (and hook_result) see the live weights
            self._slot = "_old_forward" if "_hf_hook" in entries and "_old_forward" in entries else "forward"
            self._saved = entries.get(self._slot, _MISSING)
            self._wrapper = wrap_callable(getattr(self.module, self._slot), self)
            entries[self._slot] = self._wrapper
            for owner, layer_site in self.checkpoint_owners:
                if checkpointing.ATTR in owner.__dict__:
                    checkpointing.hold(owner, layer_site)
        self._users += 1

    def release(self):
        self._users -= 1
        if self._users == 0:
            for owner, _ in self.checkpoint_owners:
                if checkpointing.ATTR in owner.__dict__:
                    checkpointing.let_go(owner)
            entries = self.module.__dict__
            # accelerate moves what it finds in forward to _old_forward when it adds its hook (and back
            # when it removes it): while a hook was live, the wrapper may sit in the other slot
            slot = next((name for name in (self._slot, "_old_forward", "forward") if entries.get(name) is self._wrapper), None)
            if slot is None:
                found = entries.get(self._slot)
                self._wrapper, self._saved = None, _MISSING
                raise ConflictError(
                    f"{self.path}.{self._slot} was replaced by something else while tlshim had it wrapped "
                    f"(found {type(found).__name__} {getattr(found, '__qualname__', '')}); "
                    "remove that patch first, then tlshim's hooks"
                )
            saved = self._saved
            if saved is _MISSING and slot != "forward":  # accelerate calls _old_forward: keep one there
                saved = type(self.module).forward.__get__(self.module)
            if saved is _MISSING:
                del entries[slot]
            else:
                entries[slot] = saved
            self._wrapper, self._saved = None, _MISSING

    def copy_error(self):
        return TypeError(
            f"{self.path}.forward is wrapped by tlshim while a hook is active on it; deepcopy, pickle or "
            "torch.save the model when no hook is active (outside run_with_hooks / run_with_cache / hooks(), "
            "and after reset_hooks(including_permanent=True) for hooks added with add_hook)"
        )

    def conflict(self) -> str | None:
        """While wrapped: a description of what replaced tlshim's wrapper, if something did."""
        if not self.wrapped:
            return None
        entries = self.module.__dict__
        if any(entries.get(name) is self._wrapper for name in (self._slot, "_old_forward", "forward")):
            return None
        return f"{self.path}.{self._slot} (tlshim's hook wrapper, now {type(entries.get(self._slot)).__name__})"

    @property
    def wrapped(self) -> bool:
        return self._users > 0

    #: fired after in_points on a copy of the input (hook_mlp_in): an edit reaches the module, not the residual
    copy_points = ()

    def __call__(self, wrapped, instance, args, kwargs):
        if self.in_points or self.copy_points:
            x = first_input(args, kwargs)
            x = self.on_input(x)
            args, kwargs = with_first_input(args, kwargs, x)
        out = self.call(wrapped, args, kwargs)
        if self.out_points:
            out = with_first_output(out, self.on_output(first_output(out)))
        return out

    def on_input(self, x):
        return fire_points(self.in_points, x)

    def on_output(self, y):
        if self.factor is not None:  # a sub-layer the block adds times a float: its points see the product
            return fire_scaled(self.out_points, y, self.factor)[0]
        return fire_points(self.out_points, y)

    def call(self, wrapped, args, kwargs):
        return wrapped(*args, **kwargs)


class SplitSite(Site):
    """A fused projection (OpenELM's qkv_proj and proj_1): each out point fires on its slice of the
    output's last axis, and the slices are put back together for what runs downstream."""

    #: the attention's clip_qkv (DBRX, MPT): the points see the output clamped, as the model uses it
    clip = None

    def __init__(self, module, path):
        super().__init__(module, path)
        self.widths: list = []

    def add(self, point, n_heads, width):
        self.out_points.append((point, n_heads))
        self.widths.append(width)

    def on_output(self, y):
        if self.clip is not None:
            y = y.clamp(min=-self.clip, max=self.clip)
        parts = list(y.split(self.widths, dim=-1))
        for i, entry in enumerate(self.out_points):
            parts[i] = fire_points([entry], parts[i])
        return torch.cat(parts, dim=-1)


class HeadsFirstSite(Site):
    """A module whose output is (batch, heads, pos, d_head); its points fire as (batch, pos, heads, d_head)."""

    def on_output(self, y):
        return fire_points(self.out_points, y.transpose(1, 2)).transpose(1, 2)


class RotarySite(Site):
    """A rotary module returning rotated (query, key), both (batch, heads, pos, d_head), the keys
    over every position (cached and new): rot_q fires on the query, rot_k on the new keys."""

    rot_q = rot_k = None

    def call(self, wrapped, args, kwargs):
        query, key = wrapped(*args, **kwargs)
        query = fire_points([(self.rot_q, None)], query.transpose(1, 2)).transpose(1, 2)
        if self.rot_k.active:
            n_new = query.shape[2]
            new = fire_points([(self.rot_k, None)], key[:, :, -n_new:].transpose(1, 2)).transpose(1, 2)
            key = torch.cat([key[:, :, :-n_new], new], dim=2)
        return query, key


class _LayerCall:
    __slots__ = ("mid", "mlp_out", "before")

    def __init__(self):
        self.mid = self.mlp_out = self.before = None


class LayerSite(Site):
    """A decoder layer: resid_pre on its input, resid_post on its output.

    An edit of resid_mid (fired at the pre-MLP norm's input) must also reach the residual branch the
    layer adds the MLP output to; the layer's output is then rebuilt as ``edited_mid + mlp_out``,
    the very addition the layer does, so the result is what the model would have computed. Those two
    values belong to one call of the layer (a context variable), never to the shared site.
    """

    mid_point = None
    #: the name of a one-element tensor of the layer its output is multiplied by (Gemma 4), or None
    scalar = None
    #: whether a sub-layer after the MLP reads resid_mid + mlp_out (Gemma 4): an edited resid_mid then
    #: reaches the residual through hook_mlp_out's value (MlpOutSite), and the model computes the rest
    tail = False

    def call(self, wrapped, args, kwargs):
        calls = _LAYER_CALLS.get()
        active = self.mid_point is not None and self.mid_point.active
        if not active and self not in calls:
            return wrapped(*args, **kwargs)
        call = _LayerCall() if active else None  # None: a nested forward of this layer (run by a hook) has none
        token = _LAYER_CALLS.set({**calls, self: call})
        try:
            out = wrapped(*args, **kwargs)
        finally:
            _LAYER_CALLS.reset(token)
        if call is not None and call.mid is not None and call.mlp_out is not None:
            total = call.mid + call.mlp_out
            if self.scalar is not None:  # in the model's own op: hidden_states *= layer_scalar
                total *= getattr(self.module, self.scalar)
            out = with_first_output(out, total)
        return out

    def current_call(self):
        return _LAYER_CALLS.get().get(self)


def fire_scaled(points, y, factor):
    """Fire the points on what is added, ``y * factor`` (the model's own product, so bit for bit); an edit
    goes back divided by the factor, for the model to multiply again (exact up to one rounding)."""
    added = y * factor
    fired = fire_points(points, added)
    return (y if fired is added else fired / factor), fired


class MlpOutSite(Site):
    """The module whose output is hook_mlp_out; hands that value to the layer for a resid_mid edit."""

    def __init__(self, module, path, layer_site):
        super().__init__(module, path)
        self.layer_site = layer_site

    def on_output(self, y):
        if self.factor is None:
            y = added = fire_points(self.out_points, y)
        else:
            y, added = fire_scaled(self.out_points, y, self.factor)
        call = self.layer_site.current_call()
        if call is not None and call.mid is not None:
            if self.layer_site.tail:  # the model adds y to the unedited resid_mid: carry the edit in y
                return y + (call.mid - call.before)
            call.mlp_out = added
        return y


def fire_mid(points, layer_site, x):
    """Fire ``points`` on x; an edited value is handed to the layer's call as its new resid_mid."""
    edited = fire_points(points, x)
    if layer_site is not None and edited is not x:
        call = layer_site.current_call()
        if call is not None:
            call.mid, call.before = edited, x
    return edited


class NormSite(Site):
    """A norm: hook_scale (the divisor it applies) and hook_normalized (its input before the weight).

    Both are computed only while hooked. Unedited, the output is the module's own; an edited scale
    or normalized value goes through the norm's weight as the model applies it (``Norm.weigh``).
    A norm without a weight (OLMo v1) fires hook_normalized on its output, which is that value.
    On the pre-MLP norm, in_points hold resid_mid and ``layer_site`` receives an edit of it.
    """

    def __init__(self, module, path, norm, scale_point, layer_site=None):
        super().__init__(module, path)
        self.norm = norm
        self.scale_point = scale_point
        self.layer_site = layer_site

    def on_input(self, x):
        return fire_points(self.copy_points, fire_mid(self.in_points, self.layer_site, x))

    def on_output(self, y):
        return y if self.norm.has_weight(self.module) else fire_points(self.out_points, y)

    def call(self, wrapped, args, kwargs):
        before_weight = self.norm.has_weight(self.module) and any(point.active for point, _ in self.out_points)
        if not (self.scale_point.active or before_weight):
            return wrapped(*args, **kwargs)
        x = first_input(args, kwargs)
        centered, var_eps = self.norm.statistics(self.module, x)
        scale = edited_scale = link = None
        if self.scale_point.active:
            scale = var_eps.sqrt()
            if needs_grad_link(self.scale_point):  # dL/d(scale) through the value divided by it
                scale = scale.detach().requires_grad_()
                link = centered.detach() / scale
            edited_scale = self.scale_point.fire(scale)
        if edited_scale is not scale:  # an edited divisor: the output follows from it
            normalized = centered / edited_scale
            edited = fire_points(self.out_points, normalized) if before_weight else normalized
            return self.norm.weigh(self.module, edited, x.dtype)
        if before_weight:
            normalized = self.norm.normalize(centered, var_eps)
            normalized = normalized if link is None else with_grad_link(normalized, link)
            edited = fire_points(self.out_points, normalized)
            if edited is not normalized or any(point.bwd_hooks for point, _ in self.out_points):
                return self.norm.weigh(self.module, edited, x.dtype)
        out = wrapped(*args, **kwargs)  # nothing edited: the module's own output
        return out if link is None else with_grad_link(out, self.norm.weigh(self.module, link, x.dtype, detach_params=True))


class OutProjSite(Site):
    """The attention output projection: hook_z on its input, hook_result (per-head outputs) when hooked."""

    def __init__(self, module, path, result_point, n_heads, weight_fn):
        super().__init__(module, path)
        self.result_point = result_point
        self.n_heads = n_heads
        self.weight_fn = weight_fn

    def call(self, wrapped, args, kwargs):
        if not self.result_point.active:
            return wrapped(*args, **kwargs)
        z = split_heads(first_input(args, kwargs), self.n_heads)
        weight, bias = self.weight_fn()
        grad_link = needs_grad_link(self.result_point)
        if grad_link:
            z, weight = z.detach(), weight.detach()
        w_o = weight.T.reshape(self.n_heads, -1, weight.shape[0])
        result = torch.matmul(z.transpose(-2, -3), w_o).transpose(-2, -3)
        if grad_link:
            result.requires_grad_()
        edited = self.result_point.fire(result)
        if edited is not result:
            out = edited.sum(-2)
            return out if bias is None else out + bias
        out = wrapped(*args, **kwargs)
        return with_grad_link(out, result.sum(-2)) if grad_link else out


def needs_grad_link(point) -> bool:
    return bool(point.bwd_hooks) and torch.is_grad_enabled()


def with_grad_link(native, side):
    """``native`` unchanged in value (it adds an exact zero), but with ``side``'s graph attached.

    A side value (hook_scale, hook_result) computed from detached inputs is thereby in the graph, so
    its backward hooks receive dL/d(side), while every other gradient stays exactly the model's own.
    """
    return native + (side - side.detach()).to(native.dtype)
