"""The rest of TransformerLens's ActivationCache surface: neuron results, the full residual
decomposition, batch slicing, stack_activation, toggle_autodiff, logit_lens.

A mixin of ActivationCache. Each method has TransformerLens 4.3's signature and meaning, on models
whose layers may differ in width (OpenELM: labels and stacks follow each layer's own count).
"""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter

import torch


def _slice(tensor, how, dim):
    from .activation_cache import _apply_slice

    return _apply_slice(tensor, how, dim)


def _at(value, layer):
    return value[layer] if isinstance(value, list) else value


def _as_2d(direction):
    """(the projection as (d_model, n_out), whether to squeeze the output's last axis)."""
    if direction is None:
        return None, False
    if direction.ndim not in (1, 2):
        raise ValueError(f"project_output_onto must be (d_model,) or (d_model, n_outputs), got shape {tuple(direction.shape)}")
    return (direction[:, None], True) if direction.ndim == 1 else (direction, False)


def _single_index(how):
    """An int neuron_slice (or TransformerLens's int-mode Slice) as a one-element list: layers are
    concatenated along the neuron axis, so it must not collapse."""
    if getattr(how, "mode", None) == "int":
        how = how.slice
    return [int(how)] if isinstance(how, int) else how


class CacheAnalysis:
    @property
    def has_embed(self):
        return "hook_embed" in self.cache_dict

    @property
    def has_pos_embed(self):
        return "hook_pos_embed" in self.cache_dict

    def _batch_size(self):
        """The most common leading size among the entries (broadcast entries have 1)."""
        counts = Counter(v.shape[0] for v in self.cache_dict.values() if v.ndim > 0)
        return counts.most_common(1)[0][0] if counts else 1

    def toggle_autodiff(self, mode: bool = False):
        """torch.set_grad_enabled(mode), globally (as TransformerLens; torch.inference_mode() is the local form)."""
        logging.warning("Changed the global state, set autodiff to %s", mode)
        torch.set_grad_enabled(mode)

    def apply_slice_to_batch_dim(self, batch_slice):
        """A new cache with ``batch_slice`` applied to every batched entry (an int drops the batch axis)."""
        if batch_slice is None or getattr(batch_slice, "mode", None) == "identity":
            return type(self)(dict(self.cache_dict), self.model, has_batch_dim=self.has_batch_dim)
        if not self.has_batch_dim:
            raise ValueError("apply_slice_to_batch_dim: this cache has no batch axis (remove_batch_dim was called)")
        size = self._batch_size()
        sliced = {name: _slice(value, batch_slice, 0) if value.ndim > 0 and value.shape[0] == size else value
                  for name, value in self.cache_dict.items()}
        single = isinstance(batch_slice, int) or getattr(batch_slice, "mode", None) == "int"
        return type(self)(sliced, self.model, has_batch_dim=not single)

    def stack_activation(self, activation_name, layer=-1, sublayer_type=None):
        """The named activation of every layer before ``layer`` (all of them by default), stacked."""
        if layer is None or layer == -1:
            layer = self._n_layers
        return torch.stack([self[(activation_name, i, sublayer_type)] for i in range(layer)])

    def get_neuron_results(self, layer, neuron_slice=None, pos_slice=None, project_output_onto=None):
        """Each neuron's contribution to the residual stream, hook_post * its row of W_out: (..., neuron, d_model),
        or projected onto ``project_output_onto`` before the expansion."""
        acts = _slice(self[("post", layer, "mlp")], pos_slice, -2)
        acts = _slice(acts, neuron_slice, -1)
        w_out = _slice(self.model.blocks[layer].mlp.W_out.detach(), neuron_slice, 0).to(acts.device)
        if project_output_onto is None:
            return acts[..., None] * w_out
        projected = w_out @ project_output_onto.to(w_out)
        return acts * projected if project_output_onto.ndim == 1 else acts[..., None] * projected

    def stack_neuron_results(self, layer, pos_slice=None, neuron_slice=None, return_labels=False, incl_remainder=False,
                             apply_ln=False, project_output_onto=None, mlp_input=False):
        """Every neuron's result in the layers before ``layer``, as (neuron, ..., d_model), labels "L{l}N{n}";
        ``incl_remainder`` adds the rest of the residual stream that ``layer`` reads."""
        if layer is None or layer == -1:
            layer = self._n_layers
        if incl_remainder and layer < 0:
            raise ValueError(f"stack_neuron_results: layer must be >= 0 with incl_remainder=True (-1 or None mean n_layers); got {layer}")
        neuron_slice = _single_index(neuron_slice)
        project, squeeze = _as_2d(project_output_onto)
        fold = apply_ln and project is not None  # normalise in d_model, then project, one layer at a time

        def finish(stack):
            if fold:
                return self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input) @ project.to(stack)
            return stack if project is None else stack @ project.to(stack)

        parts, labels = [], []
        for i in range(layer):
            ids = _slice(torch.arange(_at(self.model.cfg.d_mlp, i)), neuron_slice, 0)
            labels.extend(f"L{i}N{int(n)}" for n in ids)
            parts.append(finish(self.get_neuron_results(i, neuron_slice, pos_slice).movedim(-2, 0)))
        if parts:
            stack = torch.cat(parts)
        else:
            like = _slice(self["hook_embed"], pos_slice, -2)
            stack = finish(like.new_zeros((0, *like.shape)))
        if incl_remainder:
            target = _slice(self[("resid_mid", layer) if mlp_input else ("resid_post", layer - 1)], pos_slice, -2)
            stack = torch.cat([stack, (finish(target[None])[0] - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln and not fold:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        if squeeze:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(self, layer=None, mlp_input=False, expand_neurons=True, apply_ln=False,
                                     pos_slice=None, return_labels=False, project_output_onto=None):
        """The residual stream ``layer`` reads, split into every head's result, every neuron's (or each MLP's)
        result, the embedding and the summed biases, in that order (TransformerLens's order and labels)."""
        if layer is None or layer == -1:
            layer = self._n_layers
        project, squeeze = _as_2d(project_output_onto)

        def finish(stack):
            if apply_ln:
                stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
            return stack if project is None else stack @ project.to(stack)

        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0), pos_slice=pos_slice, return_labels=True)
        parts = [finish(heads)]
        if not self.model.cfg.attn_only and layer > 0:
            if expand_neurons:
                neurons, more = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True, apply_ln=apply_ln,
                                                          project_output_onto=project, mlp_input=mlp_input)
                parts.append(neurons)
            else:
                mlps, more = self.decompose_resid(layer, mlp_input=mlp_input, pos_slice=pos_slice, incl_embeds=False,
                                                  mode="mlp", return_labels=True)
                parts.append(finish(mlps))
            labels = labels + more
        for key, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
            if key in self.cache_dict:
                parts.append(finish(_slice(self[key], pos_slice, -2)[None]))
                labels.append(label)
        bias = self.model.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        parts.append(finish(bias.to(heads).expand((1, *heads.shape[1:]))))
        labels.append("bias")
        stack = torch.cat(parts)
        if squeeze:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack

    def ssm_layers(self, mixer_type=None):
        """The layers with an SSM mixer: none on the decoders tlshim installs into."""
        return []

    def compute_ssm_effective_attention(self, layer=None, include_dt_scaling=False, per_state_coord=False):
        raise RuntimeError("compute_ssm_effective_attention: this model has no SSM mixer layers (cache.ssm_layers() is [])")

    def compute_ssm_state(self, layer=None, time_step=None):
        raise RuntimeError("compute_ssm_state: this model has no SSM mixer layers (cache.ssm_layers() is [])")

    def logit_lens(self, **kwargs):
        """TransformerLens's tools.analysis.logit_lens on this cache (needs transformer_lens installed)."""
        if importlib.util.find_spec("transformer_lens") is None:
            raise ImportError("cache.logit_lens is TransformerLens's tools.analysis.logit_lens, and transformer_lens is not "
                              "installed; without it: model.unembed(cache.accumulated_resid(apply_ln=True)) gives the "
                              "logits of every layer")
        from transformer_lens.tools.analysis.logit_lens import logit_lens

        return logit_lens(self.model, cache=self, **kwargs)
