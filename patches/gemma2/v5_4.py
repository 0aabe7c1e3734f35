"""Gemma2 5.4-5.23: the scale moved into Gemma2TextScaledWordEmbedding, so hook_embed is its output."""

from dataclasses import replace

from . import GEMMA2

SPEC = replace(GEMMA2, versions=">=5.4,<5.24")
