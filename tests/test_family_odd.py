"""The outliers of issue 10, one section each: Granite SWA's sinks applied as an output scale,
NanoChat's norm shared by the embedding and ln_final, Gemma 4's value norm, layer scalar and per-layer
input sub-layer, and the refusals (multi-stack HRM / BLT, Gemma 3n's AltUp): what each name holds,
cached runs bit-exact, and edits equal to the same edits made by hand."""

import pytest
import torch

import tlshim
from tlshim import sink_scaling
from tlshim.attention import sink_softmax

from test_family_post import installed, present
from tiny import build, tokens

pytestmark = pytest.mark.filterwarnings("ignore:tlshim has no spec")




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


# ------------------------------------------------------------------ one norm before and after the blocks (NanoChat)


def test_nanochat_shared_norm_is_hook_embed_on_its_first_call_and_ln_final_after_the_blocks():
    model, twin = installed("nanochat")
    spec = model._tlshim.spec
    assert spec.final_norm == spec.embed_out == "model.norm" and model.ln_final is model.model.norm
    fired = []
    hooks = [(name, lambda x, hook: fired.append(hook.name)) for name in ("hook_embed", "ln_final.hook_normalized", "ln_final.hook_scale")]
    logits, cache = model.run_with_cache(tokens(), names_filter=lambda n: True, use_cache=False)
    with model.hooks(fwd_hooks=hooks), torch.no_grad():
        model(input_ids=tokens(), use_cache=False)
    assert sorted(fired) == ["hook_embed", "ln_final.hook_normalized", "ln_final.hook_scale"]  # once each per forward
    assert torch.equal(logits, native(twin))
    norm = twin.model.norm
    with torch.no_grad():
        embedded = norm(twin.model.embed_tokens(tokens()))
        last = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
        assert torch.equal(cache["hook_embed"], embedded) and torch.equal(cache["blocks.0.hook_resid_pre"], embedded)
        assert torch.equal(cache["ln_final.hook_normalized"], norm(last))
        torch.testing.assert_close(cache["ln_final.hook_scale"], last.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt())


def norm_call_edit(norm, call, edit):
    """A forward hook on the twin's shared norm editing the output of its ``call``-th call (0: the embedding's)."""
    seen = []

    def hook(module, args, out):
        seen.append(1)
        return edit(out) if len(seen) == call + 1 else out

    return norm.register_forward_hook(hook)


@pytest.mark.parametrize("name, call", [("hook_embed", 0), ("ln_final.hook_normalized", 1)])
def test_nanochat_edits_of_hook_embed_and_ln_final_reach_only_their_own_call(name, call):
    model, twin = installed("nanochat")
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    edited = model.run_with_hooks(tokens(), fwd_hooks=[(name, lambda x, hook: x + vector)], use_cache=False)
    handle = norm_call_edit(twin.model.norm, call, lambda out: out + vector)
    try:
        by_hand = native(twin)
    finally:
        handle.remove()
    assert torch.equal(edited, by_hand)
    assert not torch.allclose(edited, native(twin))


def test_nanochat_q_norm_follows_rotary_and_its_output_is_what_enters_the_kernel():
    model, twin = installed("nanochat")
    assert model._tlshim.spec.qk_norm_after_rotary
    _, cache = model.run_with_cache(tokens(), names_filter=lambda n: n.startswith("blocks.0.attn"), use_cache=False)
    assert torch.equal(cache["blocks.0.attn.hook_q_normed"], cache["blocks.0.attn.hook_rot_q"])
    assert not torch.allclose(cache["blocks.0.attn.hook_q_normed"], twin.model.layers[0].self_attn.q_norm(cache["blocks.0.attn.hook_q"]))

    def zero_head(x, hook):
        x = x.clone()
        x[:, :, 1] = 0
        return x

    edited = model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.attn.hook_q_normed", zero_head)], use_cache=False)

    def by_hand(module, args, out):  # the q norm sees (batch, heads, pos, d_head)
        out = out.clone()
        out[:, 1] = 0
        return out

    handle = twin.model.layers[0].self_attn.q_norm.register_forward_hook(by_hand)
    try:
        assert torch.equal(edited, native(twin))
    finally:
        handle.remove()


# ------------------------------------------------------------------ a norm of the value heads (Gemma 4)

