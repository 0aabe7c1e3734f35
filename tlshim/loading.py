"""Loading custom-code (``trust_remote_code``) models under transformers v5, and repairing ones loaded without it.

transformers v5 builds a model on the meta device, then loads the checkpoint into it. Remote code written
for v4 (Apple's OpenELM is the reference case; the P numbers are those of OPENELM.md section 4) breaks:

* P1 (5.4+, strict-dataclass configs): the base config constructor passes its extra kwargs to the class's
  own argument-less ``__post_init__()``: TypeError. ``loading()`` makes that ``__post_init__`` run the
  base one with them first; ``finish_loading`` gives the model's config a per-instance subclass doing
  the same, for the default configs v5 builds later (``generate`` and ``save_pretrained`` on 5.4-5.12).
* P2 (5.0+): ``config.use_cache`` is popped as a generation parameter. ``loading()`` puts it back on
  configs it sees built, ``finish_loading`` on the model's config.
* P3 (5.0+): a module constructor doing real tensor work (OpenELM's rotary tables) fails under
  ``torch.device("meta")``. ``loading()`` re-runs that constructor on the CPU.
* P4 (5.0+): non-persistent buffers come back as ``torch.empty_like`` garbage, tensors kept as plain
  attributes as meta or built from garbage. ``repair_buffers`` recomputes them (``finish_loading`` calls it).
* P5 (5.0-5.2 for remote code, to 5.12 for other custom classes): an ``_init_weights`` writing ``.data``
  re-draws the loaded weights. ``loading()`` makes it skip loaded tensors; ``check_loaded_weights``
  detects a model it was too late for (it cannot be repaired).
* P7 (5.0+): ``DynamicCache.from_legacy_cache`` / ``to_legacy_cache`` are gone (and from 4.56 they cannot
  take the cache ``generate`` makes). ``finish_loading`` gives the model's own code modules a
  ``DynamicCache`` whose v4 calls keep cache objects (``tlshim.legacy_cache``).
* P8 (5.0+): a list-valued ``_tied_weights_keys`` breaks ``save_pretrained``. ``finish_loading`` gives the
  model's modules the dict form, as instance attributes.
* P9 (4.56+): ``generate`` reads ``config.num_hidden_layers``. ``finish_loading`` sets it on the model's
  config (the number of blocks).
* No ``generate`` on a second load (5.x after 5.0, seen on 5.12 and 5.23; not in OPENELM.md): an auto
  class adds ``GenerationMixin`` to a remote class that defines ``prepare_inputs_for_generation``, but
  registers the class without it, and loads that registered class from then on. ``finish_loading``
  gives such a model a per-instance subclass with the mixin, as the first load's class has.
* P10 (5.24+): ``generate`` passes the cache to ``prepare_inputs_for_generation`` as ``cache``, not
  ``past_key_values``; the same subclass renames it, and gives v4 code the v4 cache calls it reads.

``loading()`` patches only while it is open and then puts every patched object back (the very same
objects); every other fix is made on one model and never on a class. Only custom-code classes are
changed: those defined outside transformers and torch (remote code, or a user's own ``PreTrainedModel``).
On transformers 4.x ``loading()`` patches nothing.

>>> model = tlshim.from_pretrained("path/to/openelm")           # loading() + finish_loading + install
>>> with tlshim.loading():                                       # or by hand
...     model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
>>> tlshim.finish_loading(model)

``tlshim.loading`` is the context manager; import this module's other names with
``from tlshim.loading import ...``. Not thread-safe: while ``loading()`` is open, other threads see
the patched classes too.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import os
import sys
import weakref
from itertools import chain

import torch
from torch import nn

from ._wrapt import wrap_attribute, wrap_callable
from .errors import TlshimError

__all__ = [
    "ReinitializedWeightsError",
    "check_loaded_weights",
    "finish_loading",
    "from_pretrained",
    "loading",
    "repair_buffers",
]


class ReinitializedWeightsError(TlshimError, RuntimeError):
    """The weights of a loaded model are not its checkpoint's (transformers re-drew them)."""


