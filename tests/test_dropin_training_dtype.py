"""Issue 5, training and dtype moves: gradients, gradient checkpointing, .to(bfloat16) / .half() / .float()."""

import pytest
import torch

import tlshim

from dropin import (
    ARCHS, add_to_layer_output, add_vector, assert_close_to_scale, at_layer, exact_kernel, fixture,
    layers, own_kernel_names, prompts, steering_vector,
)

LAYER = 1
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")  # tf >= 5.23


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("arch, checkpointing", [
    (arch, mode) for arch in ARCHS for mode in (None, "non_reentrant", "reentrant")
])
def test_training_backward_hooks_and_incl_bwd_give_plain_gradients(arch, checkpointing):
    model, plain = tlshim.install(fixture(arch)), fixture(arch)
    for m in (model, plain):
        m.train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    ids = torch.stack(prompts(arch, [12, 12], seed=3))
    n_layers = model.cfg.n_layers

    # plain: the gradient at each decoder layer's output, through plain torch hooks
    plain_grads = {}

    def keep(i):
        def hook(module, args, out):
            if _layer_output(out).requires_grad:
                _layer_output(out).register_hook(lambda grad: plain_grads.__setitem__(i, grad))

        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers(plain))]
    try:
        plain_loss = plain(ids, labels=ids).loss
        plain_loss.backward()
    finally:
        for handle in handles:
            handle.remove()

    seen = {}
    bwd = [(f"blocks.{i}.hook_resid_post", lambda grad, hook: seen.__setitem__(hook.name, grad)) for i in range(n_layers)]
    # a model calling sdpa itself keeps its kernel, so its very gradients, while no score or pattern is hooked
    names_filter = None if exact_kernel(arch) else own_kernel_names
    with model.hooks(bwd_hooks=bwd):
        logits, cache = model.run_with_cache(ids, labels=ids, incl_bwd=True, names_filter=names_filter)
    assert not any(point.active for point in model.hook_dict.values())

    plain_params = dict(plain.named_parameters())
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.equal(param.grad, plain_params[name].grad), name
    for i in range(n_layers):
        name = f"blocks.{i}.hook_resid_post"
        assert torch.equal(seen[name], plain_grads[i]), name
        assert torch.equal(cache[name + "_grad"], plain_grads[i]), name
    assert cache["blocks.0.hook_resid_post"].requires_grad  # incl_bwd keeps the graph

    if not exact_kernel(arch):  # scores and patterns hooked: tlshim's kernel, the same gradients to rounding
        model.zero_grad(set_to_none=True)
        logits, cache = model.run_with_cache(ids, labels=ids, incl_bwd=True)
        for name, param in model.named_parameters():
            assert_close_to_scale(param.grad, plain_params[name].grad, msg=name)
    assert cache["blocks.0.attn.hook_pattern_grad"].shape == cache["blocks.0.attn.hook_pattern"].shape


def _hf_weights(arch, model):
    """What the aliases must read, by each architecture's own module names: the query rows of the q
    projection [n_heads * d_head, d_model], the MLP's output weight, the unembedding [d_vocab, d_model]
    and the final norm's weight (None where it has none)."""
    if arch == "openelm":  # fused q|k|v projection, tied unembedding with no lm_head module
        attn = model.transformer.layers[LAYER].attn
        q_rows = attn.qkv_proj.weight[: attn.num_q_heads * attn.head_dim]
        out = model.transformer.layers[LAYER].ffn.proj_2.weight
        return q_rows, out, model.transformer.token_embeddings.weight, model.transformer.norm.weight
    layer = model.model.layers[LAYER]
    final_norm = getattr(model.model.norm, "weight", None)
    return layer.self_attn.q_proj.weight, layer.mlp.down_proj.weight, model.lm_head.weight, final_norm


MOVES = [
    ("bfloat16", lambda m: m.to(torch.bfloat16), torch.bfloat16),
    ("half", lambda m: m.half(), torch.float16),
    ("float", lambda m: m.float(), torch.float32),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_dtype_moves_after_install(arch):
    """Hooks, caches and weight aliases follow the live parameters through each move in turn."""
    model, plain = tlshim.install(fixture(arch)), fixture(arch)
    ids = prompts(arch, [10])[0][None]
    vector = steering_vector(arch)
    for label, move, dtype in MOVES:
        assert move(model) is model
        move(plain)
        assert model.cfg.dtype == dtype, label
        with torch.no_grad():
            logits, cache = model.run_with_cache(ids)
            reference = plain(ids).logits
            if exact_kernel(arch):
                assert torch.equal(logits, reference), label
            else:  # its own sdpa while no score or pattern is hooked; tlshim's kernel otherwise
                assert torch.equal(model.run_with_cache(ids, names_filter=own_kernel_names)[0], reference), label
                assert_close_to_scale(logits, reference, rel=5e-2 if dtype != torch.float32 else 2e-5, msg=label)
        for name, value in cache.items():
            # the norm's divisor and its output before the weight are float32, as the norm computes them
            # (TransformerLens's too); a parameter-free norm's (OLMo v1) hook_normalized is its output
            in_float32 = name.endswith("hook_scale") or (name.endswith("hook_normalized") and arch != "olmo")
            assert value.dtype == (torch.float32 if in_float32 else dtype), (label, name)

        # the weight aliases are views of the live parameters, not stale copies
        attn, mlp = model.blocks[LAYER].attn, model.blocks[LAYER].mlp
        q_weight, out_weight, unembed, final_norm = _hf_weights(arch, model)
        assert attn.W_Q.dtype == dtype and attn.W_Q.data_ptr() == q_weight.data_ptr(), label
        n_heads = at_layer(model.cfg.n_heads, LAYER)
        plain_q = _hf_weights(arch, plain)[0]
        assert torch.equal(attn.W_Q, plain_q.view(n_heads, -1, plain_q.shape[1]).transpose(1, 2))
        assert mlp.W_out.data_ptr() == out_weight.data_ptr()
        assert model.W_E.dtype == dtype and model.W_U.data_ptr() == unembed.data_ptr()
        if arch == "olmo":  # OLMo v1's LayerNorm has no parameters
            assert final_norm is None and model.ln_final.w is None
        elif arch == "gemma2":  # Gemma's norms multiply by (1 + w): the alias is computed from the live weight
            assert model.ln_final.w.dtype == dtype and torch.equal(model.ln_final.w, 1.0 + final_norm)
        else:
            assert model.ln_final.w.data_ptr() == final_norm.data_ptr()
        if isinstance(model.cfg.n_heads, int):  # stacked over layers only when every layer has the same heads
            assert model.W_Q.dtype == dtype and torch.equal(model.W_Q[LAYER], attn.W_Q)

        # an edit in the new dtype equals the same edit by a plain torch hook
        handle = layers(plain)[LAYER].register_forward_hook(add_to_layer_output(vector))
        try:
            with torch.no_grad():
                steered = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{LAYER}.hook_resid_post", add_vector(vector))])
                assert torch.equal(steered, plain(ids).logits), label
        finally:
            handle.remove()
        assert not torch.equal(steered, logits)
