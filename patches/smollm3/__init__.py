"""SmolLM3: the Llama layout with NoPE layers (``no_rope_layers[i]``: 1 = rotary, 0 = none).

On a NoPE layer the query and key enter the attention kernel unrotated, so hook_rot_q / hook_rot_k
fire there with the unrotated tensors; cfg.rotary_layers lists the layers that apply rotary.
"""

from tlshim.spec import llama_family_cfg


def smollm3_cfg(model):
    fields = llama_family_cfg(model)
    fields["rotary_layers"] = [i for i, flag in enumerate(model.config.no_rope_layers) if flag]
    return fields
