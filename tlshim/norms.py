"""How each kind of norm normalises (hook_scale, hook_normalized) and applies its weight.

hook_normalized is TransformerLens's: the normalised input before the norm's weight and bias, in
float32 as the norm computes it. ``weigh`` turns it into the norm's output the way the model does,
so an unedited value gives the native output bit for bit and an edited one flows on exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _eps(module):
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return 1e-5


def _weight(module):
    return module.weight


def _rms_weigh(normalized, weight, bias, dtype):
    """Llama-style RMSNorm: cast to the input dtype, then times the weight."""
    return weight * normalized.to(dtype)


def _offset_weight(module):
    return 1.0 + module.weight


def _offset_rms_weigh(normalized, weight, bias, dtype):
    """Gemma's RMSNorm: times (1 + w) in float32, then cast."""
    return (normalized * (1.0 + weight.float())).to(dtype)


def _layer_weigh(normalized, weight, bias, dtype):
    out = normalized
    if weight is not None:
        out = out * weight.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def _no_weight(module):
    return getattr(module, "weight", None)


@dataclass(frozen=True)
class Norm:
    """A norm kind: TransformerLens's normalization_type, whether it centres, and how it weighs."""

    tl_type: str
    center: bool
    weigh_fn: object  # (normalized float32, weight, bias, dtype) -> the norm's output, as the model computes it
    effective_weight: object  # module -> what the output is multiplied by

    def statistics(self, module, x):
        """(x in float32, centred for a LayerNorm; mean of its squares + eps): hook_scale is the root of the latter."""
        x = x.float()
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        return x, x.pow(2).mean(-1, keepdim=True) + _eps(module)

    @staticmethod
    def normalize(centered, var_eps):
        """hook_normalized, computed as the HF norms compute it (times rsqrt), so its weighed value is native."""
        return centered * torch.rsqrt(var_eps)

    @staticmethod
    def has_weight(module) -> bool:
        return getattr(module, "weight", None) is not None

    def weigh(self, module, normalized, dtype, detach_params=False):
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if detach_params:
            weight = None if weight is None else weight.detach()
            bias = None if bias is None else bias.detach()
        return self.weigh_fn(normalized, weight, bias, dtype)


RMS = Norm("RMS", False, _rms_weigh, _weight)
#: Gemma's RMSNorm multiplies by (1 + w); its alias exposes that effective weight.
OFFSET_RMS = Norm("RMS", False, _offset_rms_weigh, _offset_weight)
#: A LayerNorm without parameters (OLMo v1), or with them.
LAYER = Norm("LN", True, _layer_weigh, _no_weight)
def _offset_layer_weigh(normalized, weight, bias, dtype):
    """Nemotron's LayerNorm1P: a LayerNorm times (1 + w)."""
    return _layer_weigh(normalized, 1.0 + weight.float(), bias, dtype)


#: Nemotron's LayerNorm times (1 + w); its alias exposes that effective weight.
OFFSET_LAYER = Norm("LN", True, _offset_layer_weigh, _offset_weight)
#: An RMSNorm without a weight (NanoChat, HRM-Text): its output is hook_normalized.
BARE_RMS = Norm("RMS", False, _layer_weigh, _no_weight)