# Models whose loading tlshim guarded (their weights are the checkpoint's): check_loaded_weights skips them.
_GUARDED = weakref.WeakSet()
_TAG = "_self_tlshim_loading"  # marks tlshim's wrappers (wrapt keeps `_self_*` attributes on the wrapper)


@functools.cache
def _tf_version():
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__)


def _v(text):
    from packaging.version import Version

    return Version(text)


def _is_custom(obj) -> bool:
    """Defined outside transformers and torch (remote code, or a user's own class), as
    ``PreTrainedModel.is_custom_code`` (5.13+) decides."""
    module = getattr(obj, "__module__", None) or ""
    root = module.split(".")[0]
    return root not in ("transformers", "torch", "builtins", "tlshim", "accelerate", "peft")


def _config_base():
    import transformers

    return getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig


# ------------------------------------------------------------------------------------------- loading()


class _Patches:
    """The objects one ``loading()`` scope has patched: ``(owner, name, original)``, restored last first."""

    def __init__(self):
        self.patched: list = []

    def wrap(self, owner, name, wrapper):
        """Wrap ``vars(owner)[name]`` unless a tlshim loading wrapper already sits there."""
        if getattr(vars(owner).get(name), _TAG, False):
            return
        original = wrap_attribute(owner, name, wrapper)
        setattr(vars(owner)[name], _TAG, True)
        self.patched.append((owner, name, original))

    def restore(self):
        while self.patched:
            owner, name, original = self.patched.pop()
            setattr(owner, name, original)


@contextlib.contextmanager
def loading():
    """Context manager: the load-time fixes transformers v5 needs for custom-code models, removed on exit.

    Inside it, ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` (or any
    ``from_pretrained``) of a v4-era remote model builds its config (P1, P2), constructs on the meta
    device (P3) and keeps its loaded weights (P5). Afterwards call ``finish_loading(model)`` (or use
    ``tlshim.from_pretrained``, which does all of it). On transformers 4.x nothing needs patching.
    Yields the list of ``(owner, name, original)`` it has patched so far (empty again after exit).
    """
    patches = _Patches()
    try:
        if _tf_version() >= _v("5.0.0"):
            from transformers import PreTrainedModel

            patches.wrap(_config_base(), "__init__", functools.partial(_config_init, patches))
            patches.wrap(PreTrainedModel, "get_init_context", functools.partial(_init_context, patches))
        yield patches.patched
    finally:
        patches.restore()


def _config_init(patches, wrapped, instance, args, kwargs):
    """The base config constructor, for a custom config class: P1 and P2."""
    if instance is None or not _is_custom(type(instance)):
        return wrapped(*args, **kwargs)
    if dataclasses.is_dataclass(_config_base()):
        _tolerate_post_init_kwargs(patches, type(instance))
    result = wrapped(*args, **kwargs)
    # P2: v5 pops generation parameters; `use_cache` is a forward default for v4 remote code.
    if "use_cache" in kwargs and not hasattr(instance, "use_cache"):
        instance.use_cache = kwargs["use_cache"]
    return result


def _tolerate_post_init_kwargs(patches, cls):
    """P1: the strict-dataclass base calls ``self.__post_init__(**extras)``; a v4 config's own
    ``__post_init__()`` takes none. Its definer's ``__post_init__`` then runs the base one with them first."""
    owner = _post_init_owner(cls)
    if owner is not None:
        patches.wrap(owner, "__post_init__", functools.partial(_post_init_with_extras, owner))


def _post_init_with_extras(owner, wrapped, instance, args, kwargs):
    if not kwargs:
        return wrapped(*args)
    try:
        inspect.signature(wrapped).bind(*args, **kwargs)
    except TypeError:
        # the base __post_init__ stores the extras as attributes (and pops v5's generation parameters)
        getattr(super(owner, instance), "__post_init__")(**kwargs)
        return wrapped(*args)
    return wrapped(*args, **kwargs)


def _init_context(patches, wrapped, instance, args, kwargs):
    """``cls.get_init_context(...)``, called by v5 ``from_pretrained`` just before it builds ``cls`` on meta."""
    if isinstance(instance, type) and _is_custom(instance):
        _guard_model_classes(patches, instance)
    return wrapped(*args, **kwargs)


