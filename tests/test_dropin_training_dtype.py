"""Issue 5, training and dtype moves: gradients, gradient checkpointing, .to(bfloat16) / .half() / .float()."""

import pytest
import torch

import tlshim

from dropin import ARCHS, add_to_layer_output, add_vector, fixture, prompts, steering_vector

LAYER = 1
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")  # tf >= 5.23


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("checkpointing", [None, "non_reentrant", "reentrant"])
@pytest.mark.parametrize("arch", ARCHS)
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

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(plain.model.layers)]
    try:
        plain_loss = plain(ids, labels=ids).loss
        plain_loss.backward()
    finally:
        for handle in handles:
            handle.remove()

    seen = {}
    bwd = [(f"blocks.{i}.hook_resid_post", lambda grad, hook: seen.__setitem__(hook.name, grad)) for i in range(n_layers)]
    with model.hooks(bwd_hooks=bwd):
        logits, cache = model.run_with_cache(ids, labels=ids, incl_bwd=True)
    assert not any(point.active for point in model.hook_dict.values())

    plain_params = dict(plain.named_parameters())
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.equal(param.grad, plain_params[name].grad), name
    for i in range(n_layers):
        name = f"blocks.{i}.hook_resid_post"
        assert torch.equal(seen[name], plain_grads[i]), name
        assert torch.equal(cache[name + "_grad"], plain_grads[i]), name
    assert cache["blocks.0.attn.hook_pattern_grad"].shape == cache["blocks.0.attn.hook_pattern"].shape
    assert cache["blocks.0.hook_resid_post"].requires_grad  # incl_bwd keeps the graph


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
    vector = steering_vector(model.cfg.d_model)
    for label, move, dtype in MOVES:
        assert move(model) is model
        move(plain)
        assert model.cfg.dtype == dtype, label
        with torch.no_grad():
            logits, cache = model.run_with_cache(ids)
            assert torch.equal(logits, plain(ids).logits), label
        for name, value in cache.items():
            if not name.endswith("hook_scale"):  # the norm's divisor is computed in float32, as the norm does
                assert value.dtype == dtype, (label, name)

        # the weight aliases are views of the live parameters, not stale copies
        attn, mlp = model.blocks[LAYER].attn, model.blocks[LAYER].mlp
        hf_attn = plain.model.layers[LAYER].self_attn
        assert attn.W_Q.dtype == dtype and attn.W_Q.data_ptr() == attn.q_proj.weight.data_ptr(), label
        assert torch.equal(attn.W_Q, hf_attn.q_proj.weight.view(attn.W_Q.shape[0], -1, attn.W_Q.shape[1]).transpose(1, 2))
        assert mlp.W_out.data_ptr() == mlp.down_proj.weight.data_ptr()
        assert model.W_E.dtype == dtype and model.W_U.data_ptr() == model.lm_head.weight.data_ptr()
        assert model.ln_final.w.data_ptr() == model.model.norm.weight.data_ptr()
        assert model.W_Q.dtype == dtype and torch.equal(model.W_Q[LAYER], attn.W_Q)

        # an edit in the new dtype equals the same edit by a plain torch hook
        handle = plain.model.layers[LAYER].register_forward_hook(add_to_layer_output(vector))
        try:
            with torch.no_grad():
                steered = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{LAYER}.hook_resid_post", add_vector(vector))])
                assert torch.equal(steered, plain(ids).logits), label
        finally:
            handle.remove()
        assert not torch.equal(steered, logits)
