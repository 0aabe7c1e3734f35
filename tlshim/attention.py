"""The attention-internal hook points: rot_q, rot_k, attn_scores and pattern.

The model keeps its own attention module. While its site is wrapped, the module's ``config`` is a
proxy whose ``_attn_implementation`` names tlshim's attention function in transformers' attention
registry, but only inside a forward of the calling thread that has one of these points hooked (a
context variable holds the per-call state); every other forward gets the model's own value. That
function fires rot_q/rot_k and, when scores or pattern are hooked, computes attention eagerly (the one
piece tlshim computes itself); otherwise it calls the model's own kernel. With a KV cache, rot_k fires
as the new keys enter the cache, so an edit is what gets cached.
"""

from __future__ import annotations

import contextvars
import importlib

import torch

from . import sink_scaling
from ._wrapt import ObjectProxy
from .errors import ConflictError
from .sites import Site

KERNEL_NAME = "tlshim"
#: {AttnSite: _AttnCall} of the attention forwards running in tlshim's kernel in this thread / task
_CALLS: contextvars.ContextVar = contextvars.ContextVar("tlshim_attention_calls", default={})


class _AttnCall:
    """One attention forward through tlshim's kernel: its site, the model's own kernel, whether rot_k fired."""

    __slots__ = ("site", "native_kernel", "rot_k_done")

    def __init__(self, site, native_kernel):
        self.site, self.native_kernel, self.rot_k_done = site, native_kernel, False


class _KernelConfig(ObjectProxy):
    """The model's config, except that it routes attention to tlshim's function inside the forwards
    of this thread / task that need it."""

    def __init__(self, config, site):
        super().__init__(config)
        self._self_site = site

    @property
    def _attn_implementation(self):
        site = self._self_site
        if site in _CALLS.get() and site.kernel_needed():  # not in a plain forward run by one of its hooks
            return KERNEL_NAME
        return self.__wrapped__._attn_implementation

    @_attn_implementation.setter
    def _attn_implementation(self, value):
        self.__wrapped__._attn_implementation = value

    def __reduce_ex__(self, protocol):
        raise self._self_site.copy_error()

    def __deepcopy__(self, memo):
        raise self._self_site.copy_error()


class _KeyHookCache(ObjectProxy):
    """The KV cache passed to one attention call, firing rot_k on the new keys before they are stored."""

    def __init__(self, cache, call):
        super().__init__(cache)
        self._self_call = call

    def update(self, key_states, value_states, *args, **kwargs):
        call = self._self_call
        key_states = call.site.fire_heads(call.site.rot_k, key_states)
        call.rot_k_done = True
        return self.__wrapped__.update(key_states, value_states, *args, **kwargs)


class AttnSite(Site):
    """The attention module: hook_attn_out on its output and the switch into tlshim's kernel.

    rot_q / rot_k are None where a spec fires them elsewhere (at a rotary module's output).
    ``cache_kwargs`` names the keyword(s) the KV cache comes under (the spec's ``cache_kwargs``).
    """

    #: whether the module picks its kernel through ``self.config._attn_implementation``
    routes_config = True

    def __init__(self, module, path, cache_kwargs=()):
        super().__init__(module, path)
        self.cache_kwargs = cache_kwargs
        self.rot_q = self.rot_k = self.scores = self.pattern = None
        self._config = self._proxy = None
        self._causal_masks = {}

    def kernel_needed(self) -> bool:
        points = (self.rot_q, self.rot_k, self.scores, self.pattern)
        return any(point is not None and point.active for point in points)

    def acquire(self):
        first = self._users == 0
        super().acquire()
        if first and self.routes_config:
            entries = self.module.__dict__
            self._config = entries["config"]
            entries["config"] = self._proxy = _KernelConfig(self._config, self)

    def conflict(self):
        if self.wrapped and self.routes_config and self.module.__dict__.get("config") is not self._proxy:
            return f"{self.path}.config (tlshim's kernel switch, now {type(self.module.__dict__.get('config')).__name__})"
        return super().conflict()

    def release(self):
        replaced = None
        if self._users == 1 and self.routes_config:
            entries = self.module.__dict__
            if entries.get("config") is self._proxy:
                entries["config"] = self._config
            else:
                replaced = ConflictError(
                    f"{self.path}.config was replaced while tlshim had a hook on that attention; "
                    "tlshim left the replacement there"
                )
            self._config = self._proxy = None
        super().release()
        if replaced is not None:
            raise replaced

    def call(self, wrapped, args, kwargs):
        if not self.kernel_needed():
            return wrapped(*args, **kwargs)
        call = _AttnCall(self, native_attention_function(self.module, self._config))
        if self.rot_k is not None and self.rot_k.active:
            for cache_arg in self.cache_kwargs:
                if kwargs.get(cache_arg) is not None:
                    kwargs = {**kwargs, cache_arg: _KeyHookCache(kwargs[cache_arg], call)}
        token = _CALLS.set({**_CALLS.get(), self: call})
        try:
            return wrapped(*args, **kwargs)
        finally:
            _CALLS.reset(token)

    def causal_mask(self, n_query, n_key, dtype, device):
        """The additive causal mask the kernel implies when it is given none (queries are the last
        n_query positions), kept for the last shape since sdpa models pass no mask on every forward."""
        key = (n_query, n_key, dtype, device)
        mask = self._causal_masks.get(key)
        if mask is None:
            query_pos = torch.arange(n_key - n_query, n_key, device=device)[:, None]
            hidden = query_pos < torch.arange(n_key, device=device)[None, :]
            mask = torch.zeros(n_query, n_key, dtype=dtype, device=device).masked_fill(hidden, torch.finfo(dtype).min)
            self._causal_masks = {key: mask}
        return mask

    def kernel_output(self, result):
        """The kernel's (output, weights), as the model gets them (attention_output.py fires hook_z there)."""
        return result

    @staticmethod
    def fire_heads(point, states):
        """Fire a (batch, heads, pos, d_head) tensor as (batch, pos, heads, d_head)."""
        if point is None or not point.active:
            return states
        return point.fire(states.transpose(1, 2)).transpose(1, 2)


