"""Mixture-of-experts blocks (HOOKS.md "Families"): router hooks, per-expert hooks, edits of the routing
against hand-built mixtures, and gpt-oss's attention sinks, on tiny models of each MoE type the installed
transformers has (both expert layouts: a ModuleList of MLPs on 4.x, one module of 3-D parameters on 5.x)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import CONFIG_MAPPING

import tlshim
from tlshim.errors import UnsupportedModelError
from tlshim.spec import get_path

from tiny import build, tokens

TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")


def _installed(model_type):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {tlshim.registry.transformers_version()} has no {model_type}")
    model = build(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tlshim.install(model)
    return model


@pytest.fixture(params=TYPES)
def moe_model(request):
    model = _installed(request.param)
    yield model
    tlshim.uninstall(model)


def _block(model, i=0):
    spec = model._tlshim.spec
    return get_path(model, f"{spec.layers}.{i}.{spec.mlp}"), spec.moe


def _expert_out(block, moe, j, x):
    """Expert j on rows x, by hand from its parameters (fused layouts) or its own module."""
    experts = getattr(block, moe.experts)
    if isinstance(experts, torch.nn.ModuleList):
        return experts[j](x)
    if hasattr(experts, "gate_up_proj_bias"):  # gpt-oss: (d, 2m) interleaved gate/up, clamped, with biases
        gate_up = x @ experts.gate_up_proj[j] + experts.gate_up_proj_bias[j]
        gate, up = gate_up[..., ::2].clamp(max=experts.limit), gate_up[..., 1::2].clamp(-experts.limit, experts.limit)
        return ((up + 1) * (gate * torch.sigmoid(gate * experts.alpha))) @ experts.down_proj[j] + experts.down_proj_bias[j]
    gate, up = F.linear(x, experts.gate_up_proj[j]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[j])


def _mixture_by_hand(block, moe, x, weights, indices):
    """sum over k of weights[k] * expert indices[k](x), plus the (gated) shared expert: token by token."""
    flat, w, idx = x.reshape(-1, x.shape[-1]), weights.reshape(-1, weights.shape[-1]), indices.reshape(-1, indices.shape[-1])
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for k in range(idx.shape[1]):
            out[t] += w[t, k] * _expert_out(block, moe, int(idx[t, k]), flat[t : t + 1])[0]
    if hasattr(block, "shared_expert"):  # Qwen2-MoE: a dense expert every token takes, behind a sigmoid gate
        out = out + torch.sigmoid(block.shared_expert_gate(flat)) * block.shared_expert(flat)
    return out.reshape(x.shape)


def test_router_hooks_fire_with_their_shapes_and_cfg(moe_model):
    ids = tokens()
    _, moe = _block(moe_model)
    cfg = moe_model.cfg
    assert (cfg.num_experts, cfg.experts_per_token) == (moe.n_experts, moe.top_k) == (4, 2)
    with torch.no_grad():
        _, cache = moe_model.run_with_cache(ids, names_filter=lambda n: ".mlp." in n or "mlp_out" in n, use_cache=False)
    for i in range(cfg.n_layers):
        assert cache[f"blocks.{i}.mlp.hook_router_logits"].shape == (2, 12, 4)
        assert cache[f"blocks.{i}.mlp.hook_expert_weights"].shape == (2, 12, 2)
        indices = cache[f"blocks.{i}.mlp.hook_expert_indices"]
        assert indices.shape == (2, 12, 2) and indices.dtype == torch.long
        assert (indices.sort(-1).values[..., 0] != indices.sort(-1).values[..., 1]).all()  # two distinct experts
        assert cache[f"blocks.{i}.hook_mlp_out"].shape == (2, 12, cfg.d_model)
    report = tlshim.verify(moe_model, ids)
    assert report.ok, str(report)


def test_expert_weights_edit_is_the_hand_built_mixture(moe_model):
    ids = tokens()
    block, moe = _block(moe_model)
    seen = {}

    def edit(weights, hook):
        seen["weights"] = weights.clone()
        new = weights.clone()
        new[..., 0] = 2.5 * weights[..., 0]
        new[..., 1] = -weights[..., 1]
        return new

    names = ("blocks.0.mlp.hook_expert_indices", "blocks.0.hook_mlp_out")
    with torch.no_grad():
        x = _mlp_input(moe_model, ids)
        with moe_model.hooks(fwd_hooks=[("blocks.0.mlp.hook_expert_weights", edit)]):
            _, cache = moe_model.run_with_cache(ids, names_filter=lambda n: n in names, use_cache=False)
        want = _mixture_by_hand(block, moe, x, edit(seen["weights"], None), cache["blocks.0.mlp.hook_expert_indices"])
    torch.testing.assert_close(cache["blocks.0.hook_mlp_out"], want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        _, plain = moe_model.run_with_cache(ids, names_filter=lambda n: n == "blocks.0.hook_mlp_out", use_cache=False)
    assert not torch.allclose(plain["blocks.0.hook_mlp_out"], want, atol=1e-3)  # the edit did change it


def _mlp_input(model, ids):
    """The MoE block's input on an unhooked forward (the edit comes after it)."""
    return block_input(model, _block(model)[0], ids)