def _guard_model_classes(patches, cls):
    from transformers import PreTrainedModel

    classes = {klass for klass in cls.__mro__ if _is_custom(klass)}
    for module in _custom_modules(cls):
        classes.update(
            obj for obj in vars(module).values() if isinstance(obj, type) and obj.__module__ == module.__name__
        )
    for klass in sorted(classes, key=lambda k: (k.__module__, k.__qualname__)):
        if not issubclass(klass, nn.Module) or not _is_custom(klass):
            continue
        if issubclass(klass, PreTrainedModel):
            if "_init_weights" in vars(klass):
                patches.wrap(klass, "_init_weights", _init_weights_keep_loaded)  # P5
        elif "__init__" in vars(klass):
            patches.wrap(klass, "__init__", _init_off_meta)  # P3


def _custom_modules(cls):
    """The modules that define ``cls``'s custom classes, and the custom modules they import (same top package)."""
    start = [sys.modules.get(klass.__module__) for klass in cls.__mro__ if _is_custom(klass)]
    start = [module for module in start if module is not None]
    roots = {module.__name__.split(".")[0] for module in start}
    seen, todo = {}, list(start)
    while todo:
        module = todo.pop()
        if module.__name__ in seen:
            continue
        seen[module.__name__] = module
        for obj in vars(module).values():
            if inspect.ismodule(obj):
                found = obj
            elif isinstance(obj, type):
                found = sys.modules.get(obj.__module__)
            else:
                continue
            if found is not None and found.__name__.split(".")[0] in roots and found.__name__ not in seen:
                todo.append(found)
    return list(seen.values())


def _meta_is_default() -> bool:
    return torch.empty(0).device.type == "meta"


def _init_off_meta(wrapped, instance, args, kwargs):
    """P3: a module constructor that does real tensor work (copies a meta tensor to the CPU, ``.item()``...)
    fails under v5's ``torch.device("meta")``; it is run again on the CPU, so its buffers and the tensors it
    keeps as plain attributes hold real values (non-persistent buffers are refilled by ``repair_buffers``)."""
    try:
        return wrapped(*args, **kwargs)
    except (NotImplementedError, RuntimeError) as err:
        if "meta" not in str(err) or not _meta_is_default():
            raise
    with torch.device("cpu"):
        return wrapped(*args, **kwargs)


def _init_weights_keep_loaded(wrapped, instance, args, kwargs):
    """P5: a custom ``_init_weights`` writing ``.data`` in place re-draws weights v5 has just loaded (they
    carry ``_is_hf_initialized``). Skip modules whose tensors were all loaded; elsewhere keep the loaded ones."""
    if instance is not None:
        _GUARDED.add(instance)
    module = args[0] if args else kwargs.get("module")
    if not isinstance(module, nn.Module):
        return wrapped(*args, **kwargs)
    own = {
        (kind, name): tensor
        for kind, entries in (("p", module._parameters), ("b", module._buffers))
        for name, tensor in entries.items()
        if tensor is not None
    }
    loaded = {key: t for key, t in own.items() if getattr(t, "_is_hf_initialized", False)}
    if own and len(loaded) == len(own):
        return None
    if not loaded:
        return wrapped(*args, **kwargs)
    saved = {key: t.detach().clone() for key, t in loaded.items()}
    try:
        return wrapped(*args, **kwargs)
    finally:
        with torch.no_grad():
            for (kind, name), value in saved.items():
                current = (module._parameters if kind == "p" else module._buffers).get(name)
                if current is not None and current.shape == value.shape:
                    current.copy_(value)


# ------------------------------------------------------------------------------------------- after load


