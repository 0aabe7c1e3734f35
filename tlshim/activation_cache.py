"""ActivationCache: what run_with_cache returns, with TransformerLens's keys and analysis methods.

The norm methods follow TransformerLens on a model whose norm weights are not folded in:
``apply_ln_to_stack`` centres (LayerNorm) and divides by the cached hook_scale, without the norm's
weight, so its components sum to hook_normalized; ``accumulated_resid(apply_ln=True)`` up to the final
layer runs the final norm itself (weight included) on each component (TransformerLens >= 3.9's logit
lens); ``logit_attrs`` dots with ``model.tokens_to_residual_directions``, W_U with the final norm's
weight folded in (as TransformerLens's fold_ln gives it), so a full decomposition sums to the logit.
Slices take TransformerLens's forms (an int drops the axis, a tuple is a slice, a list indexes).
"""

from __future__ import annotations

import numbers

import torch

from . import attention_output
from .names import act_name
from .tl_cache import CacheAnalysis


def _apply_slice(tensor, how, dim):
    """TransformerLens's Slice: None keeps all, an int drops the axis, a tuple is slice(*tuple)."""
    if how is None:
        return tensor
    if hasattr(how, "apply") and hasattr(how, "mode"):  # TransformerLens's own Slice
        return how.apply(tensor, dim=dim)
    if isinstance(how, tuple):
        how = slice(*how)
    elif isinstance(how, numbers.Integral) or (torch.is_tensor(how) and how.ndim == 0):
        how = int(how)
    index = [slice(None)] * tensor.ndim
    index[dim] = how
    return tensor[tuple(index)]


class ActivationCache(CacheAnalysis):
    def __init__(self, cache_dict: dict, model, has_batch_dim: bool = True):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    def _key(self, key):
        if isinstance(key, str):
            return key if key in self.cache_dict else act_name(key)
        if len(key) > 1 and isinstance(key[1], int) and key[1] < 0:  # cache["resid_post", -1]: the last layer
            key = (key[0], self._n_layers + key[1], *key[2:])
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

    def remove_batch_dim(self, batch_size=None):
        if batch_size not in (None, 1):
            raise ValueError(f"remove_batch_dim needs batch size 1, got batch_size={batch_size}")
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
        stack = torch.stack([_apply_slice(c, pos_slice, -2) for c in components])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input,
                                           has_batch_dim=self.has_batch_dim, recompute_ln=layer == self._n_layers)
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
        stack = torch.stack([_apply_slice(c, pos_slice, -2) for c in components])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def compute_head_results(self):
        """Fill in blocks.{i}.attn.hook_result from the cached hook_z and W_O, where missing."""
        for i, block in enumerate(self.model.blocks):
            name = f"blocks.{i}.attn.hook_result"
            if name not in self.cache_dict:
                z = attention_output.head_inputs(self, f"blocks.{i}", block)  # hook_z, or gated (Laguna)
                self.cache_dict[name] = torch.einsum("...he,hed->...hd", z, block.attn.W_O.to(z.device).detach())

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
        if not components:  # layer 0: no heads, the shape an empty stack of residuals has
            stack = self["hook_embed"].new_zeros((0, *self["hook_embed"].shape))
        else:
            stack = torch.stack(components)
        if incl_remainder:
            total = self.accumulated_resid(layer)[-1]
            stack = torch.cat([stack, (total - stack.sum(0))[None]])
            labels.append("remainder")
        stack = _apply_slice(stack, pos_slice, -2)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, residual_stack, layer=None, mlp_input=False, pos_slice=None, batch_slice=None,
                          has_batch_dim=True, recompute_ln=False):
        """Each component as the norm reading the residual stream at ``layer`` sees it: centred (LayerNorm)
        and divided by that norm's cached scale, before its weight (TransformerLens's unfolded semantics).

        With ``recompute_ln`` at the final layer, the final norm itself (weight included) runs on each
        component with its own statistics (the logit lens).
        """
        if layer is None or layer == -1:
            layer = self._n_layers
        if has_batch_dim:
            residual_stack = _apply_slice(residual_stack, batch_slice, 1)
        if recompute_ln and layer == self._n_layers:
            return self.model.ln_final(residual_stack)
        if self.model.cfg.normalization_type == "LN":
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        prefix = "ln_final" if layer == self._n_layers else f"blocks.{layer}.ln{2 if mlp_input else 1}"
        scale = _apply_slice(self[f"{prefix}.hook_scale"], pos_slice, -2)
        if self.has_batch_dim:
            scale = _apply_slice(scale, batch_slice, 0)
        return residual_stack / scale

    def logit_attrs(self, residual_stack, tokens, incorrect_tokens=None, pos_slice=None, batch_slice=None, has_batch_dim=True):
        """Each component's contribution to the logit of ``tokens`` (minus ``incorrect_tokens``): the stack
        through ``apply_ln_to_stack`` at the final norm, dotted with the tokens' columns of W_U.

        ``tokens`` may be a string (one token). The directions carry the final norm's weight (TransformerLens's
        numbers assume it folded into W_U), so the attributions of a full decomposition sum to the logit
        (difference), less b_U and any final soft-cap.
        """
        directions = self._residual_directions(tokens)
        if incorrect_tokens is not None:
            wrong = self._residual_directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise ValueError(f"tokens and incorrect_tokens must have the same shape; got {tuple(directions.shape[:-1])} "
                                 f"and {tuple(wrong.shape[:-1])}")
            directions = directions - wrong
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim)
        int_batch = isinstance(batch_slice, numbers.Integral)
        if has_batch_dim and not int_batch and scaled.ndim == 4 and directions.ndim == 2 and directions.shape[0] == scaled.shape[1]:
            directions = directions.unsqueeze(-2)  # one token per example: broadcast over positions
        return (scaled * directions.to(scaled.dtype)).sum(-1)

    def _residual_directions(self, tokens):
        """model.tokens_to_residual_directions(tokens) (W_U with the final norm's weight folded in), detached."""
        return self.model.tokens_to_residual_directions(tokens).detach()
