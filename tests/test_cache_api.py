"""The ActivationCache and the TransformerLens-style running API."""

import pytest
import torch
import torch.nn.functional as F

import tlshim
from tlshim.names import act_name

from models import build, tokens


@pytest.fixture(scope="module")
def run():
    model = tlshim.install(build("llama"))
    ids = tokens(2, 10)
    logits, cache = model.run_with_cache(ids)
    return model, ids, logits, cache


def test_shorthand_keys(run):
    model, _, _, cache = run
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["resid_pre", 0] is cache["blocks.0.hook_resid_pre"]
    assert cache["normalized", 3, "ln2"] is cache["blocks.3.ln2.hook_normalized"]
    assert cache["q", 0] is cache["blocks.0.attn.hook_q"]
    assert cache["embed"] is cache["hook_embed"] and cache["scale"] is cache["ln_final.hook_scale"]
    assert act_name("post", 2) == "blocks.2.mlp.hook_post" and act_name("attn_out", 1) == "blocks.1.hook_attn_out"
    assert act_name("scale", 1, "ln2") == "blocks.1.ln2.hook_scale" and act_name("z", 0, "a") == "blocks.0.attn.hook_z"
    assert "blocks.0.hook_resid_mid" in cache and "blocks.0.attn.hook_result" not in cache
    switched_off = ("hook_result", "hook_attn_in", "_input", "hook_mlp_in")  # the TransformerLens switches start off
    assert set(cache.keys()) == {n for n in model.hook_dict if not n.endswith(switched_off)}
    assert len(list(cache.items())) == len(cache)


def test_cache_holds_the_activations_themselves(run):
    model, ids, logits, cache = run
    seen = {}
    model.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_post", lambda t, hook: seen.setdefault("t", t))])
    _, again = model.run_with_cache(ids, names_filter="blocks.1.hook_resid_post")
    assert list(again.keys()) == ["blocks.1.hook_resid_post"]
    assert torch.equal(again["blocks.1.hook_resid_post"], seen["t"])
    assert not again["blocks.1.hook_resid_post"].requires_grad


def test_names_filter_forms_and_device(run):
    model, ids, _, _ = run
    _, by_list = model.run_with_cache(ids, names_filter=["hook_embed", "blocks.0.attn.hook_z"])
    _, by_fn = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_z"), device="cpu")
    assert set(by_list.keys()) == {"hook_embed", "blocks.0.attn.hook_z"}
    assert set(by_fn.keys()) == {f"blocks.{i}.attn.hook_z" for i in range(4)}
    _, single = model.run_with_cache(ids[:1], remove_batch_dim=True, names_filter="hook_embed")
    assert single["hook_embed"].shape == (10, 64)
    moved = single.to("cpu")
    assert moved is single


