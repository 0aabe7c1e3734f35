"""Attention sinks applied as a scale on the attention output (Granite SWA), not as a softmax column.

gpt-oss appends each head's sink logit to the scores and drops its column after the softmax.
Granite SWA's kernel takes the softmax over the real keys and multiplies pattern @ v by
sigmoid(logsumexp(scores) - sink): the same numbers in exact arithmetic, other bits in float. Which
of the two a model's own eager kernel does is decided by running that kernel once on a tiny input
(never from the model's name), and the hooked path then follows its ops, so a run that only caches
hook_pattern gives the idle logits bit for bit.
"""

from __future__ import annotations

import importlib

import torch

#: {attention class: whether its eager kernel scales the output by the sink}, decided once per class
_SCALES = {}


def scales_output(module) -> bool:
    """Whether ``module``'s own eager kernel applies its sinks as sigmoid(logsumexp(scores) - sink) on the output."""
    kind = type(module)
    if kind not in _SCALES:
        _SCALES[kind] = _probe(module)
    return _SCALES[kind]


def _probe(module) -> bool:
    eager = getattr(importlib.import_module(type(module).__module__), "eager_attention_forward", None)
    sinks = module.sinks
    n_heads, groups = sinks.numel(), getattr(module, "num_key_value_groups", 1)
    generator = torch.Generator().manual_seed(0)

    def draw(heads):
        return torch.randn(1, heads, 8, 4, generator=generator).to(sinks)

    query, key, value = draw(n_heads), draw(n_heads // groups), draw(n_heads // groups)
    try:
        with torch.no_grad():
            out, _ = eager(module, query, key, value, None, scaling=0.5, dropout=0.0)
    except Exception:  # no eager kernel of its own, or another signature: the gpt-oss form
        return False
    with torch.no_grad():
        scores = torch.matmul(query, key.repeat_interleave(groups, 1).transpose(2, 3)) * 0.5
        plain, scale = _parts(scores, sinks, query.dtype)
        expected = (torch.matmul(plain, value.repeat_interleave(groups, 1)) * scale).transpose(1, 2)
    return torch.equal(out, expected)


def _parts(scores, sinks, dtype):
    """(softmax over the real keys, the sink's scale per query as a (..., 1) column), in the kernel's ops."""
    scale = (torch.logsumexp(scores, dim=-1) - sinks.view(1, -1, 1)).to(torch.float32).sigmoid()
    plain = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    return plain, scale.unsqueeze(-1).to(dtype)


def attention(module, site, scores, value, dropout):
    """(attention output, pattern) from the masked scores: hook_pattern holds the pattern as applied
    (softmax times the sink's scale, rows summing to 1 minus its share); while no hook edits it, the
    output is computed in the kernel's own order, (softmax @ v) * scale."""
    plain, scale = _parts(scores, module.sinks, value.dtype)
    pattern = plain * scale
    version = pattern._version
    fired = site.pattern.fire(pattern)
    if fired is pattern and pattern._version == version:  # not edited, in place or otherwise
        weights = torch.nn.functional.dropout(plain, p=dropout, training=module.training)
        out = torch.matmul(weights, value) * scale
    else:
        weights = torch.nn.functional.dropout(fired, p=dropout, training=module.training)
        out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), fired
