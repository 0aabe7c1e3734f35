"""TransformerLens's weight processing done in place on the installed model: ``process_weights`` and
``enable_compatibility_mode`` (TransformerBridge), ``process_weights_`` and ``load_and_process_state_dict``
(HookedTransformer).

The processed TL-named weights come from the state-dict functions of tl_hooked_root (fold_layer_norm,
...), computed in float32 as TransformerLens does; each changed one is written back through the live
weight view it was read from (``attn.W_Q`` is a view of q_proj's weight, of a fused qkv weight's rows,
...), so every layout those views cover is served. Every parameter touched is kept as it was and put
back by ``tlshim.uninstall`` (an added bias removed, an untied unembedding tied again).
"""

from __future__ import annotations

import warnings

import torch

from .spec import get_path, out_width

OPTIONS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases", "refactor_factored_attn_matrices")
#: the HF projection a missing TL bias is created on: (block part, spec attribute)
_BIAS_OWNER = {"b_Q": ("attn", "q_proj"), "b_K": ("attn", "k_proj"), "b_V": ("attn", "v_proj"), "b_O": ("attn", "o_proj"),
               "b_in": ("mlp", "up_proj"), "b_gate": ("mlp", "gate_proj"), "b_out": ("mlp", "down_proj")}
#: buffers a HookedTransformer state dict carries besides its weights (not weights: nothing to load)
_TL_BUFFERS = ("IGNORE", "mask", "rotary_sin", "rotary_cos")


class Originals:
    """The parameters processing changed, as they were before the first change; a journal record whose
    undo (at uninstall, before the rest of tlshim's) puts them back."""

    def __init__(self):
        self.kept = []  # (module, name, original Parameter or None where there was none, data copy or None)
        self.seen = set()

    def keep(self, module, name, data=True):
        param = module._parameters.get(name)
        if (id(module), name) not in self.seen:
            self.seen.add((id(module), name))
            self.kept.append((module, name, param, param.detach().clone() if data and param is not None else None))

    def check(self):
        pass

    def apply(self):
        pass

    def conflict(self):
        return None

    def undo(self):
        self.restore()

    def restore(self):
        with torch.no_grad():
            for module, name, param, data in reversed(self.kept):
                module._parameters[name] = param
                if data is not None:
                    param.copy_(data)
        self.kept, self.seen = [], set()


def resolve(model, requested: dict) -> dict:
    """Each option as it will run: None (TransformerLens's default) is on where this model allows it;
    True where it cannot apply raises, naming why."""
    out, skipped = {}, []
    for option, value in requested.items():
        why = _blocker(model, option) if value or value is None else None
        if value and why:
            raise ValueError(f"{option}=True cannot apply to this model: {why}; pass {option}=False "
                             f"(or leave it out: TransformerLens's default then skips it where it cannot apply)")
        quiet = option == "center_writing_weights" and model.cfg.normalization_type == "RMS"  # TL skips it silently
        if value is None and why and not quiet:
            skipped.append(f"{option} ({why})")
        out[option] = value is not False and not why
    if skipped:
        warnings.warn("weight processing skipped what cannot apply to this model: " + "; ".join(skipped), stacklevel=3)
    return out