def test_accumulated_and_decomposed_residual(run):
    model, _, logits, cache = run
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "2_pre", "3_pre", "final_post"]
    assert torch.equal(stack[1], cache["resid_pre", 1]) and torch.equal(stack[-1], cache["resid_post", 3])
    mids, labels = cache.accumulated_resid(layer=2, incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre"]
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[0] == "embed" and labels[-1] == "3_mlp_out" and len(labels) == 9
    torch.testing.assert_close(parts.sum(0), cache["resid_post", 3], rtol=1e-5, atol=1e-5)
    parts = cache.decompose_resid(layer=2, mlp_input=True)
    torch.testing.assert_close(parts.sum(0), cache["resid_mid", 2], rtol=1e-5, atol=1e-5)


def test_apply_ln_divides_by_the_cached_scale_before_the_weight(run):
    """TransformerLens on unfolded weights: components sum to hook_normalized (before the norm's weight);
    the logit lens at the final layer runs the final norm itself, weight included."""
    model, ids, logits, cache = run
    parts = cache.decompose_resid(apply_ln=True, pos_slice=-1)
    assert parts.shape == (9, 2, 64)  # an int pos_slice drops the axis, as in TransformerLens
    torch.testing.assert_close(parts.sum(0), cache["ln_final.hook_normalized"][:, -1], rtol=1e-4, atol=1e-5)
    mid = cache.decompose_resid(layer=2, mlp_input=True, apply_ln=True)
    torch.testing.assert_close(mid.sum(0), cache["blocks.2.ln2.hook_normalized"], rtol=1e-4, atol=1e-5)
    assert torch.equal(cache.accumulated_resid(layer=2, apply_ln=True)[-1], cache["resid_pre", 2] / cache["scale", 2, "ln1"])
    lens = cache.accumulated_resid(apply_ln=True)
    assert torch.equal(lens[-1], model.ln_final(cache["resid_post", 3]))
    assert torch.equal(lens[1], model.ln_final(cache["resid_pre", 1]))  # its own statistics, not the cached scale
    first = cache.apply_ln_to_stack(parts[:, None, 0] * cache["scale"][None, 0, -1], batch_slice=(0, 1), pos_slice=-1)
    torch.testing.assert_close(first, parts[:, None, 0])


def test_logit_attrs_sum_to_the_logits(run):
    """The directions carry the final norm's weight (TransformerLens's numbers assume it folded into W_U)."""
    model, ids, logits, cache = run
    answer, wrong = ids[:, -1], (ids[:, -1] + 1) % 256
    raw = cache.decompose_resid(pos_slice=-1)
    normalized = cache["ln_final.hook_normalized"][:, -1]
    attrs = cache.logit_attrs(raw, answer, pos_slice=-1)
    want = logits[torch.arange(2), -1, answer]
    torch.testing.assert_close(attrs.sum(0), want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose((normalized * model.W_U[:, answer].T).sum(-1), want, atol=1e-2)  # W_U alone misses the weight
    diff = cache.logit_attrs(raw, answer, incorrect_tokens=wrong, pos_slice=-1)
    torch.testing.assert_close(diff.sum(0), want - logits[torch.arange(2), -1, wrong], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="without a tokenizer"):  # a string is one token, as the tokenizer reads it
        cache.logit_attrs(raw, "cat")


def test_stack_head_results(run):
    model, _, _, cache = run
    heads, labels = cache.stack_head_results(layer=2, return_labels=True)
    assert heads.shape == (8, 2, 10, 64) and labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]
    for i in range(2):
        o_proj = model.blocks[i].attn.o_proj
        attn_out = F.linear(cache["z", i].flatten(-2), o_proj.weight)
        torch.testing.assert_close(heads[4 * i: 4 * i + 4].sum(0), attn_out, rtol=1e-5, atol=1e-5)
    with_rest, labels = cache.stack_head_results(layer=2, incl_remainder=True, return_labels=True)
    assert labels[-1] == "remainder"
    torch.testing.assert_close(with_rest.sum(0), cache["resid_pre", 2], rtol=1e-5, atol=1e-5)


def test_hooks_context_ctx_and_permanent_hooks(run):
    model, ids, logits, _ = run
    calls = []

    def count(t, hook):
        hook.ctx["n"] = hook.ctx.get("n", 0) + 1
        calls.append((hook.name, hook.layer()))

    with model.hooks(fwd_hooks=[(lambda n: n.endswith("hook_resid_post"), count)]):
        model(ids)
        model(ids)
    assert calls[:4] == [(f"blocks.{i}.hook_resid_post", i) for i in range(4)] and len(calls) == 8
    assert model.hook_dict["blocks.0.hook_resid_post"].ctx == {"n": 2}
    model.add_hook("blocks.0.hook_resid_pre", lambda t, hook: t * 0, is_permanent=True)
    model.reset_hooks()
    assert not torch.equal(model(ids).logits, logits)
    model.reset_hooks(including_permanent=True)
    assert torch.equal(model(ids).logits, logits)
    assert model.hook_dict["blocks.0.hook_resid_post"].ctx == {}
