"""Post-LN blocks (BERT and its kin, the post-LN BART decoders) on the structural path: what each name
holds (TransformerLens's HookedEncoder names), and edits equal to a block computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CONFIG_MAPPING

import tlshim

from tiny import build, tokens

pytestmark = pytest.mark.filterwarnings("ignore:tlshim has no spec")


def installed(model_type):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {model_type}")
    model = build(model_type)
    tlshim.install(model)
    return model


def attention_by_hand(x, q_proj, k_proj, v_proj, n_heads, causal, z_edit):
    """softmax(q k^T / sqrt(d_head)) v per head, with ``z_edit`` applied to (batch, pos, heads, d_head)."""
    split = lambda t: t.view(*t.shape[:-1], n_heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q_proj(x)), split(k_proj(x)), split(v_proj(x))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n = x.shape[1]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), torch.finfo(scores.dtype).min)
    z = (scores.softmax(-1) @ v).transpose(1, 2)
    return z_edit(z).flatten(-2)


def bert_block(layer, x, n_heads, z_edit=lambda z: z, mid_edit=lambda m: m):
    """BertLayer by hand: mid = x + attn; ln1; MLP; ln2(ln1(mid) + mlp)."""
    sa, out = layer.attention.self, layer.attention.output
    z = attention_by_hand(x, sa.query, sa.key, sa.value, n_heads, getattr(sa, "is_causal", False), z_edit)
    mid = mid_edit(x + out.dense(z))
    after = out.LayerNorm(mid)
    mlp = layer.output.dense(layer.intermediate.intermediate_act_fn(layer.intermediate.dense(after)))
    return layer.output.LayerNorm(after + mlp)


def bart_block(layer, x, n_heads, z_edit=lambda z: z, mid_edit=lambda m: m):
    """BartDecoderLayer (post-LN) by hand, no encoder."""
    at = layer.self_attn
    z = attention_by_hand(x, at.q_proj, at.k_proj, at.v_proj, n_heads, True, z_edit)
    after = layer.self_attn_layer_norm(mid_edit(x + at.out_proj(z)))
    return layer.final_layer_norm(after + layer.fc2(layer.activation_fn(layer.fc1(after))))


def megatron_block(layer, x, n_heads, z_edit=lambda z: z, mid_edit=lambda m: m):
    """MegatronBertLayer (pre-LN, residual adds inside its sub-modules) by hand."""
    sa, h = layer.attention.self, layer.attention.ln(x)
    z = attention_by_hand(h, sa.query, sa.key, sa.value, n_heads, getattr(sa, "is_causal", False), z_edit)
    mid = mid_edit(x + layer.attention.output.dense(z))
    return mid + layer.output.dense(layer.intermediate.intermediate_act_fn(layer.intermediate.dense(layer.ln(mid))))


BLOCKS = {
    "bert": (bert_block, lambda m: m.bert.encoder.layer),
    "bart": (bart_block, lambda m: m.model.decoder.layers),
    "megatron-bert": (megatron_block, lambda m: m.bert.encoder.layer),
}


def zero_head1(z, hook=None):
    z = z.clone()
    z[:, :, 1] = 0
    return z


@pytest.mark.parametrize("model_type", BLOCKS)
def test_edits_of_resid_mid_and_z_equal_the_block_by_hand(model_type):
    model = installed(model_type)
    by_hand, layers = BLOCKS[model_type]
    layer, n_heads = layers(model)[0], model.cfg.n_heads
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    out = "blocks.0.hook_normalized_resid_post" if model.cfg.post_ln else "blocks.0.hook_resid_post"
    names = lambda name: name in ("blocks.0.hook_resid_pre", out)  # noqa: E731
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens(), names_filter=names, use_cache=False)
        x = cache["blocks.0.hook_resid_pre"]
        assert torch.allclose(cache[out], by_hand(layer, x, n_heads), atol=1e-5)
        for hook, kwargs in (
            ("blocks.0.hook_resid_mid", {"mid_edit": lambda m: m + vector}),
            ("blocks.0.attn.hook_z", {"z_edit": zero_head1}),
        ):
            fn = (lambda t, hook: t + vector) if "mid" in hook else zero_head1
            with model.hooks(fwd_hooks=[(hook, fn)]):
                _, edited = model.run_with_cache(tokens(), names_filter=names, use_cache=False)
            want = by_hand(layer, x, n_heads, **kwargs)
            assert not torch.allclose(want, cache[out], atol=1e-3)  # the edit matters
            assert torch.allclose(edited[out], want, atol=1e-5), hook


@pytest.mark.parametrize("model_type", ("bert", "bart"))
def test_post_ln_names_hold_hookedencoder_values(model_type):
    model = installed(model_type)
    assert model.cfg.post_ln and model.cfg.normalization_type == "LN" and model.cfg.positional_embedding_type == "standard"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens(), names_filter=lambda name: True, use_cache=False)
        b = "blocks.1"
        mid = cache[f"{b}.hook_resid_mid"]
        assert torch.equal(mid, cache[f"{b}.hook_resid_pre"] + cache[f"{b}.hook_attn_out"])
        normalized = (mid - mid.mean(-1, keepdim=True)) / cache[f"{b}.ln1.hook_scale"]
        assert torch.allclose(cache[f"{b}.ln1.hook_normalized"], normalized, atol=1e-5)
        ln1, ln2 = model.blocks[1].ln1, model.blocks[1].ln2
        assert torch.equal(cache[f"{b}.hook_resid_post"], ln1(mid) + cache[f"{b}.hook_mlp_out"])
        assert torch.equal(cache[f"{b}.hook_normalized_resid_post"], ln2(cache[f"{b}.hook_resid_post"]))
        assert torch.equal(cache["blocks.0.hook_normalized_resid_post"], cache["blocks.1.hook_resid_pre"])
    assert tlshim.verify(model, tokens()).ok


def test_bert_embeddings_and_head():
    model = installed("bert")
    emb, ids = model.bert.embeddings, tokens()
    names = {"hook_embed", "hook_token_type_embed", "hook_pos_embed", "embed.ln.hook_scale", "embed.ln.hook_normalized"}
    assert names <= set(model.hook_dict) and model.embed.ln is emb.LayerNorm
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=lambda name: True, use_cache=False)
        by_hand = emb.word_embeddings.weight[ids] + emb.token_type_embeddings.weight[0] + emb.position_embeddings.weight[: ids.shape[1]]
        assert torch.equal(cache["hook_token_type_embed"], emb.token_type_embeddings.weight[0].expand_as(by_hand))
        assert cache["hook_pos_embed"].shape == by_hand.shape
        assert torch.allclose(cache["blocks.0.hook_resid_pre"], F.layer_norm(by_hand, (by_hand.shape[-1],), emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps), atol=1e-5)
        # ln_final is the LM head's LayerNorm, after the head's dense + activation
        head = model.cls.predictions.transform
        assert model.ln_final is head.LayerNorm and model.unembed.module is model.cls.predictions.decoder
        last = cache[f"blocks.{model.cfg.n_layers - 1}.hook_normalized_resid_post"]
        final = head.LayerNorm(head.transform_act_fn(head.dense(last)))
        assert torch.allclose(final @ model.W_U + model.b_U, logits, atol=1e-4)
        # an edit of the token-type embedding is what the model adds
        vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2))
        edited = model.run_with_hooks(ids, fwd_hooks=[("hook_token_type_embed", lambda t, hook: t + vector)], use_cache=False)
        emb.token_type_embeddings.weight[0] += vector
        try:
            assert torch.equal(edited, model(ids, use_cache=False).logits)
        finally:
            emb.token_type_embeddings.weight[0] -= vector


def test_pre_ln_bert_layout_is_a_pre_norm_block_with_its_head_norm_as_ln_final():
    model = installed("megatron-bert")
    assert not model.cfg.post_ln and model._tlshim.spec.postln.kernel == "self"
    assert model.blocks[0].ln1 is model.bert.encoder.layer[0].attention.ln and model.ln_final is model.cls.predictions.transform.LayerNorm
    assert "blocks.0.hook_normalized_resid_post" not in model.hook_dict
    assert tlshim.verify(model, tokens()).ok


def test_bart_has_no_final_norm_hooks():
    model = installed("bart")
    assert not [name for name in model.hook_dict if name.startswith("ln_final.")]
    assert isinstance(model.ln_final, torch.nn.Identity)
    assert model._tlshim.spec.postln.embed_norm == "model.decoder.layernorm_embedding" and model._tlshim.spec.postln.token_type is None
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens(), use_cache=False)
        last = cache[f"blocks.{model.cfg.n_layers - 1}.hook_normalized_resid_post"]
        assert torch.equal(model.unembed(last), logits)


def test_blenderbot_small_adds_positions_after_its_embedding_norm():
    model = installed("blenderbot-small")
    assert model._tlshim.spec.postln.pos_after_norm and model.cfg.post_embedding_ln
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens(), names_filter=lambda name: True, use_cache=False)
        assert torch.equal(cache["blocks.0.hook_resid_pre"], model.embed.ln(cache["hook_embed"]) + cache["hook_pos_embed"])
        assert torch.allclose(cache["embed.ln.hook_normalized"], F.layer_norm(cache["hook_embed"], (model.cfg.d_model,)), atol=1e-5)