def block_input(model, block, ids):
    """``block``'s input on an unhooked forward of ``model``."""
    got = {}
    handle = block.register_forward_pre_hook(lambda m, args: got.setdefault("x", args[0]))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return got["x"]


def test_expert_indices_edit_routes_every_token_to_the_chosen_experts(moe_model):
    ids = tokens()
    block, moe = _block(moe_model)

    def to_experts_3_and_0(indices, hook):
        new = torch.empty_like(indices)
        new[..., 0], new[..., 1] = 3, 0
        return new

    with torch.no_grad(), moe_model.hooks(fwd_hooks=[("blocks.0.mlp.hook_expert_indices", to_experts_3_and_0)]):
        names = ("blocks.0.mlp.hook_expert_weights", "blocks.0.hook_mlp_out")
        _, cache = moe_model.run_with_cache(ids, names_filter=lambda n: n in names, use_cache=False)
    with torch.no_grad():
        x = _mlp_input(moe_model, ids)
        indices = torch.tensor([3, 0]).expand(2, 12, 2)
        want = _mixture_by_hand(block, moe, x, cache["blocks.0.mlp.hook_expert_weights"], indices)
    torch.testing.assert_close(cache["blocks.0.hook_mlp_out"], want, rtol=1e-4, atol=1e-4)


def test_router_logits_edit_is_routed_by_the_models_own_function(moe_model):
    ids = tokens()
    _, moe = _block(moe_model)

    def favour_expert_2(logits, hook):
        return logits + torch.tensor([0.0, 0.0, 100.0, 0.0])

    names = ("blocks.0.mlp.hook_router_logits", "blocks.0.mlp.hook_expert_indices", "blocks.0.mlp.hook_expert_weights")
    with torch.no_grad(), moe_model.hooks(fwd_hooks=[("blocks.0.mlp.hook_router_logits", favour_expert_2)]):
        _, cache = moe_model.run_with_cache(ids, names_filter=lambda n: n in names, use_cache=False)
    indices = cache["blocks.0.mlp.hook_expert_indices"]
    assert (indices[..., 0] == 2).all()  # the top choice everywhere
    weights, want = moe.route(cache["blocks.0.mlp.hook_router_logits"], moe.top_k, moe.renorm)
    assert torch.equal(indices, want)
    torch.testing.assert_close(cache["blocks.0.mlp.hook_expert_weights"], weights)


def test_per_expert_hooks_where_experts_are_modules(moe_model):
    ids = tokens()
    block, moe = _block(moe_model)
    names = [n for n in moe_model.hook_dict if n.startswith("blocks.0.mlp.experts.")]
    if moe.layout != "inline":
        assert names == []  # one module of 3-D parameters: no per-expert modules to hook
        with pytest.raises(UnsupportedModelError, match=r"mlp.W_in .*blocks\[i\].mlp.experts.gate_up_proj"):
            moe_model.blocks[0].mlp.W_in
        return
    assert {f"blocks.0.mlp.experts.{j}.hook_post" for j in range(4)} <= set(names)
    with torch.no_grad():
        _, cache = moe_model.run_with_cache(ids, names_filter=lambda n: n.startswith("blocks.0.mlp."), use_cache=False)
    indices = cache["blocks.0.mlp.hook_expert_indices"]
    d_expert = getattr(block, moe.experts)[0].W_out.shape[0]
    for j in range(4):
        rows = int((indices == j).sum())
        assert cache[f"blocks.0.mlp.experts.{j}.hook_post"].shape == (rows, d_expert)
        assert cache[f"blocks.0.mlp.experts.{j}.hook_pre"].shape == (rows, d_expert)
    with pytest.raises(UnsupportedModelError, match=r"mlp.experts\[j\].W_in"):
        moe_model.blocks[0].mlp.W_in


def test_idle_logits_and_round_trip_are_native(moe_model):
    model_type = moe_model.config.model_type
    twin, ids = build(model_type), tokens()
    with torch.no_grad():
        assert torch.equal(moe_model(input_ids=ids, use_cache=False).logits, twin(input_ids=ids, use_cache=False).logits)


def test_gpt_oss_pattern_rows_leave_the_sinks_share():
    model = _installed("gpt_oss")
    ids = tokens()
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=lambda n: "attn_scores" in n or "pattern" in n, use_cache=False)
    for i in range(model.cfg.n_layers):
        scores, pattern = cache[f"blocks.{i}.attn.hook_attn_scores"], cache[f"blocks.{i}.attn.hook_pattern"]
        assert pattern.shape == scores.shape == (2, 4, 12, 12)  # the real keys only
        sinks = model.blocks[i].attn.sinks.detach()
        # the sink's share of each row, by hand: exp(sink) / (exp(sink) + sum over keys of exp(score))
        share = 1 / (1 + torch.exp(scores - sinks.view(1, -1, 1, 1)).sum(-1))
        torch.testing.assert_close(pattern.sum(-1), 1 - share)
        assert (pattern.sum(-1) <= 1 + 1e-6).all() and (pattern.sum(-1) < 0.99).any()
    tlshim.uninstall(model)


