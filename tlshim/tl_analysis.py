"""TransformerLens's model-level analysis API on an installed model: residual directions of tokens,
biases, head labels, the factored OV / QK circuits, composition scores and the HookedRootModule
hook utilities (hook_points, get_caching_hooks, cache_all, remove_all_hook_fns).

A mixin of ModelAPI. The weights are the model's own, unfolded; where TransformerLens's numbers
assume the final norm's weight folded into W_U (tokens_to_residual_directions, and so
cache.logit_attrs and tools.analysis.direct_logit_attribution), it is folded in here.
"""

from __future__ import annotations

import torch

from .factored import composition_scores, factored


#: hook names whose position axis is third from last: (..., pos, head, d_head or d_model)
_PER_HEAD = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_rot_q", "hook_rot_k", "hook_q_normed", "hook_k_normed")


class HeadLabels(list):
    """"L{layer}H{head}" for every head: a list (TransformerBridge's property) that can also be called
    (HookedTransformer's method)."""

    def __call__(self):
        return self


def _names_filter(names_filter):
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if isinstance(names_filter, (list, tuple, set, frozenset)):
        return lambda name: name in names_filter
    if callable(names_filter):
        return names_filter
    raise TypeError(f"names_filter must be None, a name, a list of names or a function name -> bool, got {type(names_filter).__name__}")


class AnalysisAPI:
    def _single_token(self, word):
        own = getattr(type(self), "to_single_token", None)
        if own is not None:
            return own(self, word)
        ids = self._tokenizer_or_raise()(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{word!r} is {len(ids)} tokens ({ids}), not one: pass a single token's string or its id")
        return ids[0]

    def tokens_to_residual_directions(self, tokens):
        """The residual-stream direction each token's logit reads, d_model last: W_U's column times the final
        norm's weight (TransformerLens's W_U after fold_ln), so that it dots with ``cache.apply_ln_to_stack``'s
        output to give the logit. ``tokens``: a string (one token), an int, or a tensor of ids."""
        if isinstance(tokens, str):
            tokens = self._single_token(tokens)
        if torch.is_tensor(tokens) and tokens.numel() > 1:
            directions = self.W_U[:, tokens].movedim(0, -1)
        elif torch.is_tensor(tokens) or isinstance(tokens, int):
            directions = self.W_U[:, int(tokens)]
        else:
            raise TypeError(f"tokens must be a string, an int or a tensor of token ids, got {type(tokens).__name__}")
        weight = self.ln_final.w
        return directions if weight is None else directions * weight.to(directions.dtype)

    def accumulated_bias(self, layer, mlp_input=False, include_mlp_biases=True):
        """The sum of the attention (b_O) and MLP (b_out) output biases added to the residual stream before
        ``layer``; ``mlp_input`` adds ``layer``'s own b_O."""
        total = torch.zeros(self.cfg.d_model, device=self.cfg.device)
        for i in range(layer):
            total = total + self.blocks[i].attn.b_O.to(total)
            b_out = getattr(self.blocks[i].mlp, "b_out", None) if include_mlp_biases else None
            if b_out is not None:
                total = total + b_out.to(total)
        if mlp_input:
            if layer >= self.cfg.n_layers:
                raise ValueError(f"accumulated_bias(mlp_input=True) needs a layer below n_layers ({self.cfg.n_layers}), got {layer}")
            total = total + self.blocks[layer].attn.b_O.to(total)
        return total

    @property
    def all_head_labels(self):
        """["L0H0", "L0H1", ...], each layer with its own head count (OpenELM)."""
        n = self.cfg.n_heads
        return HeadLabels(f"L{i}H{h}" for i in range(self.cfg.n_layers) for h in range(n[i] if isinstance(n, list) else n))

    def _expand_kv(self, weight):
        """(layer, kv head, ...) -> (layer, head, ...): each key/value head repeated for its query heads (GQA)."""
        return weight.repeat_interleave(self.W_Q.shape[1] // weight.shape[1], dim=1)

    @property
    def QK(self):
        """W_Q @ W_K^T per (layer, head), factored: (n_layers, n_heads, d_model, d_model)."""
        return factored(self.W_Q, self._expand_kv(self.W_K).transpose(-2, -1))

    @property
    def OV(self):
        """W_V @ W_O per (layer, head), factored: (n_layers, n_heads, d_model, d_model)."""
        return factored(self._expand_kv(self.W_V), self.W_O)

    def all_composition_scores(self, mode):
        """Q-, K- or V-composition score of every (earlier head, later head) pair: (layer, head, layer, head),
        zero where the second head is not in a later layer (Elhage et al. 2021)."""
        if mode not in ("Q", "K", "V"):
            raise ValueError(f"mode must be one of 'Q', 'K', 'V', not {mode!r}")
        with torch.no_grad():
            left = self.OV
            right = {"Q": self.QK, "K": self.QK.T, "V": left}[mode]
            scores = composition_scores(left, right)
        layers = torch.arange(self.cfg.n_layers, device=scores.device)
        return torch.where(layers[:, None, None, None] < layers[None, None, :, None], scores, torch.zeros_like(scores))

    # -- HookedRootModule's hook utilities -------------------------------------------------------

    def hook_points(self):
        """Every hook point of the model (hook_dict's values)."""
        return list(self.hook_dict.values())

    def remove_all_hook_fns(self, direction="both", including_permanent=False, level=None):
        """Remove the hooks added with add_hook (permanent ones only if asked); ``level`` is not used by tlshim."""
        self.reset_hooks(clear_contexts=False, direction=direction, including_permanent=including_permanent)

    def get_caching_hooks(self, names_filter=None, incl_bwd=False, device=None, remove_batch_dim=False, cache=None, pos_slice=None):
        """(cache dict, forward hooks, backward hooks) that fill the dict with the named activations when added,
        e.g. with ``model.hooks(fwd_hooks, bwd_hooks)``."""
        from .activation_cache import _apply_slice

        cache = {} if cache is None else cache
        accept = _names_filter(names_filter)

        def saver(suffix, keep_graph):
            def save(tensor, hook):
                value = tensor if keep_graph else tensor.detach()
                value = value[0] if remove_batch_dim else value
                pos_dim = -3 if hook.name.endswith(_PER_HEAD) else -2  # (.., pos, head, e) or (.., pos, d) / (.., q pos, k pos)
                if pos_slice is not None and value.ndim >= -pos_dim:
                    value = _apply_slice(value, pos_slice, pos_dim)
                cache[hook.name + suffix] = value if device is None else value.to(device)

            save.tlshim_caching = True  # is_caching: a caching hook is attached model-wide
            return save

        names = [point.name for point in self._points(accept)]  # switched-off names skipped, as a filter does
        fwd = [(name, saver("", incl_bwd)) for name in names]
        bwd = [(name, saver("_grad", False)) for name in names] if incl_bwd else []
        return cache, fwd, bwd

    def cache_all(self, cache, incl_bwd=False, device=None, remove_batch_dim=False):
        """Add hooks (until reset_hooks) that store every activation of each forward in ``cache``."""
        self.cache_some(cache, lambda name: True, incl_bwd, device, remove_batch_dim)

    def cache_some(self, cache, names, incl_bwd=False, device=None, remove_batch_dim=False):
        """Add hooks (until reset_hooks) that store the activations ``names`` accepts in ``cache``."""
        _, fwd, bwd = self.get_caching_hooks(names, incl_bwd, device, remove_batch_dim, cache)
        for hooks, direction in ((fwd, "fwd"), (bwd, "bwd")):
            for name, hook in hooks:
                self.add_hook(name, hook, dir=direction)
