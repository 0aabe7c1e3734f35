"""Pre-norm blocks whose first block has an ``nn.Identity`` where later blocks have their pre-attention
norm, because a norm inside the embedding module already normalized the block input (ModernBERT's
decoder), and an LM head transform (dense, activation, norm) between the final norm and the unembedding.

Names: blocks.0.hook_resid_pre is the embedding norm's output (what block 0's attention reads);
``embed.ln.hook_scale`` / ``hook_normalized`` are that norm's (family_postln's embedding norm);
block 0 has no ``ln1`` hooks and no ``blocks[0].ln1``; ``ln_final`` is the head's norm, so logits =
ln_final's output @ W_U + b_U (as BERT's LM head, family_postln). All found from structure and the probe.
"""

from __future__ import annotations

import torch
from torch import nn


def identity_slots(layers) -> set:
    """Child names that are an nn.Identity in some block and a norm in another (ModernBERT's attn_norm)."""
    from .structure import _looks_like_norm

    kinds = {}
    for layer in layers:
        for name, child in layer.named_children():
            kinds.setdefault(name, set()).add("identity" if isinstance(child, nn.Identity) else "norm" if _looks_like_norm(child) else "other")
    return {name for name, seen in kinds.items() if seen == {"identity", "norm"}}


def probed_block(layers, candidates):
    """The first of ``candidates`` (block indices) with no Identity in a norm's slot, else the first."""
    slots = identity_slots(layers)
    return next((i for i in candidates if not any(isinstance(getattr(layers[i], n), nn.Identity) for n in slots)), candidates[0])


def is_identity(module) -> bool:
    return isinstance(module, nn.Identity)


def embedding_norm(model, layers_path, flow):
    """The path of the norm module outside the blocks that turns the token embedding into the first
    block's input (a norm nested in the embedding module), or None."""
    from .structure import _looks_like_norm, _same

    embedding, x = flow.embedding, flow.inputs[""]
    if not isinstance(embedding, torch.Tensor) or embedding.shape != x.shape:
        return None
    for name, module in model.named_modules():
        if name.startswith(layers_path + ".") or not _looks_like_norm(module) or module._modules:
            continue
        try:
            with torch.no_grad():
                if _same(module(embedding), x):
                    return name
        except (RuntimeError, TypeError, ValueError):  # a norm of another width (a vision tower's)
            continue
    return None


def head_norm(model, layers_path, final_path):
    """The last norm outside the module holding the blocks (an LM head's transform after the final
    norm: ModernBERT's lm_head.norm), the one the unembedding reads; ``final_path`` where there is none."""
    from .structure import _looks_like_norm

    owner = layers_path.rpartition(".")[0]
    head = [n for n, m in model.named_modules() if owner and not n.startswith(owner + ".") and n != owner and _looks_like_norm(m) and not m._modules]
    return head[-1] if head else final_path
