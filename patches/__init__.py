"""Per-architecture patch specs, imported as tlshim.patches.<model_type>."""
