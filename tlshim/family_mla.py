"""Multi-head latent attention, MLA (DeepSeek-V2/V3, MiniCPM3, GLM-4-MoE-Lite, Youtu, ...).

q is one projection (``q_proj``) or a low-rank path (``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``);
keys and values come from one latent: ``kv_a_proj_with_mqa`` gives (compressed kv, k_pe), the first
normed by ``kv_a_layernorm`` and expanded by ``kv_b_proj`` into per-head (k_nope, v), k_pe (one head)
rotated and broadcast over the heads. The kernel goes through transformers' attention registry, so
rot_q / rot_k / scores / pattern come from tlshim's kernel as for Llama. Names:
- ``attn.hook_q_latent`` (b p r_q, q_a_layernorm's output) and ``attn.hook_kv_latent`` (b p r_kv,
  kv_a_layernorm's output: what kv_b_proj reads and the KV cache keeps);
- ``attn.hook_q`` (b p h e_qk): q per head before rotary, nope then rope part, as the model splits it;
- ``attn.hook_k`` (b p h e_qk): k_nope per head then k_pe (before rotary) broadcast over the heads;
  an edit may change the k_nope part only (k_pe is one head, rotated before kv_b_proj runs);
- ``attn.hook_v`` (b p h e_v): the v part of kv_b_proj's output;
- ``attn.hook_rot_q`` / ``hook_rot_k``: what enters the kernel (the new keys only, with a KV cache).
cfg.d_head is v's width (hook_z, W_O), cfg.d_head_qk q's and k's, cfg.rotary_dim the rope part.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch
from torch import nn

from .attention import AttnSite
from .errors import HookOutputError, UnsupportedModelError
from .sites import Site, first_input, needs_grad_link
from .spec import get_path, linear_params

#: the module names of one MLA attention: q direct, q low rank, the kv path (data, tried in order)
Q_DIRECT = ("q_proj",)
Q_LOW_RANK = ("q_a_proj", "q_a_layernorm", "q_b_proj")
KV = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")
OUT = "o_proj"
#: parts of an MLA attention whose hooks would not hold what their names say (name: what it is)
UNSERVED = {
    "g_proj": "a per-head sigmoid gate on the kernel output before o_proj (Dots3), so hook_z is not pattern @ v",
    "q_gate_proj": "q fused with an output gate (AXK2), so hook_z is not pattern @ v",
    "k_rope_only_layernorm": "a norm on k_pe before rotary (Dots3)",
}
#: {MlaAttnSite: _MlaCall} of the MLA attention forwards running in this thread / task
_CALLS: contextvars.ContextVar = contextvars.ContextVar("tlshim_mla_calls", default={})


@dataclass(frozen=True)
class MlaSpec:
    """Where one MLA attention keeps its parts, and its widths (read from the module, checked on the weights)."""

    q: str  # q_proj, or q_b_proj on the low-rank path
    q_a: str | None
    q_a_norm: str | None
    kv_a: str
    kv_a_norm: str
    kv_b: str
    o: str
    n_heads: int
    nope: int
    rope: int
    v: int
    kv_rank: int
    q_rank: int | None

    @property
    def qk(self) -> int:
        return self.nope + self.rope

    def head_counts(self):
        return self.n_heads, self.n_heads, self.v

    def cfg_fields(self) -> dict:
        return dict(d_head=self.v, d_head_qk=self.qk, rotary_dim=self.rope, q_lora_rank=self.q_rank, kv_lora_rank=self.kv_rank)


def describe(mla) -> str:
    q = f"{mla.q_a} -> {mla.q_a_norm} -> {mla.q}" if mla.q_a else mla.q
    return f"multi-head latent attention: q {q}, kv {mla.kv_a} -> {mla.kv_a_norm} -> {mla.kv_b}, out {mla.o}"


def _linear(attn, name):
    return isinstance(getattr(attn, name, None), nn.Linear)


def detect(attn, config) -> MlaSpec | None:
    """The MlaSpec of ``attn``, None where it has no MLA kv path; raises where the widths do not fit MLA."""
    kv_a, kv_a_norm, kv_b = KV
    if not (_linear(attn, kv_a) and _linear(attn, kv_b) and isinstance(getattr(attn, kv_a_norm, None), nn.Module)):
        return None
    found = [part for part in UNSERVED if isinstance(getattr(attn, part, None), nn.Module)]
    if found:
        raise UnsupportedModelError(f"{type(attn).__name__} is multi-head latent attention with {UNSERVED[found[0]]}: not served yet")
    low_rank = _linear(attn, Q_LOW_RANK[0]) and _linear(attn, Q_LOW_RANK[2])
    if not (low_rank or _linear(attn, Q_DIRECT[0])) or not _linear(attn, OUT):
        raise UnsupportedModelError(
            f"{type(attn).__name__} has MLA's {kv_a} / {kv_b} but not its query ({Q_DIRECT[0]}, or "
            f"{' -> '.join(Q_LOW_RANK)}) and {OUT}: not an MLA layout tlshim serves"
        )
    n_heads = getattr(attn, "num_heads", None) or config.num_attention_heads
    widths = {name: getattr(attn, name, None) for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")}
    q = Q_LOW_RANK[2] if low_rank else Q_DIRECT[0]
    spec = MlaSpec(
        q=q,
        q_a=Q_LOW_RANK[0] if low_rank else None,
        q_a_norm=Q_LOW_RANK[1] if low_rank else None,
        kv_a=kv_a,
        kv_a_norm=kv_a_norm,
        kv_b=kv_b,
        o=OUT,
        n_heads=n_heads,
        nope=widths["qk_nope_head_dim"] or 0,
        rope=widths["qk_rope_head_dim"] or 0,
        v=widths["v_head_dim"] or 0,
        kv_rank=widths["kv_lora_rank"] or 0,
        q_rank=getattr(attn, Q_LOW_RANK[0]).out_features if low_rank else None,
    )
    fits = (
        getattr(attn, q).out_features == n_heads * spec.qk
        and getattr(attn, kv_a).out_features == spec.kv_rank + spec.rope
        and getattr(attn, kv_b).out_features == n_heads * (spec.nope + spec.v)
        and getattr(attn, OUT).in_features == n_heads * spec.v
    )
    if not fits or 0 in (spec.rope, spec.v, spec.kv_rank):
        raise UnsupportedModelError(
            f"{type(attn).__name__}: the widths of {q}, {kv_a}, {kv_b} and {OUT} do not fit MLA's {n_heads} heads of "
            f"{widths} (qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank)"
        )
    return spec


def params(spec, attn, role):
    """(weight, bias) in nn.Linear layout: q where it is one linear map (q_proj), o as it is; the low-rank
    q path and the latent k / v are not one matrix, and raise naming the modules to use."""
    mla = spec.mla
    if role == "o" or (role == "q" and mla.q_a is None):
        return linear_params(spec, attn, role)
    path = f"{mla.q_a} -> {mla.q_a_norm} -> {mla.q}" if role == "q" else f"{mla.kv_a} -> {mla.kv_a_norm} -> {mla.kv_b}"
    raise UnsupportedModelError(
        f"W_{role.upper()} / b_{role.upper()}: multi-head latent attention computes {role} through the low-rank path "
        f"{path} (with a norm between), not one linear map; use those modules' weights (attn.{mla.q if role == 'q' else mla.kv_b}.weight "
        "and the rest), or hook_q / hook_k / hook_v for the values"
    )


# ------------------------------------------------------------------------------------ sites


class _MlaCall:
    __slots__ = ("n_new", "k_pe")

    def __init__(self, n_new):
        self.n_new, self.k_pe = n_new, None


class MlaAttnSite(AttnSite):
    """The MLA attention: tlshim's kernel for rot_q / rot_k / scores / pattern (AttnSite), and the number of
    new positions of each call for the k / v sites. The KV cache is not watched: it keeps the latents
    (transformers 5.x), so rot_k fires in the kernel, on the new keys, and an edit of it is not cached."""

    def __init__(self, module, path, cache_kwargs=()):
        super().__init__(module, path, ())

    def call(self, wrapped, args, kwargs):
        token = _CALLS.set({**_CALLS.get(), self: _MlaCall(first_input(args, kwargs).shape[-2])})
        try:
            return super().call(wrapped, args, kwargs)
        finally:
            _CALLS.reset(token)

    def current(self):
        return _CALLS.get().get(self)

    def fire_heads(self, point, states):
        if point is None or not point.active or point is not self.rot_k:
            return AttnSite.fire_heads(point, states)
        n_new = self.current().n_new  # the kernel's keys span the cached positions too
        new = AttnSite.fire_heads(point, states[:, :, -n_new:])
        return new if n_new == states.shape[2] else torch.cat([states[:, :, :-n_new], new], dim=2)


class KpeSite(Site):
    """kv_a_proj_with_mqa: keeps the call's k_pe (its output's last rope dims, before rotary) for hook_k."""

    def __init__(self, module, path, attn_site, kv_rank):
        super().__init__(module, path)
        self.attn_site, self.kv_rank = attn_site, kv_rank

    def on_output(self, y):
        call = self.attn_site.current()
        if call is not None:
            call.k_pe = y[..., self.kv_rank :].clone()
        return y


class KvUpSite(Site):
    """kv_b_proj: hook_k and hook_v on the per-head (k_nope, v) of its output, new positions only (with a
    KV cache of latents it expands every position); an edit is written back into what the model reads."""

    def __init__(self, module, path, attn_site, mla):
        super().__init__(module, path)
        self.attn_site, self.mla = attn_site, mla
        self.k_point = self.v_point = None

    def on_output(self, y):
        mla, call = self.mla, self.attn_site.current()
        heads = y.reshape(y.shape[0], y.shape[-2], mla.n_heads, mla.nope + mla.v)  # (b, k, h, nope + v); 4.x: no axis 1
        n_new = call.n_new if call is not None else heads.shape[1]
        k_nope, v = heads[:, -n_new:].split([mla.nope, mla.v], dim=-1)
        new_k_nope, new_v, rebuild = k_nope, v, False
        if self.k_point.active and call is not None and call.k_pe is not None:  # (not a call from outside the attention)
            k_pe = call.k_pe.view(*k_nope.shape[:2], 1, mla.rope).expand(*k_nope.shape[:3], mla.rope)
            k = torch.cat([k_nope, k_pe], dim=-1)
            edited = self.k_point.fire(k)
            if edited is not k and not torch.equal(edited[..., mla.nope :], k_pe):
                raise HookOutputError(
                    f"{self.k_point.name}: an edit changed the k_pe part (the last {mla.rope} values of each head), "
                    f"which MLA computes once for all heads and rotates before {mla.kv_b} runs; edit the first "
                    f"{mla.nope} values (k_nope) here, or hook_rot_k (the keys entering the kernel) for per-head keys"
                )
            # a backward hook gets its gradient through what flows on (the k_pe part's is zero: it is not used)
            if edited is not k or needs_grad_link(self.k_point):
                new_k_nope, rebuild = edited[..., : mla.nope], True
        if self.v_point.active:
            new_v = self.v_point.fire(v)
            rebuild = rebuild or new_v is not v or needs_grad_link(self.v_point)
        if not rebuild:
            return y
        new = torch.cat([new_k_nope, new_v], dim=-1)
        heads = new if n_new == heads.shape[1] else torch.cat([heads[:, :-n_new], new], dim=1)
        return heads.reshape(y.shape)


def plan_qkv(plan, spec, base, block, attn):
    """hook_q_latent, hook_q, hook_kv_latent, hook_k and hook_v of one MLA attention (layout._plan_layer)."""
    mla, rel = spec.mla, f"{base}.{spec.attn}"
    attn_site = plan.site(rel, spec.attn_site, spec.cache_kwargs)
    if mla.q_a_norm:
        site = plan.site(f"{rel}.{mla.q_a_norm}")
        site.out_points.append((plan.point(f"{block}.attn.hook_q_latent", attn, "hook_q_latent", site), None))
    site = plan.site(f"{rel}.{mla.q}")
    site.out_points.append((plan.point(f"{block}.attn.hook_q", attn, "hook_q", site), mla.n_heads))
    site = plan.site(f"{rel}.{mla.kv_a_norm}")
    site.out_points.append((plan.point(f"{block}.attn.hook_kv_latent", attn, "hook_kv_latent", site), None))
    kpe = plan.site(f"{rel}.{mla.kv_a}", KpeSite, attn_site, mla.kv_rank)
    up = plan.site(f"{rel}.{mla.kv_b}", KvUpSite, attn_site, mla)
    up.k_point = plan.point(f"{block}.attn.hook_k", attn, "hook_k", attn_site, kpe, up)
    up.v_point = plan.point(f"{block}.attn.hook_v", attn, "hook_v", attn_site, up)
    # (out_points makes Site.__call__ reach on_output, which fires them its own way)
    kpe.out_points.append((up.k_point, None))
    up.out_points += [(up.k_point, None), (up.v_point, None)]


def check(model, cache, same):
    """verify's MLA invariants per layer: hook_q, hook_k's k_nope and hook_v are the model's projections of
    the latents, and the nope parts of hook_rot_q / hook_rot_k are hook_q's / hook_k's."""
    spec = model._tlshim.spec
    for i, block in enumerate(model.blocks):
        if spec.mixer(i):  # a hybrid's mixer block (family_mixer) has no attention
            continue
        b, attn, mla = f"blocks.{i}", block.attn, spec.mla
        latent = cache[f"{b}.attn.hook_q_latent"] if mla.q_a_norm else None
        with torch.no_grad():
            if latent is not None:
                q = get_path(attn, mla.q)(latent)
                same(f"{b}.attn.hook_q", f"= {mla.q}(hook_q_latent) per head", cache[f"{b}.attn.hook_q"], q.view_as(cache[f"{b}.attn.hook_q"]), exact=False)
            kv = get_path(attn, mla.kv_b)(cache[f"{b}.attn.hook_kv_latent"])
        k, v = cache[f"{b}.attn.hook_k"], cache[f"{b}.attn.hook_v"]
        k_nope, want_v = kv.view(*kv.shape[:-1], mla.n_heads, -1).split([mla.nope, mla.v], dim=-1)
        same(f"{b}.attn.hook_k", f"k_nope = {mla.kv_b}(hook_kv_latent) per head", k[..., : mla.nope], k_nope, exact=False)
        same(f"{b}.attn.hook_v", f"= {mla.kv_b}(hook_kv_latent) per head", v, want_v, exact=False)
        for role in ("q", "k"):  # rotary turns the rope part only
            rot = cache[f"{b}.attn.hook_rot_{role}"][..., : mla.nope]
            same(f"{b}.attn.hook_rot_{role}", f"nope part = hook_{role}'s", rot, cache[f"{b}.attn.hook_{role}"][..., : mla.nope])
