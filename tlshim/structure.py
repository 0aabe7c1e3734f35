"""Derive a spec from the live module tree, for a model type that no patch module names.

What the names of modules say is only a first guess (the tables below are data); every role is
then checked on one short probing forward that stops after the first block: which norm reads the
block input, which feeds the MLP, which one follows attention or the MLP (a post-norm), whether
the residual adds up, what the norm computes (RMS, Gemma's (1 + w), LayerNorm, weight-free RMS),
what the q/k norms see (one head, heads first, or the whole projection) and whether the embedding
output enters the first block as it is or scaled. A model whose blocks are not all sequential
pre-norm (or post-norm-only, OLMo2) blocks with q/k/v/o projections (separate, or fused with all q
heads, then k, then v) and a dense MLP raises UnsupportedModelError naming the part that did not fit;
so does one with a part its hooks cannot serve (UNSERVED_ATTENTION, UNSERVED_MLP).
``tlshim.verify`` then checks every hook on a whole forward.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect

import torch
from torch import nn

from . import attention_output, family_abs, family_mixer, family_mla, family_moe, family_postln, identity_norm, inline_attention, norms, shared_norm
from . import family_parallel as parallel
from .attention import AttnSite
from .errors import UnsupportedModelError
from .inline_attention import InlineAttnSite
from .legacy_attention import LegacyAttnSite
from .sites import HeadsFirstSite, Site
from .spec import ArchSpec, fused_gate_up_params, fused_qkv_params, get_path, is_conv1d, linear_params, mlp_linear_params, out_width

#: child names, tried in order (attention and MLP modules of one decoder layer)
ATTENTION = ("self_attn", "attn", "attention", "self_attention")
MLP = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
#: config fields holding an expert's width, in order (DBRX keeps it in its ffn_config)
EXPERT_WIDTHS = ("moe_intermediate_size", "intermediate_size", "ffn_config.ffn_hidden_size")
#: (q, k, v, o) projection names inside the attention module
PROJECTIONS = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q_proj", "k_proj", "v_proj", "out_proj"),
    ("wq", "wk", "wv", "wo"),
    ("q_proj", "k_proj", "v_proj", "dense"),
    ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.out_proj"),  # GPT-Neo's wrapper
    ("q_proj.linear", "k_proj.linear", "v_proj.linear", "o_proj.linear"),  # Moshi's wrapper
    ("self.query", "self.key", "self.value", "output.dense"),  # BERT's self-attention and its output module
    ("q_proj", "k_proj", "v_proj", "Wo"),  # ModernBERT's decoder
)
#: (qkv, o) of a fused projection holding all q heads, then k heads, then v heads (Phi-3, MPT, GPT-2's c_attn)
#: (then those whose heads come in groups: family_parallel.GROUPED_QKV, GPT-NeoX's, BLOOM's, Falcon's)
FUSED_QKV = (("qkv_proj", "o_proj"), ("Wqkv", "out_proj"), ("c_attn", "c_proj"), *parallel.GROUPED_QKV)
#: (gate_up, down) of a fused projection holding the gate half, then the up half (Phi-3, GLM-4)
FUSED_GATE_UP = (("gate_up_proj", "down_proj"), ("Wi", "Wo"))
#: (gate, up, down) of a gated MLP, then (up, down) of a plain one
GATED = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
PLAIN = (("up_proj", "down_proj"), ("fc1", "fc2"), ("c_fc", "c_proj"), ("fc_in", "fc_out"), ("dense_h_to_4h", "dense_4h_to_h"), ("key", "value"))
#: per-head (q, k) norms inside the attention module
QK_NORMS = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"))
#: a norm of the value heads inside the attention module (Gemma 4)
V_NORMS = ("v_norm",)
#: module-level functions of a Llama-derived attention from before the registry (legacy_attention.py)
LEGACY_ATTENTION = ("apply_rotary_pos_emb", "repeat_kv")
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")
#: modules or parameters of the attention module, then of the MLP, that change what their hooks would
#: hold, so the structural path refuses them (name: what it is); a family that serves one drops it here
UNSERVED_ATTENTION = {
    "lambda_q1": "differential attention (two softmax maps subtracted, then a group norm: DiffLlama)",
}
UNSERVED_MLP: dict = {}
#: the norm kinds a probed norm is matched against, in order
NORM_KINDS = (norms.RMS, norms.OFFSET_RMS, norms.LAYER, norms.BARE_RMS, norms.OFFSET_LAYER)


class _ProbeDone(Exception):
    pass


def derive_spec(model) -> ArchSpec:
    """An ArchSpec for ``model`` read from its modules and one probing forward (see the module doc);
    where that does not fit, one of post-LN blocks (family_postln) if the model has them."""
    try:
        return _derive_pre_norm(model)
    except UnsupportedModelError:
        spec = family_postln.derive(model)
        if spec is None:
            raise
        return spec


def _derive_pre_norm(model) -> ArchSpec:
    layers_path, layers = _decoder_layers(model)
    mixers = family_mixer.mixer_layers(layers)
    if len(mixers) == len(layers):
        return family_mixer.derive_spec(model, layers_path, layers, mixers)
    # the first attention block (hybrids), past one with an Identity for its pre-norm (identity_norm)
    first = identity_norm.probed_block(layers, [i for i in range(len(layers)) if i not in dict(mixers)])
    layer = layers[first]
    attn_name = _child(layer, ATTENTION, "attention module", layers_path)
    # an MLP whose projections are the layer's own children (OPT, XGLM, BioGPT) is the layer itself
    mlp_name = "" if _names(layer, PLAIN, None, None) else _child(layer, MLP, "MLP module", layers_path)
    attn, mlp = get_path(layer, attn_name), get_path(layer, mlp_name)
    mla = family_mla.detect(attn, model.config)
    q, k, v, o = (mla.q, mla.kv_a, mla.kv_b, mla.o) if mla else _attention_projections(attn, model.config, f"{layers_path}.0.{attn_name}")
    moe = family_moe.detect([get_path(each, mlp_name) for each in layers], model.config, _mlp_projections)
    gate, up, down, d_mlp = _dense_mlp(layers, mlp_name, moe, layers_path, model.config)
    qk_norm = next((pair for pair in QK_NORMS if all(_looks_like_norm(getattr(attn, n, None)) for n in pair)), (None, None))
    _refuse_unserved(attn, UNSERVED_ATTENTION, f"{layers_path}.0.{attn_name}")
    _refuse_unserved(mlp, UNSERVED_MLP, f"{layers_path}.0.{mlp_name}")

    _same_structure_in_every_layer(layers, layers_path, (attn_name, q, k, v, o), (mlp_name, gate, up, down), moe, dict(mixers))
    owner_path = layers_path.rpartition(".")[0]
    flow = _probe(model, layer, get_path(model, owner_path), {"q_norm": getattr(attn, qk_norm[0])} if qk_norm[0] else {})
    _one_stream(flow, layer, layers_path)
    first_flow = _probe(model, layers[0], get_path(model, owner_path), {}) if first else flow
    entry = family_abs.embedding_entry(model, owner_path, first_flow) or {}
    embed_norm = None if entry else identity_norm.embedding_norm(model, layers_path, first_flow)
    roles = _post_norm_roles(layer, flow, attn_name, mlp_name) or _norm_roles(layer, flow, attn_name, mlp_name, layers_path, (o, up, down))
    # own scores and softmax watched whole (family_abs) where positions are absolute or ALiBi is on in a
    # sequential block; a parallel block's attention (Falcon, ALiBi or not) is watched op by op (inline)
    own_scores = not roles.get("parallel") and bool(entry.get("pos_embed") or family_abs.uses_alibi(attn))
    attn_site = _attention_site(model, layer, attn, f"{layers_path}.0.{attn_name}", (q, k, v, o), own_scores)
    attn_site = family_mla.MlaAttnSite if mla and attn_site is AttnSite else attn_site
    first_norm = roles["ln1"] or roles["ln1_post"]
    between = attention_output.detect(attn, mlp, "" if q == k or mla else q, o)  # MLA: q is wider than v by design
    if between:
        where = f"{layers_path}.0.{attn_name}"
        attn_site = _between_kernel_and_o_proj(between, attn_site, flow, layer, (attn_name, mlp_name, first_norm, q, qk_norm[0]), where, model.config)
    norm_kind = _norm_kind(get_path(layer, first_norm), flow, first_norm)
    for role in ("ln2", "ln1_post", "ln2_post"):
        if roles.get(role) and _norm_kind(get_path(layer, roles[role]), flow, roles[role]) is not norm_kind:
            raise UnsupportedModelError(f"the norms of {type(layer).__name__} are of different kinds")
    embed_path = _path_of(model, model.get_input_embeddings(), "input embedding")
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no output embedding module (get_output_embeddings() is None)")
    final_path = _final_norm(model, layers_path, norm_kind, entry.get("embed_out"), flow)
    final_path = identity_norm.head_norm(model, layers_path, final_path) if embed_norm else final_path
    sizes = _sizes(model, len(layers), attn, d_mlp, get_path(layer, first_norm), norm_kind)
    sizes["gated_mlp"] = gate is not None
    sizes["parallel_attn_mlp"] = roles.get("parallel", False)
    sizes["logit_scale"] = _logit_scale(model, layers_path)
    if embed_norm:  # a norm of the embedding before the first block (identity_norm)
        sizes["post_embedding_ln"] = True
    if moe is not None:
        sizes.update(num_experts=moe.n_experts, experts_per_token=moe.top_k)
    if mla is not None:
        sizes.update(mla.cfg_fields())
    grouped = parallel.GROUPED_QKV.get((q, o)) if q == k else None
    spec = ArchSpec(
        versions="",
        layers=layers_path,
        embed=embed_path,
        embed_hook_on_first_layer=not entry and not embed_norm and _embedding_scaled(first_flow),
        embed_out=entry.get("embed_out"),
        pos_embed=entry.get("pos_embed"),
        rotary_hooks=attn_site is not family_abs.SoftmaxAttnSite and not entry.get("pos_embed"),
        mlp_rows=roles.get("mlp_rows", False),
        final_norm=final_path,
        unembed=_path_of(model, unembed, "output embedding"),
        attn=attn_name,
        mlp=mlp_name,
        ln1=roles["ln1"],
        ln2=roles["ln2"],
        ln1_post=roles.get("ln1_post"),
        ln2_post=roles.get("ln2_post"),
        attn_out=roles.get("ln1_post") or roles.get("attn_out") or attn_name,
        mlp_out=roles.get("ln2_post") or roles.get("mlp_out") or mlp_name,
        q_proj=q,
        k_proj=k,
        v_proj=v,
        o_proj=o,
        q_norm=qk_norm[0],
        k_norm=qk_norm[1],
        qk_norm_whole=_qk_norm_whole(flow, sizes["d_head"]),
        qk_norm_after_rotary=q != k and _qk_norm_after_rotary(flow, f"{attn_name}.{q}"),
        v_norm=_v_norm(attn, flow, f"{attn_name}.{v}", attn_name),
        layer_scalar=roles.get("layer_scalar"),
        residual_multiplier=roles.get("residual_multiplier"),
        per_layer_out=roles.get("per_layer_out"),
        qk_norm_site=HeadsFirstSite if _qk_norm_heads_first(flow, sizes["n_heads"]) else Site,
        gate_proj=gate,
        up_proj=up,
        down_proj=down,
        norm=norm_kind,
        head_counts=functools.partial(_same_counts, structural_head_counts(attn, model.config)),
        parallel=roles.get("parallel", False),
        qkv_groups=grouped,
        linear_params=family_mla.params if mla else parallel.grouped_qkv_params if grouped else fused_qkv_params if q == k else _separate_params(between),
        mlp_params=fused_gate_up_params if gate == up else mlp_linear_params,
        tl_config=functools.partial(_structural_cfg, sizes),
        attn_site=attn_site,
        cache_kwargs=tuple(name for name in CACHE_KWARGS if name in _parameters(attn.forward)),
        moe=moe,
        attn_output=between,
        mla=mla,
        mixers=mixers,
        postln=family_postln.PostLn(post=False, embed_norm=embed_norm) if embed_norm else None,
    )
    if mixers:
        spec = dataclasses.replace(spec, mixer_layout=family_mixer.mixer_layout(model, spec, layers, first_flow if first else None))
        sizes["layer_types"] = family_mixer.layer_types(spec, len(layers))
    sizes["positional_embedding_type"] = family_abs.positional_embedding_type(model, spec)
    sizes["use_attn_scale"] = family_abs.scales_scores(attn)
    return spec


def describe(spec) -> str:
    """One line of what the structural path inferred, for the install warning."""
    post = f", post-norms {spec.ln1_post} / {spec.ln2_post}" if spec.ln1_post else ""
    post += "" if spec.ln1 else " only"
    mlp = f"gated ({spec.gate_proj}, {spec.up_proj}, {spec.down_proj})" if spec.gate_proj else f"{spec.up_proj} -> {spec.down_proj}"
    if spec.moe:
        mlp = family_moe.describe(spec.moe) + f" (dense blocks: {mlp})"
    projections = family_mla.describe(spec.mla) if spec.mla else f"{spec.q_proj}/{spec.k_proj}/{spec.v_proj}/{spec.o_proj}"
    attention = f"attention {spec.attn} ({projections})" if spec.attn else "no attention"
    return (
        f"blocks at {spec.layers}, {attention}{family_mixer.describe(spec)}, "
        f"MLP {spec.mlp} {mlp}{' in parallel' if spec.parallel else ''}, norms {spec.ln1} / {spec.ln2}{post} "
        f"({spec.norm.tl_type}), final norm {spec.final_norm}{attention_output.describe(spec.attn_output)}"
    )


def structural_head_counts(attn, config):
    """(query heads, key/value heads, d_head), from the projections' widths."""
    mla = family_mla.detect(attn, config)
    if mla is not None:
        return mla.head_counts()
    d_head = _head_dim(attn, config)
    separate = _names(attn, PROJECTIONS, None, None)
    if separate:
        q, k, _, o = (get_path(attn, name) for name in separate)
        n_heads = out_width(q) // d_head // (2 if attention_output.gives_gate(q, o) else 1)
        return n_heads, out_width(k) // d_head, d_head
    fused = out_width(getattr(attn, _names(attn, FUSED_QKV, None, None)[0])) // d_head
    n_heads = getattr(config, "num_attention_heads", None) or getattr(attn, "num_heads", None) or attn.n_heads
    return n_heads, (fused - n_heads) // 2, d_head


