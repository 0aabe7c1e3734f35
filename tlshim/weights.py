"""TransformerLens weight names on the installed modules, computed from the live parameters at each access.

Each class is a mixin for a per-instance subclass (see subclass.py); nothing is cached, so a dtype or
device move never leaves a stale copy.
"""

from __future__ import annotations

import torch


def _bias_or_zeros(bias, shape, like):
    return bias.view(shape) if bias is not None else torch.zeros(shape, dtype=like.dtype, device=like.device)


class AttnWeights:
    def _tl_heads(self):
        return type(self)._tlshim_spec.head_counts(self, getattr(self, "config", None))

    def _tl_in(self, role, n_heads):
        weight, bias = type(self)._tlshim_spec.weights(self, role)
        d_head = weight.shape[0] // n_heads
        return weight.view(n_heads, d_head, -1).transpose(1, 2), _bias_or_zeros(bias, (n_heads, d_head), weight)

    @property
    def W_Q(self):
        return self._tl_in("q", self._tl_heads()[0])[0]

    @property
    def W_K(self):
        return self._tl_in("k", self._tl_heads()[1])[0]

    @property
    def W_V(self):
        return self._tl_in("v", self._tl_heads()[1])[0]

    @property
    def b_Q(self):
        return self._tl_in("q", self._tl_heads()[0])[1]

    @property
    def b_K(self):
        return self._tl_in("k", self._tl_heads()[1])[1]

    @property
    def b_V(self):
        return self._tl_in("v", self._tl_heads()[1])[1]

    @property
    def W_O(self):
        weight, _ = type(self)._tlshim_spec.weights(self, "o")
        return weight.T.reshape(self._tl_heads()[0], -1, weight.shape[0])

    @property
    def b_O(self):
        weight, bias = type(self)._tlshim_spec.weights(self, "o")
        return _bias_or_zeros(bias, (weight.shape[0],), weight)


class MlpWeights:
    def _tl_proj(self, role):
        return type(self)._tlshim_spec.mlp_weights(self, role)

    @property
    def W_in(self):
        return self._tl_proj("up")[0].T

    @property
    def W_gate(self):
        return self._tl_proj("gate")[0].T

    @property
    def W_out(self):
        return self._tl_proj("down")[0].T

    @property
    def b_in(self):
        weight, bias = self._tl_proj("up")
        return _bias_or_zeros(bias, (weight.shape[0],), weight)

    @property
    def b_out(self):
        weight, bias = self._tl_proj("down")
        return _bias_or_zeros(bias, (weight.shape[0],), weight)


class NormWeights:
    """``w`` is the weight the norm effectively multiplies by: (1 + weight) on Gemma-style norms."""

    @property
    def w(self):
        return type(self)._tlshim_spec.norm.effective_weight(self)

    @property
    def b(self):
        return getattr(self, "bias", None)


class EmbedWeights:
    @property
    def W_E(self):
        return self.weight


class UnembedWeights:
    @property
    def W_U(self):
        return self.weight.T

    @property
    def b_U(self):
        return _bias_or_zeros(getattr(self, "bias", None), (self.weight.shape[0],), self.weight)


class TiedEmbedWeights(EmbedWeights, UnembedWeights):
    """An embedding that is the unembedding too (tied, with no lm_head module: OpenELM)."""
