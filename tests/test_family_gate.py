"""Gates and sub-norms between the attention kernel and o_proj (attention_output.py): Laguna's
softplus output gate (per head or per element), BitNet's attn_sub_norm and ffn_sub_norm. Each name
against a hand-built reference; edits against the same edit made by hand on a plain twin."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from sweep import _failures
from tiny import build, tokens
from transformers import CONFIG_MAPPING, AttentionInterface

import tlshim

#: (model_type, config fields): every layout of the family
CASES = [("laguna", {}), ("laguna", {"gating": "per-element"}), ("bitnet", {})]


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


AttentionInterface.register("tlshim_test_edit_head0", _kernel_editing_layer0)
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


@pytest.mark.parametrize("model_type, fields", CASES, ids=[f"{t}-{f}" for t, f in CASES])
def test_an_edit_of_hook_z_is_an_edit_of_the_kernel_output(model_type, fields):
    """hook_z is pattern @ v as the kernel returns it, before the gate and the sub-norm."""
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
    want = gate[..., None].expand_as(z) if gating is True else gate.view_as(z)
    assert torch.equal(cache["blocks.1.attn.hook_gate"], want)
    assert torch.equal(cache["blocks.1.attn.hook_z_gated"], z * want)
    with torch.no_grad():
        assert torch.equal(cache["blocks.1.hook_attn_out"], attn.o_proj(cache["blocks.1.attn.hook_z_gated"].flatten(-2)))


def test_an_edit_of_hook_gate_changes_what_multiplies_hook_z():
    """A gate of ones: o_proj reads the kernel output itself (by hand: o_proj's input replaced by hook_z)."""
    model, twin = _pair("laguna")
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
