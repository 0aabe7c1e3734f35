"""Qwen3 from its first release (4.51) on."""

from tlshim.spec import ArchSpec

SPEC = ArchSpec(versions=">=4.51,<5.24", q_norm="q_norm", k_norm="k_norm")
