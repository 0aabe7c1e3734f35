"""Gates and sub-norms between the attention kernel and o_proj (attention_output.py): Laguna's
softplus output gate (per head or per element), Qwen3-Next's sigmoid gate out of q_proj (its
full-attention layers, built here as a plain model), BitNet's attn_sub_norm and ffn_sub_norm; and
Moshi's wrapped projections and fused fc1. Each name against a hand-built reference; edits against
the same edit made by hand on a plain twin."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from sweep import _failures
from tiny import build, tokens
from transformers import CONFIG_MAPPING

import tlshim

#: Qwen3-Next's gated attention in every layer (the hybrid's linear-attention layers are another family)
FULL = {"layer_types": ["full_attention"] * 2}
#: (model_type, config fields): every layout of the family
CASES = [
    ("laguna", {}), ("laguna", {"gating": "per-element"}), ("bitnet", {}), ("moshi", {}),
    ("qwen3_next", FULL), ("qwen3_5_text", FULL), ("qwen3_5_moe_text", FULL),
]  # fmt: skip


def _present(model_type):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {model_type}")


def _pair(model_type, fields=None, twin_attn="eager"):
    _present(model_type)
    fields = fields or {}
    model, twin = build(model_type, **fields), build(model_type, attn_implementation=twin_attn, **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the structural path's warning: these types are verified here
        tlshim.install(model)
    return model, twin


def _edit_head0(z):
    z = z.clone()
    z[:, :, 0] = z[:, :, 0] * 2 + 0.5
    return z


def _kernel_editing_layer0(module, query, key, value, attention_mask, **kwargs):
    """The model's own eager kernel, with head 0 of layer 0's output edited: an edit made by hand."""
    eager = importlib.import_module(type(module).__module__).eager_attention_forward
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    return (_edit_head0(out) if module.layer_idx == 0 else out), weights


try:  # the hand-made kernel edit goes through transformers' attention registry (4.50 on)
    from transformers import AttentionInterface

    AttentionInterface.register("tlshim_test_edit_head0", _kernel_editing_layer0)
except ImportError:
    AttentionInterface = None
try:  # the eager kernel wants the eager (additive) mask
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionMaskInterface.register("tlshim_test_edit_head0", eager_mask)
except ImportError:  # before the mask interface every kernel got the eager mask
    pass


def _logits(model, **kwargs):
    with torch.no_grad():
        if kwargs:
            return model.run_with_hooks(tokens(), use_cache=False, **kwargs)
        return model(input_ids=tokens(), use_cache=False).logits


def _by_hand(twin, module, pre_hook):
    handle = module.register_forward_pre_hook(pre_hook)
    try:
        return _logits(twin)
    finally:
        handle.remove()


@pytest.mark.parametrize("model_type, fields", CASES, ids=[f"{t}-{f}" for t, f in CASES])
def test_the_sweep_check_passes(model_type, fields):
    model, twin = _pair(model_type, fields)
    assert _failures(model, twin, tokens(), _logits(twin)) == []
    assert tlshim.verify(model, tokens()).ok


@pytest.mark.parametrize("model_type, fields", [case for case in CASES if case[0] != "moshi"], ids=str)
def test_an_edit_of_hook_z_is_an_edit_of_the_kernel_output(model_type, fields):
    """hook_z is pattern @ v as the kernel returns it, before the gate and the sub-norm."""
    _present(model_type)
    if AttentionInterface is None:
        pytest.skip("this transformers has no AttentionInterface to edit the kernel output by hand")
    model, twin = _pair(model_type, fields, twin_attn="tlshim_test_edit_head0")
    edited = _logits(model, fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: _edit_head0(z))])
    assert torch.equal(edited, _logits(twin))
    assert not torch.equal(edited, _logits(model))


@pytest.mark.parametrize("gating", [True, "per-element"])
def test_laguna_hook_gate_is_the_softplus_gate_as_multiplied(gating):
    model, _ = _pair("laguna", {"gating": gating})
    _, cache = model.run_with_cache(tokens(), use_cache=False)
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        gate = F.softplus(attn.g_proj(model.model.layers[1].input_layernorm(cache["blocks.1.hook_resid_pre"])))
    z = cache["blocks.1.attn.hook_z"]
    per_head = attn.g_proj.out_features == model.cfg.n_heads  # (before 5.24 Laguna gates per head only)
    want = gate[..., None].expand_as(z) if per_head else gate.view_as(z)
    assert torch.equal(cache["blocks.1.attn.hook_gate"], want)
    assert torch.equal(cache["blocks.1.attn.hook_z_gated"], z * want)
    with torch.no_grad():
        assert torch.equal(cache["blocks.1.hook_attn_out"], attn.o_proj(cache["blocks.1.attn.hook_z_gated"].flatten(-2)))


@pytest.mark.parametrize("model_type, fields", [("laguna", {}), ("qwen3_next", FULL)], ids=str)
def test_an_edit_of_hook_gate_changes_what_multiplies_hook_z(model_type, fields):
    """A gate of ones: o_proj reads the kernel output itself (by hand: o_proj's input replaced by hook_z)."""
    model, twin = _pair(model_type, fields)
    _, cache = model.run_with_cache(tokens(), names_filter="blocks.0.attn.hook_z", use_cache=False)
    opened = _logits(model, fwd_hooks=[("blocks.0.attn.hook_gate", lambda g, hook: torch.ones_like(g))])
    o_proj = twin.model.layers[0].self_attn.o_proj
    assert torch.equal(opened, _by_hand(twin, o_proj, lambda m, args: (cache["blocks.0.attn.hook_z"].flatten(-2),)))


def test_an_edit_of_hook_z_gated_is_an_edit_of_what_o_proj_reads():
    model, twin = _pair("laguna")
    edited = _logits(model, fwd_hooks=[("blocks.0.attn.hook_z_gated", lambda z, hook: _edit_head0(z))])
    o_proj = twin.model.layers[0].self_attn.o_proj
    by_hand = _by_hand(twin, o_proj, lambda m, args: (_edit_head0(args[0].view(*args[0].shape[:2], -1, model.cfg.d_head)).flatten(-2),))
    assert torch.equal(edited, by_hand)


def test_bitnet_sub_norms_have_their_hooks_and_hook_post_is_the_ffn_sub_norm_input():
    model, twin = _pair("bitnet")
    assert "blocks.0.attn.hook_gate" not in model.hook_dict  # no gate: hook_z enters the sub-norm
    layer = model.model.layers[0]
    assert model.blocks[0].attn.ln_sub is layer.self_attn.attn_sub_norm
    assert model.blocks[0].mlp.ln_sub is layer.mlp.ffn_sub_norm
    _, cache = model.run_with_cache(tokens(), use_cache=False)
    seen = {}
    handles = [
        twin.model.layers[0].self_attn.attn_sub_norm.register_forward_hook(lambda m, args, out: seen.update(attn=(args[0], out))),
        twin.model.layers[0].mlp.ffn_sub_norm.register_forward_hook(lambda m, args, out: seen.update(mlp=(args[0], out))),
    ]
    try:
        _logits(twin)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(cache["blocks.0.attn.hook_z"].flatten(-2), seen["attn"][0])
    assert torch.equal(cache["blocks.0.mlp.hook_post"], seen["mlp"][0])
    for where, norm in (("attn", layer.self_attn.attn_sub_norm), ("mlp", layer.mlp.ffn_sub_norm)):
        x = seen[where][0]
        scale = (x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt()
        torch.testing.assert_close(cache[f"blocks.0.{where}.ln_sub.hook_scale"], scale)
        torch.testing.assert_close(cache[f"blocks.0.{where}.ln_sub.hook_normalized"] * norm.weight, seen[where][1])
    with torch.no_grad():
        assert torch.equal(cache["blocks.0.hook_mlp_out"], layer.mlp.down_proj(seen["mlp"][1]))


def test_bitnet_an_edit_of_hook_post_is_an_edit_of_the_ffn_sub_norm_input():
    model, twin = _pair("bitnet")
    edited = _logits(model, fwd_hooks=[("blocks.0.mlp.hook_post", lambda x, hook: x * 3)])
    assert torch.equal(edited, _by_hand(twin, twin.model.layers[0].mlp.ffn_sub_norm, lambda m, args: (args[0] * 3,)))


def test_qwen3_next_q_proj_gives_each_head_its_query_then_its_gate():
    model, twin = _pair("qwen3_next", FULL)
    attn, d_head = model.model.layers[1].self_attn, model.cfg.d_head
    assert (model.cfg.n_heads, model.blocks[1].attn.W_Q.shape) == (4, (4, 64, d_head))
    _, cache = model.run_with_cache(tokens(), use_cache=False)
    with torch.no_grad():
        out = attn.q_proj(model.model.layers[1].input_layernorm(cache["blocks.1.hook_resid_pre"]))
    query, gate = out.view(2, 12, 4, 2, d_head).unbind(-2)
    assert torch.equal(cache["blocks.1.attn.hook_q"], query)
    with torch.no_grad():  # W_Q: each head's query rows
        x = model.model.layers[1].input_layernorm(cache["blocks.1.hook_resid_pre"])
        torch.testing.assert_close(cache["blocks.1.attn.hook_q"], torch.einsum("bpd,hde->bphe", x, model.blocks[1].attn.W_Q))
    gate = torch.sigmoid(gate.reshape(2, 12, -1)).view_as(gate)  # as the model takes it: contiguous
    assert torch.equal(cache["blocks.1.attn.hook_gate"], gate)
    assert torch.equal(cache["blocks.1.attn.hook_z_gated"], cache["blocks.1.attn.hook_z"] * gate)


def test_qwen3_next_an_edit_of_hook_q_changes_only_the_query_slots_of_q_proj():
    model, twin = _pair("qwen3_next", FULL)
    d_head = model.cfg.d_head

    def by_hand(module, args, out):
        out = out.clone()
        out.view(*out.shape[:-1], 4, 2, d_head)[..., 0, 0, :] *= 3  # head 0's query, not its gate
        return out

    edited = _logits(model, fwd_hooks=[("blocks.0.attn.hook_q", lambda q, hook: torch.cat([q[:, :, :1] * 3, q[:, :, 1:]], dim=2))])
    handle = twin.model.layers[0].self_attn.q_proj.register_forward_hook(by_hand)
    try:
        assert torch.equal(edited, _logits(twin))
    finally:
        handle.remove()


def test_moshi_fc1_is_the_gate_half_then_the_up_half():
    model, _ = _pair("moshi")
    mlp = model.model.layers[0].mlp
    assert model.blocks[0].attn.W_Q.shape[0] == model.cfg.n_heads  # q_proj.linear inside Moshi's wrapper
    _, cache = model.run_with_cache(tokens(), use_cache=False)
    with torch.no_grad():
        gate, up = mlp.fc1(model.model.layers[0].post_attention_layernorm(cache["blocks.0.hook_resid_mid"])).chunk(2, dim=-1)
    assert torch.equal(cache["blocks.0.mlp.hook_pre"], gate)
    assert torch.equal(cache["blocks.0.mlp.hook_pre_linear"], up)
    assert torch.equal(cache["blocks.0.mlp.hook_post"], mlp.activation_fn(gate) * up)
    torch.testing.assert_close(model.blocks[0].mlp.W_gate, mlp.fc1.weight[: mlp.fc2.in_features].T)


@pytest.mark.parametrize("model_type, fields", [("laguna", {}), ("qwen3_next", FULL), ("bitnet", {})], ids=str)
def test_under_sdpa_hook_z_is_the_kernel_output_and_hook_gate_is_caught(model_type, fields):
    _present(model_type)
    model = build(model_type, attn_implementation="sdpa", **fields)
    eager, _ = _pair(model_type, fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tlshim.install(model)
    _, cache = model.run_with_cache(tokens(), use_cache=False)
    _, want = eager.run_with_cache(tokens(), use_cache=False)
    for name in [n for n in want if n.startswith("blocks.0.attn.hook_")]:
        torch.testing.assert_close(cache[name], want[name], rtol=1e-4, atol=1e-5)
    if "blocks.0.attn.hook_gate" in cache:
        assert torch.equal(cache["blocks.0.attn.hook_z_gated"], cache["blocks.0.attn.hook_z"] * cache["blocks.0.attn.hook_gate"])


def test_a_gate_on_an_attention_outside_the_registry_is_refused_with_the_reason():
    _present("laguna")
    model = build("laguna")
    for layer in model.model.layers:  # the same forward, from a module without the registry
        attn = layer.self_attn
        attn.__class__ = type("LagunaAttention", (type(attn),), {"__module__": __name__})
    with pytest.raises(tlshim.UnsupportedModelError, match="gates or normalises its kernel output before o_proj"):
        tlshim.install(model)
    assert not tlshim.is_installed(model)


def test_the_gated_site_keeps_the_derived_registry_site_and_refuses_one_outside_the_registry():
    from tlshim.attention import AttnSite
    from tlshim.attention_output import GatedAttnSite, gated
    from tlshim.inline_attention import InlineAttnSite

    class OwnSite(AttnSite):  # a family's registry site (its own extras)
        pass

    assert gated(AttnSite) is GatedAttnSite
    assert issubclass(gated(OwnSite), GatedAttnSite) and issubclass(gated(OwnSite), OwnSite)
    assert gated(OwnSite) is gated(OwnSite)  # one class per site class: the planner checks isinstance
    assert gated(InlineAttnSite) is None


@pytest.mark.parametrize("model_type, fields", [("laguna", {}), ("bitnet", {})], ids=str)
def test_head_results_computed_from_the_cache_are_what_o_proj_gets_per_head(model_type, fields):
    model, _ = _pair(model_type, fields)
    _, full = model.run_with_cache(tokens(), names_filter="blocks.1.attn.hook_result", use_cache=False)
    _, cache = model.run_with_cache(tokens(), use_cache=False)
    assert "blocks.1.attn.hook_result" not in cache
    cache.compute_head_results()
    torch.testing.assert_close(cache["blocks.1.attn.hook_result"], full["blocks.1.attn.hook_result"])
    if model_type == "laguna":
        _, bare = model.run_with_cache(tokens(), names_filter="blocks.1.attn.hook_z", use_cache=False)
        with pytest.raises(KeyError, match="hook_z_gated is not cached"):
            bare.compute_head_results()


@pytest.mark.parametrize(
    "model_type, fields, words",
    [("laguna", {}, "a gate"), ("qwen3_next", FULL, "a gate out of q_proj"), ("bitnet", {}, "sub-norm attn_sub_norm, sub-norm ffn_sub_norm")],
    ids=str,
)
def test_the_install_warning_says_what_sits_before_o_proj(model_type, fields, words):
    _present(model_type)
    model = build(model_type, **fields)
    model.config.model_type = f"{model_type}_like"  # a type the sweep has not verified installs with the warning
    with pytest.warns(UserWarning, match=f"final norm model.norm; before o_proj / down_proj: {words}\\. "):
        tlshim.install(model)