def _same_counts(counts, attn, config):
    """The head counts of every block (the structural path requires them equal), read once from the model's
    config: an attention module need not carry the config (CodeGen before 5.x)."""
    return counts


def _head_dim(attn, config):
    inner = getattr(attn, "attention", None)  # GPT-Neo's wrapper holds the attention module
    value = getattr(attn, "head_dim", None) or getattr(inner, "head_dim", None) or getattr(config, "head_dim", None)
    if value:
        return int(value)
    return config.hidden_size // config.num_attention_heads


def _structural_cfg(found, model):
    """TransformerLens config fields: sizes as the probe found them, the rest from the HF config."""
    config = model.config
    rope = getattr(config, "rope_parameters", None) or {}
    return dict(
        found,
        n_ctx=getattr(config, "max_position_embeddings", None) or -1,
        act_fn=getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or getattr(config, "activation_function", None),
        positional_embedding_type=found.get("positional_embedding_type", "rotary"),
        rotary_base=rope.get("rope_theta", getattr(config, "rope_theta", None)),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        window_size=getattr(config, "sliding_window", None),
        logit_scale=found.get("logit_scale") or getattr(config, "logit_scale", None) or 1.0,
        attn_scores_soft_cap=getattr(config, "attn_logit_softcapping", None) or -1.0,
        output_logits_soft_cap=getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_soft_cap", None) or -1.0,
    )


