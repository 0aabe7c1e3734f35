"""install / uninstall / is_installed: the reversible injection of TransformerLens names into a live model."""

from __future__ import annotations

import difflib
import warnings

import torch

from .api import ModelAPI
from .attention import register_kernel
from .consistency import check_config
from .errors import ConflictError
from .hook_points import foreign_hooks, remove_all
from .journal import ClassSwap, DictEntry, apply_all, undo_all
from .layout import plan_install
from .registry import spec_for
from .split_inputs import plan_switch_hooks
from .tl_calls import tokenizer_fields
from .tl_config import TLConfig
from .tl_config_fields import computed_fields

STATE = "_tlshim"


class InstallState:
    """What tlshim keeps on an installed model (its one ``__dict__`` entry besides hook points and aliases)."""

    def __init__(self, spec, hook_dict, cfg, tokenizer, records):
        self.spec, self.hook_dict, self.cfg, self.tokenizer = spec, hook_dict, cfg, tokenizer
        self.records = records


def is_installed(model) -> bool:
    """True when tlshim is installed on ``model``."""
    return STATE in vars(hf_model(model))


def hf_model(model):
    """The HuggingFace model itself: ``model``, or the one a peft wrapper holds (PeftModel -> LoraModel -> model).

    tlshim goes on that model; a peft wrapper forwards unknown attributes to it, so
    ``peft_model.run_with_cache(...)`` and ``peft_model.hooks(...)`` work once it is installed.
    """
    while type(model).__module__.split(".")[0] == "peft":
        get_base_model = getattr(type(model), "get_base_model", None)
        model = get_base_model(model) if get_base_model is not None else model.model
    return model


#: install's keyword options and what each does
OPTIONS = {
    "keep_attn_implementation": "Gemma2: keep sdpa attention instead of switching to eager",
    "tl_calls": "model(tokens) and model.generate(tokens) with a positional input follow TransformerLens",
}


def check_install_args(model, tokenizer, options):
    """Clear errors for what install cannot take: not a model, not a tokenizer, unknown options."""
    if not isinstance(model, torch.nn.Module):
        hint = {
            str: f" (a path or hub id? load it first: AutoModelForCausalLM.from_pretrained({model!r}), "
                 f"or tlshim.from_pretrained({model!r}))",
            dict: " (a state_dict or config? build the model and load it into that)",
        }.get(type(model), "")
        raise TypeError(
            f"tlshim.install takes a HuggingFace causal LM (a torch.nn.Module such as LlamaForCausalLM), "
            f"got {type(model).__name__}{hint}"
        )
    if tokenizer is not None and not (callable(tokenizer) and callable(getattr(tokenizer, "decode", None))):
        hint = f": load it with AutoTokenizer.from_pretrained({tokenizer!r})" if isinstance(tokenizer, str) else ""
        raise TypeError(
            f"tokenizer must be a HuggingFace tokenizer (callable, with decode), or None; got "
            f"{type(tokenizer).__name__}{hint}"
        )
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        close = {name: difflib.get_close_matches(name, list(OPTIONS), n=1) for name in unknown}
        hints = "; ".join(f"{name!r}" + (f" (did you mean {close[name][0]!r}?)" if close[name] else "") for name in unknown)
        valid = "; ".join(f"{name}: {what}" for name, what in OPTIONS.items())
        raise TypeError(f"tlshim.install got unknown option(s) {hints}. Valid options: tokenizer; {valid}")


def install(model, tokenizer=None, **options):
    """Give a HuggingFace causal LM TransformerLens hook points, aliases and API, in place.

    Returns the same model object. All or nothing: on any failure the model is left as it was.
    A peft wrapper (``get_peft_model(...)``) is accepted: tlshim goes on the HF model inside it and
    the wrapper is returned; LoRA layers are hooked where they sit, so hooks see adapted activations.

    >>> model = tlshim.install(AutoModelForCausalLM.from_pretrained(path), tokenizer=tok)
    >>> logits, cache = model.run_with_cache(tokens)
    """
    check_install_args(model, tokenizer, options)
    if is_installed(model):
        warnings.warn("tlshim is already installed on this model; nothing changed", stacklevel=2)
        return model
    given, model = model, hf_model(model)
    spec = spec_for(model)
    plan = plan_install(model, spec)
    plan_switch_hooks(plan)
    records = [record for step in spec.prepare for record in step(model, spec, options)]
    records += plan.entries + plan.swaps
    records.append(ClassSwap(model, ModelAPI, spec, "model"))
    cfg = _tl_config(model, spec, tokenizer)
    check_config(model, spec, cfg)
    state = InstallState(spec, plan.hook_dict, cfg, tokenizer, records)
    state.tl_calls = bool(options.get("tl_calls", False))
    records.append(DictEntry(model, STATE, state, "model"))
    register_kernel()
    apply_all(records)
    return given


def uninstall(model, force=False):
    """Remove everything tlshim added, last change first; the model is then exactly as before install.

    Every slot is checked before anything changes: if something else replaced one of tlshim's
    attributes, aliases, wrapped forwards or the class, ConflictError names each and the model stays
    installed. ``force=True`` removes everything that is still tlshim's and warns naming what it left.
    """
    if not is_installed(model):
        warnings.warn("tlshim is not installed on this model; nothing to uninstall", stacklevel=2)
        return model
    state = vars(hf_model(model))[STATE]
    points = state.hook_dict.values()
    busy = foreign_hooks(points)
    if busy:
        raise ConflictError(
            f"{busy} hooks of another thread or asyncio task are active on this model (a run_with_cache, "
            "run_with_hooks or hooks() block still running there); uninstall once those calls have returned"
        )
    sites = {site: None for point in points for site in point._sites}
    conflicts = {record: found for record in state.records if (found := record.conflict())}
    replaced = [found for site in sites if (found := site.conflict())]
    if (conflicts or replaced) and not force:
        raise ConflictError(
            "something else replaced what tlshim installed at: " + "; ".join([*replaced, *conflicts.values()])
            + ". Nothing was changed and tlshim is still installed: undo those changes and uninstall again, "
            "or tlshim.uninstall(model, force=True) to remove everything that is still tlshim's"
        )
    try:
        remove_all([hook for point in points for hook in {*point._hooks, *point.registrations()}])
    except ConflictError:
        if not force:
            raise
    undo_all(state.records, skip=conflicts)
    if force and (conflicts or replaced):
        warnings.warn(
            "tlshim.uninstall(force=True) removed everything that was still tlshim's and left what had been "
            "replaced: " + "; ".join([*replaced, *conflicts.values()]),
            stacklevel=2,
        )
    return model


def _tl_config(model, spec, tokenizer):
    fields = spec.tl_config(model)
    config = model.config
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return TLConfig(
        **{**computed_fields(model, spec, fields), **fields},  # what the spec says wins
        original_architecture=architectures[0],
        model_name=getattr(config, "_name_or_path", "") or "",
        tokenizer_name=getattr(tokenizer, "name_or_path", None),
        **tokenizer_fields(tokenizer, getattr(config, "model_type", None)),
        _model_ref=model,
    )
