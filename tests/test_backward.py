"""Backward hooks receive the gradient at their point: compared with torch.autograd.grad."""

import pytest
import torch

import tlshim

from models import ALL_ARCHS, ATTN_IMPLS, build, tokens

NAMES = [
    "hook_embed",
    "blocks.1.hook_resid_pre",
    "blocks.1.ln1.hook_normalized",
    "blocks.1.attn.hook_q",
    "blocks.1.attn.hook_rot_k",
    "blocks.1.attn.hook_pattern",
    "blocks.1.attn.hook_z",
    "blocks.1.hook_attn_out",
    "blocks.1.hook_resid_mid",
    "blocks.1.mlp.hook_post",
    "blocks.2.ln2.hook_scale",  # alone on its norm
    "blocks.2.hook_resid_post",
    "ln_final.hook_scale",
    "ln_final.hook_normalized",  # with hook_scale: both on one norm
]


@pytest.mark.parametrize("arch", list(ALL_ARCHS))
def test_backward_hooks_get_autograd_gradients(arch):
    model = tlshim.install(build(arch, ATTN_IMPLS[arch][-1], train=True))
    ids = tokens()
    acts, grads = {}, {}
    fwd = [(name, lambda t, hook: acts.__setitem__(hook.name, t)) for name in NAMES]
    bwd = [(name, lambda g, hook: grads.__setitem__(hook.name, g)) for name in NAMES]
    with model.hooks(fwd, bwd):
        loss = model(ids, labels=ids).loss
        expected = torch.autograd.grad(loss, [acts[n] for n in NAMES], retain_graph=True)
        loss.backward()
    for name, want in zip(NAMES, expected):
        assert torch.equal(grads[name], want), name
    assert all(not point.active for point in model.hook_dict.values())


@pytest.mark.parametrize("arch", list(ALL_ARCHS))
def test_run_with_cache_incl_bwd_matches_plain_gradients(arch):
    model, twin = tlshim.install(build(arch, train=True)), build(arch, train=True)
    ids = tokens()
    _, cache = model.run_with_cache(ids, names_filter=NAMES, incl_bwd=True, labels=ids)
    twin(ids, labels=ids).loss.backward()
    for name in NAMES:
        assert cache[name + "_grad"].shape == cache[name].shape
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_backward_hook_can_replace_the_gradient():
    model = tlshim.install(build(train=True))
    ids = tokens()
    model.run_with_hooks(ids, bwd_hooks=[("blocks.2.hook_resid_pre", lambda g, hook: g * 0)], labels=ids)
    with model.hooks(bwd_hooks=[("blocks.2.hook_resid_pre", lambda g, hook: g * 0)]):
        model(ids, labels=ids).loss.backward()
    assert torch.count_nonzero(model.model.layers[0].mlp.down_proj.weight.grad) == 0
    assert torch.count_nonzero(model.model.layers[3].mlp.down_proj.weight.grad) > 0
