"""Gemma2 4.48-5.3: the sqrt(d_model) embedding scale is applied in Gemma2Model.forward, after the
embedding module, so hook_embed fires on the first layer's input (which equals the scaled embedding)."""

from dataclasses import replace

from . import GEMMA2

SPEC = replace(GEMMA2, versions=">=4.48,<5.4", embed_hook_on_first_layer=True)