def from_pretrained(path, *model_args, install=True, tokenizer=None, install_options=None, **kwargs):
    """Load a causal LM with ``AutoModelForCausalLM.from_pretrained`` inside ``loading()``, repair it
    (``finish_loading``) and install tlshim on it (``install=False`` to skip that).

    ``trust_remote_code`` defaults to True when the checkpoint's config.json (local, or in the HF cache)
    names remote code in its ``auto_map``; pass it explicitly to decide yourself.

    >>> model = tlshim.from_pretrained("apple/OpenELM-270M", tokenizer=tok)
    """
    from transformers import AutoModelForCausalLM

    if "trust_remote_code" not in kwargs and _wants_remote_code(path, kwargs):
        kwargs["trust_remote_code"] = True
    with loading():
        model = AutoModelForCausalLM.from_pretrained(path, *model_args, **kwargs)
    _GUARDED.add(model)
    finish_loading(model, check_weights=False)
    if install:
        from .install import install as install_tlshim

        install_tlshim(model, tokenizer=tokenizer, **(install_options or {}))
    return model


def _wants_remote_code(path, kwargs) -> bool:
    config = _checkpoint_config_json(str(path), kwargs.get("subfolder") or "")
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    return bool(auto_map) and any(key.startswith("AutoModel") or key == "AutoConfig" for key in auto_map)


def finish_loading(model, check_weights=True):
    """The per-model fixes for a custom-code model loaded by transformers (with or without ``loading()``).

    Repairs its buffers (``repair_buffers``) and, where the installed transformers needs it: puts
    ``config.use_cache`` back (P2), gives its code the v4 cache calls (P7), gives its
    modules the dict form of ``_tied_weights_keys`` (P8) and its config ``num_hidden_layers`` (P9), and
    gives back ``generate`` to a remote-code model loaded without it (``_generation_mixin``).
    Returns the names ``repair_buffers`` repaired. Idempotent. Built-in transformers models are left alone.
    """
    from .install import hf_model

    model = hf_model(model)
    if not _is_custom(_base_class(model)):
        return []
    repaired = repair_buffers(model, check_weights=check_weights)
    config = model.config
    version = _tf_version()
    _tolerant_config_instances(model)  # P1, for default configs built later (generate, save on 5.4-5.12)
    if version >= _v("5.0.0") and not hasattr(config, "use_cache"):  # P2
        value = _checkpoint_config_json(getattr(config, "_name_or_path", "") or "").get("use_cache", True)
        config.use_cache = bool(value)
    if not hasattr(config, "num_hidden_layers") and _cache_reads_layer_count():  # P9
        layers = _count_layers(model)
        if layers:
            config.num_hidden_layers = layers
    _v4_cache_calls(model)  # P7
    if version >= _v("5.0.0"):  # P8
        _dict_tied_weights_keys(model)
    _generation_class(model)
    return repaired


_GENERATIVE = weakref.WeakKeyDictionary()


def _generation_class(model):
    """``generate`` for a remote-code model whose class lost it, or whose cache it would not use.

    * From 4.50 ``PreTrainedModel`` no longer inherits ``GenerationMixin``; an auto class adds it to a
      remote class that defines its own ``prepare_inputs_for_generation`` (v4-era code such as OpenELM),
      but registers the class without it, and in 5.x after 5.0 the next auto load of the same code takes
      that registered class: a model with no ``generate``, that ``pipeline`` refuses.
    * v4-era ``prepare_inputs_for_generation`` reads ``cache.seen_tokens`` and ``get_max_length()`` (gone
      in 4.54 and 4.49; 5.x's ``get_max_length`` says -1 where v4 said None), and takes the cache as
      ``past_key_values``, where 5.24+ ``generate`` passes ``cache`` (P10): it would find none and run the
      whole sequence again at every step. It gets the cache under its own name, with the v4 calls.

    The model (not its class) gets a subclass doing what is missing, keeping the name, module and
    qualname (``save_pretrained`` writes the same ``architectures`` and copies the same remote files).
    A model tlshim is installed on is left as it is."""
    try:
        from transformers import GenerationMixin
    except ImportError:
        return
    cls = type(model)
    if "_tlshim_base" in vars(cls) or "_tlshim_generation" in vars(cls) or not _is_custom(cls):
        return
    own = next(
        (vars(k)["prepare_inputs_for_generation"] for k in cls.__mro__ if "prepare_inputs_for_generation" in vars(k) and _is_custom(k)),
        None,
    )
    if own is None:
        return
    add_mixin = not issubclass(cls, GenerationMixin)
    v4_cache_api = _takes(own, "past_key_values") and not _takes(own, "cache")
    if not (add_mixin or v4_cache_api):
        return
    if cls not in _GENERATIVE:
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
        namespace["_tlshim_generation"] = True
        if v4_cache_api:
            namespace["prepare_inputs_for_generation"] = _v4_cache_for(own)
        bases = (cls, GenerationMixin) if add_mixin else (cls,)
        _GENERATIVE[cls] = type(cls.__name__, bases, namespace)
    model.__class__ = _GENERATIVE[cls]
    if getattr(model, "generation_config", None) is None:  # what from_pretrained loads for a generative class
        from transformers import GenerationConfig

        root = getattr(model.config, "_name_or_path", "") or ""
        found = _checkpoint_file(root, "generation_config.json")
        config_json = _checkpoint_file(root, "config.json")
        if found:
            model.generation_config = GenerationConfig.from_pretrained(os.path.dirname(found))
        elif config_json:  # as from_pretrained does without a generation_config.json
            model.generation_config = GenerationConfig.from_pretrained(
                os.path.dirname(config_json), config_file_name="config.json", _from_model_config=True
            )
        else:
            model.generation_config = GenerationConfig.from_model_config(model.config)


