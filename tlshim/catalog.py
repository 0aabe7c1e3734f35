"""The hook catalog of ../shared/HOOKS.md: which names a model of a given spec must expose."""

from __future__ import annotations

MODEL_NAMES = ("hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized")
BLOCK_NAMES = (
    "hook_resid_pre",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)


def expected_names(spec, n_layers: int) -> set:
    """Every catalog name that applies to a model of ``spec`` with ``n_layers`` blocks."""
    block = [n for n in BLOCK_NAMES if spec.ln1 or not n.startswith(("ln1.", "ln2."))]  # none in post-norm-only blocks
    if spec.gate_proj:
        block.append("mlp.hook_pre_linear")
    if spec.q_norm:
        block.append("attn.hook_q_normed")
    if spec.k_norm:
        block.append("attn.hook_k_normed")
    return set(MODEL_NAMES) | {f"blocks.{i}.{name}" for i in range(n_layers) for name in block}
