"""The switch hooks: hook_attn_in, hook_q_input / hook_k_input / hook_v_input and hook_mlp_in.

TransformerLens forks the residual entering ln1 into one copy per head (per key-value head for k and v
under GQA), runs each copy through ln1 and that head's projection rows on its own, so an edit of one
head's copy changes only that head's q (or k, v). tlshim serves these lazily: while one is hooked, ln1's
site builds the copies and fires the hooks; heads whose copy came back unchanged keep the model's own
q/k/v bit for bit, and only the edited heads are recomputed (ln1's and the projection's own forward on
that head's copy, the projection's rows of that head kept) and spliced into the projection's output
before hook_q / hook_k / hook_v fire. hook_mlp_in fires on a copy of the residual entering the MLP's
norm: an edit changes what the MLP reads, not the residual stream.
"""

from __future__ import annotations

import contextvars

import torch

from .catalog import switch_names
from .hook_points import HookPoint
from .journal import DictEntry
from .sites import SplitSite

#: {_Fork: {role: (edited copies, changed head indices)}} of this thread / task's current layer call
_PENDING: contextvars.ContextVar = contextvars.ContextVar("tlshim_split_inputs", default={})

#: block-level names, also reachable under ``attn`` as TransformerBridge names them
SPLIT_NAMES = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")


class _Fork:
    """Fires at ln1's input (a pseudo hook point of its NormSite): the per-head copies and their hooks."""

    def __init__(self, points, n_heads, n_kv):
        self.attn_in, self.q_input, self.k_input, self.v_input = points
        self.n_heads, self.n_kv = n_heads, n_kv

    @property
    def active(self):
        return any(point.active for point in (self.attn_in, self.q_input, self.k_input, self.v_input))

    def fire(self, x):
        shared = {}
        if self.attn_in.active:  # one copy per head feeds q, k and v (k/v: the first n_kv copies, as TransformerBridge)
            copies = self.attn_in.fire(_repeat(x, self.n_heads))
            shared = {"q": copies, "k": copies[:, :, : self.n_kv], "v": copies[:, :, : self.n_kv]}
        sources = dict(shared)
        for role, point, n in (("q", self.q_input, self.n_heads), ("k", self.k_input, self.n_kv), ("v", self.v_input, self.n_kv)):
            if point.active:
                sources[role] = point.fire(shared[role].clone() if role in shared else _repeat(x, n))
        pending = {}
        for role, copies in sources.items():
            changed = (copies != x.unsqueeze(-2)).any(-1).flatten(0, -2).any(0).nonzero().flatten().tolist()
            if changed:
                pending[role] = (copies, changed)
        _PENDING.set({**_PENDING.get(), self: pending})
        return x


def _repeat(x, n):
    return x.unsqueeze(-2).repeat(*([1] * (x.dim() - 1)), n, 1)


class _Splice:
    """Replaces the edited heads of one role (q, k or v) in a projection's output by their recomputation."""

    #: the projection where proj_site is a norm after it (a v norm), and that norm
    proj = norm = None

    def __init__(self, fork, role, ln1_site, proj_site, offset, point):
        self.fork, self.role, self.ln1_site, self.proj_site, self.offset = fork, role, ln1_site, proj_site, offset
        self.point = point  # hook_q / hook_k / hook_v, fired after the splice

    @property
    def active(self):
        return self.point.active or self.role in _PENDING.get().get(self.fork, {})

    def fire(self, heads):
        """``heads``: (batch, pos, n, d_head), this role's share of the projection's output."""
        pending = _PENDING.get().get(self.fork, {})
        if self.role in pending:
            copies, changed = pending[self.role]
            remaining = {role: value for role, value in pending.items() if role != self.role}
            _PENDING.set({**_PENDING.get(), self.fork: remaining})
            heads = heads.clone()
            heads[:, :, changed] = self._recompute(copies[:, :, changed], changed, heads.shape[-1]).to(heads.dtype)
        return self.point.fire(heads) if self.point.active else heads

    def _recompute(self, copies, changed, d_head):
        ln1, proj = self.ln1_site.module, self.proj or self.proj_site.module
        normed = type(ln1).forward(ln1, copies)  # the classes' forwards: tlshim's wrappers fire nothing here
        out = type(proj).forward(proj, normed)  # (batch, pos, c, out_features): every row, for each copy
        clip = getattr(self.proj_site, "clip", None)  # OLMo: hook_q/k/v hold the clamped values
        out = out if clip is None else out.clamp(min=-clip, max=clip)
        heads = torch.stack([out[:, :, i, self.offset + h * d_head: self.offset + (h + 1) * d_head] for i, h in enumerate(changed)], dim=2)
        return heads if self.norm is None else type(self.norm).forward(self.norm, heads)


class _MlpIn:
    """hook_mlp_in at the MLP norm's input, after hook_resid_mid: fires on a copy, which the norm then reads."""

    def __init__(self, point):
        self.point = point

    @property
    def active(self):
        return self.point.active

    def fire(self, x):
        return self.point.fire(x.clone())


def plan_switch_hooks(plan):
    """Add the switch hooks of every layer to an install plan (after ``plan_install``)."""
    spec = plan.spec
    layers = plan.module(spec.layers)
    served = switch_names(spec)
    for i in range(len(layers)):
        base, block = f"{spec.layers}.{i}", f"blocks.{i}"
        if spec.mixer(i):  # no attention (family_mixer)
            continue
        layer, attn = layers[i], plan.module(f"{base}.{spec.attn}")
        n_heads, n_kv, _ = spec.head_counts(attn, getattr(attn, "config", None))
        if "hook_mlp_in" in served:
            ln2 = plan.sites[f"{base}.{spec.ln2}"]
            mlp_in = plan.point(f"{block}.hook_mlp_in", layer, "hook_mlp_in", ln2)
            ln2.copy_points = (*ln2.copy_points, (_MlpIn(mlp_in), None))
        if "hook_attn_in" not in served:
            continue
        ln1 = plan.sites[f"{base}.{spec.ln1}"]
        projections = {role: plan.sites[f"{base}.{spec.attn}.{getattr(spec, role + '_proj')}"] for role in "qk"}
        projections["v"] = plan.sites[f"{base}.{spec.attn}.{spec.v_norm or spec.v_proj}"]  # hook_v after a v norm
        sites = (ln1, *dict.fromkeys(projections.values()))
        points = [plan.point(f"{block}.{name}", layer, name, *sites) for name in SPLIT_NAMES]
        for name, point in zip(SPLIT_NAMES, points):
            plan.entries.append(DictEntry(attn, name, point, where=f"{block}.attn"))
        fork = _Fork(points, n_heads, n_kv)
        ln1.in_points.append((fork, None))
        splices = {role: _splice_into(site, fork, role, ln1, f"{block}.attn.hook_{role}") for role, site in projections.items()}
        if spec.v_norm:  # the v copies go through v_proj, then the v norm (Gemma 4)
            splices["v"].proj, splices["v"].norm = plan.module(f"{base}.{spec.attn}.{spec.v_proj}"), projections["v"].module


def _splice_into(site, fork, role, ln1, name):
    """Put a _Splice in place of hook_<role>'s entry in the projection site's out_points."""
    index = next(i for i, (point, _) in enumerate(site.out_points) if isinstance(point, HookPoint) and point.name == name)
    point, n_heads = site.out_points[index]
    offset = sum(site.widths[:index]) if isinstance(site, SplitSite) else 0
    site.out_points[index] = (splice := _Splice(fork, role, ln1, site, offset, point), n_heads)
    return splice
