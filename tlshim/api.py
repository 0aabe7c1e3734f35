"""The TransformerLens API on an installed model: run_with_cache, run_with_hooks, hooks(), add_hook, ...

``ModelAPI`` is the mixin of the model's per-instance subclass; everything it needs lives in the
model's ``_tlshim`` state entry.
"""

from __future__ import annotations

import contextlib

import torch

from .activation_cache import ActivationCache
from .errors import unknown_hook_name
from .hook_points import Hook, add_scoped, remove_all
from .process_weights import ProcessWeightsAPI
from .saes import SAEMixin
from .tl_analysis import AnalysisAPI
from .tl_calls import TLCalls, outside_run, overrides, run
from .tl_hooked_root import HOOKS_LEVEL, HookedRootAPI
from .tl_switches import SwitchAPI, canonical, check_named, default_cache_filter, switched_off


def default_filter(name):
    """run_with_cache's default set: every name but hook_result (as TransformerLens without use_attn_result)."""
    return not name.endswith(".hook_result")


def _hook_pairs(pairs, arg):
    """``pairs`` as a list of (name or filter, function), or a clear error for the usual mistakes."""
    if isinstance(pairs, dict):
        raise TypeError(f"{arg} takes a list of (name, fn) pairs, got a dict: pass list(your_dict.items())")
    if isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[0], str) and callable(pairs[1]):
        raise TypeError(f"{arg} takes a list of (name, fn) pairs, got one pair: pass [({pairs[0]!r}, fn)]")
    try:
        pairs = list(pairs)
    except TypeError:
        raise TypeError(f"{arg} takes a list of (name, fn) pairs, got {type(pairs).__name__}") from None
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"{arg} takes a list of (name, fn) pairs; one item is {type(pair).__name__} {pair!r:.80}")
    return pairs


def _stack(blocks, part, name):
    lacking = [i for i, block in enumerate(blocks) if not hasattr(block, part)]
    if lacking:  # a state-space or hybrid model (cfg.layer_types)
        raise ValueError(
            f"model.{name} cannot be stacked: blocks {lacking} have no {part} (cfg.layer_types says each block's kind); "
            f"use the per-layer form model.blocks[i].{part}.{name} on the blocks that have one"
        )
    tensors = [getattr(getattr(block, part), name) for block in blocks]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(
            f"model.{name} cannot be stacked: its shape differs between layers ({sorted(shapes)}); "
            f"use the per-layer form model.blocks[i].{part}.{name}"
        )
    return torch.stack(tensors)