class _BlocksOutput(dict):
    """A stand-in for the decoder's output: its last hidden state; any other field (router logits) None."""

    def __getattr__(self, name):
        return self.get(name)

    def __getitem__(self, key):
        return list(self.values())[key] if isinstance(key, int) else dict.__getitem__(self, key)


def _logit_scale(model, layers_path):
    """The factor the model's head multiplies the unembedding's output by (Cohere's logit_scale; Granite
    divides by logits_scaling, HyperCLOVA X multiplies by the same field): measured by running the head
    on a stand-in for the blocks' output, since configs name it alike and use it oppositely. None where
    the head is no pure scale (a soft-cap) or cannot run so."""
    owner = get_path(model, layers_path.rpartition(".")[0])
    unembed = model.get_output_embeddings()
    weight = getattr(unembed, "weight", None)
    if owner is model or weight is None or weight.is_meta:
        return None
    hidden = torch.randn(1, 2, weight.shape[-1], generator=torch.Generator().manual_seed(0)).to(weight)
    saved = owner.__dict__.get("forward")  # accelerate keeps its own forward on the instance
    owner.forward = lambda *args, **kwargs: _BlocksOutput(last_hidden_state=hidden)
    try:
        with torch.no_grad():
            logits, plain = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=weight.device), use_cache=False).logits, unembed(hidden)
    except Exception:  # a head this stand-in cannot drive: the config's logit_scale, if any, stands
        return None
    finally:
        if saved is None:
            del owner.forward
        else:
            owner.forward = saved
    if logits.shape != plain.shape:
        return None
    factor = float((logits * plain).sum() / (plain * plain).sum())
    return factor if torch.allclose(logits, plain * factor, rtol=1e-4, atol=1e-6) and abs(factor - 1.0) > 1e-6 else None


