"""Llama from the attention-interface rewrite (4.48) on: the layout every Llama-family spec starts from."""

from tlshim.spec import ArchSpec

SPEC = ArchSpec(versions=">=4.48,<5.24")
