"""Mixture-of-experts layouts beyond Mixtral's (HOOKS.md "Families"): Llama 4's router returning
(dense scores, logits) with the scores scaling each expert's input, a router whose weight sits in a
linear child (Hunyuan), MoE blocks in post-norm-only (FlexOlmo) and parallel (Cohere2-MoE) blocks,
and the router outputs of older transformers ((indices, weights), GraniteMoE's expert-sorted slots,
logits the block routes itself, routing out of sight). Edits of the routing against mixtures built
by hand from the experts' parameters, on every matrix version that has the type."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import CONFIG_MAPPING

import tlshim
from tlshim.errors import UnsupportedModelError
from tlshim.spec import get_path

from test_family_moe import block_input
from tiny import build, tokens

TYPES = (
    "llama4_text", "flex_olmo", "cohere2_moe", "hunyuan_v1_moe", "dots1", "granitemoe", "granitemoeshared", "glm4_moe", "solar_open",
    "ernie4_5_moe", "dbrx",
)  # fmt: skip
#: the routing weights each type applies to logits ``l`` at the experts (3, 1) (top k = 2 of 4)
KNOWN_WEIGHTS = {
    "llama4_text": lambda l: torch.sigmoid(l[..., [3, 1]]),  # top k of the logits, a sigmoid each
    "flex_olmo": lambda l: F.softmax(l, dim=-1)[..., [3, 1]],  # softmax over all, top k, no renormalisation
    "cohere2_moe": lambda l: F.softmax(l[..., [3, 1]], dim=-1),  # top k, softmax over those
    "hunyuan_v1_moe": lambda l: F.softmax(l[..., [3, 1]], dim=-1),  # softmax, top k, renormalised: the same
    "ernie4_5_moe": lambda l: F.softmax(l[..., [3, 1]], dim=-1),  # router output (logits, indices, weights)
    "granitemoe": lambda l: F.softmax(l[..., [3, 1]], dim=-1),
    "dbrx": lambda l: F.softmax(l[..., [3, 1]], dim=-1),  # softmax, top k, divided by their 1-norm
    "granitemoeshared": lambda l: F.softmax(l[..., [3, 1]], dim=-1),
}


#: (type, transformers major.minor) that route out of tlshim's sight (test_logits_routed_out_of_sight...):
#: Hunyuan on 5.0 hands its experts dense (tokens, E) weights, which they index by slot; Llama 4 on
#: 4.53 routes inline around stacked experts
OUT_OF_SIGHT = {("hunyuan_v1_moe", "5.0"), ("llama4_text", "4.53")}
VERSION = ".".join(transformers.__version__.split(".")[:2])


def _built(model_type):
    """The tiny model, skipping where the installed transformers lacks the type or its own forward fails."""
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    model = build(model_type)
    try:
        with torch.no_grad():
            model(input_ids=tokens(), use_cache=False)
    except Exception as err:  # (DBRX on 5.0: its router reads ffn_hidden_size wide inputs)
        pytest.skip(f"{model_type} does not run tiny on transformers {transformers.__version__}: {type(err).__name__}: {err}")
    return model


@pytest.fixture(params=[t for t in TYPES if (t, VERSION) not in OUT_OF_SIGHT])
def moe_model(request):
    model = _built(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tlshim.install(model)
    yield model
    tlshim.uninstall(model)


def _moe_layer(model):
    """(index, MoE module, MoeSpec) of the first block holding a mixture."""
    spec = model._tlshim.spec
    i = next(i for i in range(model.cfg.n_layers) if f"blocks.{i}.mlp.hook_expert_weights" in model.hook_dict)
    return i, get_path(model, f"{spec.layers}.{i}.{spec.mlp}"), spec.moe


def _expert(block, j, x, llama4):
    """Expert j on rows x: its own module (4.x), or from the stacked parameters: (E, d, 2m) used as
    x @ W (Llama 4), GraniteMoE's input_linear / output_linear before 5.23, or (E, 2m, d)."""
    if hasattr(block, "input_linear"):
        gate, up = F.linear(x, block.input_linear.weight[j]).chunk(2, dim=-1)
        return F.linear(block.activation(gate) * up, block.output_linear.weight[j])
    if hasattr(block.experts, "mlp"):  # DBRX: w1, v1, w2 of every expert stacked as (E * m, d)
        glu = block.experts.mlp
        m = glu.w1.shape[0] // block.router.layer.weight.shape[0]
        w1, v1, w2 = (p[j * m : (j + 1) * m] for p in (glu.w1, glu.v1, glu.w2))
        return (glu.activation_fn(x @ w1.T) * (x @ v1.T)) @ w2
    experts = block.experts
    if isinstance(experts, torch.nn.ModuleList):
        return experts[j](x)
    if llama4:
        gate, up = (x @ experts.gate_up_proj[j]).chunk(2, dim=-1)
        return (up * experts.act_fn(gate)) @ experts.down_proj[j]
    gate, up = F.linear(x, experts.gate_up_proj[j]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[j])


