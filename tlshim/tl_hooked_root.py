"""HookedRootModule / TransformerBridge housekeeping on an installed model: hook bookkeeping
(add_caching_hooks, list_hooks, mod_dict, ...), the embedding entry (input_to_embed, W_pos), TL-named
parameters and the per-layer views of hybrid-model helpers. Methods only: nothing on the forward path.
"""

from __future__ import annotations

import contextvars

import torch

from .factored import factored
from .spec import get_path
from .tl_switches import canonical, check_named, default_cache_filter

#: how many ``model.hooks()`` blocks (run_with_hooks, run_with_cache) the calling thread / task is inside
HOOKS_LEVEL: contextvars.ContextVar = contextvars.ContextVar("tlshim_hooks_level", default=0)
_ATTN = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")
_MLP = ("W_in", "W_gate", "W_out", "b_in", "b_out")
_NORM = ("w", "b")


def _optional(obj, name):
    """``obj.name``, or None where this model has no such weight (a bias-free projection)."""
    try:
        return getattr(obj, name, None)
    except (ValueError, NotImplementedError):
        return None


class HookedRootAPI:
    # -- hook bookkeeping ----------------------------------------------------------------------

    def add_perma_hook(self, name, hook, dir="fwd"):
        """``add_hook(..., is_permanent=True)``: survives ``reset_hooks()`` unless ``including_permanent=True``."""
        return self.add_hook(name, hook, dir=dir, is_permanent=True)

    def add_caching_hooks(self, names_filter=None, incl_bwd=False, device=None, remove_batch_dim=False, cache=None):
        """Add model-wide hooks (until ``reset_hooks``) that store the named activations of every forward
        in ``cache``; returns the cache dict (filled when the model runs). By default run_with_cache's names."""
        names_filter = default_cache_filter(self.cfg) if names_filter is None else names_filter
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        for dir, pairs in (("fwd", fwd), ("bwd", bwd)):
            for name, fn in pairs:
                self.add_hook(name, fn, dir=dir)
        return cache

    def check_hooks_to_add(self, hook_point, hook_point_name, hook, dir="fwd", is_permanent=False, prepend=False):
        """Raise for a hook on a point a switch turns off (it would never fire); TL's override point."""
        check_named(self.cfg, canonical(hook_point_name))

    def check_and_add_hook(self, hook_point, hook_point_name, hook, dir="fwd", is_permanent=False, level=None, prepend=False):
        """``check_hooks_to_add``, then add ``hook`` to ``hook_point`` (model-wide)."""
        if level is not None:
            raise ValueError("tlshim keeps no hook levels: scoped hooks belong to model.hooks(...) and end with "
                             "its block; pass level=None")
        self.check_hooks_to_add(hook_point, hook_point_name, hook, dir, is_permanent, prepend)
        return hook_point.add_hook(hook, dir=dir, is_permanent=is_permanent, prepend=prepend)

    @property
    def is_caching(self) -> bool:
        """Whether model-wide caching hooks (cache_all, cache_some, add_caching_hooks) are attached, until reset_hooks."""
        points = self._tlshim.hook_dict.values()
        return any(getattr(hook.fn, "tlshim_caching", False) and not hook.removed for point in points for hook in point._hooks)

    def move_model_modules_to_device(self):
        """HookedTransformer's: every module onto ``cfg.device`` (where the model's first parameter is)."""
        if getattr(self, "hf_device_map", None):
            raise ValueError("this model was placed by accelerate (hf_device_map): its hooks move the weights; "
                             "moving the modules would break them. Load it without a device_map to move it")
        self.to(torch.device(self.cfg.device))

    def clear_contexts(self):
        """Empty every hook point's ``ctx`` dict."""
        for point in self._tlshim.hook_dict.values():
            point.clear_context()

    def get_hook_point(self, hook_name):
        """The HookPoint of a name (TransformerLens or HF alias), or None where there is none."""
        return self._tlshim.hook_dict.get(canonical(hook_name))

    def list_hooks(self, name_filter=None, dir="both", including_permanent=True):
        """{hook name: its hooks} for every point that has one (the calling thread's scoped hooks included)."""
        if name_filter is None:
            accept = lambda name: True  # noqa: E731
        elif isinstance(name_filter, str):
            accept = canonical(name_filter).__eq__
        elif callable(name_filter):
            accept = name_filter
        else:
            accept = {canonical(name) for name in name_filter}.__contains__
        found = {}
        for name, point in self._tlshim.hook_dict.items():
            hooks = [h for h in point.registrations(dir) if including_permanent or not h.permanent]
            if hooks and accept(name):
                found[name] = hooks
        return found

    @property
    def mod_dict(self) -> dict:
        """Every named module (HF names) and every hook point (TransformerLens names): name -> object."""
        return {**{name: module for name, module in self.named_modules() if name}, **self._tlshim.hook_dict}

    @property
    def hook_aliases(self) -> dict:
        """{TransformerBridge's spelling: the hook_dict name it resolves to} (``blocks.i.attn.hook_q_input``
        and the other attention-input names, which TransformerLens 3 keeps on the block)."""
        aliases = {}
        for name in self._tlshim.hook_dict:
            block, _, hook = name.rpartition(".")
            if block and canonical(f"{block}.attn.{hook}") == name:
                aliases[f"{block}.attn.{hook}"] = name
        return aliases

    @property
    def context_level(self) -> int:
        """How deep the calling thread / asyncio task is in ``hooks()`` blocks (run_with_hooks and
        run_with_cache open one): 0 outside (TransformerLens counts per model, tlshim's hooks are per thread)."""
        return HOOKS_LEVEL.get()

    def block_hooks(self, layer_idx):
        """Sorted hook names of block ``layer_idx``, relative to the block (``"attn.hook_z"``, ...)."""
        prefix = f"blocks.{layer_idx}."
        return sorted(name[len(prefix):] for name in self._tlshim.hook_dict if name.startswith(prefix))

    # -- the model as a whole ------------------------------------------------------------------

    @property
    def original_model(self):
        """The HuggingFace model: tlshim patches it in place, so it is the model itself."""
        return self

    @property
    def n_params_total(self) -> int:
        """The number of parameters (tied ones counted once, as ``model.parameters()`` yields them)."""
        return sum(p.numel() for p in self.parameters())

    def hf_generate(self, *args, **kwargs):
        """HuggingFace's own ``generate`` (``model.generate`` takes TransformerLens's arguments too)."""
        for cls in type(self).__mro__[1:]:
            if "generate" in vars(cls) and not cls.__module__.startswith("tlshim"):
                return vars(cls)["generate"](self, *args, **kwargs)
        raise TypeError(f"{type(self).__name__} has no HuggingFace generate")

    def generate_stream(self, input="", max_new_tokens=10, max_tokens_per_yield=25, stop_at_eos=True, eos_token_id=None,
                        do_sample=True, top_k=None, top_p=None, temperature=1.0, freq_penalty=0.0,
                        use_past_kv_cache=True, prepend_bos=None, padding_side=None, return_type="input", verbose=False):
        """Yield the generated tokens in batches of up to ``max_tokens_per_yield`` (the first with the prompt),
        sampled as ``generate`` samples; the HF forward runs each step, with its KV cache."""
        from .tl_generate import stream

        return stream(self, input, max_new_tokens, max_tokens_per_yield, stop_at_eos, eos_token_id, do_sample,
                      top_k, top_p, temperature, freq_penalty, use_past_kv_cache, prepend_bos, padding_side)

    @staticmethod
    def list_supported_models(architecture=None, verified_only=False):
        """The HF model types tlshim serves (by architecture, not hub ids): those with a spec and those
        the sweep verified on this transformers version (``verified_only``: the latter); ``architecture``
        keeps one model type."""
        from . import registry

        types = set(registry.verified_types())
        if not verified_only:
            types |= {t for t in registry.ARCHITECTURES if registry.spec_in_range(t) is not None}
        return sorted(t for t in types if architecture is None or t == architecture)

    @staticmethod
    def check_model_support(model_id):
        """{"is_supported", "architecture_id" (the model type), "status" (the sweep's), "suggestion"} for a
        model type or a local checkpoint directory (its config.json; no hub is asked)."""
        import os

        from . import registry

        model_type = model_id
        if os.path.isdir(model_id):
            from transformers import AutoConfig

            model_type = AutoConfig.from_pretrained(model_id, local_files_only=True).model_type
        status = registry.sweep_results().get(model_type, {}).get("status")
        spec = model_type in registry.ARCHITECTURES and registry.spec_in_range(model_type) is not None
        supported = spec or status == "verified"
        return {"is_supported": supported, "architecture_id": model_type, "status": "spec" if spec and status is None else status,
                "suggestion": None if supported else "tlshim.install(model) tries the structural path and says why it refuses"}

    @property
    def rotary_emb(self):
        """The model's rotary position embedding module (HF's ``rotary_emb``)."""
        found = next((m for name, m in self.named_modules() if name.rsplit(".", 1)[-1] == "rotary_emb"), None)
        if found is None:
            raise ValueError(f"rotary_emb: this model has no rotary embedding module "
                             f"(positional_embedding_type={self.cfg.positional_embedding_type!r})")
        return found

    def mps(self):
        """The model moved to Apple's MPS device (TransformerLens warns results there may be wrong)."""
        return self.to(torch.device("mps"))

    def set_tokenizer(self, tokenizer, default_padding_side=None):
        """Use ``tokenizer`` for to_tokens, to_string and string inputs from now on."""
        from transformers import PreTrainedTokenizerBase

        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"set_tokenizer takes a HuggingFace tokenizer, got {type(tokenizer).__name__}")
        if default_padding_side not in ("right", "left", None):
            raise ValueError(f"default_padding_side must be 'right', 'left' or None, got {default_padding_side!r}")
        if default_padding_side is not None:
            tokenizer.padding_side = default_padding_side
        self._tlshim.tokenizer = tokenizer

    @property
    def real_components(self) -> dict:
        """{TransformerLens component name: (its HF module path, the module; the layers' list for "blocks")}."""
        spec = self._tlshim.spec
        paths = {"embed": spec.embed, "pos_embed": spec.pos_embed, "blocks": spec.layers,
                 "ln_final": spec.final_norm, "unembed": spec.unembed}
        found = {name: (path, get_path(self, path)) for name, path in paths.items() if path}
        found["blocks"] = (spec.layers, list(found["blocks"][1]))
        return found

    # -- layers ---------------------------------------------------------------------------------

    def blocks_with(self, submodule):
        """[(layer index, block)] of the blocks that have ``submodule`` ("attn", "mlp", "ln1", ...)."""
        return [(i, block) for i, block in enumerate(self.blocks) if _optional(block, submodule) is not None]

    def block_submodules(self, layer_idx):
        """The TransformerLens-named submodules block ``layer_idx`` has."""
        block = self.blocks[layer_idx]
        return [name for name in ("ln1", "attn", "ln2", "mlp") if _optional(block, name) is not None]

    def layer_types(self):
        """Per block, its attention and MLP kind: "attn+mlp" for every layer of the models tlshim serves."""
        return ["+".join(n for n in ("attn", "mlp") if _optional(block, n) is not None) or "unknown" for block in self.blocks]

    def composition_layer_indices(self):
        """The layer index of each attention layer (the rows of ``all_composition_scores``)."""
        return [i for i, _ in self.blocks_with("attn")]

    @property
    def attn_head_labels(self):
        """``L{layer}H{head}`` for every head of every attention layer."""
        return [f"L{l}H{h}" for l in self.composition_layer_indices() for h in range(self.cfg.n_heads)]

    def stack_params_for(self, submodule, attr_path, reshape_fn=None):
        """(layer indices, the weight ``attr_path`` of each block having ``submodule``, stacked)."""
        matching = self.blocks_with(submodule)
        if not matching:
            raise ValueError(f"no block has a submodule {submodule!r}; blocks have {self.block_submodules(0)}")
        weights = []
        for i, block in matching:
            weight = get_path(block, attr_path)
            if weight is None:
                raise AttributeError(f"blocks[{i}].{attr_path} is None: this model has no such weight (bias-free)")
            weights.append(weight if reshape_fn is None else reshape_fn(weight))
        return [i for i, _ in matching], torch.stack(weights)

    def QK_for_attn_layers(self):
        """(attention layer indices, their QK circuit as a FactoredMatrix)."""
        indices, W_Q = self.stack_params_for("attn", "attn.W_Q")
        return indices, factored(W_Q, self._expand_kv(self.stack_params_for("attn", "attn.W_K")[1]).transpose(-2, -1))

    def OV_for_attn_layers(self):
        """(attention layer indices, their OV circuit as a FactoredMatrix)."""
        indices, W_V = self.stack_params_for("attn", "attn.W_V")
        return indices, factored(self._expand_kv(W_V), self.stack_params_for("attn", "attn.W_O")[1])

    # -- TransformerLens-named weights -----------------------------------------------------------

    def get_params(self) -> dict:
        """{TransformerLens name: weight} as TransformerBridge gives them (the model's own tensors; GQA
        key/value heads repeated for their query heads; weights this model lacks, e.g. absent biases, left out)."""
        params = {"embed.W_E": self.W_E}
        if self._tlshim.spec.pos_embed and self._learned_pos() is not None:
            params["pos_embed.W_pos"] = self.W_pos
        for i, block in enumerate(self.blocks):
            for part, names in (("ln1", _NORM), ("attn", _ATTN), ("ln2", _NORM), ("mlp", _MLP)):
                module = _optional(block, part)
                for name in names if module is not None else ():
                    value = _optional(module, name)
                    if value is not None:
                        if name in ("W_K", "W_V", "b_K", "b_V") and value.shape[0] != self.cfg.n_heads:
                            value = value.repeat_interleave(self.cfg.n_heads // value.shape[0], dim=0)
                        params[f"blocks.{i}.{part}.{name}"] = value
        for owner, names in (("ln_final", _NORM), ("unembed", ("W_U", "b_U"))):
            module = _optional(self, owner)
            for name in names if module is not None else ():
                value = _optional(module, name)
                if value is not None:
                    params[f"{owner}.{name}"] = value
        return params

    def tl_parameters(self) -> dict:
        """``get_params()``: TransformerLens-named weights (``model.parameters()`` stays HF's)."""
        return self.get_params()

    def tl_named_parameters(self):
        """An iterator of (TransformerLens name, weight)."""
        return iter(self.get_params().items())

    # -- TransformerLens's weight processing, on a TL-named state dict (the model is left as it is) ----
    # Each takes a dict such as get_params() gives, replaces entries with new tensors (never writing
    # into the model's own) and returns it; from_pretrained_no_processing is the only way tlshim loads.

    def fill_missing_keys(self, state_dict):
        """``state_dict`` with every TransformerLens name it lacks filled in with this model's weight."""
        return {**self.get_params(), **state_dict}

    def fold_layer_norm(self, state_dict, fold_biases=True, center_weights=True):
        """Fold each norm's weight (and bias, with ``fold_biases``) into the weights reading its output and
        drop the norm's entries; ``center_weights`` makes those weights' d_model rows sum to zero (right only
        after a LayerNorm, which centers; pass False for RMSNorm models, as in TransformerLens)."""
        sd = dict(state_dict)
        readers = [(f"blocks.{l}.{ln}", f"blocks.{l}.{part}", names) for l in range(self.cfg.n_layers)
                   for ln, part, names in (("ln1", "attn", ("Q", "K", "V")), ("ln2", "mlp", ("in", "gate")))]
        for norm, part, names in readers + [("ln_final", "unembed", ("U",))]:
            w, b = sd.pop(f"{norm}.w", None), sd.pop(f"{norm}.b", None)
            if norm == "ln_final" and w is None:  # TransformerLens leaves W_U alone after a weight-free final norm
                continue
            for n in names:
                key, bias = f"{part}.W_{n}", f"{part}.b_{n}"
                if key not in sd:
                    continue
                W = sd[key]  # (..., d_model, out): d_model is dim -2 for every reader
                if fold_biases and b is not None:
                    sd[bias] = sd.get(bias, 0) + (b[:, None] * W).sum(-2)
                W = W if w is None else W * w[:, None]
                sd[key] = W - W.mean(-2, keepdim=True) if center_weights else W
        return sd

    def center_writing_weights(self, state_dict):
        """Subtract from each weight writing to the residual stream (W_E, W_pos, W_O, W_out and their
        biases) its mean over d_model."""
        sd = dict(state_dict)
        writers = ["embed.W_E", "pos_embed.W_pos"] + [f"blocks.{l}.{n}" for l in range(self.cfg.n_layers)
                                                      for n in ("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out")]
        for key in writers:
            if key in sd:
                sd[key] = sd[key] - sd[key].mean(-1, keepdim=True)
        return sd

    def center_unembed(self, state_dict):
        """Subtract from W_U (and b_U) its mean over the vocabulary (softmax is unchanged)."""
        sd = dict(state_dict)
        for key in ("unembed.W_U", "unembed.b_U"):
            if key in sd:
                sd[key] = sd[key] - sd[key].mean(-1, keepdim=True)
        return sd

    def fold_value_biases(self, state_dict):
        """Move b_V into b_O (sum over heads of b_V @ W_O; each pattern row sums to 1) and zero b_V."""
        sd = dict(state_dict)
        for l in range(self.cfg.n_layers):
            b_V, W_O = sd.get(f"blocks.{l}.attn.b_V"), sd.get(f"blocks.{l}.attn.W_O")
            if b_V is None or W_O is None:
                continue
            folded = (b_V[..., None] * W_O).sum((0, 1))
            sd[f"blocks.{l}.attn.b_O"] = sd.get(f"blocks.{l}.attn.b_O", 0) + folded
            sd[f"blocks.{l}.attn.b_V"] = torch.zeros_like(b_V)
        return sd

    def refactor_factored_attn_matrices(self, state_dict):
        """Refactor each head's W_Q, W_K (with their biases) and W_V, W_O by the SVD of W_QK and W_OV:
        W_Q = U S^1/2, W_K = V S^1/2 (biases as an extra input row), W_V = U S, W_O = V^T; b_V moves to b_O."""
        if self.cfg.positional_embedding_type == "rotary":
            raise ValueError("refactor_factored_attn_matrices: the QK circuit of a rotary model depends on the "
                             "positions of query and key, so it has no single W_QK to refactor")
        sd = self.fold_value_biases(state_dict)
        for l in range(self.cfg.n_layers):
            key = f"blocks.{l}.attn."
            W_Q, W_K = sd[key + "W_Q"], sd[key + "W_K"]
            b_Q = sd.get(key + "b_Q", torch.zeros(W_Q.shape[0], W_Q.shape[-1], dtype=W_Q.dtype))
            b_K = sd.get(key + "b_K", torch.zeros(W_K.shape[0], W_K.shape[-1], dtype=W_K.dtype))
            U, S, V = factored(torch.cat([W_Q, b_Q[:, None]], 1), torch.cat([W_K, b_K[:, None]], 1).transpose(-2, -1)).svd()
            Q, K = U * S.sqrt()[:, None], V * S.sqrt()[:, None]
            sd[key + "W_Q"], sd[key + "b_Q"], sd[key + "W_K"], sd[key + "b_K"] = Q[:, :-1], Q[:, -1], K[:, :-1], K[:, -1]
            U, S, V = factored(sd[key + "W_V"], sd[key + "W_O"]).svd()
            sd[key + "W_V"], sd[key + "W_O"] = U * S[:, None], V.transpose(-2, -1)
        return sd

    @staticmethod
    def from_pretrained_no_processing(model_name, *model_args, **kwargs):
        """``tlshim.from_pretrained``: HF loads the checkpoint, tlshim installs (weights are never processed)."""
        from .loading import from_pretrained

        return from_pretrained(model_name, *model_args, **kwargs)

    @staticmethod
    def boot_transformers(model_name, hf_config_overrides=None, device=None, dtype=torch.float32, tokenizer=None,
                          hf_model=None, **from_pretrained_kwargs):
        """A model with tlshim installed: ``hf_model`` as it is (installed in place), else ``model_name``
        loaded by ``tlshim.from_pretrained`` (a local path or the HF cache; config fields from
        ``hf_config_overrides``), moved to ``device`` and ``dtype``."""
        if hf_model is None:
            from .loading import from_pretrained

            hf_model = from_pretrained(model_name, install=False, **(hf_config_overrides or {}), **from_pretrained_kwargs)
            hf_model.to(device=device, dtype=dtype)
        from .install import install

        return install(hf_model, tokenizer=tokenizer)

    # -- the embedding entry ---------------------------------------------------------------------

    def _learned_pos(self):
        """The learned absolute position table (n_ctx, d_model), or None (a sinusoidal one has no weight)."""
        module = get_path(self, self._tlshim.spec.pos_embed)
        weight = next((p for p in module.parameters() if p.dim() == 2), None)
        if weight is not None and weight.shape[0] == self.cfg.n_ctx + 2:  # OPT numbers positions from 2
            weight = weight[2:]
        return weight

    @property
    def W_pos(self):
        """The learned absolute position embedding (n_ctx, d_model)."""
        kind = self.cfg.positional_embedding_type
        if not self._tlshim.spec.pos_embed:
            raise ValueError(f"W_pos: this model has no position embedding table (positional_embedding_type={kind!r}: "
                             "positions enter inside attention); W_E is its whole input basis")
        weight = self._learned_pos()
        if weight is None:
            raise ValueError(f"W_pos: this model's positions are a fixed {kind} function with no weight table")
        return weight

    @property
    def W_E_pos(self):
        """``[W_E; W_pos]`` (d_vocab + n_ctx, d_model): the full input basis of an absolute-position model."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    def get_pos_offset(self, past_kv_cache, batch_size):
        """The number of positions ``past_kv_cache`` already holds (0 without one)."""
        if past_kv_cache is None:
            return 0
        if hasattr(past_kv_cache, "get_seq_length"):
            return int(past_kv_cache.get_seq_length())
        raise TypeError(f"get_pos_offset takes a transformers Cache or None, got {type(past_kv_cache).__name__}")

    def get_residual(self, embed, pos_offset, prepend_bos=None, attention_mask=None, tokens=None,
                     return_shortformer_pos_embed=True, device=None):
        """The residual entering block 0 from the token embedding ``embed`` (batch, pos, d_model): with the
        learned position rows from ``pos_offset`` added on an absolute-position model, as it is otherwise."""
        residual = embed
        if self._tlshim.spec.pos_embed:
            residual = embed + self.W_pos[pos_offset:pos_offset + embed.shape[1]].to(embed)
        return (residual, None) if return_shortformer_pos_embed else residual

    def input_to_embed(self, input, prepend_bos=None, padding_side=None, attention_mask=None, past_kv_cache=None):
        """(residual entering block 0 = ``blocks.0.hook_resid_pre``, tokens, None, attention_mask); resume
        with ``model(residual, start_at_layer=0)``."""
        if isinstance(input, (str, list)):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        elif torch.is_tensor(input) and not input.is_floating_point():
            tokens = input[None] if input.dim() == 1 else input
        else:
            raise TypeError(f"input_to_embed takes a string, a list of strings or token ids, got {type(input).__name__}")
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        if past_kv_cache is not None:
            kwargs["past_kv_cache"] = past_kv_cache
        residual = self(tokens, stop_at_layer=0, **kwargs)
        return residual, tokens, None, attention_mask

