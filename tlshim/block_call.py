"""``model.blocks``: the decoder layers, where ``model.blocks[i](resid)`` is TransformerLens's block call.

``model.blocks`` is a proxy of the model's own layer list (isinstance, len, iteration, attributes and
hooks all reach the real modules), whose items are proxies of the layers. The model's forward never
goes through it (it calls its own ``layers``), so nothing changes for HF. Called with one tensor
(``blocks[i](resid)``, optionally ``attention_mask=``), a block returns the residual stream after it,
as in TransformerLens; any other call is the HF layer's own call, unchanged.

The layer needs what the model's forward builds for it (causal or sliding-window mask, rotary cos/sin,
position ids). tlshim takes those from the model itself: one forward of ``inputs_embeds`` of the same
shape, with every hook hidden, stopped as it reaches layer i, so every architecture and transformers
version gets its own masks and positions (the price: that forward runs the layers before i).
"""

from __future__ import annotations

import copy
import weakref

import torch

from . import hook_points
from ._wrapt import ObjectProxy

_TL_KWARGS = {"attention_mask", "shortformer_pos_embed", "past_kv_cache_entry"}


class _Reached(Exception):
    """Raised at layer i's input to stop the capturing forward there."""

    def __init__(self, kwargs):
        super().__init__("tlshim: layer inputs captured")
        self.kwargs = kwargs


class Blocks(ObjectProxy):
    """The model's layer list, whose items call as TransformerLens blocks."""

    def __init__(self, layers, model):
        super().__init__(layers)
        self._self_model = model if isinstance(model, weakref.ref) else weakref.ref(model)

    def __getitem__(self, index):
        cls = Blocks if isinstance(index, slice) else Block
        return cls(self.__wrapped__[index], self._self_model)

    def __iter__(self):
        return (Block(layer, self._self_model) for layer in self.__wrapped__)

    def __repr__(self):
        return repr(self.__wrapped__)

    def __deepcopy__(self, memo):
        model = self._self_model()
        return Blocks(copy.deepcopy(self.__wrapped__, memo), copy.deepcopy(model, memo))

    def __reduce_ex__(self, protocol):
        return Blocks, (self.__wrapped__, self._self_model())


class Block(ObjectProxy):
    """One decoder layer: ``block(resid)`` returns the residual after it; any other call is the layer's own."""

    def __init__(self, layer, model_ref):
        super().__init__(layer)
        self._self_model = model_ref

    def __repr__(self):
        return repr(self.__wrapped__)

    @property
    def submodules(self) -> dict:
        """The block's parts by TransformerLens name, as TransformerLens's structure checks read them
        (transformer_lens.patching's direct path refuses a post-attention norm through this)."""
        parts = {name: getattr(self.__wrapped__, name, None) for name in ("ln1", "attn", "ln1_post", "ln2", "mlp", "ln2_post")}
        return {name: part for name, part in parts.items() if part is not None}

    @property
    def hook_aliases(self) -> dict:
        """Where hook_attn_out is read (after the post-attention norm where there is one), for the same checks."""
        return {"hook_attn_out": "ln1_post.hook_out" if "ln1_post" in self.submodules else "attn.hook_out"}

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and torch.is_tensor(args[0]) and args[0].dim() == 3 and set(kwargs) <= _TL_KWARGS:
            return self._tl_call(args[0], **kwargs)
        return self.__wrapped__(*args, **kwargs)

    def _tl_call(self, resid, attention_mask=None, shortformer_pos_embed=None, past_kv_cache_entry=None):
        if shortformer_pos_embed is not None or past_kv_cache_entry is not None:
            given = "shortformer_pos_embed" if shortformer_pos_embed is not None else "past_kv_cache_entry"
            raise NotImplementedError(
                f"model.blocks[i]({given}=...) is not supported: call blocks[i](resid) or blocks[i](resid, "
                "attention_mask=mask), or run the model with its KV cache (model(ids, past_key_values=...))"
            )
        model = self._self_model()
        layer_kwargs = _layer_inputs(model, self.__wrapped__, resid, attention_mask)
        out = self.__wrapped__(resid, **layer_kwargs)
        return out[0] if isinstance(out, tuple) else out


def _layer_inputs(model, layer, resid, attention_mask):
    """The keyword arguments the model's own forward gives ``layer`` for a residual of this shape."""
    embeds = torch.zeros_like(resid)
    handle = layer.register_forward_pre_hook(_stop, with_kwargs=True)
    token = hook_points._SCOPED.set(hook_points._INSIDE_HOOK)  # no hook sees the capturing forward
    try:
        with torch.no_grad():
            model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
    except _Reached as reached:
        return reached.kwargs
    finally:
        hook_points._SCOPED.reset(token)
        handle.remove()
    raise RuntimeError(f"the model's forward did not reach {type(layer).__name__}; blocks[i](resid) cannot call it")


def _stop(module, args, kwargs):
    raise _Reached(kwargs)
