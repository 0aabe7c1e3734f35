"""SAEs spliced in at a hook point: SAELens's HookedSAETransformer API on an installed model.

An SAE is anything that maps an activation to its reconstruction: a SAELens SAE (``encode`` /
``decode`` and its own hook points), or any module or function of one tensor. It runs as the first
hook of its hook point, so what flows on (and what other hooks there see) is its output. Its stages
are hook points named as SAELens names them, ``<hook_name>.hook_sae_input``, ``.hook_sae_acts_pre``,
``.hook_sae_acts_post``, ``.hook_sae_recons`` (those a SAELens SAE has), ``.hook_sae_error`` and
``.hook_sae_output``; they are in ``model.hook_dict`` while an SAE is attached there.

``add_sae`` is model-wide (as SAELens's, until ``reset_saes``); ``saes()``, ``run_with_saes`` and
the other ``*_with_saes`` calls attach for the calling thread / asyncio task only, in front of a
model-wide SAE at the same name, like the scoped hooks of ``hooks()``.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref

import torch

from .errors import unknown_hook_name
from .hook_points import LOCK, HookPoint, add_scoped, remove_all

INPUT, OUTPUT, ERROR = "hook_sae_input", "hook_sae_output", "hook_sae_error"
#: {base HookPoint: Splice} of the SAEs the calling thread / task attached with saes()
_SCOPED_SAES: contextvars.ContextVar = contextvars.ContextVar("tlshim_scoped_saes", default={})
#: {SAE hook module: tlshim HookPoint} while a splice runs that SAE in this thread / task
_FIRING: contextvars.ContextVar = contextvars.ContextVar("tlshim_sae_firing", default={})
#: {SAE module: [torch hook handles, splices using them]}: the bridges from a SAELens SAE's own hook
#: points to tlshim's, on the SAE (not the model) while some splice uses it
_BRIDGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sae_hook_name(sae) -> str | None:
    """The hook name a SAELens SAE was trained on (``cfg.metadata.hook_name`` in 6.x, ``cfg.hook_name`` before)."""
    cfg = getattr(sae, "cfg", None)
    metadata = getattr(cfg, "metadata", None)
    return getattr(metadata, "hook_name", None) or getattr(cfg, "hook_name", None)


def _own_hooks(sae) -> dict:
    """{name: module} of the hook points a SAELens-style SAE fires inside ``encode`` / ``decode``."""
    hook_dict = getattr(sae, "hook_dict", None)
    if not (isinstance(hook_dict, dict) and callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None))):
        return {}
    return {name: module for name, module in hook_dict.items() if name not in (OUTPUT, ERROR)}


def _bridge(module, args, output):
    point = _FIRING.get().get(module)
    return output if point is None else point.fire(output)


class Splice:
    """One SAE at one hook point: the hook function that replaces the activation by the SAE's output."""

    #: hook_points._call runs it with the caller's hooks visible, so its stages fire them
    sees_caller_hooks = True

    def __init__(self, sae, hook_name, use_error_term, points):
        self.sae, self.hook_name, self.use_error_term = sae, hook_name, bool(use_error_term)
        self.own = _own_hooks(sae)
        self.points = points  # {suffix: HookPoint}

    def suffixes(self):
        return list(dict.fromkeys([INPUT, *self.own, ERROR, OUTPUT]))

    def __call__(self, tensor, hook):
        override = _SCOPED_SAES.get().get(hook)
        if override is not None and override is not self:
            return None  # the calling thread attached another SAE here for its own calls
        out = self._reconstruct(tensor)
        if not (torch.is_tensor(out) and out.shape == tensor.shape):
            got = f"shape {tuple(out.shape)}" if torch.is_tensor(out) else type(out).__name__
            raise ValueError(
                f"the SAE at {self.hook_name} returned {got}; an SAE must map the activation "
                f"(shape {tuple(tensor.shape)}) to a reconstruction of the same shape"
            )
        out = out.to(tensor.dtype)
        if self.use_error_term:
            with torch.no_grad():
                clean = self._reconstruct(tensor, hooks=False).to(tensor.dtype) if self._hooked() else out.detach()
                error = tensor - clean
                hooked = self.points[ERROR].fire(error)
            # with nothing edited this is the activation itself, bit for bit; the gradient flows
            # through the SAE only (SAELens's error term is a constant)
            out = tensor.detach() + (out - clean) if hooked is error else out + hooked
        return self.points[OUTPUT].fire(out)

    def _hooked(self) -> bool:
        """Whether a hook inside the SAE may edit it (then the error term needs a clean rerun)."""
        return any(self.points[name].active for name in (INPUT, *self.own))

    def _reconstruct(self, x, hooks=True):
        if not self.own:  # a module or function: tlshim fires its input
            return self.sae(self.points[INPUT].fire(x) if hooks else x)
        token = _FIRING.set({module: self.points[name] for name, module in self.own.items()} if hooks else {})
        try:
            return self.sae.decode(self.sae.encode(x))
        finally:
            _FIRING.reset(token)

    def acquire(self):
        with LOCK:
            for module in self.own.values():
                entry = _BRIDGES.setdefault(module, [None, 0])
                if entry[1] == 0:
                    entry[0] = module.register_forward_hook(_bridge)
                entry[1] += 1

    def release(self):
        with LOCK:
            for module in self.own.values():
                entry = _BRIDGES[module]
                entry[1] -= 1
                if entry[1] == 0:
                    entry[0].remove()
                    del _BRIDGES[module]


