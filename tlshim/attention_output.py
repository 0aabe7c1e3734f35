"""What an attention does between its kernel and o_proj: an output gate, a sub-norm, or both
(BitNet's attn_sub_norm; Laguna's and Qwen3-Next's gates, computed from the block input).

The names keep HOOKS.md's meanings: hook_z is the kernel output, pattern @ v, fired as the kernel
returns it (tlshim's attention function, so only registry attentions are served). Then:
- attn.hook_gate (b p h e): the gate as it multiplies hook_z (broadcast over d_head where the
  model gates per head), caught at that multiplication;
- attn.hook_z_gated (b p h e): hook_z * hook_gate, the input of the sub-norm or of o_proj;
- attn.ln_sub.hook_scale / hook_normalized: the sub-norm, as ln1's hooks are for ln1.
attn_out = (ln_sub output, else hook_z_gated, flattened) @ W_O + b_O; hook_result splits what o_proj
reads. A sub-norm before down_proj (BitNet's ffn_sub_norm): hook_post is that norm's input
(act(gate) * up) and mlp.ln_sub fires its hooks; mlp_out = ln_sub output @ W_out.
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass

import torch

from .attention import AttnSite
from .sites import Site, fire_points
from .spec import get_path, is_conv1d, linear_params, out_width

#: attention children (modules or parameters) of an output gate computed from the block input
GATES = ("gate_proj", "g_proj")
#: attention children that normalise the kernel output before o_proj, then MLP children that do the
#: same before down_proj
SUB_NORMS = ("attn_sub_norm",)
MLP_SUB_NORMS = ("ffn_sub_norm",)
#: the multiplication of the kernel output by the gate, as the model may call it
_MUL = (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul_, torch.Tensor.__imul__)
#: {GatedAttnSite: _GateCall} of the gated attention forwards running in this thread / task
_CALLS: contextvars.ContextVar = contextvars.ContextVar("tlshim_gate_calls", default={})


@dataclass(frozen=True)
class AttnOutput:
    """What an ArchSpec's attention (and MLP) does between kernel and output projection."""

    gate: bool = False
    query_gate: bool = False  # the gate comes out of q_proj, after each head's query (Qwen3-Next)
    sub_norm: str | None = None  # attention child path
    mlp_sub_norm: str | None = None  # MLP child path


def detect(attn, mlp, q, o):
    """The AttnOutput of an attention / MLP pair (q, o: its projection names), from the GATES and
    SUB_NORMS tables and the projections' widths; None if plain."""
    query_gate = q != "" and gives_gate(get_path(attn, q), get_path(attn, o))
    found = AttnOutput(
        gate=query_gate or any(_has(attn, name) for name in GATES),
        query_gate=query_gate,
        sub_norm=next((name for name in SUB_NORMS if _has(attn, name)), None),
        mlp_sub_norm=next((name for name in MLP_SUB_NORMS if _has(mlp, name)), None),
    )
    return found if found != AttnOutput() else None


def describe(found) -> str:
    """The install warning's words for ``found`` (an AttnOutput or None)."""
    if found is None:
        return ""
    parts = ["a gate out of q_proj" if found.query_gate else "a gate" if found.gate else ""]
    parts += [f"sub-norm {name}" for name in (found.sub_norm, found.mlp_sub_norm) if name]
    return f"; before o_proj / down_proj: {', '.join(part for part in parts if part)}"


def gives_gate(q_proj, o_proj) -> bool:
    """Whether the query projection gives twice what o_proj reads: a gate per head after each head's
    query (checked on the probe by structure.py)."""
    o_in = o_proj.weight.shape[0] if is_conv1d(o_proj) else o_proj.in_features
    return out_width(q_proj) == 2 * o_in


def query_params(spec, attn, role):
    """(weight, bias) of q: each head's query rows of a q_proj that also gives the gate; k, v, o as they are."""
    weight, bias = linear_params(spec, attn, role)
    if role != "q":
        return weight, bias
    n_heads = spec.head_counts(attn, getattr(attn, "config", None))[0]

    def query(t):
        return None if t is None else t.view(n_heads, 2, -1, *t.shape[1:])[:, 0].flatten(0, 1)

    return query(weight), query(bias)


def plan_query(plan, rel):
    """Before hook_q is planned: q_proj's site, where it also gives the gate."""
    spec = plan.spec
    if spec.attn_output and spec.attn_output.query_gate:
        plan.site(rel(f"{spec.attn}.{spec.q_proj}"), QueryGateSite)


class QueryGateSite(Site):
    """A q_proj whose output is, per head, the query then the gate (Qwen3-Next): hook_q fires on the
    queries (b p h e); an edit is put back into their slots."""

    def on_output(self, y):
        ((point, n_heads),) = self.out_points
        halves = y.view(*y.shape[:-1], n_heads, 2, -1)
        query = halves[..., 0, :]
        fired = fire_points([(point, None)], query)
        if fired is query:
            return y
        return torch.stack([fired, halves[..., 1, :]], dim=-2).reshape(y.shape)


def _has(module, name):
    return name in module._modules or name in module._parameters


def z_reader(spec) -> str:
    """The attention child whose input is hook_z (gated): the sub-norm, else o_proj."""
    out = spec.attn_output
    return (out and out.sub_norm) or spec.o_proj


def post_reader(spec) -> str:
    """The MLP child whose input is hook_post: the MLP sub-norm, else down_proj."""
    out = spec.attn_output
    return (out and out.mlp_sub_norm) or spec.down_proj