def _blocker(model, option) -> str | None:
    spec, cfg = model._tlshim.spec, model.cfg
    if isinstance(cfg.n_heads, (list, tuple)):
        return "its layers have different head counts (per-layer weights); process each layer's weights yourself"
    if option in ("fold_ln", "center_writing_weights"):
        params = model.get_params()
        bare = [l for l in range(cfg.n_layers) if not {f"blocks.{l}.attn.W_Q", f"blocks.{l}.mlp.W_in"} <= set(params)]
        if spec.moe is not None or bare:
            return (f"block {(bare or [0])[0]}'s mixer or MLP (experts, a state-space mixer) has no TransformerLens-named "
                    "weights, so what reads its norm or writes its output cannot be folded or centred")
    attn = next((a for block in model.blocks if (a := getattr(block, "attn", None)) is not None), None)
    if option in ("fold_ln", "fold_value_biases", "refactor_factored_attn_matrices") and attn is not None and _param_of(model, attn.W_Q) is None:
        return "its q/k/v weights are interleaved per head in one projection, which tlshim reads as a copy"
    if option in ("fold_ln", "center_writing_weights") and spec.ln1 and any(getattr(block, "ln1", None) is None for block in model.blocks):
        return "a block reads the residual stream with no pre-norm of its own (ModernBERT's block 0: identity_norm)"
    if option in ("fold_ln", "center_writing_weights") and getattr(cfg, "post_ln", False):
        return "its blocks are post-LN (BERT, BART): each norm reads a sum the sub-layer wrote, not the block's input"
    if option == "fold_ln" and (spec.ln1 is None or spec.ln2 is None):
        return "its blocks have no pre-norms (post-norm only): nothing reads a norm's output linearly"
    if option == "center_writing_weights":
        if cfg.normalization_type != "LN" or spec.ln1 is None or spec.ln2 is None:
            return ("centring the residual stream's writers changes nothing only where every reader is a LayerNorm "
                    f"(this model: {cfg.normalization_type} norms{'' if spec.ln1 and spec.ln2 else ', post-norm blocks'})")
        if spec.embed_out:
            return "its embedding goes through another module before the residual stream"
    if option == "center_unembed" and (cfg.output_logits_soft_cap or -1.0) > 0:
        return "its logits are soft-capped (tanh is not translation invariant)"
    if option == "refactor_factored_attn_matrices":
        if cfg.positional_embedding_type == "rotary":
            return "the QK circuit of a rotary model depends on the positions, so it has no single W_QK"
        if cfg.n_key_value_heads not in (None, cfg.n_heads):
            return "its query heads share key/value heads (GQA), which a per-head refactoring would split"
    return None


def processed(model, options: dict) -> dict:
    """The TL-named weights after TransformerLens's processing, in float32, in TransformerLens's order."""
    sd = {k: v.detach().float() for k, v in model.get_params().items()}
    ln = model.cfg.normalization_type == "LN"
    if options["fold_ln"]:
        sd = model.fold_layer_norm(sd, fold_biases=ln, center_weights=ln)
    if options["center_writing_weights"]:
        sd = model.center_writing_weights(sd)
    if options["center_unembed"]:
        sd = model.center_unembed(sd)
    if options["fold_value_biases"]:
        sd = model.fold_value_biases(sd)
        if options["center_writing_weights"]:
            for l in range(model.cfg.n_layers):
                if f"blocks.{l}.attn.b_O" in sd:
                    sd[f"blocks.{l}.attn.b_O"] = sd[f"blocks.{l}.attn.b_O"] - sd[f"blocks.{l}.attn.b_O"].mean()
    if options["refactor_factored_attn_matrices"]:
        sd = model.refactor_factored_attn_matrices(sd)
    return sd


def _originals(model) -> Originals:
    state = model._tlshim
    found = getattr(state, "originals", None)
    if found is None:
        found = state.originals = Originals()
        state.records.append(found)  # uninstall undoes it first (last in)
    return found


def _owner(model, key):
    """(module holding the TL weight ``key``, its TL attribute name)."""
    path, name = key.rsplit(".", 1)
    if path.startswith("blocks."):
        _, layer, part = path.split(".")
        return getattr(model.blocks[int(layer)], part), name
    return (model if path == "pos_embed" else getattr(model, path)), name


def _live(model, key):
    """The live tensor of TL weight ``key`` (a view of a parameter where the model has one)."""
    module, name = _owner(model, key)
    if name == "b_gate":
        return model._tlshim.spec.mlp_weights(module, "gate")[1]
    return getattr(module, name)


def _param_of(model, tensor):
    """(module, name) of the parameter whose storage ``tensor`` views, or None."""
    if tensor is None:
        return None
    ptr = tensor.untyped_storage().data_ptr()
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.untyped_storage().data_ptr() == ptr:
                return module, name
    return None


def _add_bias(model, key, kept):
    """Create the zero bias a folded value needs on an HF projection that has none (nn.Linear, Conv1D)."""
    spec, (owner, name) = model._tlshim.spec, _owner(model, key)
    if key == "unembed.b_U":
        proj = get_path(model, spec.unembed)
    elif name in _BIAS_OWNER and getattr(spec, _BIAS_OWNER[name][1], None):
        proj = get_path(owner, getattr(spec, _BIAS_OWNER[name][1]))
    else:
        proj = None
    if proj is None or "bias" not in proj._parameters or proj._parameters["bias"] is not None:
        raise ValueError(f"{key}: the processed weights need a bias here and tlshim cannot add one to "
                         f"{type(proj).__name__ if proj is not None else 'this layout'}; process with that option off")
    kept.keep(proj, "bias", data=False)
    proj.bias = torch.nn.Parameter(torch.zeros(out_width(proj), dtype=proj.weight.dtype, device=proj.weight.device))


