"""Post-norm-only blocks (OLMo2, OLMo3, EXAONE 4): attention and MLP read the residual stream itself,
and a norm after each gives what is added to it (hook_attn_out / hook_mlp_out, after the post-norm).

There is no pre-norm, so no ln1 / ln2 hooks: hook_resid_mid fires on the MLP's input, and an edit
of it also reaches the residual branch (the layer's output is rebuilt as in any block).
"""

from __future__ import annotations

from .sites import Site, fire_mid


class MidInputSite(Site):
    """The module that reads resid_mid where no norm does (the MLP of a post-norm-only block)."""

    def __init__(self, module, path, layer_site):
        super().__init__(module, path)
        self.layer_site = layer_site

    def on_input(self, x):
        return fire_mid(self.in_points, self.layer_site, x)
