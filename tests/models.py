"""Small models on which a wrong hook cannot pass (../shared/TESTING.md): sharp attention, random norm
weights, fixed seeds.

``build(arch, ...)`` makes the model under test; calling it again with the same arguments makes its
bit-identical plain twin, the reference for exact comparisons.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from packaging.version import Version

TF_VERSION = Version(transformers.__version__)
D_MODEL, N_LAYERS, VOCAB = 64, 4, 256

LLAMA_FAMILY = {
    # arch: (config class name, extra config fields)
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=4, tie_word_embeddings=True, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
}
SEED_ARCHS = {
    # released soft-cap values; a window of 4 makes sliding layers differ from global ones on 12 tokens
    "gemma2": ("Gemma2Config", dict(
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, sliding_window=4, hidden_activation="gelu_pytorch_tanh",
    )),
    # q/k/v weights are scaled at build so that about 18% of q/k/v elements exceed the clip
    "olmo": ("OlmoConfig", dict(num_key_value_heads=2, clip_qkv=8.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # layer 3 is NoPE
    "smollm3": ("SmolLM3Config", dict(num_key_value_heads=2, no_rope_layers=[1, 1, 1, 0], tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}
ALL_ARCHS = {**LLAMA_FAMILY, **SEED_ARCHS}
FIRST_VERSION = {"qwen3": Version("4.51"), "smollm3": Version("4.53")}
#: where each architecture keeps what tests build references from, written out independently of tlshim's specs
LAYOUT = {arch: dict(ln2="post_attention_layernorm", attn_out="self_attn", mlp_out="mlp") for arch in ALL_ARCHS}
LAYOUT["gemma2"] = dict(ln2="pre_feedforward_layernorm", attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm")
#: attention implementations each architecture is built with in the tests (Gemma2: see its patch module)
ATTN_IMPLS = {arch: ("eager", "sdpa") for arch in ALL_ARCHS}
if TF_VERSION >= Version("5.21"):
    ATTN_IMPLS["gemma2"] = ("eager",)
#: the architectures the drop-in tests (generate, pipeline, padding, accelerate, peft, training) run on;
#: an architecture joins by being added here once tlshim supports it (OpenELM, remote code that build()
#: cannot make, joins them in dropin.py)
DROPIN_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "olmo", "smollm3")


def require(arch):
    first = FIRST_VERSION.get(arch)
    if first is not None and TF_VERSION < first:
        pytest.skip(f"{arch} is not in transformers {TF_VERSION} (added in {first})")


def dtype_kwarg(dtype):
    """transformers before 4.56 takes torch_dtype=, later versions dtype=."""
    return {"dtype": dtype} if TF_VERSION >= Version("4.56") else {"torch_dtype": dtype}


def config_for(arch, attn="eager", **overrides):
    require(arch)
    class_name, extra = ALL_ARCHS[arch]
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=128,
        initializer_range=2 / math.sqrt(D_MODEL),
        **extra,
    )
    fields.update(overrides)
    config = getattr(transformers, class_name)(**fields)
    if TF_VERSION >= Version("5.21") and arch == "gemma2":
        attn = "eager"
    config._attn_implementation = attn
    config.architectures = [class_name.replace("Config", "ForCausalLM")]
    return config


def build(arch="llama", attn="eager", dtype=torch.float32, train=False, seed=0, **overrides):
    config = config_for(arch, attn, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, **dtype_kwarg(dtype))
    if arch == "qwen2":
        _randomize_biases(model, seed)
    if arch == "olmo":
        _scale_qkv(model, 6 / math.sqrt(D_MODEL) / config.initializer_range)
    randomize_norms(model, seed)
    return model.train(train)


def randomize_norms(model, seed, low=0.5, high=1.5):
    """Every norm weight drawn so the norm multiplies by uniform(low, high) (Gemma: 1 + w), biases
    around 0: a hook that drops, repeats or misplaces a norm's weight then shows (HF starts them at 1)."""
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if "norm" not in type(module).__name__.lower() or weight is None:
                continue
            offset = 1.0 if "gemma" in type(module).__name__.lower() else 0.0
            drawn = torch.empty(weight.shape).uniform_(low, high, generator=generator) - offset
            weight.copy_(drawn.to(weight.dtype))
            bias = getattr(module, "bias", None)
            if bias is not None:
                bias.copy_((torch.rand(bias.shape, generator=generator) - 0.5).to(bias.dtype))


def _scale_qkv(model, factor):
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.mul_(factor)


def _randomize_biases(model, seed):
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype))


def tokens(batch=2, seq=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)