# ------------------------------------------------------------------------------------ structure


def _decoder_layers(model):
    """(path, ModuleList) of the decoder blocks: the longest ModuleList of one class under the model,
    not counting lists inside the items of another (a block's experts)."""
    scope = _decoder_scope(model)
    best = _longest_block_list(model, scope) or _longest_block_list(model, "")
    if best is None:
        raise UnsupportedModelError(f"no list of decoder layers (an nn.ModuleList of blocks) found in {type(model).__name__}")
    lists = {name: module for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module)}
    top = [name for name in lists if not any(name.startswith(other + ".") for other in lists)]  # not a block's experts
    stacks = [name for name in top if type(lists[name][0]) is type(best[1][0]) and best[1][0]._modules]  # of blocks, not Linears
    if len(stacks) > 1:
        calls = _calls_per_forward(model, [lists[name][0] for name in stacks])
        runs = ", ".join(f"{name} (its first block runs {n} time{'s' * (n != 1)} per forward)" for name, n in zip(stacks, calls))
        why = "re-entered in a loop, so a block has no one blocks.{i} number" if max(calls) > 1 else "with other modules between them"
        raise UnsupportedModelError(f"{type(model).__name__} has its blocks in more than one stack, {why}: {runs}")
    return best


def _longest_block_list(model, scope):
    best, outer = None, []
    for name, module in model.named_modules():
        # (of modules with children: a list of projections, Gemma 3n's altup_projections, holds no blocks)
        if isinstance(module, nn.ModuleList) and len(module) and module[0]._modules and (len({type(m) for m in module}) == 1 or family_mixer.hybrid_blocks(module)):
            if any(name.startswith(f"{other}.") for other in outer) or not name.startswith(scope):
                continue
            outer.append(name)
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


def _decoder_scope(model) -> str:
    """The path (with its dot) of the module transformers' get_decoder() names, where it is not the model
    itself: a multimodal model's language model, whose blocks count before a longer vision tower's."""
    try:
        decoder = model.get_decoder()
    except Exception:  # no decoder to name
        return ""
    return next((f"{name}." for name, module in model.named_modules() if module is decoder and name), "")


def _calls_per_forward(model, modules) -> list:
    """How often each module runs in one forward on a few tokens."""
    counts = [0] * len(modules)
    handles = [m.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1)) for i, m in enumerate(modules)]
    embedding = model.get_input_embeddings()
    try:
        with torch.no_grad():
            model(input_ids=torch.arange(1, 7, device=embedding.weight.device).remainder(embedding.num_embeddings)[None], use_cache=False)
    except Exception:  # the count is for the message only
        pass
    finally:
        for handle in handles:
            handle.remove()
    return counts


def _child(layer, candidates, what, layers_path):
    for name in candidates:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name
    for outer, child in layer.named_children():  # one level down (DBRX's norm_attn_norm.attn)
        for name in candidates:
            if isinstance(getattr(child, name, None), nn.Module):
                return f"{outer}.{name}"
    children = ", ".join(layer._modules)
    raise UnsupportedModelError(
        f"no {what} found in {type(layer).__name__} at {layers_path}.0 (looked for {', '.join(candidates)}; it has {children})"
    )


