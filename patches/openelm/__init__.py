"""OpenELM (Apple, remote code): per-layer head counts and MLP widths, fused qkv_proj and proj_1,
q/k RMSNorms on (batch, heads, pos, d_head), a rotary module per layer, its own sdpa call, and tied
embeddings with no lm_head module.

hook_q/k/v are split out of qkv_proj's output (all query heads, then key, then value heads) and
hook_pre / hook_pre_linear out of proj_1's (gate half, then up half). The KV cache holds keys before
rotary, so hook_rot_k (the new positions) can edit the keys of that forward only.
"""

from __future__ import annotations

from tlshim.spec import get_path


def repair_loaded_buffers(model, spec, options):
    """Install step: a model loaded by transformers v5 without ``tlshim.loading()`` has uninitialised
    non-persistent buffers (causal mask, rotary tables); they are recomputed in place, and stay
    repaired after uninstall. Weights already re-initialised by 5.0-5.2 raise ReinitializedWeightsError."""
    from tlshim.loading import repair_buffers

    repair_buffers(model)
    return []


def head_counts(attn, config):
    return attn.num_q_heads, attn.num_k_heads, attn.head_dim


def openelm_cfg(model):
    config = model.config
    layers = get_path(model, "transformer.layers")
    return dict(
        n_layers=config.num_transformer_layers,
        d_model=config.model_dim,
        n_heads=list(config.num_query_heads),
        n_key_value_heads=list(config.num_kv_heads),
        d_head=config.head_dim,
        d_mlp=[layer.ffn.proj_1.out_features // (2 if config.ffn_with_glu else 1) for layer in layers],
        d_vocab=config.vocab_size,
        d_vocab_out=config.vocab_size,
        n_ctx=config.max_context_length,
        act_fn="silu",
        eps=layers[0].attn_norm.eps,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_base=config.rope_freq_constant,
        gated_mlp=bool(config.ffn_with_glu),
        tie_word_embeddings=bool(config.share_input_output_layers),
    )