class _SdpaCall(torch.overrides.TorchFunctionMode):
    """Routes F.scaled_dot_product_attention, inside one attention forward, to the site's eager path."""

    def __init__(self, site):
        super().__init__()
        self.site = site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            return self.site.sdpa(*args, **kwargs)
        return func(*args, **kwargs)


class SdpaCallSite(AttnSite):
    """An attention module that calls F.scaled_dot_product_attention itself (remote code such as
    OpenELM, outside transformers' attention registry). While hook_attn_scores or hook_pattern holds
    a hook, that call is computed eagerly by tlshim, for that module's forward only."""

    routes_config = False
    #: the function mode that serves the hooks inside one forward of the module
    mode = _SdpaCall

    def kernel_needed(self) -> bool:
        return self.scores.active or self.pattern.active

    def call(self, wrapped, args, kwargs):
        if not self.kernel_needed():
            return wrapped(*args, **kwargs)
        with self.mode(self):
            return wrapped(*args, **kwargs)

    def sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        out, _ = eager_attention(self.module, self, query, key, value, attn_mask, scale, dropout_p, is_causal=is_causal)
        return out.transpose(1, 2)


def native_attention_function(module, config):
    """The kernel the model itself would use for ``module`` under ``config``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = config._attn_implementation
    if impl in (None, "eager"):
        return importlib.import_module(type(module).__module__).eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def register_kernel():
    """Add tlshim's attention function to transformers' registry (idempotent, changes no model)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if KERNEL_NAME in ALL_ATTENTION_FUNCTIONS:
        return
    register = getattr(type(ALL_ATTENTION_FUNCTIONS), "register", None)
    if register is not None:
        register(KERNEL_NAME, tlshim_attention)
    else:
        ALL_ATTENTION_FUNCTIONS[KERNEL_NAME] = tlshim_attention


def tlshim_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    call = _CALLS.get()[module.config._self_site]
    site = call.site
    indices = kwargs.pop("indices", None)
    if indices is not None:  # a sparse attention's picks (DeepSeek-V3.2's indexer), handed to kernels not named eager / sdpa
        attention_mask = selected_keys_mask(attention_mask, indices, key.shape[2], query.dtype)
    query = site.fire_heads(site.rot_q, query)
    if site.rot_k is not None and site.rot_k.active and not call.rot_k_done:
        key = site.fire_heads(site.rot_k, key)
    if not (site.scores.active or site.pattern.active):
        result = call.native_kernel(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    else:
        result = eager_attention(module, site, query, key, value, attention_mask, scaling, dropout, **kwargs)
    return site.kernel_output(result)


def selected_keys_mask(mask, indices, n_key, dtype):
    """The attention mask with every key outside ``indices`` (b, p, top k) masked, as the model masks them itself."""
    hidden = indices.new_ones((*indices.shape[:2], n_key), dtype=torch.bool).scatter(-1, indices.long(), False).unsqueeze(1)
    if mask is None:  # (sdpa on 5.1x gets none) the causal mask it implies, the queries being the last positions
        query_pos = torch.arange(n_key - indices.shape[1], n_key, device=indices.device)[:, None]
        hidden = hidden | (torch.arange(n_key, device=indices.device) > query_pos)
        mask = torch.zeros(hidden.shape, dtype=dtype, device=indices.device)
    return mask & ~hidden if mask.dtype == torch.bool else mask.masked_fill(hidden, torch.finfo(dtype).min)


def eager_attention(module, site, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """Scaled dot-product attention with hook_attn_scores and hook_pattern, in the ops HF's eager uses."""
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = _apply_mask(module, site, scores, attention_mask, kwargs.get("is_causal"))
    scores = site.scores.fire(scores)
    sinks = getattr(module, "sinks", None)
    if sinks is not None and sink_scaling.scales_output(module):  # Granite SWA
        return sink_scaling.attention(module, site, scores, value, dropout)
    if sinks is not None:  # gpt-oss: a per-head sink logit takes a share of each row, then is dropped
        pattern = sink_softmax(scores, sinks)
    else:
        pattern = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    pattern = site.pattern.fire(pattern)
    weights = torch.nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, pattern


def sink_softmax(scores, sinks):
    """The attention pattern over the real keys with attention sinks, in the ops of gpt-oss's eager kernel."""
    sinks = sinks.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[-2], -1)
    combined = torch.cat([scores, sinks], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return torch.nn.functional.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]


def _apply_mask(module, site, scores, mask, is_causal):
    n_query, n_key = scores.shape[-2:]
    if mask is None:
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        if not causal or n_query == 1:
            return scores
        mask = site.causal_mask(n_query, n_key, scores.dtype, scores.device)
    mask = mask[..., :n_key]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores + mask