def _untie(model, kept):
    """Give the unembedding its own weight where it shares the embedding's (TransformerLens unties them)."""
    unembed = get_path(model, model._tlshim.spec.unembed) if model._tlshim.spec.unembed else None
    embed = model.embed
    if unembed is None or isinstance(unembed, torch.nn.Embedding) or unembed is embed:
        raise ValueError("this model's unembedding is its embedding matrix itself (no lm_head module), so W_U "
                         "cannot change without W_E; process with fold_ln, center_writing_weights and center_unembed off")
    kept.keep(unembed, "weight", data=False)
    unembed.weight = torch.nn.Parameter(unembed.weight.detach().clone(), requires_grad=unembed.weight.requires_grad)


def write(model, sd: dict, kept: Originals):
    """Write each TL-named weight of ``sd`` that differs from the model's into the model, in place."""
    with torch.no_grad():
        changed = [k for k in ("embed.W_E", "unembed.W_U") if k in sd and not _same(_live(model, k), sd[k])]
        if changed and model.W_E.untyped_storage().data_ptr() == model.W_U.untyped_storage().data_ptr():
            _untie(model, kept)
        for key, value in sd.items():
            if key.endswith((".w", ".b")):
                continue
            live = _live(model, key)
            if key.rsplit(".", 1)[1] in ("W_K", "W_V", "b_K", "b_V") and live.shape[0] != value.shape[0]:
                value = _ungroup(key, value, live.shape[0])
            if _same(live, value):
                continue
            if _param_of(model, live) is None and key.rsplit(".", 1)[1].startswith("b_"):
                _add_bias(model, key, kept)
                live = _live(model, key)
            found = _param_of(model, live)
            if found is None or live.shape != value.shape:
                raise ValueError(f"{key}: tlshim reads this weight as a copy of the model's layout, not a view of "
                                 "its parameter, so it cannot write it back; this model's weights cannot be processed")
            kept.keep(*found)
            live.copy_(value.to(live.dtype))


def _same(live, value) -> bool:
    if live is None:
        return not bool(value.any())
    return live.shape == value.shape and torch.equal(live, value.to(live.dtype))