GEMMA4 = ("gemma4_unified_text", "gemma4_unified")


def language_model(model):
    return getattr(model.model, "language_model", model.model)


@pytest.mark.parametrize("model_type", GEMMA4)
def test_hook_v_is_the_normed_value_heads_attention_uses(model_type):
    model, twin = installed(model_type)
    assert model._tlshim.spec.v_norm == "v_norm"
    logits, cache = model.run_with_cache(tokens(), names_filter=lambda n: True, use_cache=False)
    assert torch.equal(logits, native(twin))
    attn = language_model(twin).layers[0].self_attn
    with torch.no_grad():
        v = attn.v_proj(cache["blocks.0.ln1.hook_normalized"] * language_model(twin).layers[0].input_layernorm.weight)
    v = v.view(cache["blocks.0.attn.hook_v"].shape)
    torch.testing.assert_close(cache["blocks.0.attn.hook_v"], v * v.pow(2).mean(-1, keepdim=True).add(attn.v_norm.eps).rsqrt())
    assert not torch.allclose(cache["blocks.0.attn.hook_v"], v)


@pytest.mark.parametrize("model_type", GEMMA4)
def test_an_edit_of_hook_v_equals_editing_the_v_norm_output_by_hand(model_type):
    model, twin = installed(model_type)

    def zero_head(x, hook):
        x = x.clone()
        x[:, :, 1] = 0
        return x

    edited = model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.attn.hook_v", zero_head)], use_cache=False)
    v_norm = language_model(twin).layers[0].self_attn.v_norm
    handle = v_norm.register_forward_hook(lambda m, args, out: zero_head(out, None))
    try:
        by_hand = native(twin)
    finally:
        handle.remove()
    assert torch.equal(edited, by_hand) and not torch.equal(edited, native(twin))


def test_an_edit_of_hook_v_input_goes_through_v_proj_then_the_v_norm():
    model, twin = installed("gemma4_unified_text")
    model.set_use_split_qkv_input(True)
    delta = torch.randn(tokens().shape[1], model.cfg.d_model, generator=torch.Generator().manual_seed(3))

    def add_to_head0(x, hook):
        x = x.clone()
        x[:, :, 0] += delta
        return x

    edited = model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.hook_v_input", add_to_head0)], use_cache=False)
    layer = twin.model.layers[0]
    seen = {}
    d_head = model.cfg.d_head

    def recompute(module, args, out):  # kv head 0 from the edited copy: ln1, v_proj's rows of that head, the v norm
        out = out.clone()
        v = layer.self_attn.v_proj(layer.input_layernorm(seen["x"] + delta))[..., :d_head]
        out[:, :, 0] = type(module).forward(module, v)  # not module(v): that would run this hook again
        return out

    handles = [
        layer.register_forward_pre_hook(lambda m, args: seen.update(x=args[0])),
        layer.self_attn.v_norm.register_forward_hook(recompute),
    ]
    try:
        by_hand = native(twin)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(edited, by_hand) and not torch.equal(edited, native(twin))


def with_layer_scalars(model):
    with torch.no_grad():
        for i, layer in enumerate(language_model(model).layers):
            layer.layer_scalar.fill_(0.75 + 0.5 * i)
    return model


def test_a_layer_scalar_scales_resid_post_and_a_resid_mid_edit_is_scaled_as_the_model_scales_it():
    present("gemma4_unified_text")
    model, twin = with_layer_scalars(build("gemma4_unified_text")), with_layer_scalars(build("gemma4_unified_text"))
    tlshim.install(model)
    assert model._tlshim.spec.layer_scalar == "layer_scalar"
    report = tlshim.verify(model, tokens())
    assert report.ok, str(report)
    logits, cache = model.run_with_cache(tokens(), names_filter=lambda n: "resid" in n or n.endswith("mlp_out"), use_cache=False)
    assert torch.equal(logits, native(twin))
    assert torch.equal(cache["blocks.1.hook_resid_post"], (cache["blocks.1.hook_resid_mid"] + cache["blocks.1.hook_mlp_out"]) * 1.25)
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    steered = model.run_with_hooks(tokens(), fwd_hooks=[("blocks.1.hook_resid_mid", lambda x, hook: x + vector)], use_cache=False)
    norm = twin.model.layers[1].post_attention_layernorm
    handle = norm.register_forward_hook(lambda m, args, out: out + vector)
    try:
        by_hand = native(twin)
    finally:
        handle.remove()
    torch.testing.assert_close(steered, by_hand, rtol=1e-5, atol=1e-5 * float(by_hand.abs().max()))
    assert not torch.allclose(steered, native(twin), atol=1e-3)


