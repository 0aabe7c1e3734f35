"""TransformerLens's short activation names: ("pattern", 1) -> "blocks.1.attn.hook_pattern"."""

from __future__ import annotations

_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_post": "post",
    "mlp_pre_linear": "pre_linear",
}
_ATTN = {"q", "k", "v", "z", "rot_q", "rot_k", "q_normed", "k_normed", "result", "pattern", "attn_scores"}
_MLP = {"pre", "post", "pre_linear"}
_NORM = {"scale", "normalized"}
_SUBLAYERS = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": ""}


def act_name(name: str, layer: int | None = None, sublayer: str | None = None) -> str:
    """The full hook name for a TransformerLens short name (a full name is returned as it is)."""
    if "." in name or (name.startswith("hook_") and layer is None):
        return name
    name = _ALIASES.get(name.removeprefix("hook_"), name.removeprefix("hook_"))
    if layer is None:
        return f"ln_final.hook_{name}" if name in _NORM else f"hook_{name}"
    if sublayer is None:
        sublayer = "attn" if name in _ATTN else "mlp" if name in _MLP else "ln1" if name in _NORM else ""
    sublayer = _SUBLAYERS.get(sublayer, sublayer)
    prefix = f"blocks.{layer}." + (f"{sublayer}." if sublayer else "")
    return f"{prefix}hook_{name}"