def _by_hand(model, i, block, x, weights, indices):
    """hook_mlp_out of block i built token by token: sum over k of weights[k] * expert(x) (Llama 4:
    expert(weights[k] * x)), plus the shared expert (Cohere2-MoE may average the two), then the
    post-MLP norm where the block is post-norm."""
    flat, w, idx = x.reshape(-1, x.shape[-1]), weights.reshape(-1, weights.shape[-1]), indices.reshape(-1, indices.shape[-1])
    llama4 = type(block).__name__ == "Llama4TextMoe"
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for k in range(idx.shape[1]):
            row, j = flat[t : t + 1], int(idx[t, k])
            out[t] += (_expert(block, j, w[t, k] * row, True) if llama4 else w[t, k] * _expert(block, j, row, False))[0]
    shared = next((getattr(block, n) for n in ("shared_expert", "shared_experts", "shared_mlp") if hasattr(block, n)), None)
    if shared is not None:
        out = (out + shared(flat)) / 2 if getattr(block, "shared_expert_combination_strategy", "sum") == "average" else out + shared(flat)
    out = out.reshape(x.shape)
    spec = model._tlshim.spec
    if spec.residual_multiplier:  # GraniteMoE: what the block adds is the output times its multiplier
        out = out * getattr(get_path(model, f"{spec.layers}.{i}"), spec.residual_multiplier)
    return get_path(model, f"{spec.layers}.{i}.{spec.ln2_post}")(out) if spec.ln2_post else out


def test_router_hooks_hold_the_routing_the_model_applies(moe_model):
    """Shapes, the logits = the router's weight applied by hand, and the cached routing rebuilds the block's output."""
    ids = tokens()
    i, block, moe = _moe_layer(moe_model)
    names = [f"blocks.{i}.mlp.hook_{n}" for n in ("router_logits", "expert_weights", "expert_indices")] + [f"blocks.{i}.hook_mlp_out"]
    with torch.no_grad():
        x = block_input(moe_model, block, ids)
        _, cache = moe_model.run_with_cache(ids, names_filter=lambda n: n in names, use_cache=False)
        logits, weights, indices, mlp_out = (cache[n] for n in names)
        assert (logits.shape, weights.shape, indices.shape) == ((2, 12, 4), (2, 12, 2), (2, 12, 2))
        router = getattr(block, moe.router)
        weight = router.weight if isinstance(getattr(router, "weight", None), torch.Tensor) else next(router.children()).weight
        assert torch.equal(logits, F.linear(x, weight))
        torch.testing.assert_close(mlp_out, _by_hand(moe_model, i, block, x, weights, indices), rtol=1e-4, atol=1e-4)
    assert tlshim.verify(moe_model, ids).ok


def test_expert_weights_edit_is_the_hand_built_mixture(moe_model):
    ids = tokens()
    i, block, _ = _moe_layer(moe_model)
    seen = {}

    def edit(weights, hook):
        seen["weights"] = weights.clone()
        return torch.stack([2.5 * weights[..., 0], -weights[..., 1]], dim=-1)

    names = (f"blocks.{i}.mlp.hook_expert_indices", f"blocks.{i}.hook_mlp_out")
    with torch.no_grad():
        x = block_input(moe_model, block, ids)
        plain = moe_model.run_with_cache(ids, names_filter=lambda n: n == names[1], use_cache=False)[1][names[1]]
        with moe_model.hooks(fwd_hooks=[(f"blocks.{i}.mlp.hook_expert_weights", edit)]):
            _, cache = moe_model.run_with_cache(ids, names_filter=lambda n: n in names, use_cache=False)
        want = _by_hand(moe_model, i, block, x, edit(seen["weights"], None), cache[names[0]])
    torch.testing.assert_close(cache[names[1]], want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, want, atol=1e-3)  # the edit did change it


