"""Small models on which a wrong hook cannot pass (../shared/TESTING.md): sharp attention, fixed seeds.

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
FIRST_VERSION = {"qwen3": Version("4.51")}


def require(arch):
    first = FIRST_VERSION.get(arch)
    if first is not None and TF_VERSION < first:
        pytest.skip(f"{arch} is not in transformers {TF_VERSION} (added in {first})")


def dtype_kwarg(dtype):
    """transformers before 4.56 takes torch_dtype=, later versions dtype=."""
    return {"dtype": dtype} if TF_VERSION >= Version("4.56") else {"torch_dtype": dtype}


def config_for(arch, attn="eager", **overrides):
    require(arch)
    class_name, extra = LLAMA_FAMILY[arch]
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
    config._attn_implementation = attn
    config.architectures = [class_name.replace("Config", "ForCausalLM")]
    return config


def build(arch="llama", attn="eager", dtype=torch.float32, train=False, seed=0, **overrides):
    config = config_for(arch, attn, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, **dtype_kwarg(dtype))
    if arch == "qwen2":
        _randomize_biases(model, seed)
    return model.train(train)


def _randomize_biases(model, seed):
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype))


def tokens(batch=2, seq=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)
