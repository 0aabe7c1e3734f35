"""In-place weight processing against TransformerLens 3.9's HookedTransformer, built from a config with
the same shapes: its load_and_process_state_dict on the model's TL-named weights gives what
process_weights_ writes into the model, and a HookedTransformer state dict (its ``_W_K`` key/value
heads, its buffers) loads into the model. Runs in the `sae` tox env (transformer-lens 3.9 with SAELens);
skipped where TransformerLens 3 is absent.
"""

import importlib.metadata
import warnings

import pytest
import torch

import tlshim

import models
import tiny

transformer_lens = pytest.importorskip("transformer_lens", reason="transformer-lens is not installed (the `sae` tox env has 3.9)")
if importlib.metadata.version("transformer-lens").split(".")[0] != "3":
    pytest.skip("needs TransformerLens 3's HookedTransformer (the `sae` tox env has 3.9)", allow_module_level=True)

KV = ("W_K", "W_V", "b_K", "b_V")


def ht_config(model, **fields):
    c = model.cfg
    return transformer_lens.HookedTransformerConfig(
        d_model=c.d_model, d_head=c.d_head, n_heads=c.n_heads, d_mlp=c.d_mlp, n_layers=c.n_layers, n_ctx=c.n_ctx,
        d_vocab=c.d_vocab, eps=c.eps, default_prepend_bos=False, **fields)


def gpt2():
    model = tlshim.install(tiny.build("gpt2"))
    return model, ht_config(model, act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard"), tiny.tokens()


def llama():
    model = tlshim.install(models.build("llama"))
    c = model.cfg
    cfg = ht_config(model, n_key_value_heads=c.n_key_value_heads, act_fn="silu", normalization_type="RMS", gated_mlp=True,
                    final_rms=True, positional_embedding_type="rotary", rotary_dim=c.d_head, rotary_base=c.rotary_base)
    return model, cfg, models.tokens()


def ht_named(model):
    """The model's TL-named weights as HookedTransformer names them (GQA: ``_W_K`` etc. per key/value head)."""
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    out = {}
    for key, value in model.get_params().items():
        path, name = key.rsplit(".", 1)
        if name in KV and group > 1:
            key, value = f"{path}._{name}", value[::group]
        out[key] = value.detach().clone()
    return out


def ht_weight(ht, name):
    """HookedTransformer's stacked weight; GQA key/value weights per key/value head (its ``_W_K``), as
    tlshim's stacked ``W_K`` keeps them (HookedTransformer's ``W_K`` repeats them per query head)."""
    if name in KV and hasattr(ht.blocks[0].attn, f"_{name}"):
        return torch.stack([getattr(block.attn, f"_{name}") for block in ht.blocks]).detach()
    return getattr(ht, name).detach()


@pytest.mark.parametrize("make", [gpt2, llama])
def test_process_weights_writes_what_hooked_transformer_computes(make):
    model, cfg, ids = make()
    ht = transformer_lens.HookedTransformer(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ht.load_and_process_state_dict(ht_named(model), center_writing_weights=cfg.normalization_type == "LN")
        model.process_weights_()
    names = ["W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_E", "W_U", "b_U"]
    names += ["W_gate"] if cfg.gated_mlp else ["b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "W_pos"]
    for name in names:
        torch.testing.assert_close(getattr(model, name), ht_weight(ht, name), rtol=0, atol=1e-6, msg=name)
    with torch.no_grad():  # HookedTransformer computes attention itself: float rounding
        torch.testing.assert_close(model(ids, return_type="logits"), ht(ids), rtol=0, atol=1e-4)


def test_a_hooked_transformer_state_dict_loads_into_the_model():
    model, cfg, ids = llama()
    torch.manual_seed(3)
    ht = transformer_lens.HookedTransformer(cfg)
    for name, param in ht.named_parameters():  # HookedTransformer starts its norms at one and biases at zero
        # its gated MLP adds b_in after the gating (HF: up_proj's bias, before it): left at zero
        torch.nn.init.normal_(param, std=0.2) if not name.endswith("mlp.b_in") else None
    model.load_and_process_state_dict(ht.state_dict(), fold_ln=False, center_unembed=False, fold_value_biases=False)
    torch.testing.assert_close(model.W_K, ht_weight(ht, "W_K"), rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[1].ln2.w, ht.blocks[1].ln2.w.detach(), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, return_type="logits"), ht(ids), rtol=0, atol=1e-4)
