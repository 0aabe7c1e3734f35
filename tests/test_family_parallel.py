"""Parallel blocks, grouped fused qkv, partial rotary and inline attention (HOOKS.md "Families"),
on tiny random models of every configuration the family has, against hand-made references."""

from __future__ import annotations

import warnings

import pytest
import torch
from sweep import _failures
from tiny import build, tokens

import tlshim
from tlshim.spec import get_path

#: (model_type, config fields, parallel): every layout of the family
CASES = [
    ("gpt_neox", {}, True),
    ("gpt_neox", {"use_parallel_residual": False}, False),
    ("gptj", {"rotary_dim": 8}, True),
    ("phi", {}, True),
    ("falcon", {}, True),  # multi-query: all q heads, then one k, then one v; one shared norm
    ("falcon", {"multi_query": False, "num_kv_heads": 4}, True),  # q, k, v interleaved per head
    ("falcon", {"new_decoder_architecture": True}, True),  # grouped per kv head; ln_attn and ln_mlp
    ("falcon", {"alibi": True}, True),
    ("cohere", {}, True),
    ("cohere2", {}, True),
    ("stablelm", {"use_parallel_residual": True}, True),
    ("stablelm", {}, False),
    ("codegen", {}, True),  # qkv_proj: 4 groups (mp_num) of q, v, k heads
    ("codegen", {"n_head": 8, "rotary_dim": 4}, True),
]


def _pair(model_type, fields):
    model, twin = build(model_type, **fields), build(model_type, **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the structural path's warning: these types are verified here
        tlshim.install(model)
    return model, twin


@pytest.mark.parametrize("model_type, fields, parallel", CASES, ids=[f"{t}-{f}" for t, f, _ in CASES])
def test_the_sweep_check_passes_on_every_layout(model_type, fields, parallel):
    model, twin = _pair(model_type, fields)
    ids = tokens()
    with torch.no_grad():
        native = twin(input_ids=ids, use_cache=False).logits
    assert model.cfg.parallel_attn_mlp is parallel
    assert ("blocks.0.hook_resid_mid" in model.hook_dict) is not parallel
    assert _failures(model, twin, ids, native) == []


@pytest.mark.parametrize(
    "model_type, fields, exact",
    [("cohere", {}, True), ("stablelm", {"use_parallel_residual": True}, True), ("gptj", {}, False), ("falcon", {}, False)],
)
def test_resid_post_is_resid_pre_plus_attn_out_plus_mlp_out(model_type, fields, exact):
    """Bit for bit where the model sums in that order (residual + attention + MLP), close otherwise."""
    model, _ = _pair(model_type, fields)
    _, cache = model.run_with_cache(tokens(), use_cache=False)
    for i in range(model.cfg.n_layers):
        b = f"blocks.{i}"
        added = cache[f"{b}.hook_resid_pre"] + cache[f"{b}.hook_attn_out"] + cache[f"{b}.hook_mlp_out"]
        if exact:
            assert torch.equal(cache[f"{b}.hook_resid_post"], added)
        else:
            torch.testing.assert_close(cache[f"{b}.hook_resid_post"], added)
            assert not torch.equal(cache[f"{b}.hook_mlp_out"], torch.zeros_like(added))


def test_a_shared_norm_is_ln1_and_ln2_and_both_fire_its_values():
    model, _ = _pair("phi", {})
    block = model.blocks[0]
    assert block.ln2 is block.ln1
    _, cache = model.run_with_cache(tokens(), names_filter=lambda name: ".ln" in name, use_cache=False)
    for name in ("hook_scale", "hook_normalized"):
        assert torch.equal(cache[f"blocks.0.ln2.{name}"], cache[f"blocks.0.ln1.{name}"])
    # an edit of ln2's normalized value reaches the MLP (and, one module, the attention)
    edited = model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.ln2.hook_normalized", lambda x, hook: x * 0)], use_cache=False)
    assert not torch.equal(edited, model(tokens(), use_cache=False).logits)


def test_two_norms_in_a_parallel_block_are_each_their_own():
    model, _ = _pair("falcon", {"new_decoder_architecture": True})
    block = model.blocks[0]
    assert block.ln1 is model.transformer.h[0].ln_attn and block.ln2 is model.transformer.h[0].ln_mlp
    _, cache = model.run_with_cache(tokens(), use_cache=False)
    x = cache["blocks.0.hook_resid_pre"]
    want = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, unbiased=False) + block.ln2.eps).sqrt()
    torch.testing.assert_close(cache["blocks.0.ln2.hook_normalized"], want)