def test_router_logits_edit_is_routed_by_the_models_own_function(moe_model):
    """Logits set to (0, 1, -1, 2) for every token: experts (3, 1) everywhere, with the type's own weights
    (where the block routes the logits itself, GLM-4-MoE on 5.0-5.12, by its own code; where the router
    routes them by a function tlshim does not know, the edit raises naming what to edit instead)."""
    ids = tokens()
    i, block, moe = _moe_layer(moe_model)
    known = torch.tensor([0.0, 1.0, -1.0, 2.0])
    names = [f"blocks.{i}.mlp.hook_expert_weights", f"blocks.{i}.mlp.hook_expert_indices", f"blocks.{i}.hook_mlp_out"]
    hooks = [(f"blocks.{i}.mlp.hook_router_logits", lambda l, hook: known.expand_as(l).clone())]
    if moe.route is None and moe.layout != "logits":
        with pytest.raises(UnsupportedModelError, match="hook_expert_weights"):
            moe_model.run_with_hooks(ids, fwd_hooks=hooks, use_cache=False)
        return
    with torch.no_grad():
        x = block_input(moe_model, block, ids)
        with moe_model.hooks(fwd_hooks=hooks):
            _, cache = moe_model.run_with_cache(ids, names_filter=lambda n: n in names, use_cache=False)
    weights, indices, mlp_out = (cache[n] for n in names)
    assert (indices == torch.tensor([3, 1])).all()
    if moe_model.config.model_type in KNOWN_WEIGHTS:
        torch.testing.assert_close(weights, KNOWN_WEIGHTS[moe_model.config.model_type](known).expand_as(weights))
    torch.testing.assert_close(mlp_out, _by_hand(moe_model, i, block, x, weights, indices), rtol=1e-4, atol=1e-4)


def test_the_block_kind_keeps_its_residual_rule(moe_model):
    """Parallel (Cohere2-MoE): resid_post = resid_pre + attn_out + mlp_out, no resid_mid; post-norm-only
    (FlexOlmo): hook_resid_mid is what the MoE block reads, and an edit of it reaches the block's input."""
    ids = tokens()
    i, block, moe = _moe_layer(moe_model)
    cfg = moe_model.cfg
    with torch.no_grad():
        _, cache = moe_model.run_with_cache(ids, use_cache=False)
    pre, post = cache[f"blocks.{i}.hook_resid_pre"], cache[f"blocks.{i}.hook_resid_post"]
    if cfg.parallel_attn_mlp:
        assert f"blocks.{i}.hook_resid_mid" not in moe_model.hook_dict
        assert torch.equal(post, pre + cache[f"blocks.{i}.hook_attn_out"] + cache[f"blocks.{i}.hook_mlp_out"])
        return
    assert torch.equal(post, cache[f"blocks.{i}.hook_resid_mid"] + cache[f"blocks.{i}.hook_mlp_out"])
    vector = torch.randn(cfg.d_model, generator=torch.Generator().manual_seed(5))
    seen = {}
    # (the router's input: a pre-hook on the block itself runs before tlshim's wrapper fires resid_mid)
    handle = getattr(block, moe.router).register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            moe_model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{i}.hook_resid_mid", lambda r, hook: r + vector)], use_cache=False)
    finally:
        handle.remove()
    want = cache[f"blocks.{i}.hook_resid_mid"] + vector
    if moe_model._tlshim.spec.ln2:  # the MoE block reads the pre-MLP norm of resid_mid
        want = get_path(moe_model, f"{moe_model._tlshim.spec.layers}.{i}.{moe_model._tlshim.spec.ln2}")(want)
    torch.testing.assert_close(seen["x"].reshape(want.shape), want, rtol=0, atol=1e-6)