def _has_cache(hf_kwargs) -> bool:
    """Whether a forward continues from a KV cache (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    return any(hf_kwargs.get(name) is not None for name in ("cache", "past_key_values"))


def _stacked(part, name):
    return property(lambda self: _stack(self.blocks, part, name), doc=f"{name} of every layer, stacked")


class ModelAPI(TLCalls, AnalysisAPI, ProcessWeightsAPI, HookedRootAPI, SwitchAPI, SAEMixin):
    #: set on the per-instance class itself, ahead of the HF base class (TL calls beside HF's)
    _tlshim_overrides = staticmethod(overrides)

    def __copy__(self):
        raise TypeError(
            "copy.copy of a model with tlshim installed would share its modules, hook points and tlshim's "
            "journal with the original (uninstalling the copy would uninstall the original); use "
            "copy.deepcopy(model) for an independent installed copy, or tlshim.uninstall(model) first"
        )

    @property
    def hook_dict(self) -> dict:
        return self._tlshim.hook_dict

    @property
    def cfg(self):
        return self._tlshim.cfg

    @property
    def tokenizer(self):
        return self._tlshim.tokenizer

    W_Q, W_K, W_V, W_O = (_stacked("attn", n) for n in ("W_Q", "W_K", "W_V", "W_O"))
    b_Q, b_K, b_V, b_O = (_stacked("attn", n) for n in ("b_Q", "b_K", "b_V", "b_O"))
    W_in, W_gate, W_out = (_stacked("mlp", n) for n in ("W_in", "W_gate", "W_out"))
    b_in, b_out = (_stacked("mlp", n) for n in ("b_in", "b_out"))

    @property
    def W_E(self):
        return self.embed.W_E

    @property
    def W_U(self):
        return self.unembed.W_U

    @property
    def b_U(self):
        return self.unembed.b_U

    # -- hooks ---------------------------------------------------------------------------------

    def _points(self, name_or_filter):
        hook_dict = self._tlshim.hook_dict
        if isinstance(name_or_filter, str):
            name = canonical(name_or_filter)
            if name not in hook_dict:
                raise unknown_hook_name(name, hook_dict)
            check_named(self.cfg, name)
            return [hook_dict[name]]
        off = switched_off(self.cfg)  # a filter, or a list of names, skips the names a switch turns off
        if callable(name_or_filter):
            return [point for name, point in hook_dict.items() if name_or_filter(name) and not name.endswith(off)]
        if isinstance(name_or_filter, (list, tuple, set, frozenset)) and all(isinstance(n, str) for n in name_or_filter):
            names = [canonical(name) for name in name_or_filter]
            for name in names:
                if name not in hook_dict:
                    raise unknown_hook_name(name, hook_dict)
            return [hook_dict[name] for name in names if not name.endswith(off)]
        raise TypeError(
            f"a hook name must be a name (str), a list of names or a filter function name -> bool, "
            f"got {type(name_or_filter).__name__} {name_or_filter!r:.80}"
        )

    def add_hook(self, name_or_filter, hook, dir="fwd", is_permanent=False, prepend=False):
        """Add ``hook(tensor, hook)`` to one name, a list of names, or every name a filter accepts.

        Model-wide: it fires in every thread's forwards until ``reset_hooks`` (hooks given to
        ``run_with_hooks``, ``run_with_cache`` and ``hooks()`` belong to the calling thread only).

        >>> model.add_hook("blocks.0.hook_resid_post", lambda t, hook: t * 0)
        """
        points = self._points(name_or_filter)
        for point in points:  # every point checks the hook before any is added
            Hook(point, hook, dir)
        added = []
        try:
            for point in points:
                added.append(point.add_hook(hook, dir=dir, is_permanent=is_permanent, prepend=prepend))
        except BaseException:
            remove_all(added)
            raise
        return added

    def reset_hooks(self, clear_contexts=True, direction="both", including_permanent=False):
        """Remove the model-wide hooks and the calling thread's own (permanent ones only if asked)."""
        points = self._tlshim.hook_dict.values()
        remove_all([hook for point in points for hook in point.registrations(direction) if including_permanent or not hook.permanent])
        if clear_contexts:
            for point in points:
                point.clear_context()

    @contextlib.contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end=True, clear_contexts=False):
        """Hooks active inside a ``with`` block, for any forward or ``generate`` run in it by this
        thread (or asyncio task); other threads' forwards on the same model do not see them.

        >>> with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", show)]):
        ...     model.generate(ids, max_new_tokens=5)
        """
        entries = [(point, fn, dir) for dir, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks))
                   for name, fn in _hook_pairs(pairs, f"{dir}_hooks") for point in self._points(name)]
        added = add_scoped(entries)
        level = HOOKS_LEVEL.set(HOOKS_LEVEL.get() + 1)
        try:
            yield self
        finally:
            HOOKS_LEVEL.reset(level)
            if reset_hooks_end:
                try:
                    remove_all(added)
                finally:
                    if clear_contexts:
                        for point in {hook.point: None for hook in added}:
                            point.clear_context()

    # -- running ---------------------------------------------------------------------------------

    def _forward(self, input, hf_kwargs):
        mask = hf_kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and hf_kwargs.get("position_ids") is None and not _has_cache(hf_kwargs):
            # left padding: number each row's real tokens from 0 (as generate does), so every real
            # position gets the activations of that sequence run alone
            hf_kwargs = {**hf_kwargs, "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}
        key = "inputs_embeds" if torch.is_tensor(input) and input.is_floating_point() else "input_ids"
        return self(**{key: input}, **hf_kwargs)

    def run_with_hooks(self, *model_args, fwd_hooks=(), bwd_hooks=(), reset_hooks_end=True, clear_contexts=False, **model_kwargs):
        """Run the forward with hooks active; returns what TransformerLens's forward returns (the logits
        by default; ``return_type``, ``stop_at_layer`` etc. as in ``model(...)`` with TL arguments).

        >>> logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", ablate)])
        """
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return run(self, model_args, model_kwargs)[0]

    def run_with_cache(self, *model_args, names_filter=None, device=None, remove_batch_dim=False, incl_bwd=False, **model_kwargs):
        """Run the HF forward and keep the activations named by ``names_filter``.

        By default every name except ``hook_result``, which (as in TransformerLens without
        use_attn_result) is computed only when asked for by name or filter; ``cache.stack_head_results``
        computes it from hook_z when it is missing. Cached tensors are the activations themselves,
        detached (attached with ``incl_bwd=True``, which backpropagates the loss, TransformerLens's with
        ``return_type="loss"`` or HF's with ``labels=``, and adds ``<name>_grad`` entries). Returns
        (what ``model(...)`` with TL arguments returns, the logits by default; the cache).

        >>> logits, cache = model.run_with_cache("a b c a b", names_filter=lambda n: "pattern" in n)
        >>> cache["pattern", 0].shape
        """
        names = [point.name for point in self._points(default_cache_filter(self.cfg) if names_filter is None else names_filter)]
        start, stop = model_kwargs.get("start_at_layer"), model_kwargs.get("stop_at_layer")
        if start is not None or stop is not None:  # as TransformerLens: blocks it does not run are not in the cache
            names = [name for name in names if not outside_run(name, start, stop, self.cfg.n_layers)]
        store: dict = {}

        def keep(key, keep_graph):
            def save(tensor, hook):
                value = tensor if keep_graph else tensor.detach()
                store[key(hook.name)] = value if device is None else value.to(device)

            return save

        fwd = [(name, keep(str, incl_bwd)) for name in names]
        bwd = [(name, keep(lambda n: n + "_grad", False)) for name in names] if incl_bwd else []
        with self.hooks(fwd, bwd):
            value, out = run(self, model_args, model_kwargs)
            if incl_bwd:
                loss = value if torch.is_tensor(value) and value.dim() == 0 else getattr(out, "loss", None)
                if loss is None:
                    raise ValueError("run_with_cache(incl_bwd=True) backpropagates a loss: pass return_type='loss' "
                                     "(TransformerLens's) or labels=... (HF's)")
                loss.backward()
        cache = ActivationCache(store, self)
        if remove_batch_dim:
            cache.remove_batch_dim()
        return value, cache

    # -- tokens ----------------------------------------------------------------------------------

    def _tokenizer_or_raise(self):
        if self._tlshim.tokenizer is None:
            raise ValueError("this model was installed without a tokenizer: tlshim.install(model, tokenizer=tok)")
        return self._tlshim.tokenizer