def _takes(function, name) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _v4_cache_for(own):
    """``own`` (v4-era ``prepare_inputs_for_generation``) given ``generate``'s cache as v4 code reads it:
    under its own name, ``past_key_values`` (5.24+ passes it as ``cache``, P10), and with the v4 calls
    (``seen_tokens``, ``get_max_length()``: ``legacy_cache.V4CacheView``). The signature stays own's,
    which ``generate`` inspects."""
    from .legacy_cache import v4_cache

    @functools.wraps(own)
    def prepare_inputs_for_generation(self, *args, **kwargs):
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = kwargs.pop("cache")
        if len(args) > 1:  # (input_ids, past_key_values, ...)
            args = (args[0], v4_cache(args[1]), *args[2:])
        elif "past_key_values" in kwargs:
            kwargs["past_key_values"] = v4_cache(kwargs["past_key_values"])
        return own(self, *args, **kwargs)

    return prepare_inputs_for_generation


def _post_init_owner(cls):
    """The class whose ``__post_init__`` ``cls`` runs, when it is custom code that takes no extra kwargs."""
    for klass in cls.__mro__:
        if "__post_init__" in vars(klass):
            function = vars(klass)["__post_init__"]
            try:
                params = inspect.signature(function).parameters.values()
            except (TypeError, ValueError):
                return None
            takes_extras = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
            return klass if _is_custom(klass) and not takes_extras else None
    return None


_TOLERANT_CONFIGS = weakref.WeakKeyDictionary()


def _tolerant_config_instances(model):
    """P1 after loading: v5.4+ builds default instances of a config's class (``self.__class__()``, in
    ``generate`` and ``save_pretrained`` on 5.4-5.12), which fails as in P1. Each config object of the
    model gets a per-instance subclass (same name, module and qualname) whose ``__post_init__`` takes
    the base's extras; the class itself is not changed."""
    if not dataclasses.is_dataclass(_config_base()):
        return
    from transformers import PreTrainedModel

    for module in model.modules():
        config = getattr(module, "config", None) if isinstance(module, PreTrainedModel) else None
        if config is None or "_tlshim_config_base" in vars(type(config)):
            continue
        owner = _post_init_owner(type(config))
        if owner is not None:
            config.__class__ = _tolerant_config_class(type(config), owner)


def _tolerant_config_class(cls, owner):
    if cls not in _TOLERANT_CONFIGS:
        post_init = _unwrapped(vars(owner)["__post_init__"])
        namespace = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "__init__": cls.__init__,  # keeps the class's own constructor (no dataclass __init__)
            "__post_init__": wrap_callable(post_init, functools.partial(_post_init_with_extras, owner)),
            "__reduce_ex__": _reduce_tolerant_config,
            "__deepcopy__": _deepcopy_tolerant_config,
            "_tlshim_config_base": cls,
        }
        _TOLERANT_CONFIGS[cls] = type(cls.__name__, (cls,), namespace)
    return _TOLERANT_CONFIGS[cls]