def _v_of_head0(model_type, fields, d_head, n_heads, n_kv):
    """A forward hook zeroing head 0's value in the fused output, written for each layout by hand."""

    def hook(module, args, out):
        out = out.clone()
        if model_type == "codegen":  # (4, q heads of the group, then v heads, then k heads)
            out.view(*out.shape[:-1], 4, 3, n_heads // 4, d_head)[..., 0, 1, 0, :] = 0
        elif model_type == "gpt_neox" or not fields.get("multi_query", True):  # (heads, 3, d_head)
            out.view(*out.shape[:-1], n_heads, 3, d_head)[..., 0, 2, :] = 0
        elif fields.get("new_decoder_architecture"):  # (kv groups, q per group + 2, d_head)
            out.view(*out.shape[:-1], n_kv, n_heads // n_kv + 2, d_head)[..., 0, -1, :] = 0
        else:  # multi-query: q heads, then the one k, then the one v
            out[..., -d_head:] = 0
        return out

    return hook


@pytest.mark.parametrize(
    "model_type, fields",
    [
        ("gpt_neox", {}),
        ("falcon", {}),
        ("falcon", {"multi_query": False, "num_kv_heads": 4}),
        ("falcon", {"new_decoder_architecture": True}),
        ("codegen", {"n_head": 8, "rotary_dim": 4}),
    ],
)
def test_an_edit_of_hook_v_equals_editing_its_slice_of_the_fused_output(model_type, fields):
    model, twin = _pair(model_type, fields)
    cfg = model.cfg

    def zero_head0(v, hook):
        v = v.clone()
        v[:, :, 0] = 0
        return v

    edited = model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.attn.hook_v", zero_head0)], use_cache=False)
    spec = model._tlshim.spec
    fused = get_path(twin, f"{spec.layers}.0.{spec.attn}.{spec.v_proj}")
    handle = fused.register_forward_hook(_v_of_head0(model_type, fields, cfg.d_head, cfg.n_heads, cfg.n_key_value_heads))
    try:
        by_hand = twin(input_ids=tokens(), use_cache=False).logits
    finally:
        handle.remove()
    assert torch.equal(edited, by_hand)


@pytest.mark.parametrize("model_type, fields", [("gpt_neox", {}), ("falcon", {"new_decoder_architecture": True}), ("phi", {}), ("codegen", {"n_head": 8, "rotary_dim": 4})])
def test_w_q_w_k_w_v_are_the_slices_hook_q_k_v_come_from(model_type, fields):
    model, _ = _pair(model_type, fields)
    _, cache = model.run_with_cache(tokens(), use_cache=False)
    attn, normed = model.blocks[0].attn, cache["blocks.0.ln1.hook_normalized"]
    x = model.blocks[0].ln1(cache["blocks.0.hook_resid_pre"])
    for role in "qkv":
        weight, bias = getattr(attn, f"W_{role.upper()}"), getattr(attn, f"b_{role.upper()}")
        torch.testing.assert_close(cache[f"blocks.0.attn.hook_{role}"], torch.einsum("bpd,hde->bphe", x, weight) + bias)
    assert normed.shape == x.shape


@pytest.mark.parametrize(
    "model_type, fields, rotary_dim",
    [("gpt_neox", {}, 4), ("gptj", {"rotary_dim": 8}, 8), ("phi", {}, 8), ("stablelm", {}, 4), ("falcon", {}, 16), ("codegen", {"rotary_dim": 4}, 4)],
)
def test_rotary_acts_on_the_first_rotary_dim_dims_only(model_type, fields, rotary_dim):
    """Known answers: rotary_pct 0.25 (NeoX), rotary_dim (GPT-J), partial_rotary_factor 0.5 (Phi) and 0.25
    (StableLM) of d_head 16; Falcon rotates all of it."""
    model, _ = _pair(model_type, fields)
    assert model.cfg.rotary_dim == rotary_dim
    _, cache = model.run_with_cache(tokens(), use_cache=False)
    q, rot_q = cache["blocks.0.attn.hook_q"], cache["blocks.0.attn.hook_rot_q"]
    assert torch.equal(rot_q[..., rotary_dim:], q[..., rotary_dim:])
    assert not torch.allclose(rot_q[:, 1:, :, :rotary_dim], q[:, 1:, :, :rotary_dim])


def test_cohere_logits_carry_the_logit_scale():
    model, _ = _pair("cohere", {"logit_scale": 0.5})
    assert model.cfg.logit_scale == 0.5
    logits, cache = model.run_with_cache(tokens(), use_cache=False)
    final = model.ln_final(cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"])
    torch.testing.assert_close(logits, final @ model.W_U * 0.5)


@pytest.mark.parametrize("model_type, fields", [("falcon", {}), ("falcon", {"alibi": True})])
def test_inline_attention_edits_flow_on_like_the_kernels(model_type, fields):
    """Falcon computes attention inline: an unedited pass through rot_q/rot_k/scores/pattern is the
    native run bit for bit, and zeroing head 0's pattern zeroes its hook_z."""
    model, twin = _pair(model_type, fields)
    names = [f"blocks.0.attn.hook_{n}" for n in ("rot_q", "rot_k", "attn_scores", "pattern")]
    passed = model.run_with_hooks(tokens(), fwd_hooks=[(n, lambda x, hook: x.clone()) for n in names], use_cache=False)
    assert torch.equal(passed, twin(input_ids=tokens(), use_cache=False).logits)

    def zero_head0(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 0] = 0
        return pattern

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", zero_head0)]):
        _, cache = model.run_with_cache(tokens(), names_filter="blocks.0.attn.hook_z", use_cache=False)
    assert torch.equal(cache["blocks.0.attn.hook_z"][:, :, 0], torch.zeros_like(cache["blocks.0.attn.hook_z"][:, :, 0]))
    assert cache["blocks.0.attn.hook_z"][:, :, 1].abs().max() > 0
