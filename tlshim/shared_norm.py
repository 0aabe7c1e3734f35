"""One norm module before and after the blocks (NanoChat's ``model.norm``): it normalizes the
embedding, and after the last block the residual stream the unembedding reads.

Its first call in a forward of the module holding the blocks is the embedding's: hook_embed fires on
that output, what enters blocks.0 (as BLOOM's embedding LayerNorm is inside hook_embed). Every later
call is ln_final's, with hook_scale and hook_normalized. The count belongs to one forward of that
module (a context variable), so a forward run by a hook counts its own calls.
"""

from __future__ import annotations

import contextvars

import torch

from .sites import NormSite, Site, fire_points, first_output, with_first_output

#: {SharedNormSite: calls so far} for the running forward of the module that holds the blocks
_CALLS: contextvars.ContextVar = contextvars.ContextVar("tlshim_shared_norm_calls", default=None)


class OwnerSite(Site):
    """The module that holds the blocks: each of its forwards counts the shared norm's calls afresh."""

    def call(self, wrapped, args, kwargs):
        token = _CALLS.set({})
        try:
            return wrapped(*args, **kwargs)
        finally:
            _CALLS.reset(token)


class SharedNormSite(NormSite):
    """The shared norm: ``embed_points`` fire on its first call's output, its norm hooks on the others
    (and on a call outside the owner's forward, ``model.ln_final(x)``)."""

    def __init__(self, module, path, norm, scale_point):
        super().__init__(module, path, norm, scale_point)
        self.embed_points: list = []

    def __call__(self, wrapped, instance, args, kwargs):
        calls = _CALLS.get()
        if calls is not None:
            calls[self] = calls.get(self, 0) + 1
            if calls[self] == 1:
                out = wrapped(*args, **kwargs)
                return with_first_output(out, fire_points(self.embed_points, first_output(out)))
        return super().__call__(wrapped, instance, args, kwargs)


def runs_after_blocks(model, norm, last_layer) -> bool:
    """Whether ``norm`` is called again after the last block (one forward: the probe stops at the first block)."""
    order = []
    handles = [
        module.register_forward_hook(lambda *_, tag=tag: order.append(tag)) for tag, module in (("norm", norm), ("block", last_layer))
    ]
    embedding = model.get_input_embeddings()
    ids = torch.arange(1, 7, device=embedding.weight.device).remainder(embedding.num_embeddings)[None]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return order[:1] == ["norm"] and order[-2:] == ["block", "norm"]


def plan(plan, spec, model):
    """(the shared norm's site, the owner's site) for ``layout.plan_install``, hook_embed planned on them."""
    site = plan.site(spec.final_norm, SharedNormSite, spec.norm, None)
    owner = plan.site(spec.layers.rpartition(".")[0], OwnerSite)
    site.embed_points.append((plan.point("hook_embed", model, "hook_embed", site, owner), None))
    return site, owner
