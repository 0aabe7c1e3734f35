"""Attention computed inline, outside transformers' attention registry (Falcon; GPT-J, GPT-NeoX and
StableLM before their refactor): rot_q, rot_k, attn_scores and pattern.

While one of those points holds a hook (and only then), the attention module's forward runs under a
torch function mode that sees its ops as the model calls them: the first product of two head-shaped
tensors is query @ key^T (rot_q and rot_k fire on its operands), the first softmax turns
attn_scores (its input: scaled, masked, ALiBi added) into the pattern (its output). A call of
F.scaled_dot_product_attention fires rot_q / rot_k on its query and key and, when scores or pattern
are hooked, is computed eagerly (attention.eager_attention). Every value goes on to the model's own op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import AttnSite, eager_attention

#: the product query @ key^T, as the model may call it (``@`` arrives as Tensor.matmul)
_PRODUCTS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.baddbmm)
_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)


class InlineAttnSite(AttnSite):
    routes_config = False

    def call(self, wrapped, args, kwargs):
        if not self.kernel_needed():
            return wrapped(*args, **kwargs)
        with _Ops(self):
            return wrapped(*args, **kwargs)

    def fire_key(self, key, n_query):
        """rot_k on the new positions of a (batch, heads, pos, d_head) key; a key already repeated over
        each GQA group (StableLM's repeat_kv) fires one copy per key/value head."""
        if self.rot_k is None or not self.rot_k.active:
            return key
        n_kv = self.head_counts[1]
        n_rep = key.shape[1] // n_kv if key.shape[1] > n_kv else 1
        own = key[:, ::n_rep]
        new_keys = own[:, :, -n_query:]
        fired = self.fire_heads(self.rot_k, new_keys)
        if fired is new_keys:
            return key
        own = torch.cat([own[:, :, :-n_query], fired], dim=2)
        return own.repeat_interleave(n_rep, dim=1) if n_rep > 1 else own


def _query_key(func, args):
    """The two operands of a product of head-shaped tensors ((batch, heads) or batch * heads first), or None."""
    operands = args[1:3] if func is torch.baddbmm else args[:2]
    dims = (3,) if func in (torch.bmm, torch.baddbmm) else (4,)
    return operands if all(isinstance(t, torch.Tensor) and t.dim() in dims for t in operands) else None


def computes_attention(attn, run) -> bool:
    """Whether ``attn``'s forward, in the forward that ``run()`` makes, takes a product of head-shaped
    tensors and then a softmax, or calls F.scaled_dot_product_attention (what _Ops serves)."""
    seen = _Seen()
    handles = [
        attn.register_forward_pre_hook(lambda *_: (seen.__enter__(), None)[1]),
        attn.register_forward_hook(lambda *_: seen.__exit__(None, None, None)),
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen.sdpa or seen.softmax


class _Seen(torch.overrides.TorchFunctionMode):
    product = softmax = sdpa = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.product = self.product or (func in _PRODUCTS and _query_key(func, args) is not None)
        self.softmax = self.softmax or (self.product and func in _SOFTMAX)
        self.sdpa = self.sdpa or func is F.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


class _Ops(torch.overrides.TorchFunctionMode):
    """The ops of one attention forward: see the module doc."""

    def __init__(self, site):
        super().__init__()
        self.site = site
        self.product_seen = self.softmax_seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        site = self.site
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func in _PRODUCTS and not self.product_seen:
            operands = _query_key(func, args)
            if operands:
                self.product_seen = True
                query, key_t = (self._heads(t) for t in operands)
                query = site.fire_heads(site.rot_q, query)
                key_t = site.fire_key(key_t.transpose(-1, -2), query.shape[2]).transpose(-1, -2)
                new = [query.reshape(operands[0].shape), key_t.reshape(operands[1].shape)]
                args = (args[0], *new, *args[3:]) if func is torch.baddbmm else (*new, *args[2:])
        elif func in _SOFTMAX and not self.softmax_seen:
            self.softmax_seen = True
            scores, rest = (args[0], args[1:]) if args else (kwargs.pop("input"), ())
            scores = self._fire_scores(site.scores, scores)
            return self._fire_scores(site.pattern, func(scores, *rest, **kwargs))
        return func(*args, **kwargs)

    def _heads(self, t):
        """(batch, heads, pos, d) of a 4-d tensor, or of a 3-d one with batch and heads flattened (GPT-NeoX 4.48)."""
        return t if t.dim() == 4 else t.view(-1, self.site.head_counts[0], *t.shape[1:])

    def _fire_scores(self, point, t):
        if not point.active:
            return t
        return point.fire(self._heads(t)).reshape(t.shape)

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        site = self.site
        query = site.fire_heads(site.rot_q, query)
        key = site.fire_key(key, query.shape[2])
        if site.scores.active or site.pattern.active:
            out, _ = eager_attention(site.module, site, query, key, value, attn_mask, scale, dropout_p, is_causal=is_causal)
            return out.transpose(1, 2)
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
