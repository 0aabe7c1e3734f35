"""What Gemma2, OLMo v1 and SmolLM3 each need beyond the Llama path."""

import warnings

import pytest
import torch

import tlshim

from models import ATTN_IMPLS, build, tokens

# -- Gemma2 ---------------------------------------------------------------------------------------


def installed_gemma2(attn="eager", **options):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "tlshim switched")
        return tlshim.install(build("gemma2", attn), **options)


def test_gemma2_embed_is_scaled_and_post_norms_are_aliased():
    model = installed_gemma2()
    ids = tokens()
    _, cache = model.run_with_cache(ids)
    assert torch.equal(cache["hook_embed"], model.W_E[ids] * torch.tensor(64**0.5))
    for i, block in enumerate(model.blocks):
        layer = model.model.layers[i]
        assert block.ln1_post is layer.post_attention_layernorm and block.ln2_post is layer.post_feedforward_layernorm
        assert block.ln2 is layer.pre_feedforward_layernorm
        assert torch.equal(block.ln1.w, 1 + layer.input_layernorm.weight)
        assert torch.equal(block.ln2_post.w, 1 + layer.post_feedforward_layernorm.weight)
        assert torch.equal(cache[f"blocks.{i}.hook_mlp_out"], block.ln2_post(block.mlp(block.ln2(cache[f"blocks.{i}.hook_resid_mid"]))))
        # hook_normalized is before the (1 + w): the norm's output is it times w, in float32
        assert torch.equal(block.ln2(cache[f"blocks.{i}.hook_resid_mid"]), cache[f"blocks.{i}.ln2.hook_normalized"] * block.ln2.w)
    assert model.cfg.output_logits_soft_cap == 30.0 and model.cfg.attn_scores_soft_cap == 50.0 and model.cfg.window_size == 4


def test_gemma2_scores_are_scaled_capped_and_windowed():
    model = installed_gemma2()
    _, cache = model.run_with_cache(tokens())
    n_rep = model.cfg.n_heads // model.cfg.n_key_value_heads
    for i in range(model.cfg.n_layers):
        q = cache[f"blocks.{i}.attn.hook_rot_q"].transpose(1, 2)
        k = cache[f"blocks.{i}.attn.hook_rot_k"].transpose(1, 2).repeat_interleave(n_rep, dim=1)
        raw = q @ k.transpose(-1, -2) * model.config.query_pre_attn_scalar**-0.5
        capped = torch.tanh(raw / 50.0) * 50.0
        scores = cache[f"blocks.{i}.attn.hook_attn_scores"]
        query, key = torch.arange(12)[:, None], torch.arange(12)[None, :]
        sliding = i % 2 == 0
        visible = (key <= query) & (query - key < 4) if sliding else key <= query
        torch.testing.assert_close(scores[..., visible], capped[..., visible], rtol=1e-5, atol=1e-5)
        pattern = cache[f"blocks.{i}.attn.hook_pattern"]
        assert torch.all(pattern[..., ~visible] == 0)
        beyond_window = (key <= query) & (query - key >= 4)
        assert torch.all(pattern[..., beyond_window] > 0) != sliding


@pytest.mark.skipif("sdpa" not in ATTN_IMPLS["gemma2"], reason="transformers >= 5.21 builds Gemma2 with eager attention only")
def test_gemma2_sdpa_is_switched_to_eager_for_that_model_only():
    ids = tokens()
    model, bystander = build("gemma2", "sdpa"), build("gemma2", "sdpa")
    sdpa_logits = model(ids).logits
    with pytest.warns(UserWarning, match="switched this Gemma2 model from 'sdpa' to eager"):
        tlshim.install(model)
    assert model.config._attn_implementation == "eager"
    assert bystander.config._attn_implementation == "sdpa"
    assert torch.equal(model(ids).logits, build("gemma2", "eager")(ids).logits)
    assert not torch.allclose(model(ids).logits, sdpa_logits, atol=1e-3)  # soft-capping restored
    tlshim.uninstall(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(model(ids).logits, sdpa_logits)
    kept = build("gemma2", "sdpa")
    with pytest.warns(UserWarning, match="keep_attn_implementation=True"):
        tlshim.install(kept, keep_attn_implementation=True)
    assert kept.config._attn_implementation == "sdpa"
    assert torch.equal(kept(ids).logits, sdpa_logits)


# -- OLMo -----------------------------------------------------------------------------------------


def test_olmo_hooks_see_the_clamped_projections_and_keep_them():
    model = tlshim.install(build("olmo"))
    ids = tokens()
    seen, copies = {}, {}

    def keep(tensor, hook):
        seen[hook.name], copies[hook.name] = tensor, tensor.clone()

    names = [f"blocks.{i}.attn.hook_{r}" for i in range(4) for r in "qkv"]
    _, cache = model.run_with_cache(ids, names_filter=names + ["blocks.0.ln1.hook_normalized"])
    logits = model.run_with_hooks(ids, fwd_hooks=[(n, keep) for n in names])
    assert torch.equal(logits, build("olmo")(ids).logits)
    clamped = 0
    for name in names:
        assert torch.equal(seen[name], copies[name]), f"{name} was changed after its hook saw it"
        assert seen[name].abs().max() <= 8.0
        clamped += (seen[name].abs() == 8.0).sum().item()
    assert clamped / sum(seen[n].numel() for n in names) > 0.1
    q_proj = model.model.layers[0].self_attn.q_proj
    want = q_proj(cache["blocks.0.ln1.hook_normalized"]).clamp(-8.0, 8.0).view(2, 12, 4, 16)
    assert torch.equal(cache["blocks.0.attn.hook_q"], want)
    assert model.cfg.normalization_type == "LN" and model.blocks[0].ln1.w is None


def test_olmo_backward_through_the_clamp():
    model = tlshim.install(build("olmo", train=True))
    ids = tokens()
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith(("hook_q", "hook_v")), incl_bwd=True, labels=ids)
    grad = cache["blocks.1.attn.hook_q_grad"]
    assert grad.shape == cache["blocks.1.attn.hook_q"].shape and grad.abs().sum() > 0


# -- SmolLM3 --------------------------------------------------------------------------------------


def test_smollm3_nope_layer_fires_unrotated_and_its_pattern_has_no_rotary():
    model = tlshim.install(build("smollm3"))
    assert model.cfg.rotary_layers == [0, 1, 2]
    _, cache = model.run_with_cache(tokens())
    for i in range(4):
        same = torch.equal(cache[f"blocks.{i}.attn.hook_rot_q"], cache[f"blocks.{i}.attn.hook_q"])
        assert same == (i == 3) and torch.equal(cache[f"blocks.{i}.attn.hook_rot_k"], cache[f"blocks.{i}.attn.hook_k"]) == (i == 3)
    # layer 3's pattern by hand from the unrotated q and k; rotating them first gives another pattern
    q = cache["blocks.3.attn.hook_q"].transpose(1, 2)
    k = cache["blocks.3.attn.hook_k"].transpose(1, 2).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) * 16**-0.5
    scores = scores.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(cache["blocks.3.attn.hook_pattern"], scores.softmax(-1), rtol=1e-5, atol=1e-6)
    rotated_q = cache["blocks.2.attn.hook_rot_q"].transpose(1, 2)
    assert not torch.allclose(rotated_q, cache["blocks.2.attn.hook_q"].transpose(1, 2), atol=1e-3)
