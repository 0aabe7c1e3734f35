"""OLMo from 4.48: the clamp sits only in OlmoAttention.forward, right after the projections."""

from tlshim import norms
from tlshim.spec import ArchSpec

from . import ClampedProjectionSite, olmo_cfg

SPEC = ArchSpec(versions=">=4.48,<5.24", norm=norms.LAYER, qkv_site=ClampedProjectionSite, tl_config=olmo_cfg)
