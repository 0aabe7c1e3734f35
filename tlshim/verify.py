"""``tlshim.verify(model)``: one short forward, and every HOOKS.md invariant that applies, per hook name.

For a layout tlshim derived from the modules (no spec names the model type) this is the proof that
each hook holds what its name says; it works the same on every supported model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import attention_output, family_mixer, family_mla, family_postln
from .attention import sink_softmax
from .spec import get_path
from .tl_switches import all_switched_on

BIT = "bit for bit"


@dataclass
class Finding:
    name: str
    check: str
    ok: bool
    detail: str = ""


@dataclass
class VerifyReport:
    """What held on the verifying forward: ``ok``, ``failures``, and a table (``str(report)``)."""

    model_type: str
    findings: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    @property
    def failures(self) -> list:
        return [f for f in self.findings if not f.ok]

    def by_name(self) -> dict:
        out: dict = {}
        for finding in self.findings:
            out.setdefault(finding.name, []).append(finding)
        return out

    def __str__(self):
        names = self.by_name()
        held = sum(all(f.ok for f in fs) for fs in names.values())
        lines = [f"tlshim.verify: {self.model_type}: {held} of {len(names)} names hold every check"]
        for finding in self.failures:
            lines.append(f"  FAILS {finding.name}: {finding.check} {finding.detail}".rstrip())
        return "\n".join(lines)


def verify(model, input_ids=None) -> VerifyReport:
    """Run one forward with every hook cached and check HOOKS.md's invariants name by name.

    Installs tlshim for the check (and uninstalls it again) when it is not installed. ``input_ids``
    defaults to two random sequences of 12 tokens (fixed seed).

    >>> report = tlshim.verify(model)
    >>> report.ok, print(report)
    """
    from .install import install, is_installed, uninstall

    installed_here = not is_installed(model)
    if installed_here:
        install(model)
    try:
        return _verify(model, input_ids)
    finally:
        if installed_here:
            uninstall(model)


def _verify(model, input_ids):
    cfg = model.cfg
    report = VerifyReport(getattr(model.config, "model_type", type(model).__name__))
    add = report.findings.append
    if input_ids is None:
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, cfg.d_vocab, (2, 12), generator=generator).to(cfg.device)
    batch, pos = input_ids.shape
    with torch.no_grad():
        idle = model(input_ids=input_ids, use_cache=False).logits
        with all_switched_on(cfg):  # the switch hooks fire too
            logits, cache = model.run_with_cache(input_ids, names_filter=lambda name: True, use_cache=False)

    def same(name, check, a, b, exact=True):
        if a.shape != b.shape:
            add(Finding(name, check, False, f"(shapes {tuple(a.shape)} and {tuple(b.shape)})"))
            return
        ok = torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        diff = "" if ok else f"(max difference {(a.float() - b.float()).abs().max().item():.3g})"
        add(Finding(name, check + (f" ({BIT})" if exact else " (close)"), ok, diff))

    same("logits", "a run caching every name gives the idle logits", logits, idle)
    for name in model.hook_dict:
        add(Finding(name, "fires", name in cache))
    for name, value in cache.items():
        want = _shape(cfg, name, batch, pos)
        if want is not None:
            add(Finding(name, "shape", tuple(value.shape) == want, f"{tuple(value.shape)}, expected {want}"))
    own = model._tlshim.spec.postln is not None  # family_postln's embeddings and head
    if own:
        family_postln.check_entry(model, cache, same)
    elif "hook_pos_embed" in cache:  # absolute positions: added to the token embedding
        entered = cache["hook_embed"] + cache["hook_pos_embed"]
        same("hook_pos_embed", "hook_embed + hook_pos_embed equals blocks.0.hook_resid_pre", entered, cache["blocks.0.hook_resid_pre"])
    else:
        same("hook_embed", "equals blocks.0.hook_resid_pre", cache["hook_embed"], cache["blocks.0.hook_resid_pre"])
    for i in range(cfg.n_layers):
        b, block = f"blocks.{i}", model.blocks[i]
        if i + 1 < cfg.n_layers and not cfg.post_ln:
            same(f"{b}.hook_resid_post", "equals the next block's hook_resid_pre", cache[f"{b}.hook_resid_post"], cache[f"blocks.{i + 1}.hook_resid_pre"])
        if model._tlshim.spec.mixer(i):
            family_mixer.check_block(cache, b, same)
            continue
        if cfg.parallel_attn_mlp:
            _parallel_block(cfg, cache, b, same, add)
        else:
            same(f"{b}.hook_resid_mid", "= resid_pre + attn_out", cache[f"{b}.hook_resid_mid"], cache[f"{b}.hook_resid_pre"] + cache[f"{b}.hook_attn_out"])
        if cfg.post_ln:
            family_postln.check_block(cache, b, block, same, last=i + 1 == cfg.n_layers)
        elif not cfg.parallel_attn_mlp:
            total, spec = cache[f"{b}.hook_resid_mid"] + cache[f"{b}.hook_mlp_out"], model._tlshim.spec
            if spec.per_layer_out:  # Gemma 4: a third sub-layer adds after the MLP
                total = total + cache[f"{b}.hook_per_layer_out"]
            if spec.layer_scalar:  # Gemma 4: the block output is scaled
                total = total * getattr(get_path(model, f"{spec.layers}.{i}"), spec.layer_scalar)
            same(f"{b}.hook_resid_post", "= resid_mid + mlp_out" + (" + per_layer_out" if spec.per_layer_out else "") + (" (times the layer scalar)" if spec.layer_scalar else ""), cache[f"{b}.hook_resid_post"], total)
        scores, pattern = cache[f"{b}.attn.hook_attn_scores"], cache[f"{b}.attn.hook_pattern"]
        sinks = getattr(block.attn, "sinks", None)
        if sinks is not None:  # HOOKS.md: the sink takes the rest of each row's mass
            want = sink_softmax(scores, sinks)
            same(f"{b}.attn.hook_pattern", "= softmax(hook_attn_scores, sink logit) over the real keys", pattern, want, exact=False)
        else:
            same(f"{b}.attn.hook_pattern", "= softmax(hook_attn_scores)", pattern, torch.softmax(scores.float(), -1).to(pattern.dtype), exact=False)
        n_rep = _at(cfg.n_heads, i) // _at(cfg.n_key_value_heads, i)
        v = cache[f"{b}.attn.hook_v"].repeat_interleave(n_rep, dim=2)
        z = torch.matmul(pattern, v.transpose(1, 2)).transpose(1, 2)
        same(f"{b}.attn.hook_z", "= pattern @ v", cache[f"{b}.attn.hook_z"], z, exact=False)
        attn = block.attn
        _check_qk_norms(same, cache, b, attn, model._tlshim.spec)
        attention_output.check(cache, b, same)
        o_out = F.linear(attention_output.o_proj_input(cache, b, block), attn.W_O.flatten(0, 1).T, attn.b_O)
        post = getattr(block, "ln1_post", None)
        with torch.no_grad():
            want = post(o_out) if post is not None else o_out
        multiplier = model._tlshim.spec.residual_multiplier  # Granite: what is added is the output times it
        want = want * getattr(get_path(model, f"{model._tlshim.spec.layers}.{i}"), multiplier) if multiplier else want
        same(f"{b}.hook_attn_out", "= hook_z (gated, sub-normed) @ W_O + b_O (then the post-attention norm, the residual multiplier)", cache[f"{b}.hook_attn_out"], want, exact=False)
    _check_moe(model, cache, same, add)
    if model._tlshim.spec.mla is not None:
        family_mla.check(model, cache, same)
    with torch.no_grad():
        last = cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
        final = family_postln.unembed_input(model, cache, cfg.n_layers) if own else model.ln_final(last)
        unembedded = F.linear(final, model.W_U.T, model.b_U)
    cap = getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0
    unembedded = unembedded * cfg.logit_scale if cfg.logit_scale != 1.0 else unembedded
    same("logits", "= ln_final(last hook_resid_post) @ W_U + b_U", logits, torch.tanh(unembedded / cap) * cap if cap > 0 else unembedded, exact=False)
    return report


def _check_qk_norms(same, cache, b, attn, spec):
    """hook_q_normed / hook_k_normed are the q / k norm of hook_q / hook_k: per head, or over the whole
    projection before the head split (OLMo2)."""
    for role in ("q", "k"):
        name, path = f"{b}.attn.hook_{role}_normed", getattr(spec, f"{role}_norm")
        if name not in cache or not path:
            continue
        if spec.qk_norm_after_rotary:  # the norm reads the rotated q / k: its output enters the kernel
            same(name, f"equals hook_rot_{role} (the {role} norm follows rotary)", cache[name], cache[f"{b}.attn.hook_rot_{role}"])
            continue
        x, norm = cache[f"{b}.attn.hook_{role}"], get_path(attn, path)
        with torch.no_grad():
            want = norm(x.flatten(-2)).view_as(x) if spec.qk_norm_whole else norm(x)
        same(name, f"= the {role} norm of hook_{role}", cache[name], want, exact=False)


def _parallel_block(cfg, cache, b, same, add):
    """HOOKS.md, parallel blocks: no resid_mid; resid_post = resid_pre + attn_out + mlp_out (the model may
    sum in another order); ln2 of a shared norm holds ln1's values."""
    add_up = cache[f"{b}.hook_resid_pre"] + cache[f"{b}.hook_attn_out"] + cache[f"{b}.hook_mlp_out"]
    same(f"{b}.hook_resid_post", "= resid_pre + attn_out + mlp_out", cache[f"{b}.hook_resid_post"], add_up, exact=False)
    add(Finding(f"{b}.hook_resid_mid", "is absent (parallel block)", f"{b}.hook_resid_mid" not in cache))
    block = cfg._model_ref().blocks[int(b.split(".")[1])]
    if block.ln2 is block.ln1:
        for name in ("hook_scale", "hook_normalized"):
            same(f"{b}.ln2.{name}", "equals ln1's (one shared norm)", cache[f"{b}.ln2.{name}"], cache[f"{b}.ln1.{name}"])


