"""Granite's multipliers (HOOKS.md "Multipliers"): hook_embed after embedding_multiplier, hook_attn_out /
hook_mlp_out after residual_multiplier (what is added), the scores after attention_multiplier, the logits after
logits_scaling; edits against the same edits made by hand on a plain twin. The tiny build sets Granite 3's
kind of values (tests/tiny.py MULTIPLIERS), so a hook that forgot a factor fails here."""

import pytest
import torch
from transformers import CONFIG_MAPPING

import tlshim
from tlshim.spec import get_path
from tiny import MULTIPLIERS, build, tokens

pytestmark = pytest.mark.filterwarnings("ignore:tlshim has no spec")
TYPES = [t for t in ("granite", "granitemoe", "granitemoeshared") if t in CONFIG_MAPPING]


def _pair(model_type):
    model, twin = build(model_type), build(model_type)
    assert {name: getattr(model.config, name) for name in MULTIPLIERS} == MULTIPLIERS  # none left at 1.0
    return tlshim.install(model), twin


@pytest.mark.parametrize("model_type", TYPES)
def test_the_names_hold_what_is_added_and_the_logits_carry_the_scaling(model_type):
    model, twin = _pair(model_type)
    ids, m = tokens(), MULTIPLIERS["residual_multiplier"]
    seen, spec = {}, model._tlshim.spec
    layer = twin.model.layers[0]

    def keep(key):
        def hook(mod, args, out):
            seen[key] = out[0] if isinstance(out, tuple) else out  # returns None: the output flows on
        return hook

    handles = [get_path(layer, spec.attn_out).register_forward_hook(keep("attn")),
               get_path(layer, spec.mlp_out).register_forward_hook(keep("mlp")),
               twin.model.embed_tokens.register_forward_hook(keep("embed"))]
    with torch.no_grad():
        native = twin(input_ids=ids).logits
    for handle in handles:
        handle.remove()
    logits, cache = model.run_with_cache(ids)
    assert torch.equal(logits, native)
    assert torch.equal(cache["hook_embed"], seen["embed"] * MULTIPLIERS["embedding_multiplier"])
    assert torch.equal(cache["blocks.0.hook_attn_out"], seen["attn"] * m)
    assert torch.equal(cache["blocks.0.hook_mlp_out"], seen["mlp"] * m)
    assert torch.equal(cache["blocks.0.hook_resid_mid"], cache["blocks.0.hook_resid_pre"] + cache["blocks.0.hook_attn_out"])
    assert torch.equal(cache["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_mid"] + cache["blocks.0.hook_mlp_out"])
    assert model.cfg.logit_scale == 1 / MULTIPLIERS["logits_scaling"]
    unembedded = model.unembed(cache["ln_final.hook_normalized"] * model.ln_final.w) * model.cfg.logit_scale
    torch.testing.assert_close(unembedded, logits, rtol=1e-5, atol=1e-5)
    assert tlshim.verify(model, ids).ok


@pytest.mark.parametrize("name, module", [("blocks.0.hook_attn_out", "self_attn"), ("blocks.0.hook_mlp_out", "mlp"), ("blocks.0.hook_resid_mid", "self_attn")])
def test_an_edit_of_what_is_added_equals_the_edit_by_hand(name, module):
    """Adding v at the name equals adding v / residual_multiplier to the sub-layer's output by hand (the block
    multiplies it); the division and the model's product round once, so equal to float rounding."""
    model, twin = _pair("granite")
    ids, vector = tokens(), torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    edited = model.run_with_hooks(ids, fwd_hooks=[(name, lambda x, hook: x + vector)])
    m = MULTIPLIERS["residual_multiplier"]

    def add(mod, args, out):
        if isinstance(out, tuple):
            return (out[0] + vector / m, *out[1:])
        return out + vector / m

    handle = getattr(twin.model.layers[0], module).register_forward_hook(add)
    try:
        with torch.no_grad():
            by_hand = twin(input_ids=ids).logits
    finally:
        handle.remove()
    assert not torch.allclose(by_hand, model(input_ids=ids).logits)  # the edit changes the output
    torch.testing.assert_close(edited, by_hand, rtol=1e-5, atol=1e-5 * by_hand.abs().max().item())


def test_the_logit_scale_is_measured_not_read_one_way_from_the_config():
    """Granite divides its logits by logits_scaling, HyperCLOVA X multiplies by the same field."""
    for model_type, want in (("granite", 1 / MULTIPLIERS["logits_scaling"]), ("hyperclovax", MULTIPLIERS["logits_scaling"])):
        if model_type not in CONFIG_MAPPING:
            continue
        model = tlshim.install(build(model_type))
        assert model.cfg.logit_scale == pytest.approx(want)
        assert tlshim.verify(model, tokens()).ok
