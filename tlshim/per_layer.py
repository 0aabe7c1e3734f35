"""Per-layer counts (OpenELM's heads and MLP widths): a list where layers differ, an int where they agree.

TransformerLens's per-head helpers read cfg.n_heads as one int (range(cfg.n_heads), a tensor of
n_layers x n_heads); on a list they would fail obscurely or, through list arithmetic, silently.
The list refuses to act as a number and says what to use instead.
"""

from __future__ import annotations


class PerLayer(list):
    """cfg.<name> of a model whose layers differ in it: index it by layer."""

    def __init__(self, name, values):
        super().__init__(values)
        self.name = name

    def _refuse(self, *args):
        raise TypeError(
            f"cfg.{self.name} differs between layers ({list(self)}), so a helper that needs one "
            f"{self.name} for the whole model cannot run on this model: use cfg.{self.name}[layer] per layer, "
            "or tlshim's per-layer forms (model.all_head_labels, cache.stack_head_results, "
            "model.blocks[layer].attn.W_Q, ...)"
        )

    __index__ = __int__ = __float__ = _refuse
    __mul__ = __rmul__ = __imul__ = __add__ = __radd__ = __iadd__ = _refuse
    __floordiv__ = __rfloordiv__ = __truediv__ = __rtruediv__ = __sub__ = __rsub__ = _refuse
    __lt__ = __le__ = __gt__ = __ge__ = _refuse

    def __reduce__(self):
        return PerLayer, (self.name, list(self))


def per_layer(name, value):
    """An int where every layer agrees, else a PerLayer list; anything not a list as it is."""
    if not isinstance(value, list):
        return value
    if len(set(value)) == 1:
        return value[0]
    return PerLayer(name, value)
