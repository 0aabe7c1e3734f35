"""Post-norm-only blocks (OLMo2, OLMo3, EXAONE 4) and weight-free RMSNorms on the structural path:
what each name holds (HOOKS.md "Families"), and edits equal to the same edits made by hand."""

from types import SimpleNamespace

import pytest
import torch
from transformers import CONFIG_MAPPING

import tlshim
from tlshim.structure import _norm_kind, derive_spec

from tiny import build, tokens

POST_NORM = ("olmo2", "olmo3", "exaone4")

pytestmark = pytest.mark.filterwarnings("ignore:tlshim has no spec")


def present(model_type):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {model_type}")


def installed(model_type):
    present(model_type)
    model, twin = build(model_type), build(model_type)
    tlshim.install(model)
    return model, twin


def run_by_hand(twin, module, hook):
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return twin(input_ids=tokens(), use_cache=False).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("model_type", POST_NORM)
def test_post_norm_blocks_have_no_pre_norm_hooks_and_their_attn_out_is_after_the_post_norm(model_type):
    model, _ = installed(model_type)
    spec = derive_spec(model)
    assert (spec.ln1, spec.ln2, spec.ln1_post, spec.ln2_post) == (None, None, "post_attention_layernorm", "post_feedforward_layernorm")
    assert not [n for n in model.hook_dict if ".ln1." in n or ".ln2." in n]
    assert model.blocks[0].ln1_post is model.model.layers[0].post_attention_layernorm
    _, cache = model.run_with_cache(tokens(), names_filter=lambda name: True, use_cache=False)
    layer = model.model.layers[1]
    with torch.no_grad():
        o_out = layer.self_attn.o_proj(cache["blocks.1.attn.hook_z"].flatten(-2))
        assert torch.equal(cache["blocks.1.hook_attn_out"], layer.post_attention_layernorm(o_out))
        assert torch.equal(cache["blocks.1.hook_mlp_out"], layer.post_feedforward_layernorm(layer.mlp(cache["blocks.1.hook_resid_mid"])))
    assert torch.equal(cache["blocks.1.hook_resid_mid"], cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_out"])
    assert torch.equal(cache["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_mid"] + cache["blocks.1.hook_mlp_out"])
    report = tlshim.verify(model, tokens())
    assert report.ok, str(report)
    assert {f.name for f in report.findings if f.check.startswith("= the k norm of hook_k")} == {"blocks.0.attn.hook_k_normed", "blocks.1.attn.hook_k_normed"}


@pytest.mark.parametrize("model_type", POST_NORM)
def test_q_normed_is_split_into_heads_and_an_edit_of_one_head_equals_the_edit_by_hand(model_type):
    model, twin = installed(model_type)
    batch, pos = tokens().shape
    _, cache = model.run_with_cache(tokens(), names_filter=lambda name: name.endswith("_normed"), use_cache=False)
    cfg = model.cfg
    assert cache["blocks.0.attn.hook_q_normed"].shape == (batch, pos, cfg.n_heads, cfg.d_head)
    assert cache["blocks.0.attn.hook_k_normed"].shape == (batch, pos, cfg.n_key_value_heads, cfg.d_head)

    def zero_head(x, hook):
        x = x.clone()
        x[:, :, 1] = 0
        return x

    edited = model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.attn.hook_q_normed", zero_head)], use_cache=False)
    q_norm = twin.model.layers[0].self_attn.q_norm
    whole = model._tlshim.spec.qk_norm_whole

    def by_hand(module, args, out):  # the whole vector (b p h*d), (b h p d) or (b p h d), as the model has it
        out = out.clone()
        if whole:
            out[..., cfg.d_head : 2 * cfg.d_head] = 0
        elif out.shape[1] == cfg.n_heads and out.shape[2] == pos:
            out[:, 1] = 0
        else:
            out[:, :, 1] = 0
        return out

    assert torch.equal(edited, run_by_hand(twin, q_norm, by_hand))
    assert whole == (model_type != "exaone4")  # OLMo2/3 normalise the whole projection, EXAONE 4 each head


@pytest.mark.parametrize("model_type", POST_NORM)
def test_a_resid_mid_edit_reaches_the_mlp_and_the_residual(model_type):
    model, twin = installed(model_type)
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    steered = model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.hook_resid_mid", lambda x, hook: x + vector)], use_cache=False)
    by_hand = run_by_hand(twin, twin.model.layers[0].post_attention_layernorm, lambda m, args, out: out + vector)
    # (resid + attn_out) + v against resid + (attn_out + v): equal up to float rounding only
    torch.testing.assert_close(steered, by_hand, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(steered, twin(input_ids=tokens(), use_cache=False).logits, atol=1e-3)


class BareRMSNorm(torch.nn.Module):
    """An RMSNorm without a weight, as NanoChat and HRM-Text have it (their model types are refused for
    other reasons: a norm shared by the embedding and the final norm, a hierarchical stack of blocks)."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def bare_llama():
    model = build("llama")
    model.config.model_type = "llama_bare"
    for layer in model.model.layers:
        layer.input_layernorm, layer.post_attention_layernorm = BareRMSNorm(1e-5), BareRMSNorm(1e-5)
    model.model.norm = BareRMSNorm(1e-5)
    return model


def test_a_weight_free_rms_norm_fires_its_output_as_hook_normalized_and_an_edited_scale_flows_on():
    model, twin = bare_llama(), bare_llama()
    assert derive_spec(model).norm is tlshim.norms.BARE_RMS
    tlshim.install(model)
    assert tlshim.verify(model, tokens()).ok
    _, cache = model.run_with_cache(tokens(), names_filter=lambda name: True, use_cache=False)
    resid = cache["blocks.1.hook_resid_pre"]
    scale = (resid.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    assert torch.equal(cache["blocks.1.ln1.hook_normalized"], model.model.layers[1].input_layernorm(resid))
    torch.testing.assert_close(cache["blocks.1.ln1.hook_scale"], scale)
    doubled = model.run_with_hooks(tokens(), fwd_hooks=[("blocks.1.ln1.hook_scale", lambda x, hook: 2 * x)], use_cache=False)
    by_hand = run_by_hand(twin, twin.model.layers[1].input_layernorm, lambda m, args, out: out / 2)
    torch.testing.assert_close(doubled, by_hand, rtol=1e-5, atol=1e-5)


def test_nemotrons_one_plus_w_layer_norm_is_found_and_an_edited_scale_flows_through_it():
    present("nemotron")
    model, twin = build("nemotron"), build("nemotron")
    norm, x = model.model.layers[0].input_layernorm, torch.randn(2, 5, model.config.hidden_size)
    flow = SimpleNamespace(inputs={"norm": x}, outputs={"norm": norm(x)})
    assert _norm_kind(norm, flow, "norm") is tlshim.norms.OFFSET_LAYER
    tlshim.install(model)  # on 4.x through its own attention code (legacy_attention / inline_attention)
    assert model._tlshim.spec.norm is tlshim.norms.OFFSET_LAYER
    assert tlshim.verify(model, tokens()).ok
    doubled = model.run_with_hooks(tokens(), fwd_hooks=[("blocks.1.ln1.hook_scale", lambda x, hook: 2 * x)], use_cache=False)
    norm = twin.model.layers[1].input_layernorm
    by_hand = run_by_hand(twin, norm, lambda m, args, out: (out - m.bias) / 2 + m.bias)
    torch.testing.assert_close(doubled, by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [
        ("diffllama", "differential attention"),
        ("hrm_text", "more than one stack"),
    ],
)
def test_types_whose_hooks_would_not_hold_what_their_names_say_are_refused_with_the_reason(model_type, reason):
    present(model_type)
    model = build(model_type)
    with pytest.raises(tlshim.UnsupportedModelError, match=reason):
        tlshim.install(model)
    assert not tlshim.is_installed(model)
