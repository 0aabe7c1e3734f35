"""Gemma2: (1 + w) RMSNorms, post-attention and post-feedforward norms, soft-capping, sliding windows.

Soft-capping exists only in Gemma2's eager attention (sdpa silently drops it in the versions that
accept sdpa for Gemma2), so install switches an installed Gemma2 to eager, for that model only.
"""

from __future__ import annotations

import warnings

from tlshim import norms
from tlshim.journal import Call
from tlshim.spec import ArchSpec, llama_family_cfg


def gemma2_cfg(model):
    config = model.config
    fields = llama_family_cfg(model)
    fields.update(
        attn_scores_soft_cap=config.attn_logit_softcapping or -1.0,
        output_logits_soft_cap=config.final_logit_softcapping or -1.0,
        window_size=config.sliding_window,
    )
    return fields


class _AttnImplementation:
    """Set and restore one model's attention implementation (its own config object only)."""

    def __init__(self, config, value):
        self.config, self.value = config, value
        self.original = config._attn_implementation

    def apply(self):
        self.config._attn_implementation = self.value

    def undo(self):
        self.config._attn_implementation = self.original


def use_eager_attention(model, spec, options):
    current = model.config._attn_implementation
    if current == "eager":
        return []
    if options.get("keep_attn_implementation"):
        warnings.warn(
            f"Gemma2 is running {current!r} attention, which drops attention soft-capping; kept as asked "
            "(keep_attn_implementation=True), so its logits are not Gemma2's and hook_attn_scores is uncapped",
            stacklevel=4,
        )
        return []
    warnings.warn(
        f"tlshim switched this Gemma2 model from {current!r} to eager attention: {current} drops attention "
        "soft-capping, so its logits change (soft-capping is restored). uninstall() switches back; "
        "install(..., keep_attn_implementation=True) keeps it",
        stacklevel=4,
    )
    switch = _AttnImplementation(model.config, "eager")
    return [Call(switch.apply, switch.undo)]


GEMMA2 = ArchSpec(
    versions="",
    ln2="pre_feedforward_layernorm",
    ln1_post="post_attention_layernorm",
    ln2_post="post_feedforward_layernorm",
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    norm=norms.OFFSET_RMS,
    tl_config=gemma2_cfg,
    prepare=(use_eager_attention,),
)
