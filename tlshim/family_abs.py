"""Absolute positions, GPT-2-style projections and ALiBi (../shared/HOOKS.md, "Families").

GPT-2, GPT-Neo, OPT, BioGPT and XGLM add a position embedding to the token embedding before the
first block: hook_pos_embed fires on that module's output (OPT's offset and XGLM's sinusoidal table
are the module's own business), broadcast to the batch. BLOOM and MPT add ALiBi inside their
attention, which computes its own scores outside transformers' attention registry: hook_attn_scores
and hook_pattern are the input and output of that attention's softmax call, so both are exactly the
model's. BLOOM's fused query_key_value holds (q, k, v) per head.
"""

from __future__ import annotations

import contextvars
import inspect

import torch

from .attention import SdpaCallSite
from .hook_points import ROWS
from .sites import LayerSite, Site, first_input, first_output, fire_points, with_first_output
from .spec import get_path, linear_params

#: attention classes that do not divide q.k by sqrt(d_head)
UNSCALED_ATTENTION = ("GPTNeoSelfAttention",)
#: attention forward arguments that carry an ALiBi bias
ALIBI_ARGS = ("alibi", "position_bias")
#: the batch size of the running forward of the module that holds the blocks (while hook_pos_embed is hooked)
_BATCH: contextvars.ContextVar = contextvars.ContextVar("tlshim_batch", default=None)


class BatchSite(Site):
    """The module that holds the blocks: tells the position embedding the batch size of its forward."""

    def call(self, wrapped, args, kwargs):
        tokens = kwargs.get("input_ids")
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        tokens = args[0] if tokens is None and args else tokens
        token = _BATCH.set(None if tokens is None else tokens.shape[0])
        try:
            return wrapped(*args, **kwargs)
        finally:
            _BATCH.reset(token)


class PosEmbedSite(Site):
    """The position embedding: hook_pos_embed as (batch, pos, d_model), as in TransformerLens, where the
    module gives one row (or a bare table) of positions for the whole batch (the sum broadcasts the same either way)."""

    def on_output(self, y):
        batch = _BATCH.get()
        if batch is not None and y.dim() == 2:  # one (pos, d_model) table for the batch (Marian)
            y = y[None]
        if batch is not None and y.dim() == 3 and y.shape[0] == 1 != batch:
            y = y.expand(batch, *y.shape[1:]).clone()
        return fire_points(self.out_points, y)


#: the points of a block that fire inside an MLP working on (batch * pos, d) rows (OPT)
ROWS_POINTS = ("hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out")


class RowsLayerSite(LayerSite):
    """A decoder layer that runs its MLP on (batch * pos, d) rows (OPT): the points there fire as
    (batch, pos, ...) (``hook_points.ROWS``), and an output rebuilt from rows (an edit of
    hook_resid_mid) gets the layer's shape back."""

    def call(self, wrapped, args, kwargs):
        shape = first_input(args, kwargs).shape
        token = ROWS.set(tuple(shape[:2]))
        try:
            out = super().call(wrapped, args, kwargs)
        finally:
            ROWS.reset(token)
        return with_first_output(out, first_output(out).view(shape))


def _heads_view(module, scores):
    """fire(point, tensor) firing (batch * heads, q, k) scores (XGLM) or (batch, q, heads, k) ones
    (GPT-BigCode's multi-query before 5.0) as (batch, heads, q, k)."""
    if scores.dim() == 4 and getattr(module, "multi_query", False):
        return lambda point, x: point.fire(x.transpose(1, 2)).transpose(1, 2)
    if scores.dim() == 4:
        return lambda point, x: point.fire(x)
    n_heads = getattr(module, "num_heads", None) or module.n_heads
    return lambda point, x: point.fire(x.view(-1, n_heads, *x.shape[1:])).reshape(x.shape)


_SOFTMAX = (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax)


class _SoftmaxCall(torch.overrides.TorchFunctionMode):
    def __init__(self, site):
        super().__init__()
        self.site, self.done = site, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SOFTMAX and not self.done:
            self.done = True
            return self.site.fire_scores_and_pattern(func, args, kwargs)
        return func(*args, **kwargs)


class SoftmaxAttnSite(SdpaCallSite):
    """An attention module computing its own scores (ALiBi, GPT-Neo's unscaled ones): while
    hook_attn_scores or hook_pattern is hooked, its one softmax call fires scores on its input and
    pattern on its output, for that module's forward only."""

    mode = _SoftmaxCall

    def fire_scores_and_pattern(self, softmax, args, kwargs):
        scores = args[0] if args else kwargs.pop("input")
        heads = _heads_view(self.module, scores)
        scores = heads(self.scores, scores)
        return heads(self.pattern, softmax(scores, *args[1:], **kwargs))


def scales_scores(attn) -> bool:
    """TransformerLens's use_attn_scale: False for the attention classes that do not scale q.k (GPT-Neo)."""
    inner = getattr(attn, "attention", attn)
    return type(inner).__name__ not in UNSCALED_ATTENTION


def uses_alibi(attn) -> bool:
    try:
        names = inspect.signature(attn.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(name in names for name in ALIBI_ARGS)


def embedding_entry(model, owner_path, flow):
    """How the token embedding enters the first block where it is not as it is: {"embed_out": the
    module after the embedding whose output enters (OPT's project_in, BLOOM's LayerNorm) or None,
    "pos_embed": the module whose output is added (GPT-2's wpe) or None}; None where neither fits."""
    from .structure import _same

    owner, x = get_path(model, owner_path), flow.inputs[""]
    children = {name: child for name, child in owner.named_children() if name in flow.top_outputs}
    embedding = model.get_input_embeddings()
    end = next((name for name, child in children.items() if child is embedding), None)
    if end is None:
        return None
    chain = [end]
    while not _same(flow.top_outputs[chain[-1]], x):  # modules reading what the last one gave (a projection, a LayerNorm)
        after = next((n for n in children if n not in chain and _same(flow.top_inputs.get(n), flow.top_outputs[chain[-1]])), None)
        if after is None:
            break
        chain.append(after)
    path = lambda name: f"{owner_path}.{name}" if owner_path else name  # noqa: E731
    embed_out = path(chain[-1]) if len(chain) > 1 else None
    entered = flow.top_outputs[chain[-1]]
    if _same(entered, x):
        return {"embed_out": embed_out, "pos_embed": None}
    for name in children:
        added = flow.top_outputs[name]
        if name not in chain and isinstance(added, torch.Tensor) and added.dim() in (2, 3) and added.shape[-2:] == x.shape[1:]:
            if _same(entered + added, x):
                return {"embed_out": embed_out, "pos_embed": path(name)}
    return None


def positional_embedding_type(model, spec) -> str:
    """TransformerLens's name: "standard" (learned), "sinusoidal" (a fixed table), "alibi" or "rotary"."""
    if spec.pos_embed:
        learned = any(p.dim() == 2 for p in get_path(model, spec.pos_embed).parameters())
        return "standard" if learned else "sinusoidal"
    return "rotary" if spec.rotary_hooks else "alibi"
