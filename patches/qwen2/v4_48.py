"""Same module layout as Llama from 4.48 on; q/k/v biases (Qwen2) are read from the live projections."""

from tlshim.spec import ArchSpec

SPEC = ArchSpec(versions=">=4.48,<5.24")
