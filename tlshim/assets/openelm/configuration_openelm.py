"""Local stand-in for Apple's OpenELM remote configuration (``configuration_openelm.py``).

Written for tlshim's tests from the prose specification in ``OPENELM.md``; it is not a copy of
the hub file. It keeps the v4-era structure on purpose, including the parts that break under
transformers v5 (a custom ``__init__`` that stores the fields, then calls an argument-less
``__post_init__``, then the base constructor with ``use_cache``), because tlshim must cope with
the real file, which behaves the same way.
"""

from numbers import Number
from typing import List, Optional, Union

import numpy as np
from transformers import PretrainedConfig


def make_divisible(
    v: Union[float, int],
    divisor: Optional[int] = 8,
    min_value: Optional[Union[float, int]] = None,
) -> Union[float, int]:
    """Round ``v`` to a multiple of ``divisor`` (MobileNet rule), never losing more than 10%."""
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * v:
        rounded += divisor
    return rounded


def compute_heads(model_dim: int, head_dim: int) -> int:
    """Number of heads of width ``head_dim`` that fill ``model_dim`` exactly."""
    if model_dim % head_dim != 0:
        raise ValueError(
            f"Model dimension should be divisible by head dimension. Got: {model_dim} and {head_dim}."
        )
    return model_dim // head_dim


def _public_size(num_transformer_layers: int, model_dim: int, head_dim: int) -> dict:
    return dict(
        num_transformer_layers=num_transformer_layers,
        model_dim=model_dim,
        head_dim=head_dim,
        num_gqa_groups=4,
        normalize_qk_projections=True,
        share_input_output_layers=True,
        ffn_multipliers=(0.5, 4.0),
        qkv_multipliers=(0.5, 1.0),
    )


OpenELM_CONFIGS = {
    "OpenELM-270M": _public_size(16, 1280, 64),
    "OpenELM-450M": _public_size(20, 1536, 64),
    "OpenELM-1_1B": _public_size(28, 2048, 64),
    "OpenELM-3B": _public_size(36, 3072, 128),
}


class OpenELMConfig(PretrainedConfig):
    """Configuration of an OpenELM model (layer-wise scaled heads and FFN widths).

    Field names follow Apple's checkpoints: there is no ``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads`` and so on. ``num_gqa_groups`` is the number of query heads per
    key/value head. ``num_query_heads`` / ``num_kv_heads`` are always re-derived per layer.
    """

    model_type = "openelm"

    def __init__(
        self,
        vocab_size: int = 32000,
        max_context_length: int = 2048,
        num_transformer_layers: int = 12,
        model_dim: int = 2048,
        head_dim: int = 128,
        qkv_multipliers: Union[Number, List[Number]] = 1.0,
        num_query_heads: Union[int, None] = None,
        num_gqa_groups: int = 1,
        ffn_multipliers: Union[Number, List[Number]] = 4.0,
        ffn_with_glu: bool = True,
        ffn_dim_divisor: int = 256,
        activation_fn_name: str = "swish",
        normalization_layer_name: str = "rms_norm",
        normalize_qk_projections: bool = False,
        share_input_output_layers: bool = False,
        rope_freq_constant: int = 10000,
        rope_max_length: int = 4096,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.max_context_length = max_context_length
        self.num_transformer_layers = num_transformer_layers
        self.model_dim = model_dim
        self.head_dim = head_dim
        self.qkv_multipliers = qkv_multipliers
        self.num_query_heads = num_query_heads
        self.num_gqa_groups = num_gqa_groups
        self.ffn_multipliers = ffn_multipliers
        self.ffn_with_glu = ffn_with_glu
        self.ffn_dim_divisor = ffn_dim_divisor
        self.activation_fn_name = activation_fn_name
        self.normalization_layer_name = normalization_layer_name
        self.normalize_qk_projections = normalize_qk_projections
        self.share_input_output_layers = share_input_output_layers
        self.rope_freq_constant = rope_freq_constant
        self.rope_max_length = rope_max_length
        self.initializer_range = initializer_range

        # Derive the per-layer lists first, then hand the rest to the base class. Under
        # transformers >= 5.4 the base constructor forwards every unknown kwarg (use_cache among
        # them) to __post_init__(**extras), which this argument-less override rejects: that
        # TypeError is the real remote code's behaviour and is kept on purpose.
        self.__post_init__()
        super().__init__(
            use_cache=use_cache,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )

    def __post_init__(self) -> None:
        layers = self.num_transformer_layers
        head_multiple_of = self.num_gqa_groups if self.num_gqa_groups is not None else 2

        if isinstance(self.qkv_multipliers, Number):
            qkv_per_layer = [self.qkv_multipliers] * layers
        elif isinstance(self.qkv_multipliers, (tuple, list)) and len(self.qkv_multipliers) == 2:
            lo, hi = self.qkv_multipliers
            qkv_per_layer = [round(m, 2) for m in np.linspace(lo, hi, num=layers, dtype=float)]
        else:
            raise NotImplementedError(
                f"QKV multipliers should be a single number or a list of two numbers. "
                f"Got: {self.qkv_multipliers}."
            )

        query_dims = [
            int(make_divisible(self.model_dim * m, divisor=self.head_dim * head_multiple_of))
            for m in qkv_per_layer
        ]
        self.num_query_heads = [int(compute_heads(d, self.head_dim)) for d in query_dims]
        self.num_kv_heads = [q // self.num_gqa_groups for q in self.num_query_heads]

        if isinstance(self.ffn_multipliers, Number):
            self.ffn_multipliers = [self.ffn_multipliers] * layers
        elif isinstance(self.ffn_multipliers, (tuple, list)):
            if len(self.ffn_multipliers) == 2:
                lo, hi = self.ffn_multipliers
                self.ffn_multipliers = [
                    round(m, 2) for m in np.linspace(lo, hi, num=layers, dtype=float)
                ]
            else:
                assert len(self.ffn_multipliers) == layers, (
                    f"len(ffn_multipliers)={len(self.ffn_multipliers)} != "
                    f"num_transformer_layers={layers}"
                )
        else:
            raise NotImplementedError(
                f"FFN multipliers should be a single number or a list. Got: {self.ffn_multipliers}."
            )

        for q_heads, kv_heads in zip(self.num_query_heads, self.num_kv_heads):
            assert q_heads % kv_heads == 0, (q_heads, kv_heads)