def _unwrapped(function):
    """``function`` without a wrapper of an open ``loading()`` scope."""
    return function.__wrapped__ if getattr(function, _TAG, False) else function


def _reduce_tolerant_config(self, protocol):
    # pickles as the original class (found by name where it is unpickled)
    reduced = object.__reduce_ex__(self, protocol)
    return (_new_config, (vars(type(self))["_tlshim_config_base"],), *reduced[2:])


def _new_config(cls):
    return cls.__new__(cls)


def _deepcopy_tolerant_config(self, memo):
    # a deep copy keeps the per-instance class (transformers v5 deep-copies the config it builds a model from)
    return copy._reconstruct(self, memo, *object.__reduce_ex__(self, 4))


def _base_class(model):
    """The model's class before tlshim's per-instance subclass (if installed)."""
    return vars(type(model)).get("_tlshim_base", type(model))


def _cache_reads_layer_count() -> bool:
    from transformers.cache_utils import DynamicCache

    try:
        return "config" in inspect.signature(DynamicCache.__init__).parameters
    except (TypeError, ValueError):
        return False


def _count_layers(model) -> int:
    """The length of the model's longest ModuleList of one class (its decoder blocks)."""
    best = 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > best and len({type(m) for m in module}) == 1:
            best = len(module)
    return best


def _v4_cache_calls(model):
    """P7: v4-era code calls ``DynamicCache.from_legacy_cache`` / ``to_legacy_cache`` on every cache: gone
    in v5, and from 4.56 unable to take the cache object ``generate`` builds. The custom modules of the
    model's code that name transformers' ``DynamicCache`` get ``LegacyDynamicCache`` under that name
    instead, for every model of that code in this process (their own namespace; transformers' classes
    are not changed)."""
    from transformers.cache_utils import DynamicCache

    from .legacy_cache import LegacyDynamicCache

    for module in _custom_modules(_base_class(model)):
        if vars(module).get("DynamicCache") is DynamicCache:
            module.DynamicCache = LegacyDynamicCache


def _dict_tied_weights_keys(model):
    """P8: v5 reads ``_tied_weights_keys`` as ``{tied: source}`` (``save_pretrained`` calls ``.keys()``); a v4
    list names weights tied to the input embeddings. Each module holding a list gets, on the instance, the
    dict of those that really share the input embedding's tensor (none for OpenELM: its tied head is no
    module), so v5's tying, which loading skipped for the list, stays as it was."""
    for module in model.modules():
        keys = getattr(module, "_tied_weights_keys", None)
        if not isinstance(keys, (list, tuple)):
            continue
        tied = {}
        source = None
        with contextlib.suppress(Exception):
            source = module.get_input_embeddings().weight
        names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
        params = dict(module.named_parameters(remove_duplicate=False))
        if source is not None and id(source) in names:
            for key in keys:
                param = params.get(key)
                if param is not None and key != names[id(source)] and param.data_ptr() == source.data_ptr():
                    tied[key] = names[id(source)]
        vars(module)["_tied_weights_keys"] = tied


# ------------------------------------------------------------------------------------------- buffers


def repair_buffers(model, check_weights=True) -> list:
    """Recompute what v5 loading leaves broken in a model: non-persistent buffers (``torch.empty_like``
    garbage) and tensors that module constructors keep as plain attributes (meta tensors, or tables built
    from garbage). Returns the names of the tensors replaced (``[]`` when all were right).

    Every module's state is compared with that of a fresh instance of the model's class built from the
    same config on the CPU (parameters on meta, so it costs little memory). A module whose tensors
    differ (same shape, other values) or are meta gets the fresh ones, cast to its dtype and device, with
    the private int/float attributes next to them (e.g. a cached length). Tensors whose shape changed
    since construction (a cache grown at run time) are taken as valid.

    With ``check_weights`` it first raises ``ReinitializedWeightsError`` where transformers is known to
    have re-drawn the loaded weights (``check_loaded_weights``), since that cannot be repaired here.
    """
    from .install import hf_model

    model = hf_model(model)
    if check_weights:
        check_loaded_weights(model)
    owners = [(name, module) for name, module in model.named_modules() if _state(module)]
    if not owners:
        return []
    dtype = _build_dtype(model)
    fresh = {dtype: _fresh_modules(model, dtype)}

    def reference(name, dtype):
        if dtype not in fresh:
            fresh[dtype] = _fresh_modules(model, dtype)
        return fresh[dtype].get(name)

    repaired = []
    for name, module in owners:
        ref = reference(name, dtype)
        if ref is None or _base_class(ref) is not _base_class(module):
            continue
        if not _broken(module, ref):
            continue
        if dtype != torch.float32:
            # built under another default dtype (a float32 model cast afterwards, say): as valid
            alt = reference(name, torch.float32)
            if alt is not None and not _broken(module, alt):
                continue
        repaired += [f"{name}.{n}" if name else n for n in _restore(module, ref, model)]
    return repaired


