"""ActivationCache: what run_with_cache returns, with TransformerLens's keys and analysis methods.

tlshim does not fold norm weights into the next weights, so ``apply_ln_to_stack`` applies the norm's
(effective) weight too: the result is linear in the stack and its components sum to the norm's output,
which keeps ``logit_attrs`` summing to the logits.
"""

from __future__ import annotations

import torch

from .names import act_name


class ActivationCache:
    def __init__(self, cache_dict: dict, model, has_batch_dim: bool = True):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    def _key(self, key):
        if isinstance(key, str):
            return key if key in self.cache_dict else act_name(key)
        return act_name(*key)

    def __getitem__(self, key):
        name = self._key(key)
        if name not in self.cache_dict:
            from .errors import unknown_hook_name

            raise unknown_hook_name(name, self.cache_dict)
        return self.cache_dict[name]

    def __contains__(self, key):
        return self._key(key) in self.cache_dict

    def __len__(self):
        return len(self.cache_dict)

    def __iter__(self):
        return iter(self.cache_dict)

    def __repr__(self):
        return f"ActivationCache with keys {list(self.cache_dict)}"

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def to(self, device, move_model: bool = False):
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        if move_model:
            self.model.to(device)
        return self

    def remove_batch_dim(self):
        if self.has_batch_dim:
            for name, value in self.cache_dict.items():
                if value.shape[0] != 1:
                    raise ValueError(f"remove_batch_dim needs batch size 1; {name} has {value.shape[0]}")
            self.cache_dict = {k: v[0] for k, v in self.cache_dict.items()}
            self.has_batch_dim = False
        return self

    @property
    def _n_layers(self):
        return self.model.cfg.n_layers

    @staticmethod
    def _slice_pos(tensor, pos_slice):
        if pos_slice is None:
            return tensor
        return tensor[..., [pos_slice] if isinstance(pos_slice, int) else pos_slice, :]

    def accumulated_resid(self, layer=None, incl_mid=False, apply_ln=False, pos_slice=None, mlp_input=False, return_labels=False):
        """The residual stream before each layer up to ``layer`` (n_layers = the final one), stacked."""
        if layer is None or layer == -1:
            layer = self._n_layers
        components, labels = [], []
        for i in range(layer + 1):
            if i == self._n_layers:
                components.append(self[f"blocks.{i - 1}.hook_resid_post"])
                labels.append("final_post")
                continue
            components.append(self[f"blocks.{i}.hook_resid_pre"])
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                components.append(self[f"blocks.{i}.hook_resid_mid"])
                labels.append(f"{i}_mid")
        stack = self._slice_pos(torch.stack(components), pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer=None, mlp_input=False, mode="all", apply_ln=False, pos_slice=None, incl_embeds=True, return_labels=False):
        """The residual stream at ``layer`` split into embed, then each attention and MLP output."""
        if layer is None or layer == -1:
            layer = self._n_layers
        components, labels = [], []
        if incl_embeds:
            components.append(self["hook_embed"])
            labels.append("embed")
            if "hook_pos_embed" in self.cache_dict:
                components.append(self["hook_pos_embed"])
                labels.append("pos_embed")
        for i in range(layer):
            if mode != "mlp":
                components.append(self[f"blocks.{i}.hook_attn_out"])
                labels.append(f"{i}_attn_out")
            if mode != "attn":
                components.append(self[f"blocks.{i}.hook_mlp_out"])
                labels.append(f"{i}_mlp_out")
        if mlp_input and mode != "mlp" and layer < self._n_layers:
            components.append(self[f"blocks.{layer}.hook_attn_out"])
            labels.append(f"{layer}_attn_out")
        stack = self._slice_pos(torch.stack(components), pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def compute_head_results(self):
        """Fill in blocks.{i}.attn.hook_result from the cached hook_z and W_O, where missing."""
        for i, block in enumerate(self.model.blocks):
            name = f"blocks.{i}.attn.hook_result"
            if name not in self.cache_dict:
                w_o = block.attn.W_O.to(self[f"blocks.{i}.attn.hook_z"].device)
                self.cache_dict[name] = torch.einsum("...he,hed->...hd", self[f"blocks.{i}.attn.hook_z"], w_o.detach())

    def stack_head_results(self, layer=-1, return_labels=False, incl_remainder=False, pos_slice=None, apply_ln=False):
        """Every head's output (z_h @ W_O[h]) up to ``layer``, as (layer * head, ..., d_model)."""
        if layer is None or layer == -1:
            layer = self._n_layers
        self.compute_head_results()
        components, labels = [], []
        for i in range(layer):
            result = self[f"blocks.{i}.attn.hook_result"]
            components.extend(result.unbind(-2))
            labels.extend(f"L{i}H{h}" for h in range(result.shape[-2]))
        stack = torch.stack(components)
        if incl_remainder:
            total = self.accumulated_resid(layer)[-1]
            stack = torch.cat([stack, (total - stack.sum(0))[None]])
            labels.append("remainder")
        stack = self._slice_pos(stack, pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, residual_stack, layer=None, mlp_input=False, pos_slice=None, batch_slice=None, has_batch_dim=True):
        """Apply, to each component, the norm that reads the residual stream at ``layer`` (cached scale)."""
        if layer is None or layer == -1 or layer == self._n_layers:
            prefix, module = "ln_final", self.model.ln_final
        else:
            ln = "ln2" if mlp_input else "ln1"
            prefix, module = f"blocks.{layer}.{ln}", getattr(self.model.blocks[layer], ln)
        scale = self._slice_pos(self[f"{prefix}.hook_scale"], pos_slice)
        if batch_slice is not None:
            scale = scale[batch_slice]
        stack = residual_stack.float()
        if self.model.cfg.normalization_type == "LN":
            stack = stack - stack.mean(-1, keepdim=True)
        stack = stack / scale
        weight = module.w
        if weight is not None:
            stack = stack * weight.detach().float()
        return stack.to(residual_stack.dtype)

    def logit_attrs(self, residual_stack, tokens, incorrect_tokens=None, pos_slice=None, batch_slice=None, has_batch_dim=True):
        """Each component's contribution to the logit of ``tokens`` (minus ``incorrect_tokens``)."""
        w_u = self.model.W_U.detach()
        directions = w_u[:, tokens].movedim(0, -1) if torch.is_tensor(tokens) else w_u[:, tokens]
        if incorrect_tokens is not None:
            wrong = w_u[:, incorrect_tokens].movedim(0, -1) if torch.is_tensor(incorrect_tokens) else w_u[:, incorrect_tokens]
            directions = directions - wrong
        return (residual_stack * directions.to(residual_stack.dtype)).sum(-1)
