"""Tiny random models of every causal-LM type transformers registers (../shared/TESTING.md).

``build(model_type)`` makes one from its config class with every size field shrunk (hidden 64, 2
layers, 4 heads, 2 KV heads, d_mlp 128, vocab 256, 128 positions), eager attention, sharp patterns
(initializer_range 2 / sqrt(d_model)) and norm weights drawn around 1, under a fixed seed: two
builds are bitwise equal, so a second build is the plain twin for bit-exact checks.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

D_MODEL, VOCAB = 64, 256

#: config field -> tiny value (a field is set only where the config has it as an int)
SIZES = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "model_dim", "dim", "embed_dim", "word_embed_proj_dim"), D_MODEL),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"), 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"), 2),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "decoder_ffn_dim", "d_ff"), 128),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"), 32),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "top_k", "moe_topk", "num_selected_experts", "moe_top_k"), 2),
    **dict.fromkeys(("head_dim", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "rotary_dim", "attention_head_size"), 16),
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 32),
    **dict.fromkeys(("global_head_dim",), 16),
    **dict.fromkeys(("n_group", "topk_group"), 1),
    **dict.fromkeys(("num_kv_shared_layers",), 0),
    **dict.fromkeys(("vocab_size",), VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx", "max_sequence_length"), 128),
}
#: size fields a config may hold as None where its model needs a number
FILL_NONE = ("head_dim", "num_key_value_heads", "num_experts_per_tok", "n_routed_experts")
#: scalar factors a config leaves at 1.0, where a hook that forgot them would still pass: set to real
#: checkpoints' kind of values (Granite 3's)
MULTIPLIERS = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125, "logits_scaling": 8.0}
#: config fields a type needs to run as a causal LM at all
FIELDS = {
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": (32, 32), "axial_pos_shape": (8, 16)},
    "mamba2": {"num_heads": 8},  # expand * hidden_size = heads * head_dim
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "xlstm": {"embedding_dim": D_MODEL, "num_blocks": 2},  # its read-only head sizes make sized configs fail
    "gemma4_text": {"hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": VOCAB, "head_dim": 16, "global_head_dim": 16},
    "gemma4_unified_text": {"hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": VOCAB, "head_dim": 16, "global_head_dim": 16},
    "cohere_compass_text": {"rope_parameters": dict.fromkeys(("full_attention", "sliding_attention"), {"rope_type": "default", "rope_theta": 1e4})},
    # transformers 4.x refuses to run Jamba without the CUDA kernels otherwise; hybrids keep an attention block
    "jamba": {"use_mamba_kernels": False, "attn_layer_period": 2, "attn_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1]},
    # RWKV halves the residual stream every rescale_every blocks in eval mode (refused where that acts): off
    "rwkv": {"rescale_every": 0},
    "zamba": {"attention_hidden_size": 128, "mamba_dt_rank": 4},
    "dots1": {"n_shared_experts": 1},
    # block-sparse attention falls back to (and rebuilds itself as) full attention at tiny lengths
    "big_bird": {"attention_type": "original_full"},
    "bigbird_pegasus": {"attention_type": "original_full"},
}
#: multimodal types whose text config is that of a text type, built tiny as that type
TEXT_CONFIG = {"gemma4": "gemma4_text", "gemma4_unified": "gemma4_unified_text"}
_SUB = {"hidden_size": D_MODEL, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128, "num_hidden_layers": 2}
#: sub-configs given tiny when the config is built (towers and stacks beside the text model; BLT's byte stacks)
SUB_CONFIGS = {
    "blt": {
        "encoder_hash_byte_group_vocab": VOCAB,
        **dict.fromkeys(("patcher_config", "global_config"), {**_SUB, "head_dim": 16}),
        "encoder_config": {**_SUB, "hidden_size_global": D_MODEL, "num_hidden_layers": 1},
        "decoder_config": {**_SUB, "hidden_size_global": D_MODEL, "head_dim": 16},
    },
    "phi4_multimodal": {
        "vision_config": {**_SUB, "num_key_value_heads": None, "image_size": 28},
        "audio_config": {**_SUB, "num_blocks": 1, "ext_pw_out_channel": D_MODEL, "depthwise_separable_out_channel": D_MODEL, "nemo_conv_channels": D_MODEL},
    },
}
#: fields of a sub-config a type reads without its config defining them (DBRX: rope_theta, clip_qkv)
SUB_FIELDS = {"dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}}}  # (5.x clamps even with no clip)
#: the types that cannot run a forward on input_ids alone (TESTING.md), with the reason
NOT_RUNNABLE = {
    "musicgen": "codebook-shaped input ids",
    "musicgen_melody": "codebook-shaped input ids",
    "gemma4_assistant": "a draft model",
    "gemma4_unified_assistant": "a draft model",
    "gemma3n": "needs pillow and timm",
}


def tiny_config(model_type: str):
    config = AutoConfig.for_model(model_type)
    # the sizes go in as arguments, so that the fields a config derives from them (a Mamba head size, an
    # MLA query width, Gemma 4's per-layer table) follow; a config that refuses them is shrunk as it is
    given = {name: value for name, value in SIZES.items() if _is_int(_field(config, name))}
    if model_type in TEXT_CONFIG:
        given["text_config"] = tiny_config(TEXT_CONFIG[model_type]).to_dict()
    given.update(SUB_CONFIGS.get(model_type, {}))
    try:
        config = AutoConfig.for_model(model_type, **{**given, **FIELDS.get(model_type, {})})
    except Exception:
        pass
    for sub in [config, *(getattr(config, name) for name in ("text_config", "attn_config", "ffn_config") if hasattr(config, name))]:
        _shrink(sub)
    for name, value in FIELDS.get(model_type, {}).items():  # over what _shrink set
        setattr(config, name, value)
    for sub, fields in SUB_FIELDS.get(model_type, {}).items():
        for name, value in fields.items():
            setattr(getattr(config, sub), name, value)
    if _field(config, "pad_token_id", missing=False) is False:  # 5.0.0's configs built with sizes lack it
        config.pad_token_id = None
    return config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(config, name, missing=None):
    """config.name, or ``missing`` where it has none or it is a per-layer field (refusing a global read)."""
    try:
        return getattr(config, name)
    except Exception:
        return missing


def _default_layer_types(config):
    try:
        return list(getattr(type(config)(), "layer_types", None) or ())
    except Exception:
        return []


def _shrink(config):
    for name, value in SIZES.items():
        current = _field(config, name, missing=False)
        if _is_int(current) or (current is None and name in FILL_NONE):
            try:
                setattr(config, name, value)
            except Exception:
                pass
    for name, value in MULTIPLIERS.items():
        if vars(config).get(name) == 1.0:
            setattr(config, name, value)
    for name in list(vars(config)):
        value = vars(config).get(name)
        if name.endswith("_token_id") and isinstance(value, int) and value >= VOCAB:
            setattr(config, name, VOCAB - 1)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and layer_types:
        # the kinds the full-size config mixes: a hybrid derives its layer types from the layer count, so
        # two layers of it may be all linear attention (Qwen3-Next's full attention comes every 4th)
        kinds = list(dict.fromkeys(_default_layer_types(config) or layer_types))
        attention = [k for k in kinds if "attention" in str(k) and "linear" not in str(k)]  # (linear attention is a mixer)
        other = [k for k in kinds if k not in attention]
        wanted = None
        if other and attention:  # a hybrid: one block of each kind
            wanted = other[:1] + attention[:1]
        elif not hasattr(config, "per_layer_config"):  # (a per-layer table, Gemma 4's, was made for the layer types the config derived itself)
            wanted = layer_types[:1] * 2
        try:
            if wanted:
                config.layer_types = wanted
        except AttributeError:  # derived from another field (a read-only property)
            pass
    if vars(config).get("kv_lora_rank") and "num_key_value_heads" in vars(config):
        config.num_key_value_heads = vars(config).get("num_attention_heads", D_MODEL // 16)  # MLA: as many KV heads as heads
    if hasattr(config, "rope_theta") and getattr(config, "rope_theta", 0) is None:
        config.rope_theta = 10000.0
    if not hasattr(config, "pad_token_id"):  # transformers 5.0's Phi and StableLM read it without defining it
        config.pad_token_id = None
    for name in ("initializer_range", "init_std"):  # init_std: OPT, XGLM
        if hasattr(config, name):
            setattr(config, name, 2 / D_MODEL**0.5)


def build(model_type: str, seed: int = 0, attn_implementation: str = "eager", **config_fields):
    """A tiny random model of ``model_type`` in float32, eval mode, norm weights drawn around 1
    (``config_fields`` are set on the tiny config before the model is built)."""
    torch.manual_seed(seed)
    config = tiny_config(model_type)
    for name, value in config_fields.items():
        setattr(config, name, value)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, torch_dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if "norm" in type(module).__name__.lower() and isinstance(weight, torch.nn.Parameter) and weight.dim() == 1:
                weight.copy_(torch.rand(weight.shape, generator=generator) + 0.5)
    return model.eval()


def tokens(batch=2, pos=12, seed=1):
    return torch.randint(0, 200, (batch, pos), generator=torch.Generator().manual_seed(seed))
