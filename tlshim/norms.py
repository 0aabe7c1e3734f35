"""How each kind of norm computes its divisor (hook_scale) and applies an edited one."""

from __future__ import annotations

from dataclasses import dataclass


def _eps(module):
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return 1e-5


def _rms_scale(module, x):
    return (x.float().pow(2).mean(-1, keepdim=True) + _eps(module)).sqrt()


def _weight(module):
    return module.weight


def _rms_apply(x, scale, weight, bias):
    return weight * (x.float() / scale).to(x.dtype)


def _offset_weight(module):
    return 1.0 + module.weight


def _offset_rms_apply(x, scale, weight, bias):
    return ((x.float() / scale) * (1.0 + weight.float())).to(x.dtype)


def _layer_scale(module, x):
    return (x.float().var(-1, keepdim=True, unbiased=False) + _eps(module)).sqrt()


def _layer_apply(x, scale, weight, bias):
    dtype, x = x.dtype, x.float()
    out = (x - x.mean(-1, keepdim=True)) / scale
    if weight is not None:
        out = out * weight.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def _no_weight(module):
    return getattr(module, "weight", None)


@dataclass(frozen=True)
class Norm:
    """A norm kind: TransformerLens's normalization_type and the three functions tlshim needs."""

    tl_type: str
    scale: object  # (module, x) -> the divisor, float32 (..., 1)
    apply_fn: object  # (x, scale, weight, bias) -> the norm's output
    effective_weight: object  # module -> what the output is multiplied by

    def apply(self, module, x, scale, detach_params=False):
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if detach_params:
            weight = None if weight is None else weight.detach()
            bias = None if bias is None else bias.detach()
        return self.apply_fn(x, scale, weight, bias)


RMS = Norm("RMS", _rms_scale, _rms_apply, _weight)
#: Gemma's RMSNorm multiplies by (1 + w); its alias exposes that effective weight.
OFFSET_RMS = Norm("RMS", _rms_scale, _offset_rms_apply, _offset_weight)
#: A LayerNorm without parameters (OLMo v1), or with them.
LAYER = Norm("LN", _layer_scale, _layer_apply, _no_weight)