def _state(module):
    """``{name: tensor}``: a module's non-persistent buffers and the tensors it keeps as plain attributes."""
    out = {n: module._buffers[n] for n in module._non_persistent_buffers_set if module._buffers.get(n) is not None}
    for name, value in vars(module).items():
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            out[name] = value
    return out


def _broken(module, ref) -> bool:
    mine, theirs = _state(module), _state(ref)
    for name, value in mine.items():
        if value.is_meta:
            return True
        expected = theirs.get(name)
        if expected is None or expected.shape != value.shape:
            continue
        if not torch.equal(value, expected.to(device=value.device, dtype=value.dtype)):
            return True
    return False


def _restore(module, ref, model):
    fallback = _device_of(module, model)
    done = []
    for name, expected in _state(ref).items():
        current = module._buffers.get(name) if name in module._buffers else vars(module).get(name)
        if isinstance(current, torch.Tensor) and not current.is_meta:
            value = expected.to(device=current.device, dtype=current.dtype)
            if value.shape == current.shape and torch.equal(value, current):
                continue  # right already
        else:
            value = expected.to(device=fallback)
        if name in ref._buffers:
            module._buffers[name] = value
            if name in ref._non_persistent_buffers_set:
                module._non_persistent_buffers_set.add(name)
        else:
            vars(module)[name] = value
        done.append(name)
    bare = vars(nn.Module())
    for name, value in vars(ref).items():
        if name.startswith("_") and name not in bare and type(value) in (int, float) and name in vars(module):
            vars(module)[name] = value
    return done