def _check_moe(model, cache, same, add):
    """Router hooks: the routing the model applied is the routing of hook_router_logits (its own function)."""
    for name, logits in cache.items():
        if not name.endswith("mlp.hook_router_logits"):
            continue
        b = name[: -len(".hook_router_logits")]
        site = model.hook_dict[name]._sites[0]
        moe = site.block.moe
        if f"{b}.hook_expert_indices" not in cache:  # inline routing of no known function: not served
            continue
        indices = cache[f"{b}.hook_expert_indices"]
        ok = indices.shape[-1] == moe.top_k and bool(((indices >= 0) & (indices < moe.n_experts)).all())
        add(Finding(f"{b}.hook_expert_indices", f"holds {moe.top_k} of {moe.n_experts} experts per token", ok))
        if moe.route is not None:
            weights, want = moe.route(logits, moe.top_k, moe.renorm)
            same(f"{b}.hook_expert_indices", "= the routing of hook_router_logits", indices, want)
            got = cache[f"{b}.hook_expert_weights"]
            same(f"{b}.hook_expert_weights", "= the routing of hook_router_logits", got, weights.to(got.dtype), exact=False)


def _at(value, i):
    return value[i] if isinstance(value, (list, tuple)) else value


def _shape(cfg, name, batch, pos):
    """The documented shape of ``name`` (HOOKS.md), for a forward without cache."""
    d = cfg.d_model
    if name == "hook_unembed":
        return (batch, pos, cfg.d_vocab_out)
    if not name.startswith("blocks."):
        return (batch, pos, 1) if name.endswith("hook_scale") else (batch, pos, d)
    i, rest = int(name.split(".")[1]), name.split(".", 2)[2]
    if rest.startswith("mlp.experts."):
        return None  # one row per token routed to that expert
    h, g, e, m = _at(cfg.n_heads, i), _at(cfg.n_key_value_heads, i), cfg.d_head, _at(cfg.d_mlp, i)
    qk = getattr(cfg, "d_head_qk", None) or e  # MLA: q and k are wider than v
    table = {
        "ln1.hook_scale": (batch, pos, 1), "ln2.hook_scale": (batch, pos, 1),
        "attn.hook_q": (batch, pos, h, qk), "attn.hook_k": (batch, pos, g, qk), "attn.hook_v": (batch, pos, g, e),
        "attn.hook_q_normed": (batch, pos, h, qk), "attn.hook_k_normed": (batch, pos, g, qk),
        "attn.hook_rot_q": (batch, pos, h, qk), "attn.hook_rot_k": (batch, pos, g, qk),
        "attn.hook_q_latent": (batch, pos, getattr(cfg, "q_lora_rank", None)),
        "attn.hook_kv_latent": (batch, pos, getattr(cfg, "kv_lora_rank", None)),
        "attn.hook_attn_scores": (batch, h, pos, pos), "attn.hook_pattern": (batch, h, pos, pos),
        "attn.hook_z": (batch, pos, h, e), "attn.hook_result": (batch, pos, h, d),
        "attn.hook_gate": (batch, pos, h, e), "attn.hook_z_gated": (batch, pos, h, e),
        "attn.ln_sub.hook_scale": (batch, pos, 1), "attn.ln_sub.hook_normalized": (batch, pos, h * e),
        "mlp.ln_sub.hook_scale": (batch, pos, 1), "mlp.ln_sub.hook_normalized": (batch, pos, m),
        "hook_attn_in": (batch, pos, h, d), "hook_q_input": (batch, pos, h, d),
        "hook_k_input": (batch, pos, g, d), "hook_v_input": (batch, pos, g, d),
        "mlp.hook_router_logits": (batch, pos, getattr(cfg, "num_experts", None)),
        "mlp.hook_expert_weights": (batch, pos, getattr(cfg, "experts_per_token", None)),
        "mlp.hook_expert_indices": (batch, pos, getattr(cfg, "experts_per_token", None)),
        "mlp.hook_pre": (batch, pos, m), "mlp.hook_pre_linear": (batch, pos, m), "mlp.hook_post": (batch, pos, m),
    }
    return table.get(rest, (batch, pos, d))