def test_gemma4_per_layer_input_is_hook_per_layer_out_and_resid_post_adds_it_before_the_scalar():
    present("gemma4_text")
    model, twin = with_layer_scalars(build("gemma4_text")), with_layer_scalars(build("gemma4_text"))
    tlshim.install(model)
    spec = model._tlshim.spec
    assert (spec.per_layer_out, spec.layer_scalar, spec.final_norm) == ("post_per_layer_input_norm", "layer_scalar", "model.norm")
    report = tlshim.verify(model, tokens())
    assert report.ok, str(report)
    logits, cache = model.run_with_cache(tokens(), names_filter=lambda n: n.startswith("blocks.1.hook"), use_cache=False)
    seen = {}
    handle = twin.model.layers[1].post_per_layer_input_norm.register_forward_hook(lambda m, args, out: seen.update(out=out))
    try:
        assert torch.equal(logits, native(twin))
    finally:
        handle.remove()
    assert torch.equal(cache["blocks.1.hook_per_layer_out"], seen["out"])
    total = (cache["blocks.1.hook_resid_mid"] + cache["blocks.1.hook_mlp_out"] + cache["blocks.1.hook_per_layer_out"]) * 1.25
    assert torch.equal(cache["blocks.1.hook_resid_post"], total)


@pytest.mark.parametrize("name, module", [("hook_per_layer_out", "post_per_layer_input_norm"), ("hook_resid_mid", "post_attention_layernorm")])
def test_gemma4_edits_before_the_per_layer_sub_layer_equal_the_edit_by_hand(name, module):
    """hook_per_layer_out: zeroed, bit for bit; hook_resid_mid: a vector added, which the per-layer
    sub-layer then reads as the model computes it (the sum order differs: close, not bit for bit)."""
    present("gemma4_text")
    model, twin = with_layer_scalars(build("gemma4_text")), with_layer_scalars(build("gemma4_text"))
    tlshim.install(model)
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    edit = (lambda x: torch.zeros_like(x)) if name == "hook_per_layer_out" else (lambda x: x + vector)
    edited = model.run_with_hooks(tokens(), fwd_hooks=[(f"blocks.0.{name}", lambda x, hook: edit(x))], use_cache=False)
    handle = getattr(twin.model.layers[0], module).register_forward_hook(lambda m, args, out: edit(out))
    try:
        by_hand = native(twin)
    finally:
        handle.remove()
    if name == "hook_per_layer_out":
        assert torch.equal(edited, by_hand)
    else:
        torch.testing.assert_close(edited, by_hand, rtol=1e-5, atol=1e-5 * float(by_hand.abs().max()))
    assert not torch.allclose(edited, native(twin), atol=1e-3)


# ------------------------------------------------------------------ blocks in more than one stack (HRM, BLT)


@pytest.mark.parametrize(
    "model_type, message",
    [
        # H_cycles 2 x L_cycles 3 of the default config: the low stack runs 6 times, the high one twice
        ("hrm_text", r"re-entered in a loop.*L_module.layers \(its first block runs 6 times per forward\), model.H_module.layers \(its first block runs 2 times"),
        ("blt", r"with other modules between them: model.local_encoder.layers \(its first block runs 1 time per forward\)"),
    ],
)
def test_blocks_in_more_than_one_stack_are_refused_saying_how_often_each_runs(model_type, message):
    present(model_type)
    with pytest.raises(tlshim.UnsupportedModelError, match=message):
        tlshim.install(build(model_type))


def test_gemma3n_altup_streams_are_refused_naming_them():
    present("gemma3n_text")
    model = build("gemma3n_text")
    # the list of blocks, not the longer list of AltUp's projections
    with pytest.raises(tlshim.UnsupportedModelError, match=r"model.layers.0 reads 4 residual streams stacked on a leading axis \(AltUp\)"):
        tlshim.install(model)
