"""Parallel blocks and the grouped fused qkv projection (HOOKS.md, "Families").

A parallel block (GPT-J, GPT-NeoX with use_parallel_residual, Phi-1/2, Falcon, Cohere, StableLM where
configured) feeds attention and MLP from the block input, through one shared norm or one norm each,
and returns input + attention output + MLP output: there is no resid_mid. With one shared norm,
``ln2`` is that same module and its hook points fire on the same values as ``ln1``'s.

Grouped fused projections: GPT-NeoX's and Falcon's ``query_key_value`` hold, per key/value head,
that head's query heads, then its key, then its value (GPT-NeoX: one q per group, so q, k, v
interleave per head; Falcon multi-query: one group, so all q, then k, then v); CodeGen's ``qkv_proj``
holds 4 groups (its mp_num) of q, v, k heads. hook_q / hook_k / hook_v fire on those slices.
"""

from __future__ import annotations

import torch

from .hook_points import HookPoint
from .sites import MlpOutSite, Site, fire_points
from .spec import linear_params

#: (fused qkv, o) names -> fn(n_heads, n_kv) -> (groups, ((role, heads of that role per group), ...))
GROUPED_QKV = {
    ("query_key_value", "dense"): lambda h, kv: (kv, (("q", h // kv), ("k", 1), ("v", 1))),
    ("qkv_proj", "out_proj"): lambda h, kv: (4, (("q", h // 4), ("v", h // 4), ("k", h // 4))),  # CodeGen, mp_num 4
}


def parallel_roles(flow, attn_name, mlp_name, feeding, close) -> dict | None:
    """{"ln1", "ln2"} of a parallel block seen on the probe, or None where the block is not one:
    attention and MLP each read a norm of the block input (the same one, or one each), and the block
    output is input + attention output + MLP output (``close``: the model may sum in another order)."""
    x = flow.inputs[""]
    ln1, ln2 = feeding(flow.inputs[attn_name]), feeding(flow.inputs[mlp_name])
    if ln1 is None or ln2 is None or not all(torch.equal(flow.inputs[n], x) for n in (ln1, ln2)):
        return None
    if not close(flow.outputs[""], x + flow.outputs[attn_name] + flow.outputs[mlp_name]):
        return None
    return {"ln1": ln1, "ln2": ln2}


def rotary_dim(config, d_head):
    """How many of each head's dims carry rotary (GPT-J rotary_dim, NeoX rotary_pct, partial_rotary_factor)."""
    if isinstance(getattr(config, "rotary_dim", None), int):
        return config.rotary_dim
    rope = getattr(config, "rope_parameters", None) or {}
    for factor in (rope.get("partial_rotary_factor"), getattr(config, "partial_rotary_factor", None), getattr(config, "rotary_pct", None)):
        if isinstance(factor, (int, float)) and not isinstance(factor, bool):
            return int(d_head * factor)
    return d_head


def share_norm(plan, ln1, block):
    """ln2 of a parallel block whose one norm feeds both attention and MLP: ln1's site fires ln2's points
    too (the module's attributes stay ln1's points; ln2's are in hook_dict only)."""
    scale, normalized = (HookPoint(f"{block}.ln2.{name}", (ln1,)) for name in ("hook_scale", "hook_normalized"))
    plan.hook_dict[scale.name], plan.hook_dict[normalized.name] = scale, normalized
    ln1.scale_point = _Both(ln1.scale_point, scale)
    ln1.out_points.append((normalized, None))
    return ln1


class _Both:
    """Two hook points on one value (ln1 and ln2 of a shared norm): fired in turn, active if either is."""

    def __init__(self, first, second):
        self.points = (first, second)

    @property
    def active(self):
        return any(point.active for point in self.points)

    @property
    def bwd_hooks(self):
        return [hook for point in self.points for hook in point.bwd_hooks]

    def fire(self, tensor):
        return fire_points([(point, None) for point in self.points], tensor)


class CopyOutSite(MlpOutSite):
    """The MLP of a parallel block: hands on a copy of what its points saw, because Falcon adds the
    attention output into that tensor in place."""

    def on_output(self, y):
        return super().on_output(y).clone()


def _slices(groups):
    """{role: slice of the heads within one group} and the heads per group, of a layout (groups, order)."""
    out, start = {}, 0
    for role, count in groups[1]:
        out[role], start = slice(start, start + count), start + count
    return out, start


def plan_grouped_qkv(plan, path, entries, block, owner, n_heads, n_kv):
    """hook_q / hook_k / hook_v on a grouped fused projection (entries: (attribute, n_heads) in q, k, v order)."""
    site = plan.site(path, GroupedQkvSite, plan.spec.qkv_groups(n_heads, n_kv))
    for role, (attr, _) in zip("qkv", entries):
        site.roles.append(role)
        site.out_points.append((plan.point(f"{block}.attn.{attr}", owner, attr, site), None))


class GroupedQkvSite(Site):
    """A fused projection whose output is (..., groups, heads per group, d_head), each group holding its
    q, k and v heads in the layout's order: out_points (in ``roles`` order) fire each role's heads as
    (..., heads, d_head); an edit is put back into its slices of the output."""

    def __init__(self, module, path, groups):
        super().__init__(module, path)
        self.groups, self.roles = groups, []
        self.slices, self.per_group = _slices(groups)

    def on_output(self, y):
        grouped = y.view(*y.shape[:-1], self.groups[0], self.per_group, -1)
        parts = {role: grouped[..., self.slices[role], :].flatten(-3, -2) for role in self.roles}
        fired = {role: fire_points([entry], parts[role]) for role, entry in zip(self.roles, self.out_points)}
        if all(fired[role] is parts[role] for role in self.roles):
            return y
        rows = [fired[role].unflatten(-2, (self.groups[0], -1)) for role, _ in self.groups[1]]
        return torch.cat(rows, dim=-2).reshape(y.shape)


def grouped_qkv_params(spec, attn, role):
    """(weight, bias) of q, k or v: the rows of a grouped fused projection (see GroupedQkvSite); o as it is."""
    weight, bias = linear_params(spec, attn, role)
    if role == "o":
        return weight, bias
    n_heads, n_kv, d_head = spec.head_counts(attn, getattr(attn, "config", None))
    groups = spec.qkv_groups(n_heads, n_kv)
    slices, per_group = _slices(groups)

    def pick(t):
        return None if t is None else t.view(groups[0], per_group, d_head, *t.shape[1:])[:, slices[role]].flatten(0, 2)

    return pick(weight), pick(bias)
