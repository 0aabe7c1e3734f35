"""SmolLM3 from its first release (4.53) on."""

from tlshim.spec import ArchSpec

from . import smollm3_cfg

SPEC = ArchSpec(versions=">=4.53,<5.24", tl_config=smollm3_cfg)
