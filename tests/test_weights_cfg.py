"""Weight aliases in TransformerLens shapes, read live from the parameters; model.cfg from the HF config."""

import pytest
import torch

import tlshim

from models import LLAMA_FAMILY, build

ARCHS = list(LLAMA_FAMILY)


def check_weights(model):
    cfg = model.cfg
    d, h, g, e, m, v = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    for i, block in enumerate(model.blocks):
        hf = model.model.layers[i]
        attn, mlp = block.attn, block.mlp
        assert attn is hf.self_attn and block.ln1 is hf.input_layernorm and block.ln2 is hf.post_attention_layernorm
        assert attn.W_Q.shape == (h, d, e) and attn.W_K.shape == (g, d, e) and attn.W_V.shape == (g, d, e)
        assert attn.W_O.shape == (h, e, d) and attn.b_Q.shape == (h, e) and attn.b_K.shape == (g, e) and attn.b_O.shape == (d,)
        x = torch.randn(3, d, dtype=attn.W_Q.dtype)
        # per head: x @ W_Q[h] + b_Q[h] is that head's slice of q_proj(x)
        q = hf.self_attn.q_proj(x).view(3, h, e)
        torch.testing.assert_close(torch.einsum("bd,hde->bhe", x, attn.W_Q) + attn.b_Q, q, rtol=1e-2, atol=1e-2)
        k = hf.self_attn.k_proj(x).view(3, g, e)
        torch.testing.assert_close(torch.einsum("bd,gde->bge", x, attn.W_K) + attn.b_K, k, rtol=1e-2, atol=1e-2)
        z = torch.randn(3, h, e, dtype=attn.W_Q.dtype)
        torch.testing.assert_close(torch.einsum("bhe,hed->bd", z, attn.W_O) + attn.b_O, hf.self_attn.o_proj(z.flatten(1)), rtol=1e-2, atol=1e-2)
        assert mlp.W_in.shape == (d, m) and mlp.W_gate.shape == (d, m) and mlp.W_out.shape == (m, d)
        assert torch.equal(mlp.W_gate, hf.mlp.gate_proj.weight.T) and torch.equal(mlp.W_in, hf.mlp.up_proj.weight.T)
        assert torch.equal(mlp.W_out, hf.mlp.down_proj.weight.T)
        assert torch.equal(block.ln1.w, hf.input_layernorm.weight)
    assert model.W_E.shape == (v, d) and model.W_U.shape == (d, v) and model.b_U.shape == (v,)
    assert torch.equal(model.W_U, model.lm_head.weight.T) and model.embed is model.model.embed_tokens
    assert model.W_Q.shape == (cfg.n_layers, h, d, e) and model.W_out.shape == (cfg.n_layers, m, d)
    assert torch.equal(model.W_K[2], model.blocks[2].attn.W_K)


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_follow_the_live_parameters(arch):
    model = tlshim.install(build(arch))
    check_weights(model)
    model.to(torch.bfloat16)
    assert model.blocks[0].attn.W_Q.dtype == torch.bfloat16 and model.W_U.dtype == torch.bfloat16
    check_weights(model)
    model.float()
    assert model.W_E.dtype == torch.float32
    check_weights(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(2)
    assert torch.equal(model.blocks[1].attn.W_Q, model.model.layers[1].self_attn.q_proj.weight.view(4, -1, 64).transpose(1, 2))


@pytest.mark.parametrize("arch", ARCHS)
def test_cfg_has_transformer_lens_fields(arch):
    model = tlshim.install(build(arch))
    config, cfg = model.config, model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads) == (config.num_hidden_layers, config.hidden_size, config.num_attention_heads)
    assert cfg.n_key_value_heads == config.num_key_value_heads and cfg.d_head == 16
    assert (cfg.d_mlp, cfg.d_vocab, cfg.n_ctx) == (config.intermediate_size, config.vocab_size, config.max_position_embeddings)
    assert cfg.act_fn == "silu" and cfg.normalization_type == "RMS" and cfg.positional_embedding_type == "rotary"
    assert cfg.original_architecture == type(model).__name__ and cfg.eps == config.rms_norm_eps
    assert cfg.dtype == torch.float32 and cfg.device.type == "cpu"
    assert cfg.tie_word_embeddings == config.tie_word_embeddings
    assert cfg.rotary_base == 10000.0


def test_tied_embeddings_share_one_matrix():
    model = tlshim.install(build("qwen2"))
    assert model.W_U.data_ptr() == model.W_E.data_ptr()