class SAEState:
    """Per model: the model-wide SAEs and the SAE stage hook points published in hook_dict."""

    def __init__(self):
        self.attached: dict = {}  # {hook_name: (Splice, Hook)}
        self.points: dict = {}  # {name: [HookPoint, splices using it]}


def _sae_list(saes):
    return list(saes) if isinstance(saes, (list, tuple)) else [saes]


def _no_exclusion(exclude_special_tokens):
    """SAELens's exclude_special_tokens is refused rather than passed on to HF's forward (which would ignore it)."""
    if exclude_special_tokens is not False:
        raise ValueError(
            "exclude_special_tokens is not supported by tlshim's SAEs: the SAE runs at every position; "
            "to keep BOS out, run the model on tokens[:, 1:] or restore those positions in a hook on <hook>.hook_sae_output"
        )


class SAEMixin:
    """SAELens's HookedSAETransformer methods, on the installed model."""

    def _sae_state(self) -> SAEState:
        state = self._tlshim
        with LOCK:
            if "saes" not in vars(state):
                state.saes = SAEState()
            return state.saes

    def _splice(self, sae, hook_name, use_error_term) -> Splice:
        """A Splice for ``sae`` with its stage points published in hook_dict (validated first)."""
        hook_name = hook_name or sae_hook_name(sae)
        if hook_name is None:
            raise ValueError(
                f"{type(sae).__name__} has no cfg.metadata.hook_name (a SAELens SAE's): pass the hook point, "
                "e.g. model.add_sae(sae, hook_name='blocks.0.hook_resid_post')"
            )
        if not callable(sae):
            raise TypeError(f"an SAE must be callable (tensor -> reconstruction) or have encode/decode, got {type(sae).__name__}")
        if getattr(getattr(getattr(sae, "cfg", None), "metadata", None), "hook_name_out", None) not in (None, hook_name):
            raise ValueError(
                f"{type(sae).__name__} reads {hook_name} and writes {sae.cfg.metadata.hook_name_out} (a transcoder): "
                "tlshim splices SAEs that reconstruct their own hook point only"
            )
        hook_dict = self._tlshim.hook_dict
        if hook_name not in hook_dict:
            raise unknown_hook_name(hook_name, hook_dict)
        if use_error_term is None:
            use_error_term = getattr(sae, "use_error_term", False)
        splice = Splice(sae, hook_name, use_error_term, {})
        state = self._sae_state()
        with LOCK:
            published = {}
            for suffix in splice.suffixes():
                name = f"{hook_name}.{suffix}"
                entry = state.points.setdefault(name, [HookPoint(name), 0])
                entry[1] += 1
                splice.points[suffix] = published[name] = entry[0]
            # a new dict, so a thread iterating hook_dict meanwhile keeps a consistent one
            self._tlshim.hook_dict = {**hook_dict, **published}
            splice.acquire()
        return splice

    def _unsplice(self, splice):
        state = self._sae_state()
        with LOCK:
            splice.release()
            gone = []
            for point in splice.points.values():
                entry = state.points[point.name]
                entry[1] -= 1
                if entry[1] == 0:
                    remove_all([hook for hook in {*point._hooks, *point.registrations()}])
                    del state.points[point.name]
                    gone.append(point.name)
            if gone:
                self._tlshim.hook_dict = {k: v for k, v in self._tlshim.hook_dict.items() if k not in gone}

    def add_sae(self, sae, hook_name=None, use_error_term=None, exclude_special_tokens=False):
        """Attach ``sae`` at ``hook_name`` (default: the SAELens SAE's own) for every forward, in every
        thread, until ``reset_saes``; replaces an SAE attached there before.

        ``use_error_term=True`` adds back what the SAE misses, so the model computes exactly what it
        would without it while the SAE's stages (``<hook_name>.hook_sae_acts_post``, ...) are hookable.
        The default is the SAE's own ``use_error_term`` (False for a plain module).

        >>> model.add_sae(sae)                     # a SAELens SAE
        >>> model.add_sae(my_module, "blocks.1.hook_resid_post", use_error_term=True)
        """
        _no_exclusion(exclude_special_tokens)
        splice = self._splice(sae, hook_name, use_error_term)
        state = self._sae_state()
        try:
            point = self._tlshim.hook_dict[splice.hook_name]
            if splice.hook_name in state.attached:
                self.reset_saes(splice.hook_name)
            hook = point.add_hook(splice, dir="fwd", is_permanent=True, prepend=True)
        except BaseException:
            self._unsplice(splice)
            raise
        state.attached[splice.hook_name] = (splice, hook)

    def reset_saes(self, act_names=None, prev_saes=None):
        """Detach the model-wide SAEs at ``act_names`` (a name or list; default all); ``prev_saes``
        (one per name, None for none) are attached there again afterwards, as in SAELens."""
        state = self._sae_state()
        names = [act_names] if isinstance(act_names, str) else list(state.attached) if act_names is None else list(act_names)
        if prev_saes is not None and len(prev_saes) != len(names):
            raise ValueError(f"reset_saes: {len(prev_saes)} prev_saes for {len(names)} act_names; give one per name (None for none)")
        for name in names:
            entry = state.attached.pop(name, None)
            if entry is not None:
                remove_all([entry[1]])
                self._unsplice(entry[0])
        for name, prev in zip(names, prev_saes or ()):
            if prev is not None:
                self.add_sae(prev, hook_name=name)

    @property
    def acts_to_saes(self) -> dict:
        """{hook name: SAE} of the SAEs the calling thread's forwards use (its own saes() ones first)."""
        found = {name: splice.sae for name, (splice, hook) in self._sae_state().attached.items() if not hook.removed}
        for point, splice in _SCOPED_SAES.get().items():
            if self._tlshim.hook_dict.get(point.name) is point:
                found[point.name] = splice.sae
        return found

    @contextlib.contextmanager
    def saes(self, saes=(), reset_saes_end=True, use_error_term=None, exclude_special_tokens=False):
        """SAEs attached inside a ``with`` block for this thread's (or asyncio task's) forwards only;
        ``reset_saes_end=False`` attaches them model-wide for good (``add_sae``), as SAELens does.

        >>> with model.saes([sae]):
        ...     logits, cache = model.run_with_cache(tokens)
        """
        _no_exclusion(exclude_special_tokens)
        saes = _sae_list(saes)
        if not reset_saes_end:
            for sae in saes:
                self.add_sae(sae, use_error_term=use_error_term)
            yield self
            return
        splices, hooks = [], []
        try:
            for sae in saes:
                splices.append(self._splice(sae, None, use_error_term))
            names = [splice.hook_name for splice in splices]
            if len(set(names)) < len(names):
                raise ValueError(f"two SAEs at one hook point in {names}: attach one SAE per hook name")
            points = {self._tlshim.hook_dict[splice.hook_name]: splice for splice in splices}
            hooks = add_scoped([(point, splice, "fwd") for point, splice in points.items()], prepend=True)
            token = _SCOPED_SAES.set({**_SCOPED_SAES.get(), **points})
            try:
                yield self
            finally:
                _SCOPED_SAES.reset(token)
        finally:
            try:
                remove_all(hooks)
            finally:
                for splice in splices:
                    self._unsplice(splice)

    def run_with_saes(self, *model_args, saes=(), reset_saes_end=True, use_error_term=None, exclude_special_tokens=False,
                      **model_kwargs):
        """``run_with_hooks`` (TransformerLens's forward) with ``saes`` attached for this call.

        >>> logits = model.run_with_saes(tokens, saes=[sae])
        """
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self.run_with_hooks(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args, saes=(), reset_saes_end=True, use_error_term=None,
                                 exclude_special_tokens=False, return_cache_object=True, remove_batch_dim=False, **kwargs):
        """``run_with_cache`` with ``saes`` attached; the cache holds their stages too.

        >>> logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
        >>> cache["blocks.0.hook_resid_pre.hook_sae_acts_post"]
        """
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            logits, cache = self.run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        return (logits, cache) if return_cache_object else (logits, dict(cache.items()))

    def run_with_hooks_with_saes(self, *model_args, saes=(), reset_saes_end=True, exclude_special_tokens=False,
                                 fwd_hooks=(), bwd_hooks=(), reset_hooks_end=True, clear_contexts=False, **model_kwargs):
        """``run_with_hooks`` with ``saes`` attached; hooks may name the SAEs' stages."""
        with self.saes(saes, reset_saes_end, exclude_special_tokens=exclude_special_tokens):
            return self.run_with_hooks(*model_args, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks,
                                       reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts, **model_kwargs)
