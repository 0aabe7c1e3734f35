"""The outliers of issue 10: Granite SWA's sinks applied as an output scale, ... (one section each):
what each name holds, cached runs bit-exact, and edits equal to the same edits made by hand."""

import pytest
import torch
from transformers import CONFIG_MAPPING

import tlshim
from tlshim import sink_scaling
from tlshim.attention import sink_softmax

from tiny import build, tokens

pytestmark = pytest.mark.filterwarnings("ignore:tlshim has no spec")


def installed(model_type):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {model_type}")
    model, twin = build(model_type), build(model_type)
    tlshim.install(model)
    return model, twin


def native(twin, pre_hooks=()):
    """The twin's logits, with (module, forward pre-hook) pairs registered for the one forward."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in pre_hooks]
    try:
        with torch.no_grad():
            return twin(input_ids=tokens(), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------ sinks as an output scale (Granite SWA)


@pytest.mark.parametrize("model_type", ["granite_swa", "granitemoe_swa"])
def test_sink_scaled_kernel_is_recognised_and_a_run_caching_the_pattern_gives_the_idle_logits(model_type):
    model, twin = installed(model_type)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.sinks.copy_(torch.linspace(5, 40, attn.sinks.numel()))
        twin.model.layers[0].self_attn.sinks.copy_(attn.sinks)
    assert sink_scaling.scales_output(attn)
    logits, cache = model.run_with_cache(tokens(), names_filter=lambda n: "attn" in n, use_cache=False)
    assert torch.equal(logits, native(twin))
    scores, pattern = cache["blocks.0.attn.hook_attn_scores"], cache["blocks.0.attn.hook_pattern"]
    # the pattern as applied: the sink takes its share of each row (HOOKS.md), as gpt-oss's column would
    torch.testing.assert_close(pattern, sink_softmax(scores, attn.sinks), rtol=1e-5, atol=1e-6)
    share = torch.sigmoid(torch.logsumexp(scores, -1) - attn.sinks.view(1, -1, 1))
    torch.testing.assert_close(pattern.sum(-1), share)
    assert (share < 0.99).any()


def test_gpt_oss_sinks_are_a_softmax_column_not_an_output_scale():
    model, _ = installed("gpt_oss")
    assert not sink_scaling.scales_output(model.model.layers[0].self_attn)


def test_an_edited_sink_scaled_pattern_gives_pattern_at_v_as_z():
    model, twin = installed("granite_swa")
    _, cache = model.run_with_cache(tokens(), names_filter=lambda n: n.startswith("blocks.0.attn"), use_cache=False)
    keep = torch.ones_like(cache["blocks.0.attn.hook_pattern"])
    keep[:, 1, :, 0] = 0  # head 1 no longer reads the first position

    edited = model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: p * keep)], use_cache=False)
    attn = twin.model.layers[0].self_attn
    # by hand: the pattern from the cached scores with the sink as an extra logit, edited, times v
    pattern = sink_softmax(cache["blocks.0.attn.hook_attn_scores"], attn.sinks) * keep
    v = cache["blocks.0.attn.hook_v"].repeat_interleave(model.cfg.n_heads // model.cfg.n_key_value_heads, 2)
    z = torch.matmul(pattern, v.transpose(1, 2)).transpose(1, 2).flatten(-2)
    by_hand = native(twin, [(attn.o_proj, lambda m, args: (z,))])
    torch.testing.assert_close(edited, by_hand, rtol=1e-5, atol=1e-5 * float(by_hand.abs().max()))
    assert not torch.allclose(edited, native(twin), atol=1e-3)


def test_an_in_place_edit_of_the_sink_scaled_pattern_is_seen():
    model, twin = installed("granite_swa")

    def zero(p, hook):
        p.zero_()

    edited = model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.attn.hook_pattern", zero)], use_cache=False)
    attn = twin.model.layers[0].self_attn
    by_hand = native(twin, [(attn.o_proj, lambda m, args: (torch.zeros_like(args[0]),))])
    assert torch.equal(edited, by_hand)
