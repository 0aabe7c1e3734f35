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
#: served while their TransformerLens switch is on (tlshim.tl_switches)
SWITCH_NAMES = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in")


def switch_names(spec) -> list:
    """The switch hooks a layout serves: the per-head split inputs need a pre-norm (ln1) and q/k/v
    projections that are separate or fused contiguously (not MLA's latents); hook_mlp_in needs an MLP norm of its own."""
    names = []
    if spec.ln1 and not spec.qkv_groups and spec.mla is None:
        names += ["hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input"]
    if spec.ln2 and spec.ln2 != spec.ln1:
        names.append("hook_mlp_in")
    return names


def expected_names(spec, n_layers: int) -> set:
    """Every catalog name that applies to a model of ``spec`` with ``n_layers`` blocks."""
    block = [n for n in BLOCK_NAMES if spec.ln1 or not n.startswith(("ln1.", "ln2."))]  # none in post-norm-only blocks
    block += switch_names(spec)
    if spec.gate_proj:
        block.append("mlp.hook_pre_linear")
    if spec.q_norm:
        block.append("attn.hook_q_normed")
    if spec.k_norm:
        block.append("attn.hook_k_normed")
    if spec.mla is not None:
        block += ["attn.hook_kv_latent"] + (["attn.hook_q_latent"] if spec.mla.q_a_norm else [])
    model = [*MODEL_NAMES, "hook_unembed"] if spec.unembed != spec.embed else MODEL_NAMES
    return set(model) | {f"blocks.{i}.{name}" for i in range(n_layers) for name in block}
