"""Attention classes that predate transformers' attention registry (Qwen2-MoE and OLMoE before 5.0).

They compute attention inline: eager ones as ``matmul(q, k^T) / sqrt(d) + mask``, ``softmax``,
``matmul(pattern, v)``; sdpa ones with one ``F.scaled_dot_product_attention`` call; both after
``repeat_kv``. While hook_rot_q / rot_k / attn_scores / pattern hold a hook, a torch function mode
active for that module's forward only sees those calls: rot_q and rot_k fire on the first matmul's
(or sdpa's) query and keys (the keys once per key-value head, the new positions only), attn_scores
on the softmax input, pattern on its output; an sdpa call is computed eagerly then (attention.py).
The cache update comes before these calls: with a KV cache, an edit of rot_k reaches this forward's
attention but not the cached keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import AttnSite, eager_attention


class _LegacyCall(torch.overrides.TorchFunctionMode):
    def __init__(self, site, n_rep):
        super().__init__()
        self.site, self.n_rep = site, n_rep
        self.scored = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and not self.scored:
            self.scored = True
            return self.sdpa(*args, **kwargs)
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and not self.scored and args[0].dim() == 4:
            query, keys = self.rotated(args[0], args[1].transpose(2, 3))
            return func(query, keys.transpose(2, 3))
        if func in (F.softmax, torch.softmax, torch.Tensor.softmax) and not self.scored:
            self.scored = True
            site = self.site
            pattern = func(site.scores.fire(args[0]), *args[1:], **kwargs)
            return site.pattern.fire(pattern)
        return func(*args, **kwargs)

    def rotated(self, query, keys):
        """(query, repeated keys) with rot_q / rot_k fired (rot_k on each key-value head once)."""
        site = self.site
        query = site.fire_heads(site.rot_q, query)
        if site.rot_k.active:
            n_new = query.shape[2]
            new = keys[:, :: self.n_rep, -n_new:]
            edited = site.fire_heads(site.rot_k, new)
            if edited is not new:
                keys = torch.cat([keys[:, :, :-n_new], edited.repeat_interleave(self.n_rep, dim=1)], dim=2)
        return query, keys

    def sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        query, key = self.rotated(query, key)
        site = self.site
        if not (site.scores.active or site.pattern.active):
            return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        out, _ = eager_attention(site.module, site, query, key, value, attn_mask, scale, dropout_p, is_causal=is_causal)
        return out.transpose(1, 2)


class LegacyAttnSite(AttnSite):
    """An attention module outside the registry: its hooks are served by ``_LegacyCall``."""

    routes_config = False

    def call(self, wrapped, args, kwargs):
        if not self.kernel_needed():
            return wrapped(*args, **kwargs)
        module = self.module
        n_rep = getattr(module, "num_key_value_groups", None) or 1
        with _LegacyCall(self, n_rep):
            return wrapped(*args, **kwargs)