def _ungroup(key, value, n_kv):
    """A GQA key/value weight given per query head, back to the model's key/value heads (the copies must agree)."""
    grouped = value.unflatten(0, (n_kv, value.shape[0] // n_kv))
    if not torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
        raise ValueError(f"{key}: the query heads sharing a key/value head were given different values; "
                         "this model keeps one copy per key/value head")
    return grouped[:, 0]


def _norms(model):
    """Every pre-norm and the final norm (a shared norm once)."""
    found = [m for block in model.blocks for m in (getattr(block, "ln1", None), getattr(block, "ln2", None))]
    found.append(model.ln_final)
    return list({id(m): m for m in found if m is not None}.values())


def set_norm(model, module, w, b, kept):
    """Make ``module`` multiply by ``w`` and add ``b`` (None: leave it), whatever way it stores its weight."""
    effective = model._tlshim.spec.norm.effective_weight
    with torch.no_grad():
        for name, value in (("weight", w), ("bias", b)):
            param = module._parameters.get(name)
            if value is None or param is None:
                if value is not None and bool((value != (1 if name == "weight" else 0)).any()):
                    raise ValueError(f"{type(module).__name__} has no {name} to set")
                continue
            kept.keep(module, name)
            param.copy_(value)
            if name == "weight" and not torch.equal(effective(module), param):
                param.copy_(value - 1)  # a (1 + weight) norm (Gemma)


def process_in_place(model, options: dict, loaded: dict | None = None):
    """Load ``loaded`` (TL-named weights) where given, then process with the resolved ``options``."""
    unreadable = next((n for n, p in model.named_parameters() if p.device.type == "meta" or not p.is_floating_point()), None)
    if unreadable:
        raise ValueError(f"cannot process the weights: {unreadable} is offloaded (meta) or quantized; load the model "
                         "with its weights in memory, in a float dtype")
    kept = _originals(model)
    try:
        if loaded is not None:
            load(model, loaded, kept)
        write(model, processed(model, options), kept)
        if options["fold_ln"]:
            for norm in _norms(model):
                w = model._tlshim.spec.norm.effective_weight(norm)
                set_norm(model, norm, None if w is None else torch.ones_like(w),
                         None if getattr(norm, "bias", None) is None else torch.zeros_like(norm.bias), kept)
    except Exception as err:
        kept.restore()
        model._tlshim.processed = None
        err.add_note("tlshim: the model's weights are back as they were before any processing")
        raise


def load(model, state_dict: dict, kept: Originals):
    """Write a TransformerLens-named state dict (HookedTransformer's or get_params()'s names) into the model."""
    known = model.get_params()
    weights, norms = {}, {}
    for key, value in state_dict.items():
        base = key.replace("._W_", ".W_").replace("._b_", ".b_")  # HookedTransformer's GQA key/value names
        if key.rsplit(".", 1)[1] in _TL_BUFFERS or ".hook_" in key:
            continue
        if base not in known:
            raise KeyError(f"load_and_process_state_dict: {key!r} is not a TransformerLens weight of this model "
                           f"(expected names such as {', '.join(list(known)[:4])}, ...: see model.get_params())")
        (norms if base.endswith((".w", ".b")) else weights)[base] = value.detach()
    write(model, weights, kept)
    for key, value in norms.items():
        module, name = _owner(model, key)
        set_norm(model, module, value if name == "w" else None, value if name == "b" else None, kept)


class ProcessWeightsAPI:
    """The TransformerLens names of in-place weight processing on an installed model."""

    @property
    def compatibility_mode(self) -> bool:
        """True once ``enable_compatibility_mode`` ran (TransformerBridge's flag)."""
        return getattr(self._tlshim, "compatibility_mode", False)

    def process_weights(self, verbose=False, fold_ln=None, center_writing_weights=None, center_unembed=None,
                        fold_value_biases=None, refactor_factored_attn_matrices=False):
        """TransformerBridge's ``process_weights``, in place on the model's own parameters (see the README);
        an option left None runs where this model allows it, as TransformerLens's default True does."""
        if getattr(self._tlshim, "processed", None) is not None:
            warnings.warn(f"process_weights already ran on this model ({self._tlshim.processed}); skipping it "
                          "(tlshim.uninstall gives the original weights back)", stacklevel=2)
            return
        requested = dict(zip(OPTIONS, (fold_ln, center_writing_weights, center_unembed, fold_value_biases,
                                        refactor_factored_attn_matrices)))
        options = resolve(self, requested)
        process_in_place(self, options)
        self._tlshim.processed = {k: v for k, v in options.items() if v}
        if verbose:
            print(f"processed {self.cfg.model_name or type(self).__name__}: {', '.join(self._tlshim.processed) or 'nothing'}")

    def process_weights_(self, fold_ln=None, center_writing_weights=None, center_unembed=None,
                         refactor_factored_attn_matrices=False):
        """HookedTransformer's in-place processing (value biases folded too, as there)."""
        self.process_weights(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                             center_unembed=center_unembed, refactor_factored_attn_matrices=refactor_factored_attn_matrices)

    def enable_compatibility_mode(self, disable_warnings=False, no_processing=False, fold_ln=None,
                                  center_writing_weights=None, center_unembed=None, fold_value_biases=None,
                                  refactor_factored_attn_matrices=False):
        """TransformerBridge's compatibility mode: ``process_weights`` with these options (none with
        ``no_processing``); tlshim's hook names are TransformerLens's already."""
        if not no_processing:
            self.process_weights(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                 center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                                 refactor_factored_attn_matrices=refactor_factored_attn_matrices)
        self._tlshim.compatibility_mode = True

    def load_and_process_state_dict(self, state_dict, fold_ln=None, center_writing_weights=None, center_unembed=None,
                                    fold_value_biases=None, refactor_factored_attn_matrices=False):
        """Write a TransformerLens-named state dict (``get_params()``'s names, or HookedTransformer's
        ``state_dict()``) into the model's own parameters, then process them as ``process_weights`` does."""
        requested = dict(zip(OPTIONS, (fold_ln, center_writing_weights, center_unembed, fold_value_biases,
                                        refactor_factored_attn_matrices)))
        options = resolve(self, requested)
        process_in_place(self, options, loaded=state_dict)
        self._tlshim.processed = {k: v for k, v in options.items() if v}