def plan_block(plan, rel, block, attn, attn_site, n_heads, plan_norm):
    """hook_z at the kernel, hook_gate / hook_z_gated and the sub-norms' hooks of one block."""
    spec, out = plan.spec, plan.spec.attn_output
    attn_site.z = plan.point(f"{block}.attn.hook_z", attn, "hook_z", attn_site)
    if out.sub_norm:
        norm = plan_norm(plan, rel(f"{spec.attn}.{out.sub_norm}"), f"{block}.attn.ln_sub")
        plan.alias(attn, "ln_sub", norm.module, f"{block}.attn")
    if out.gate:
        attn_site.gate = plan.point(f"{block}.attn.hook_gate", attn, "hook_gate", attn_site)
        reader = plan.site(rel(f"{spec.attn}.{z_reader(spec)}"))
        reader.in_points.append((plan.point(f"{block}.attn.hook_z_gated", attn, "hook_z_gated", reader), n_heads))
    if out.mlp_sub_norm:
        mlp = plan.module(rel(spec.mlp))
        norm = plan_norm(plan, rel(f"{spec.mlp}.{out.mlp_sub_norm}"), f"{block}.mlp.ln_sub")
        plan.alias(mlp, "ln_sub", norm.module, f"{block}.mlp")


class _GateCall:
    __slots__ = ("z",)

    def __init__(self):
        self.z = None


class GatedAttnSite(AttnSite):
    """A registry attention whose kernel output is gated and / or normalised before o_proj: hook_z
    fires as the kernel returns, hook_gate at the multiplication of that output."""

    z = gate = None

    def kernel_needed(self) -> bool:
        return super().kernel_needed() or self.z.active or (self.gate is not None and self.gate.active)

    def call(self, wrapped, args, kwargs):
        if not self.kernel_needed():
            return wrapped(*args, **kwargs)
        token = _CALLS.set({**_CALLS.get(), self: _GateCall()})
        try:
            if self.gate is None or not self.gate.active:
                return super().call(wrapped, args, kwargs)
            with _GateMul(self):
                return super().call(wrapped, args, kwargs)
        finally:
            _CALLS.reset(token)

    def kernel_output(self, result):
        """Fire hook_z on the kernel's (b p h e) output and remember it for the gate."""
        out = result[0]
        edited = self.z.fire(out) if self.z.active else out
        call = _CALLS.get().get(self)
        if call is not None:
            call.z = edited
        return result if edited is out else (edited, *result[1:])

    def fire_gate(self, gate, z):
        """hook_gate on the gate as it multiplies ``z`` (broadcast to b p h e); the gate to use."""
        full = gate.expand(torch.broadcast_shapes(gate.shape, z.shape))
        heads = full.reshape(*full.shape[:2], self.head_counts[0], -1)
        edited = self.gate.fire(heads)
        return gate if edited is heads else edited.reshape(full.shape)


class _GateMul(torch.overrides.TorchFunctionMode):
    """Inside one gated attention forward: the first product of the kernel output (or a view of it)
    with another tensor is the gate multiplication; hook_gate fires on that other factor."""

    def __init__(self, site):
        super().__init__()
        self.site = site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = _CALLS.get().get(self.site)
        if func in _MUL and call is not None and call.z is not None and len(args) == 2:
            for i in (0, 1):
                z, gate = args[i], args[1 - i]
                if _views(z, call.z) and isinstance(gate, torch.Tensor):
                    call.z = None  # one gate per forward
                    gate = self.site.fire_gate(gate, z)
                    args = (z, gate) if i == 0 else (gate, z)
                    break
        return func(*args, **kwargs)


def _views(tensor, z) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.numel() == z.numel() and tensor.data_ptr() == z.data_ptr()


def o_proj_input(cache, b, block):
    """What o_proj read on a cached forward, from the cached names: ln_sub of the gated values (or
    of hook_z), else the gated values, else hook_z; flattened over heads."""
    gated = f"{b}.attn.hook_z_gated"
    z = cache[gated if gated in cache else f"{b}.attn.hook_z"].flatten(-2)
    norm = getattr(block.attn, "ln_sub", None)
    if norm is None:
        return z
    with torch.no_grad():
        return norm(z)


def head_inputs(cache, b, block):
    """(b p h e): what o_proj read, per head, from a cache (hook_result = this @ W_O per head): hook_z,
    or on a gated / sub-normed attention the values after the gate (hook_z_gated must be cached) and
    the sub-norm."""
    if getattr(block.attn, "hook_z_gated", None) is not None and f"{b}.attn.hook_z_gated" not in cache:
        raise KeyError(f"{b}.attn.hook_z_gated is not cached: a gated attention's head results need it (or hook_result)")
    z = cache[f"{b}.attn.hook_z"]
    return o_proj_input(cache, b, block).unflatten(-1, z.shape[-2:])


def check(cache, b, same):
    """HOOKS.md for a gated attention: hook_z_gated = hook_z * hook_gate (bit for bit)."""
    if f"{b}.attn.hook_z_gated" in cache:
        gated = cache[f"{b}.attn.hook_z"] * cache[f"{b}.attn.hook_gate"]
        same(f"{b}.attn.hook_z_gated", "= hook_z * hook_gate", cache[f"{b}.attn.hook_z_gated"], gated)


@functools.cache
def gated(site_class):
    """The site class serving a gated / sub-normed attention otherwise served by ``site_class`` (a
    registry site: hook_z fires at the kernel); None where the kernel is not tlshim's to watch."""
    if not (issubclass(site_class, AttnSite) and site_class.routes_config):
        return None
    if site_class is AttnSite:
        return GatedAttnSite
    return type(f"Gated{site_class.__name__}", (GatedAttnSite, site_class), {"__module__": __name__})

