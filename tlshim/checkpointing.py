"""Gradient checkpointing: a checkpointed layer runs its forward again during backward, possibly after
the run_with_hooks that hooked it has returned, so the recompute must see the hooks its forward saw
(else the gradients are silently wrong, or torch's checkpoint raises CheckpointError).

While a layer is hooked, the checkpoint function the model calls for it (``_gradient_checkpointing_func``
on the layer, transformers >= 4.52, or on the model holding the layers, before) is wrapped: each call
takes a snapshot of the calling thread's hooks, and every call of the checkpointed function after the
first (the recompute) runs with that snapshot replayed.
"""

from __future__ import annotations

from .hook_points import replayed, scope

ATTR = "_gradient_checkpointing_func"


class Replaying:
    """Stands in for a module's checkpoint function while a hook needs it; ``users`` counts the layers.

    On a decoder layer (which checkpoints its own forward, bypassing tlshim's wrapper of it), the
    checkpointed function runs through ``layer_site.call`` too, so a resid_mid edit is rebuilt inside
    the checkpoint, in the forward and in the recompute alike.
    """

    def __init__(self, original, layer_site=None):
        self.original, self.layer_site = original, layer_site
        self.users = 0

    def __call__(self, function, *args, **kwargs):
        snapshot = scope()
        if not snapshot:
            return self.original(function, *args, **kwargs)
        calls = []
        site = self.layer_site

        def run(*args, **kwargs):
            calls.append(None)
            if len(calls) == 1:  # the forward itself
                return function(*args, **kwargs) if site is None else site.call(function, args, kwargs)
            with replayed(snapshot):
                return function(*args, **kwargs) if site is None else site.call(function, args, kwargs)

        return self.original(run, *args, **kwargs)


def hold(module, layer_site=None):
    """Wrap ``module``'s checkpoint function, if it has one (counted, for a model shared by its layers)."""
    current = vars(module).get(ATTR)
    if current is None:
        return
    if not isinstance(current, Replaying):
        vars(module)[ATTR] = current = Replaying(current, layer_site)
    current.users += 1


def let_go(module):
    current = vars(module).get(ATTR)
    if isinstance(current, Replaying):  # else checkpointing was switched since: that setting stays
        current.users -= 1
        if current.users == 0:
            vars(module)[ATTR] = current.original