def test_a_router_with_no_known_routing_serves_the_routing_and_refuses_a_logits_edit():
    """AFMoE's router (sigmoid scores, top k of scores + an expert bias, renormalised and scaled) matches
    none of tlshim's routing functions: its weights and indices are still hooked; an edit of
    hook_router_logits names what to edit instead. (Its attention's output gate is served elsewhere, so
    the mixture is probed on its own.)"""
    if "afmoe" not in CONFIG_MAPPING:
        pytest.skip(f"transformers {tlshim.registry.transformers_version()} has no afmoe")
    from tlshim import family_moe
    from tlshim.structure import _mlp_projections

    model = build("afmoe")
    blocks = [layer.mlp for layer in model.model.layers]
    with torch.no_grad():  # (its router and bias start at zero: every expert ties)
        for block in blocks[1:]:
            block.router.gate.weight.normal_(generator=torch.Generator().manual_seed(0))
            block.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.25, 0.0]))
    moe = family_moe.detect(blocks, model.config, _mlp_projections)
    assert (moe.router, moe.route, moe.shared, moe.n_experts, moe.top_k) == ("router", None, "shared_experts", 4, 2)
    assert moe.layout in ("triple", "routing")  # (logits, weights, indices); (weights, indices) on 5.0
    with pytest.raises(UnsupportedModelError, match="hook_expert_weights"):
        family_moe.RouterSite(None, "model.layers.1.mlp.router", type("B", (), {"moe": moe})())._route(torch.zeros(1, 4))


def test_dbrx_q_k_v_hooks_hold_the_clamped_projection():
    """DBRX clamps its fused Wqkv output to +-clip_qkv before the heads split: hook_q / k / v hold the
    clamped values (what attention uses), so z = pattern @ v still holds where the clamp bites."""
    model = _built("dbrx")
    for block in model.transformer.blocks:
        block.norm_attn_norm.attn.clip_qkv = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tlshim.install(model)
    ids = tokens()
    wqkv, seen = model.transformer.blocks[0].norm_attn_norm.attn.Wqkv, {}
    handle = wqkv.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(ids, names_filter=lambda n: n.startswith("blocks.0.attn.hook_"), use_cache=False)
    finally:
        handle.remove()
    raw = F.linear(seen["x"], wqkv.weight)  # (the projection's own output, by hand)
    assert raw.abs().max() > 0.5  # the clamp bites
    q, k, v = (cache[f"blocks.0.attn.hook_{n}"] for n in "qkv")
    clamped = raw.clamp(-0.5, 0.5)
    n_q, n_kv = q.shape[2] * q.shape[3], k.shape[2] * k.shape[3]
    assert torch.equal(q.flatten(2), clamped[..., :n_q])
    assert torch.equal(v.flatten(2), clamped[..., n_q + n_kv :])
    assert tlshim.verify(model, ids).ok
    tlshim.uninstall(model)


@pytest.mark.parametrize("model_type", ["aria_text"] + [t for t, v in OUT_OF_SIGHT if v == VERSION])
def test_logits_routed_out_of_sight_are_edited_exactly(model_type):
    """Aria before 5.23 routes its router's logits where tlshim does not see the routing (its experts
    module, or the block around grouped experts): only hook_router_logits is served, and an edit of it
    equals the same logits put out of the router by hand."""
    model, twin = _built(model_type), build(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tlshim.install(model)
    moe = model._tlshim.spec.moe
    if moe.layout != "internal":
        tlshim.uninstall(model)
        pytest.skip(f"{model_type}'s router on transformers {transformers.__version__} returns its routing")
    assert "blocks.0.mlp.hook_router_logits" in model.hook_dict and "blocks.0.mlp.hook_expert_weights" not in model.hook_dict
    ids, known = tokens(), torch.tensor([0.0, 1.0, -1.0, 2.0])
    spec = model._tlshim.spec
    router = get_path(twin, f"{spec.layers}.0.{spec.mlp}.{moe.router}")
    handle = router.register_forward_hook(lambda m, args, out: known.expand_as(out).clone())
    try:
        with torch.no_grad():
            by_hand, plain = twin(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits
            hooks = [("blocks.0.mlp.hook_router_logits", lambda l, hook: known.expand_as(l).clone())]
            edited = model.run_with_hooks(ids, fwd_hooks=hooks, use_cache=False)
    finally:
        handle.remove()
    assert torch.equal(edited, by_hand)
    assert not torch.allclose(plain, by_hand, atol=1e-3)
    tlshim.uninstall(model)
