"""The rest of HookedTransformerConfig's fields on ``model.cfg``, and a ``cfg.device`` TransformerLens code can compare.

Computed at install from the model: rotary_dim, attn_scale, use_local_attn, attn_types, use_qk_norm,
use_normalization_before_and_after, n_params, trust_remote_code, initializer_range and the Llama-3 rope
scaling (use_NTK_by_parts_rope and its factors). The switches start off. Everything else has
TransformerLens's default value for a loaded model (no checkpoint, no experts, one device, causal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .family_parallel import rotary_dim
from .spec import get_path


@dataclass(kw_only=True)
class TLConfigFields:
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    use_hook_tokens: bool = False
    rotary_dim: int | None = None
    attn_scale: float = -1.0
    use_local_attn: bool = False
    attn_types: list | None = None
    use_qk_norm: bool = False
    use_normalization_before_and_after: bool = False
    n_params: int | None = None
    trust_remote_code: bool = False
    initializer_range: float = -1.0
    use_NTK_by_parts_rope: bool = False
    NTK_by_parts_low_freq_factor: float = 1.0
    NTK_by_parts_high_freq_factor: float = 4.0
    NTK_by_parts_factor: float = 8.0
    NTK_original_ctx_len: int = 8192
    attention_dir: str = "causal"
    seed: int | None = None
    n_devices: int = 1
    ungroup_grouped_query_attention: bool = False
    post_embedding_ln: bool = False
    scale_attn_by_inverse_layer_idx: bool = False
    rotary_adjacent_pairs: bool = False
    load_in_4bit: bool = False
    num_experts: int | None = None
    experts_per_token: int | None = None
    relative_attention_max_distance: int | None = None
    relative_attention_num_buckets: int | None = None
    decoder_start_token_id: int | None = None
    from_checkpoint: bool = False
    checkpoint_index: int | None = None
    checkpoint_label_type: str | None = None
    checkpoint_value: int | None = None
    init_mode: str = "gpt2"
    init_weights: bool = False  # the weights are the loaded model's, never initialised by TransformerLens


class Device(str):
    """The model's device as TransformerLens's cfg holds it: a string ("cpu", "cuda:0") that also compares
    equal to the ``torch.device`` and has its ``type`` and ``index``."""

    def __new__(cls, device):
        device = torch.device(device)
        self = super().__new__(cls, str(device))
        self._device = device
        return self

    type = property(lambda self: self._device.type)
    index = property(lambda self: self._device.index)

    def __eq__(self, other):
        if isinstance(other, (str, torch.device)):
            try:
                return torch.device(other) == self._device
            except RuntimeError:
                return False
        return NotImplemented

    def __ne__(self, other):
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = str.__hash__


def computed_fields(model, spec, fields: dict) -> dict:
    """The computed fields of TLConfigFields for one installed model (``fields``: the spec's tl_config)."""
    config = model.config
    attention = [i for i in range(len(get_path(model, spec.layers))) if not spec.mixer(i)]  # (family_mixer)
    attn = get_path(model, f"{spec.layers}.{attention[0]}.{spec.attn}") if attention else None
    d_head = fields["d_head"]
    scaling = getattr(attn, "scaling", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    layer_types = getattr(config, "layer_types", None)
    window = fields.get("window_size")
    out = dict(
        rotary_dim=rotary_dim(config, d_head) if fields.get("positional_embedding_type") == "rotary" else None,
        attn_scale=1 / scaling if scaling else math.sqrt(d_head),
        use_local_attn=window is not None,
        attn_types=_attn_types(model, spec, layer_types) if window is not None else None,
        use_qk_norm=bool(spec.q_norm),
        use_normalization_before_and_after=bool(spec.ln1_post),
        n_params=_n_params(fields),
        trust_remote_code=type(model).__module__.startswith("transformers_modules"),
        initializer_range=float(getattr(config, "initializer_range", -1.0)),
    )
    if rope.get("rope_type") == "llama3":
        out.update(
            use_NTK_by_parts_rope=True,
            NTK_by_parts_low_freq_factor=rope["low_freq_factor"],
            NTK_by_parts_high_freq_factor=rope["high_freq_factor"],
            NTK_by_parts_factor=rope["factor"],
            NTK_original_ctx_len=rope["original_max_position_embeddings"],
        )
    return out


def _attn_types(model, spec, layer_types):
    """"local" or "global" per layer: from config.layer_types, or (transformers < 4.5x) each attention's sliding_window."""
    if layer_types:
        return [{"sliding_attention": "local"}.get(kind, "global") for kind in layer_types]
    layers = get_path(model, spec.layers)
    return ["local" if getattr(get_path(layer, spec.attn), "sliding_window", None) else "global" for layer in layers]


def _n_params(fields) -> int:
    """TransformerLens's count: 4 d_model x d_head matrices per head and the MLP's matrices, per layer."""
    n_layers = fields["n_layers"]
    per_layer = lambda value: value if isinstance(value, list) else [value] * n_layers  # noqa: E731
    mlp_mats = 3 if fields.get("gated_mlp", True) else 2
    return sum(
        fields["d_model"] * fields["d_head"] * h * 4 + fields["d_model"] * m * mlp_mats
        for h, m in zip(per_layer(fields["n_heads"]), per_layer(fields["d_mlp"]))
    )