@pytest.mark.parametrize("role", ["q", "k"])
def test_rotated_q_or_k_zeroed_gives_uniform_causal_attention(moe_model, role):
    """Known answer, on registry and pre-registry (Qwen2-MoE, OLMoE on 4.x) attention alike: with
    head 0's rotated query (or key-value head 0's rotated keys) zeroed, the scores of the heads reading
    it are 0, so each row spreads 1 / (i + 1) over its causal keys."""
    ids = tokens()
    n_rep = moe_model.cfg.n_heads // moe_model.cfg.n_key_value_heads

    def zero_head0(x, hook):
        x = x.clone()
        x[:, :, 0] = 0
        return x

    with torch.no_grad(), moe_model.hooks(fwd_hooks=[(f"blocks.0.attn.hook_rot_{role}", zero_head0)]):
        _, cache = moe_model.run_with_cache(ids, names_filter=lambda n: n == "blocks.0.attn.hook_pattern", use_cache=False)
    pattern = cache["blocks.0.attn.hook_pattern"]
    heads = 1 if role == "q" else n_rep
    if hasattr(moe_model.blocks[0].attn, "sinks"):
        pattern = pattern / pattern.sum(-1, keepdim=True)  # the sink's share aside
    uniform = torch.tril(torch.ones(12, 12)) / torch.arange(1, 13)[:, None]
    torch.testing.assert_close(pattern[:, :heads], uniform.expand(2, heads, 12, 12))
    assert not torch.allclose(pattern[:, heads], uniform)  # the other heads keep their own pattern


def test_routing_no_known_function_reproduces_serves_what_it_can():
    """PhiMoE routes by sparsemixer: its router output is observed (5.x), never re-derived; an edit of
    its router logits raises naming what to edit instead; inline (4.x) it serves router_logits only."""
    model = _installed("phimoe")
    block, moe = _block(model)
    assert moe.route is None
    names = {n.rsplit(".", 1)[-1] for n in model.hook_dict if n.startswith("blocks.0.mlp.hook_")}
    if moe.layout == "inline":
        assert names == {"hook_router_logits"}
    else:
        assert names == {"hook_router_logits", "hook_expert_weights", "hook_expert_indices"}
        with pytest.raises(UnsupportedModelError, match="edit hook_expert_weights / hook_expert_indices instead"):
            model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.mlp.hook_router_logits", lambda x, hook: x + 1)], use_cache=False)
    assert tlshim.verify(model, tokens()).ok
    tlshim.uninstall(model)


def test_a_moe_block_of_another_shape_is_refused_naming_it():
    """A router returning its dense scores alone (no logits, no expert indices): install refuses, naming the block."""
    if "llama4_text" not in CONFIG_MAPPING:
        pytest.skip(f"transformers {tlshim.registry.transformers_version()} has no llama4_text")
    model = build("llama4_text")
    for layer in model.model.layers:
        router = getattr(layer.feed_forward, "router", None)
        if router is not None:  # (an MoE block's)
            router.forward = lambda h, router=router: (torch.sigmoid(F.linear(h, router.weight)),)
    with pytest.raises(UnsupportedModelError, match="Llama4TextMoe"):
        tlshim.install(model)
    assert not tlshim.is_installed(model)


def test_backward_hooks_get_the_routing_gradients(moe_model):
    """dL/d(expert weights) reaches its backward hook and equals, per slot, <dL/d(mlp_out), what that
    expert gave>; dL/d(router logits) arrives too; the forward stays the idle one bit for bit."""
    ids = tokens()
    block, moe = _block(moe_model)
    grads, fwd = {}, {}
    names = ("blocks.0.mlp.hook_expert_weights", "blocks.0.mlp.hook_router_logits", "blocks.0.hook_mlp_out")
    with torch.no_grad():
        idle = moe_model(input_ids=ids, use_cache=False).logits
        x = _mlp_input(moe_model, ids)
    fwd_hooks = [(n, lambda t, hook: fwd.__setitem__(hook.name, t.detach())) for n in ("blocks.0.mlp.hook_expert_indices",)]
    bwd_hooks = [(n, lambda g, hook: grads.__setitem__(hook.name, g.detach())) for n in names]
    with moe_model.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
        logits = moe_model(input_ids=ids, use_cache=False).logits
        assert torch.equal(logits, idle)
        logits.sum().backward()
    assert grads["blocks.0.mlp.hook_router_logits"].shape == (2, 12, 4)
    indices, d_out = fwd["blocks.0.mlp.hook_expert_indices"], grads["blocks.0.hook_mlp_out"]
    with torch.no_grad():
        flat, idx = x.reshape(-1, x.shape[-1]), indices.reshape(-1, 2)
        d_flat = d_out.reshape(-1, d_out.shape[-1])
        want = torch.tensor(
            [[(d_flat[t] * _expert_out(block, moe, int(idx[t, k]), flat[t : t + 1])[0]).sum() for k in range(2)] for t in range(len(flat))]
        ).reshape(2, 12, 2)
    torch.testing.assert_close(grads["blocks.0.mlp.hook_expert_weights"], want, rtol=1e-4, atol=1e-4)