def _device_of(module, model):
    for tensor in chain(module.parameters(), module.buffers(), model.parameters()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


def _build_dtype(model):
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.get_default_dtype()


def _fresh_modules(model, dtype):
    """``{name: module}`` of a fresh model of ``model``'s class and config: built on the CPU under the
    default dtype ``dtype``, outside any meta context, with its parameters moved to meta as they are made."""
    cls = _base_class(model)
    config = copy.deepcopy(model.config)
    previous = torch.get_default_dtype()
    with torch.device("cpu"), _parameters_on_meta(), torch.no_grad():
        torch.set_default_dtype(dtype)
        try:
            fresh = cls(config)
        except Exception as err:
            raise TlshimError(
                f"tlshim could not build a fresh {cls.__name__} from its config ({type(err).__name__}: "
                f"{err}), so it cannot check or recompute the model's non-persistent buffers"
            ) from err
        finally:
            torch.set_default_dtype(previous)
    return dict(fresh.named_modules())


@contextlib.contextmanager
def _parameters_on_meta():
    """Like accelerate's ``init_empty_weights(include_buffers=False)``: each parameter goes to meta once
    registered (so a fresh model holds no weights), buffers are made for real."""
    patches = _Patches()

    def register(wrapped, instance, args, kwargs):
        wrapped(*args, **kwargs)
        name = args[0] if args else kwargs["name"]
        param = instance._parameters.get(name)
        if param is not None and not param.is_meta:
            extra = dict(vars(param))
            extra["requires_grad"] = param.requires_grad
            instance._parameters[name] = type(param)(param.to("meta"), **extra)

    try:
        patches.wrap(nn.Module, "register_parameter", register)
        yield
    finally:
        patches.restore()


# ------------------------------------------------------------------------------------------- weights


def _reinit_possible(cls) -> bool:
    """Whether the installed transformers re-draws the loaded weights of ``cls`` (P5): a custom class with
    its own ``_init_weights``, on 5.0-5.2 (remote code) or 5.0-5.12 (other custom code)."""
    from transformers import PreTrainedModel

    version = _tf_version()
    if not (_v("5.0.0") <= version < _v("5.13.0")) or not _is_custom(cls):
        return False
    if version >= _v("5.3.0") and getattr(cls, "_auto_class", None) is not None:
        return False
    return any("_init_weights" in vars(k) and _is_custom(k) for k in cls.__mro__ if issubclass(k, PreTrainedModel))


def check_loaded_weights(model, checkpoint=None, sample=8, force=False):
    """Raise ``ReinitializedWeightsError`` when a model's weights are not those of its checkpoint because
    transformers re-initialised them on load (P5: 5.0-5.2 for remote code). Compares up to ``sample``
    tensors with the checkpoint's safetensors (``checkpoint``, else ``config._name_or_path`` as a local
    folder or a cached hub repo). Models loaded through tlshim, versions that keep weights, and models
    whose checkpoint is not found are not checked (``force=True`` compares anyway).
    """
    from .install import hf_model

    model = hf_model(model)
    if not force:
        if model in _GUARDED or not _reinit_possible(_base_class(model)):
            return
        if not any(getattr(p, "_is_hf_initialized", False) for p in model.parameters()):
            return  # not loaded by v5's from_pretrained (built from a config, say)
    root = checkpoint or getattr(model.config, "_name_or_path", "") or ""
    files = _checkpoint_weight_files(str(root))
    if not files:
        return
    from safetensors import safe_open

    state = model.state_dict()
    keys = [k for k in sorted(files) if k in state and state[k].is_floating_point() and not state[k].is_meta]
    differ = checked = 0
    handles = {}
    try:
        for key in keys[:sample]:
            path = files[key]
            if path not in handles:
                handles[path] = safe_open(path, framework="pt")
            saved = handles[path].get_tensor(key)
            mine = state[key]
            checked += 1
            if saved.shape != mine.shape or not torch.equal(mine.detach().cpu(), saved.to(mine.dtype)):
                differ += 1
    except Exception:  # an unreadable checkpoint is no evidence either way
        return
    if checked and differ * 2 > checked:
        import transformers

        raise ReinitializedWeightsError(
            f"{differ} of {checked} weights of this {type(model).__name__} differ from its checkpoint {root!r}: "
            f"transformers {transformers.__version__} re-initialises the loaded weights of custom-code models "
            "whose _init_weights writes .data in place, and the model cannot be repaired afterwards. Load it "
            "with tlshim.from_pretrained(path), or inside `with tlshim.loading():` "
            "(AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True), then tlshim.finish_loading). "
            "If you changed the weights on purpose, skip this check (check_weights=False)."
        )


def _checkpoint_file(root, filename):
    if not root:
        return None
    if os.path.isdir(root):
        path = os.path.join(root, filename)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(root, filename)
    except Exception:
        return None
    return path if isinstance(path, str) and os.path.isfile(path) else None


def _checkpoint_config_json(root, subfolder=""):
    path = _checkpoint_file(root, os.path.join(subfolder, "config.json") if subfolder else "config.json")
    if path is None:
        return {}
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _checkpoint_weight_files(root) -> dict:
    """``{tensor name: safetensors file}`` of a checkpoint (single file or sharded index), or ``{}``."""
    single = _checkpoint_file(root, "model.safetensors")
    if single:
        try:
            from safetensors import safe_open

            with safe_open(single, framework="pt") as handle:
                return {key: single for key in handle.keys()}
        except Exception:
            return {}
    index = _checkpoint_file(root, "model.safetensors.index.json")
    if index:
        try:
            with open(index) as handle:
                weight_map = json.load(handle)["weight_map"]
        except (OSError, ValueError, KeyError):
            return {}
        folder = os.path.dirname(index)
        return {key: os.path.join(folder, name) for key, name in weight_map.items()}
    return {}