def _is_projection(module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _get(module, path):
    try:
        return get_path(module, path)
    except AttributeError:
        return None


def _names(module, options, where, what):
    for names in options:
        if all(_is_projection(_get(module, n)) for n in names):
            return names
    if where is None:
        return None
    raise UnsupportedModelError(
        f"no {what} found in {type(module).__name__} at {where} (looked for {options}; it has {', '.join(module._modules)})"
    )


def _attention_projections(attn, config, where):
    """(q, k, v, o) projection names; q, k and v name the same module where it is fused."""
    separate = _names(attn, PROJECTIONS, None, None)
    if separate:
        return separate
    fused = _names(attn, FUSED_QKV, None, None)
    if fused:
        n_heads, n_kv, d_head = structural_head_counts(attn, config)
        if (n_heads + 2 * n_kv) * d_head != out_width(getattr(attn, fused[0])) or n_kv <= 0:
            raise UnsupportedModelError(f"the fused projection {fused[0]} at {where} does not split into q, k, v heads")
        return fused[0], fused[0], fused[0], fused[1]
    raise UnsupportedModelError(
        f"no q/k/v/o projections found in {type(attn).__name__} at {where} (looked for {PROJECTIONS} and "
        f"{FUSED_QKV} as nn.Linear; it has {', '.join(attn._modules)})"
    )


def _mlp_projections(mlp, where):
    """(gate, up, down) names: gate None for a plain MLP, gate == up where they are fused."""
    gated = _names(mlp, GATED, None, None)
    if gated:
        return gated
    fused = _names(mlp, FUSED_GATE_UP, None, None)
    if fused:
        return fused[0], fused[0], fused[1]
    plain = _names(mlp, PLAIN, None, None)
    if plain:
        up, down = (get_path(mlp, name) for name in plain)
        if 2 * (down.weight.shape[0] if is_conv1d(down) else down.in_features) == out_width(up):
            return plain[0], plain[0], plain[1]  # down reads half of up: the gate half, then the up half (Moshi)
        return None, *plain
    raise UnsupportedModelError(
        f"no MLP projections found in {type(mlp).__name__} at {where} (looked for {GATED}, {FUSED_GATE_UP} and "
        f"{PLAIN} as nn.Linear; it has {', '.join(mlp._modules)})"
    )


def _dense_mlp(layers, mlp_name, moe, layers_path, config):
    """(gate, up, down, d_mlp) of the first dense MLP; where every block holds a mixture of experts,
    those of one expert (its names, where experts are modules) and the experts' width."""
    for i, layer in enumerate(layers):
        mlp = get_path(layer, mlp_name)
        if moe is None or not moe.is_moe(mlp):
            gate, up, down = _mlp_projections(mlp, f"{layers_path}.{i}.{mlp_name}")
            return gate, up, down, out_width(getattr(mlp, up)) // (2 if gate == up else 1)
    width = next(_get(config, name) for name in EXPERT_WIDTHS if _get(config, name))
    return (*(moe.expert_projections or ("gate_proj", "up_proj", "down_proj")), width)


def _same_structure_in_every_layer(layers, layers_path, attn_paths, mlp_paths, moe=None, mixers=()):
    """The first block's layout is every block's, but for the blocks that hold a mixture of experts
    (and the mixer blocks of a hybrid, family_mixer)."""
    for i, layer in enumerate(layers):
        if i in mixers:
            continue
        moe_block = moe is not None and moe.is_moe(_get(layer, mlp_paths[0]) if mlp_paths[0] else layer)
        for owner, *children in (attn_paths,) if moe_block else (attn_paths, mlp_paths):
            module = _get(layer, owner) if owner else layer
            missing = [c for c in children if c and not _is_projection(_get(module, c))]
            if module is None or missing:
                raise UnsupportedModelError(
                    f"block {i} at {layers_path}.{i} is not laid out as block 0 ({owner} lacks {missing or 'itself'}): "
                    "blocks of different kinds (a mixture of experts in some) are not supported by the structural path"
                )


def _attention_site(model, layer, attn, where, projections, own_scores):
    """The site class of the attention: AttnSite where it goes through transformers' attention registry;
    one watching its softmax where it computes its own scores with absolute positions or ALiBi
    (family_abs); the legacy site where it is a Llama-derived class from before the registry (rotary and
    repeat_kv inline) with no parameters beyond its projections and q/k norms (not so DiffLlama's
    lambdas); else the inline site, where the probe sees it compute softmax(q @ k^T) or call sdpa."""
    source_module = importlib.import_module(type(attn).__module__)
    if all(hasattr(source_module, name) for name in ("eager_attention_forward", "ALL_ATTENTION_FUNCTIONS")) and hasattr(attn, "config"):
        return AttnSite
    if own_scores and "softmax" in inspect.getsource(source_module):
        return family_abs.SoftmaxAttnSite
    known = {*projections, *(name for pair in QK_NORMS for name in pair)}
    if all(hasattr(source_module, name) for name in LEGACY_ATTENTION) and all(
        name.split(".")[0] in known for name, _ in attn.named_parameters()
    ):
        return LegacyAttnSite
    if inline_attention.computes_attention(attn, lambda: _probe(model, layer, layer, {})):
        return InlineAttnSite
    raise UnsupportedModelError(
        f"{type(attn).__name__} at {where} neither goes through transformers' attention registry nor computes "
        "softmax(q @ k^T) or sdpa itself, so hook_rot_q / hook_attn_scores cannot be served"
    )


def _between_kernel_and_o_proj(between, attn_site, flow, layer, names, where, config):
    """The site of an attention with a gate or sub-norm before o_proj (attention_output.py): hook_z
    fires at the kernel, so the attention must go through the registry; sub-norms of the blocks' kind;
    a gate out of q_proj only where the probe shows each head's query, then its gate (the q norm reads
    the first half of each head's slice)."""
    attn_name, mlp_name, first_norm, q, q_norm = names
    site = attention_output.gated(attn_site)
    if site is None:
        raise UnsupportedModelError(
            f"{type(get_path(layer, attn_name)).__name__} at {where} gates or normalises its kernel output before o_proj "
            "but does not go through transformers' attention registry, so hook_z (the kernel output) cannot be served"
        )
    if between.query_gate:
        out, n_heads = flow.outputs[f"{attn_name}.{q}"], structural_head_counts(get_path(layer, attn_name), config)[0]
        queries = out.view(*out.shape[:-1], n_heads, 2, -1)[..., 0, :]
        if not q_norm or not _same(flow.inputs.get(f"{attn_name}.{q_norm}"), queries):
            raise UnsupportedModelError(f"{where}: {q} gives twice the heads o_proj reads, but not each head's query, then its gate")
    kind = _norm_kind(get_path(layer, first_norm), flow, first_norm)
    for owner, name in ((attn_name, between.sub_norm), (mlp_name, between.mlp_sub_norm)):
        path = f"{owner}.{name}" if owner else name
        if name and _norm_kind(get_path(layer, path), flow, path) is not kind:
            raise UnsupportedModelError(f"{where}: the sub-norm {path} is of another kind than the blocks' norms")
    return site


def _separate_params(between):
    return attention_output.query_params if between and between.query_gate else linear_params


def _refuse_unserved(module, table, where):
    found = [part for part in table if part in module._modules or part in module._parameters]
    if found:
        raise UnsupportedModelError(f"{type(module).__name__} at {where} has {table[found[0]]}")


def _parameters(function) -> tuple:
    try:
        return tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return ()


def _sizes(model, n_layers, attn, d_mlp, ln1, norm_kind):
    n_heads, n_kv, d_head = structural_head_counts(attn, model.config)
    embedding = model.get_input_embeddings()
    return dict(
        n_layers=n_layers,
        d_model=embedding.embedding_dim,
        n_heads=n_heads,
        n_key_value_heads=n_kv,
        d_head=d_head,
        d_mlp=d_mlp,
        d_vocab=embedding.num_embeddings,
        d_vocab_out=model.get_output_embeddings().out_features,
        eps=norms._eps(ln1),
        normalization_type=norm_kind.tl_type,
        final_rms=norm_kind.tl_type == "RMS",
    )


def _path_of(model, module, what):
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise UnsupportedModelError(f"the {what} of {type(model).__name__} is not one of its modules")


def _final_norm(model, layers_path, norm_kind, embed_out=None, flow=None):
    """The norm module right after the blocks: a child of the module that holds the block list (not
    one after the embedding, BLOOM's, nor one that ran before the first block, Gemma 4's per-layer input norm)."""
    owner_path = layers_path.rpartition(".")[0]
    owner = get_path(model, owner_path)
    prefix = f"{owner_path}." if owner_path else ""
    before = flow.top_outputs if flow is not None else {}
    found = [name for name, child in owner.named_children() if _looks_like_norm(child) and prefix + name != embed_out and name not in before]
    shared = get_path(model, embed_out) if embed_out and embed_out.rpartition(".")[0] == owner_path else None
    if not found and _looks_like_norm(shared) and shared_norm.runs_after_blocks(model, shared, owner._modules[layers_path.rpartition(".")[2]][-1]):
        return embed_out  # the embedding's norm is also the final one (NanoChat): shared_norm.py serves both calls
    if len(found) != 1:
        raise UnsupportedModelError(
            f"no single final norm found next to the blocks in {type(owner).__name__} (norm-like children: {found or 'none'})"
        )
    return f"{owner_path}.{found[0]}" if owner_path else found[0]


def _looks_like_norm(module) -> bool:
    weight = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and (weight is None or weight.dim() == 1)


# ------------------------------------------------------------------------------------ the probe


class _Flow:
    """First inputs and outputs of the first block and its direct children, on the probing forward."""

    def __init__(self):
        self.inputs, self.outputs = {}, {}
        #: the same of the children of the module that holds the blocks (embeddings, their norm)
        self.top_inputs, self.top_outputs = {}, {}
        self.embedding = None


def _probe(model, layer, owner, extra) -> _Flow:
    """``owner``: the module holding the blocks (its children's first inputs and outputs are recorded
    too); ``extra``: more {name: module} of the first block whose first input and output are recorded."""
    flow = _Flow()
    handles = []

    def record(name, inputs, outputs):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("hidden_states")
            inputs.setdefault(name, x)
            out = output[0] if isinstance(output, tuple) else output
            outputs.setdefault(name, out.clone() if isinstance(out, torch.Tensor) else out)  # Falcon adds in place
            if name == "" and inputs is flow.inputs:
                raise _ProbeDone

        return hook

    def embedding_hook(module, args, output):
        flow.embedding = output

    for name, child in [*layer.named_modules(), *extra.items()]:
        handles.append(child.register_forward_hook(record(name, flow.inputs, flow.outputs), with_kwargs=True))
    for name, child in owner.named_children():
        handles.append(child.register_forward_hook(record(name, flow.top_inputs, flow.top_outputs), with_kwargs=True))
    handles.append(model.get_input_embeddings().register_forward_hook(embedding_hook))
    vocab = model.get_input_embeddings().num_embeddings
    device = model.get_input_embeddings().weight.device
    ids = torch.arange(1, 7, device=device).remainder(vocab)[None]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _ProbeDone:
        pass
    except Exception as err:
        raise UnsupportedModelError(f"the probing forward of {type(model).__name__} failed: {type(err).__name__}: {err}") from err
    finally:
        for handle in handles:
            handle.remove()
    if "" not in flow.inputs:
        raise UnsupportedModelError(f"the probing forward of {type(model).__name__} never reached its first block")
    return flow


def _same(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


def _close(a, b) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def _adds_up(total, a, b) -> bool:
    return isinstance(b, torch.Tensor) and _same(total, a + b)


def _block_norms(layer, flow, attn_name):
    """The norms among the block's children, and among the attention's siblings where it is nested (DBRX)."""
    outer = attn_name.rpartition(".")[0]
    owners = [("", layer)] + ([(outer + ".", get_path(layer, outer))] if outer else [])
    found = [prefix + name for prefix, owner in owners for name, child in owner.named_children() if _looks_like_norm(child)]
    return [name for name in found if name in flow.inputs]


def _norm_roles(layer, flow, attn_name, mlp_name, layers_path, projections):
    norms_seen = _block_norms(layer, flow, attn_name)
    x = flow.inputs[""]
    where = f"{type(layer).__name__} at {layers_path}.0"

    def norm_reading(tensor):
        return next((n for n in norms_seen if _same(flow.inputs[n], tensor)), None)

    def norm_feeding(tensor):
        return next((n for n in norms_seen if _same(flow.outputs[n], tensor)), None)

    o, up, down = projections
    # an MLP that is the layer itself reads its input projection and gives its output projection's
    mlp_in, mlp_name = (mlp_name, mlp_name) if mlp_name else (up, down)
    if not all(isinstance(flow.outputs.get(name), torch.Tensor) for name in (attn_name, mlp_name)):
        raise UnsupportedModelError(f"{where}: the attention or the MLP does not return its output tensor first")
    roles = {"ln1": norm_feeding(flow.inputs[attn_name]), "ln2": norm_feeding(flow.inputs[mlp_in])}
    if roles["ln2"] is None or roles["ln2"] == roles["ln1"] or _same(flow.inputs.get(roles["ln2"]), x):
        found = parallel.parallel_roles(flow, attn_name, mlp_in, norm_feeding, _close)
        if found:
            return {**found, "parallel": True}
    if roles["ln1"] is None or not _same(flow.inputs[roles["ln1"]], x):
        raise UnsupportedModelError(f"{where}: the attention's input is not a norm of the block input (no pre-norm block)")
    if roles["ln2"] is None or roles["ln2"] == roles["ln1"]:
        raise UnsupportedModelError(f"{where}: the MLP does not read its own norm (a parallel block, or no pre-norm)")
    mid = flow.inputs[roles["ln2"]]
    roles["mlp_rows"] = mid.dim() == 2 and x.dim() == 3  # the MLP works on (batch * pos, d) rows (OPT)
    rows = (lambda t: t.view(x.shape)) if roles["mlp_rows"] else (lambda t: t)  # noqa: E731
    mid = rows(mid)
    # a sub-layer that adds the residual itself (BLOOM, MPT's MLP): its output projection's is what it adds
    if _same(flow.outputs[attn_name], mid) and _adds_up(mid, x, flow.outputs.get(f"{attn_name}.{o}")):
        attn_name = f"{attn_name}.{o}"
    if _same(flow.outputs[mlp_name], flow.outputs[""]) and _adds_up(flow.outputs[""], mid, flow.outputs.get(f"{mlp_in}.{down}")):
        mlp_name = f"{mlp_in}.{down}"
    roles["attn_out"], roles["mlp_out"] = attn_name, mlp_name
    roles["ln1_post"] = norm_reading(flow.outputs[attn_name])
    roles["ln2_post"] = norm_reading(flow.outputs[mlp_name])
    if bool(roles["ln1_post"]) != bool(roles["ln2_post"]):
        raise UnsupportedModelError(f"{where}: a post-norm after only one of attention and MLP")
    attn_out = flow.outputs[roles["ln1_post"] or attn_name]
    mlp_out = rows(flow.outputs[roles["ln2_post"] or mlp_name])
    roles["residual_multiplier"] = _residual_multiplier(layer, mid, x, attn_out)
    if roles["residual_multiplier"]:  # Granite: what each sub-layer adds is its output times this float
        factor = getattr(layer, roles["residual_multiplier"])
        attn_out, mlp_out = attn_out * factor, mlp_out * factor
    total = mid + mlp_out
    roles["per_layer_out"] = _third_sub_layer(layer, flow, total)
    if roles["per_layer_out"]:
        total = total + flow.outputs[roles["per_layer_out"]]
    roles["layer_scalar"] = _layer_scalar(layer, flow.outputs[""], total)
    if not _same(mid, x + attn_out) or roles["layer_scalar"] is False:
        raise UnsupportedModelError(
            f"{where}: the residual stream is not block input + attention output + MLP output "
            "(a multiplier or another sum order)"
        )
    return roles


def _residual_multiplier(layer, mid, x, attn_out):
    """The name of a float attribute of the layer that the attention output is multiplied by before it is
    added (Granite's residual_multiplier), where the sum is not the plain one; else None."""
    if _same(mid, x + attn_out):
        return None
    return next((name for name, value in vars(layer).items() if type(value) is float and _same(mid, x + attn_out * value)), None)


def _third_sub_layer(layer, flow, total):
    """The child whose output a sub-layer after the MLP adds to resid_mid + mlp_out (Gemma 4's per-layer
    input: a child reads that sum, a norm gives what is added), or None."""
    if not any(_same(flow.inputs.get(n), total) for n in layer._modules):
        return None
    for name in layer._modules:
        out = flow.outputs.get(name)
        if isinstance(out, torch.Tensor) and out.shape == total.shape and _layer_scalar(layer, flow.outputs[""], total + out) is not False:
            return name
    return None


def _layer_scalar(layer, out, total):
    """The name of a one-element buffer or parameter of the layer that the block output is resid_mid +
    mlp_out times (Gemma 4's layer_scalar), None where it is that sum itself, False where it is neither."""
    for name, tensor in [*layer.named_buffers(recurse=False), *layer.named_parameters(recurse=False)]:
        if tensor.numel() == 1 and tensor.is_floating_point() and _same(out, total * tensor):
            return name
    return None if _same(out, total) else False


def _post_norm_roles(layer, flow, attn_name, mlp_name):
    """The roles of a post-norm-only block (OLMo2): attention reads the block input itself, a norm of
    its output is added to the residual, the MLP reads that sum and a norm of its output is added
    again. None where the attention does not read the block input."""
    x = flow.inputs[""]
    if not _same(flow.inputs[attn_name], x):
        return None
    norms_seen = _block_norms(layer, flow, attn_name)
    ln1_post = next((n for n in norms_seen if _same(flow.inputs[n], flow.outputs[attn_name])), None)
    ln2_post = next((n for n in norms_seen if _same(flow.inputs[n], flow.outputs[mlp_name])), None)
    mid = flow.inputs[mlp_name]
    if ln1_post and ln2_post and _same(mid, x + flow.outputs[ln1_post]) and _same(flow.outputs[""], mid + flow.outputs[ln2_post]):
        return {"ln1": None, "ln2": None, "ln1_post": ln1_post, "ln2_post": ln2_post}
    raise UnsupportedModelError(
        f"{type(layer).__name__}: attention reads the block input with no norm before it, but the block is not "
        "x + post_norm(attention(x)), then + post_norm(mlp(...)) (the post-norm-only layout of OLMo2)"
    )


def _one_stream(flow, layer, where):
    """Refuse blocks that read several residual streams stacked on a leading axis (Gemma 3n's AltUp)."""
    x, embedding = flow.inputs[""], flow.embedding
    if isinstance(x, torch.Tensor) and isinstance(embedding, torch.Tensor) and x.dim() == embedding.dim() + 1 and x.shape[1:] == embedding.shape:
        raise UnsupportedModelError(
            f"{type(layer).__name__} at {where}.0 reads {x.shape[0]} residual streams stacked on a leading axis "
            "(AltUp), not one: hook_resid_pre and the residual invariants have no single stream to hold"
        )


def _qk_norm_whole(flow, d_head) -> bool:
    """Whether the q norm spans the whole projection before the head split (OLMo2), not one head."""
    return "q_norm" in flow.inputs and flow.inputs["q_norm"].shape[-1] != d_head


def _qk_norm_after_rotary(flow, q_path) -> bool:
    """Whether the q norm reads the rotated q (NanoChat: rotary, then the norm), not q_proj's output."""
    x, q = flow.inputs.get("q_norm"), flow.outputs.get(q_path)
    if x is None or q is None:
        return False
    heads = q.view(*q.shape[:-1], -1, x.shape[-1])
    views = [q, heads, heads.transpose(1, 2)]
    if q.shape[-1] % (2 * x.shape[-1]) == 0:  # each head's query, then its gate (Qwen3-Next)
        views.append(q.view(*q.shape[:-1], -1, 2 * x.shape[-1])[..., : x.shape[-1]])
    return not any(_same(x, view) for view in views)


def _v_norm(attn, flow, v_path, attn_name):
    """The name of a norm that reads the value projection's output split into heads (Gemma 4), or None."""
    name = next((n for n in V_NORMS if _looks_like_norm(getattr(attn, n, None))), None)
    x, v = flow.inputs.get(f"{attn_name}.{name}"), flow.outputs.get(v_path)
    if name is None or x is None or v is None or not _same(x, v.view(x.shape)):
        return None
    return name


def _qk_norm_heads_first(flow, n_heads) -> bool:
    """Whether a per-head q norm sees (batch, heads, pos, d_head) (EXAONE 4), not (batch, pos, heads, d_head)."""
    x = flow.inputs.get("q_norm")
    return x is not None and x.dim() == 4 and x.shape[1] == n_heads and x.shape[2] != n_heads


def _norm_kind(module, flow, name):
    """The norm kind whose formula gives what ``module`` gave on the probe (float tolerance: the model
    may order its float32 casts differently)."""
    x, out = flow.inputs[name], flow.outputs[name]
    for kind in NORM_KINDS:
        try:
            centered, var_eps = kind.statistics(module, x)
            candidate = kind.weigh(module, kind.normalize(centered, var_eps), x.dtype)
        except (TypeError, RuntimeError, AttributeError):  # e.g. a norm without weight for a kind that needs one
            continue
        if candidate.shape == out.shape and torch.allclose(candidate, out, rtol=1e-4, atol=1e-5):
            return kind
    raise UnsupportedModelError(f"the norm {name} ({type(module).__name__}) computes neither RMSNorm, (1 + w) RMSNorm nor LayerNorm")


def _embedding_scaled(flow) -> bool:
    """Whether the first block's input is the embedding output scaled (Gemma's sqrt(d_model) applied
    after the module): hook_embed then fires on that input. Any other difference is not supported."""
    embedding, x = flow.embedding, flow.inputs[""]
    if _same(embedding, x):
        return False
    if embedding is not None and embedding.shape == x.shape:
        ratio = x.float() / embedding.float().where(embedding != 0, torch.ones_like(embedding.float()))
        values = ratio[embedding != 0]
        if values.numel() and torch.allclose(values, values.flatten()[0].expand_as(values), rtol=1e-3):
            return True
    raise UnsupportedModelError(
        "the first block's input is not the token embedding (absolute positions, a norm of the embedding, or another addition)"
    )
