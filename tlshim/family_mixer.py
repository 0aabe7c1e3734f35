"""State-space and hybrid models: blocks whose sequence mixer is not attention (Mamba, Mamba2, gated
delta-net linear attention, LFM2's short convolution, RecurrentGemma's recurrent block, RWKV's time mix).

A mixer block is norm -> mixer -> added to the residual, then (where the block has one) norm -> MLP ->
added again; the probe checks exactly that sum. ``blocks.{i}.hook_mixer_out`` is what the mixer adds,
where an attention block has its attention hooks; the residual-stream, norm and MLP hooks are the
usual ones. Which blocks are mixers is read per block from its children (HF's hybrids put attention
in some blocks only), never from the model type's name. A norm of the first block's input that the
rest of the block reads as its residual stream (RWKV's pre_ln) is the embedding norm embed.ln.
"""

from __future__ import annotations

import dataclasses
import functools

from torch import nn

from . import layout, structure
from .errors import UnsupportedModelError
from .family_postln import PostLn
from .sites import LayerSite, NormSite, fire_points
from .spec import ArchSpec, fused_gate_up_params, get_path, mlp_linear_params

#: child names of a block's non-attention mixer, tried in order
MIXERS = ("mixer", "mamba", "linear_attn", "conv", "temporal_block")
#: parts (children or parameters) that make a module in an attention's place a linear-attention or
#: recurrent mixer, not softmax attention (Kimi-Linear's and Bailing's delta attention under self_attn)
LINEAR_ATTENTION = ("forget_gate", "conv1d", "A_log", "time_decay")
#: config fields of a number N of blocks after which the model halves the residual stream in inference
#: mode (RWKV's rescale_every; its output weights are divided to match), so that a block's input is not
#: the previous block's output
RESCALES = ("rescale_every",)
#: child names of a mixer block's MLP beyond structure.MLP (RecurrentGemma's)
MLPS = (*structure.MLP, "mlp_block")


def _module_child(layer, names):
    return next((n for n in names if isinstance(getattr(layer, n, None), nn.Module)), None)


def _mixer(layer):
    """The child name of the block's mixer, or None where it has (softmax) attention."""
    # (attention or an MLP under a mixer's name, Nemotron-H's blocks of one sub-layer each, is no mixer)
    for name in (_module_child(layer, structure.ATTENTION), _module_child(layer, MIXERS)):
        module = getattr(layer, name) if name else None
        if module is not None and any(part in module._modules or part in module._parameters for part in LINEAR_ATTENTION):
            return name
        if module is not None and _is_attention_or_mlp(module):
            return None
    return _module_child(layer, MIXERS)


def _is_attention_or_mlp(module) -> bool:
    """Whether ``module`` has q/k/v/o or MLP projections, or routes to experts."""
    tables = (structure.PROJECTIONS, structure.FUSED_QKV, structure.GATED, structure.FUSED_GATE_UP, structure.PLAIN)
    moe = _module_child(module, structure.family_moe.ROUTERS) and _module_child(module, structure.family_moe.EXPERTS)
    return bool(moe) or any(structure._names(module, table, None, None) for table in tables)


def mixer_layers(layers) -> tuple:
    """(index, mixer child name) of each block with no attention but a mixer."""
    found = ((i, _mixer(layer)) for i, layer in enumerate(layers))
    return tuple((i, name) for i, name in found if name)


def hybrid_blocks(modules) -> bool:
    """Whether a list of modules of several classes is a hybrid's blocks (Jamba's attention and Mamba
    decoder layers): each has a norm of its own and an attention or a mixer."""
    return all(
        any(structure._looks_like_norm(child) for child in m.children()) and _module_child(m, (*structure.ATTENTION, *MIXERS))
        for m in modules
    )


def layer_types(spec, n_layers) -> list:
    """Per block, "attention" or "mixer" (cfg.layer_types)."""
    return ["mixer" if spec.mixer(i) else "attention" for i in range(n_layers)]


def derive_spec(model, layers_path, layers, mixers) -> ArchSpec:
    """The spec of a model whose every block is a mixer block (Mamba, or a hybrid built without attention)."""
    layer, mixer = layers[0], mixers[0][1]
    where = f"{type(layer).__name__} at {layers_path}.0"
    _refuse_rescaling(model.config, len(layers))
    mlp_name = _module_child(layer, MLPS)
    owner_path = layers_path.rpartition(".")[0]
    flow = structure._probe(model, layer, get_path(model, owner_path), {})
    roles = block_roles(layer, flow, mixer, mlp_name, where)
    entry_norm = roles.pop("entry", None)
    moe = gate = up = down = None
    d_mlp = 0
    if mlp_name:
        mlps = [get_path(each, mlp_name) for each in layers]
        moe = structure.family_moe.detect(mlps, model.config, structure._mlp_projections)
        gate, up, down, d_mlp = structure._dense_mlp(layers, mlp_name, moe, layers_path, model.config)
    norm_kind = structure._norm_kind(getattr(layer, roles["ln1"]), flow, roles["ln1"])
    if any(structure._norm_kind(getattr(layer, n), flow, n) is not norm_kind for n in (roles["ln2"], entry_norm) if n):
        raise UnsupportedModelError(f"the norms of {type(layer).__name__} are of different kinds")
    entry = structure.family_abs.embedding_entry(model, owner_path, flow) or {}
    if entry.get("pos_embed"):
        raise UnsupportedModelError(f"{where}: absolute positions in a model of mixer blocks are not served")
    embedding = model.get_input_embeddings()
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no output embedding module (get_output_embeddings() is None)")
    sizes = dict(
        n_layers=len(layers),
        d_model=embedding.embedding_dim,
        n_heads=0,
        n_key_value_heads=0,
        d_head=0,
        d_mlp=d_mlp,
        d_vocab=embedding.num_embeddings,
        d_vocab_out=unembed.out_features,
        eps=structure.norms._eps(getattr(layer, roles["ln1"])),
        normalization_type=norm_kind.tl_type,
        final_rms=norm_kind.tl_type == "RMS",
        gated_mlp=gate is not None,
        positional_embedding_type="none",
        layer_types=["mixer"] * len(layers),
    )
    if moe is not None:
        sizes.update(num_experts=moe.n_experts, experts_per_token=moe.top_k)
    return ArchSpec(
        versions="",
        layers=layers_path,
        embed=structure._path_of(model, embedding, "input embedding"),
        embed_hook_on_first_layer=not entry and structure._embedding_scaled(flow),
        embed_out=entry.get("embed_out"),
        rotary_hooks=False,
        final_norm=structure._final_norm(model, layers_path, norm_kind, entry.get("embed_out")),
        unembed=structure._path_of(model, unembed, "output embedding"),
        attn=None,
        mlp=mlp_name,
        ln1=roles["ln1"],
        ln2=roles["ln2"],
        ln1_post=roles["ln1_post"],
        ln2_post=roles["ln2_post"],
        attn_out=None,
        mlp_out=roles["ln2_post"] or mlp_name,
        gate_proj=gate,
        up_proj=up,
        down_proj=down,
        norm=norm_kind,
        mlp_params=fused_gate_up_params if gate is not None and gate == up else mlp_linear_params,
        tl_config=functools.partial(structure._structural_cfg, sizes),
        moe=moe,
        mixers=mixers,
        postln=PostLn(post=False, embed_norm=f"{layers_path}.0.{entry_norm}") if entry_norm else None,
    )


def _refuse_rescaling(config, n_layers):
    for name in RESCALES:
        every = getattr(config, name, 0) or 0
        if 0 < every < n_layers:
            raise UnsupportedModelError(
                f"{type(config).__name__}.{name} = {every}: in inference mode the model halves the residual stream "
                f"after every {every} blocks, so blocks.{{i}}.hook_resid_post would not be the next block's hook_resid_pre; "
                f"load it with {name}=0 (from_pretrained(path, {name}=0), before its first forward: the same model up to "
                "float rounding and the norms' eps, which the halving scales) to install"
            )


def block_roles(layer, flow, mixer, mlp_name, where) -> dict:
    """{"ln1", "ln2", "ln1_post", "ln2_post"}: the norms before the mixer and the MLP (ln2 None where the
    block has no MLP) and the post-norms after them where there are (LFM3), checked on the probe:
    resid_post = resid_pre + mixer_out (+ mlp_out), each out after its post-norm; and "entry" where a norm
    of the block input comes first, whose output is resid_pre (RWKV's pre_ln)."""
    norms_seen = [name for name, child in layer.named_children() if structure._looks_like_norm(child) and name in flow.inputs]
    x = flow.inputs[""]

    def norm_feeding(name):
        return next((n for n in norms_seen if structure._same(flow.outputs[n], flow.inputs.get(name))), None)

    def norm_reading(name):
        return next((n for n in norms_seen if structure._same(flow.inputs[n], flow.outputs.get(name))), None)

    ln1, ln1_post = norm_feeding(mixer), norm_reading(mixer)
    # a norm of the block input that the rest of the block reads as its residual stream (RWKV's first block)
    entries = (n for n in norms_seen if ln1 not in (None, n) and structure._same(flow.inputs[n], x))
    entry = next((n for n in entries if structure._same(flow.outputs[n], flow.inputs[ln1])), None)
    x = flow.outputs[entry] if entry else x
    found = {"entry": entry} if entry else {}
    if ln1 is None or not structure._same(flow.inputs[ln1], x):
        raise UnsupportedModelError(f"{where}: the mixer {mixer} does not read a norm of the block input (no pre-norm block)")
    after_mixer = x + flow.outputs[ln1_post or mixer]
    if not mlp_name:
        if not structure._same(flow.outputs[""], after_mixer):
            raise UnsupportedModelError(f"{where}: the residual stream is not block input + mixer output")
        return {"ln1": ln1, "ln2": None, "ln1_post": ln1_post, "ln2_post": None, **found}
    ln2, ln2_post = norm_feeding(mlp_name), norm_reading(mlp_name)
    mlp_out = flow.outputs.get(ln2_post or mlp_name)
    if (
        ln2 is None
        or ln2 == ln1
        or not structure._same(flow.inputs[ln2], after_mixer)
        or not structure._adds_up(flow.outputs[""], after_mixer, mlp_out)
    ):
        raise UnsupportedModelError(
            f"{where}: the residual stream is not block input + mixer output, then + the output of the MLP read through its own norm"
        )
    return {"ln1": ln1, "ln2": ln2, "ln1_post": ln1_post, "ln2_post": ln2_post, **found}


def plan_layer(plan, i):
    """Hook points of mixer block i: resid_pre, ln1, hook_mixer_out, then the MLP and resid_post as in any block."""
    hybrid = plan.spec
    plan.spec = dataclasses.replace(hybrid, **dict(hybrid.mixer_layout))  # the mixer blocks' own norms
    try:
        _plan_layer(plan, i)
    finally:
        plan.spec = hybrid


class EntryNormSite(NormSite):
    """embed.ln inside the first block (RWKV's pre_ln): hook_scale / hook_normalized as any norm, then
    blocks.0.hook_resid_pre on its output (after the weight), which the block adds to as its residual."""

    def on_output(self, y):
        return fire_points(self.after_points, super().on_output(y))  # (out_points holds hook_normalized)


def mixer_out(spec, i) -> str:
    """The child of block i whose output is hook_mixer_out: what is added, after a post-norm (LFM3)."""
    return dict(spec.mixer_layout).get("ln1_post", spec.ln1_post) or spec.mixer(i)


def _plan_layer(plan, i):
    spec = plan.spec
    base, block, mixer = f"{spec.layers}.{i}", f"blocks.{i}", spec.mixer(i)
    layer_site = plan.site(base, LayerSite)
    layer = layer_site.module
    # the first block's own norm of the embedding (embed.ln, family_postln.plan_embeddings): resid_pre is its output
    entry = spec.postln.embed_norm if spec.postln and spec.postln.embed_norm.startswith(f"{base}.") else None
    if entry:
        site = plan.sites[entry]  # embed.ln's NormSite, planned before the blocks: it fires resid_pre too
        site.__class__, site.after_points = EntryNormSite, []
        site.after_points.append((plan.point(f"{block}.hook_resid_pre", layer, "hook_resid_pre", site), None))
    else:
        layer_site.in_points.append((plan.point(f"{block}.hook_resid_pre", layer, "hook_resid_pre", layer_site), None))
    ln1 = layout._plan_norm(plan, f"{base}.{spec.ln1}", f"{block}.ln1")
    mixer_site = plan.site(f"{base}.{mixer_out(spec, i)}")
    mixer_site.out_points.append((plan.point(f"{block}.hook_mixer_out", layer, "hook_mixer_out", mixer_site), None))
    layout.plan_block_rest(plan, i, layer_site, ln1, {"ln1": ln1.module, "mixer": plan.module(f"{base}.{mixer}")})


def check_block(cache, b, same):
    """tlshim.verify's sums of a mixer block: resid_pre + mixer_out (+ mlp_out), bit for bit."""
    after_mixer = cache[f"{b}.hook_resid_pre"] + cache[f"{b}.hook_mixer_out"]
    if f"{b}.hook_resid_mid" not in cache:
        same(f"{b}.hook_resid_post", "= resid_pre + mixer_out", cache[f"{b}.hook_resid_post"], after_mixer)
        return
    same(f"{b}.hook_resid_mid", "= resid_pre + mixer_out", cache[f"{b}.hook_resid_mid"], after_mixer)
    same(f"{b}.hook_resid_post", "= resid_mid + mlp_out", cache[f"{b}.hook_resid_post"], cache[f"{b}.hook_resid_mid"] + cache[f"{b}.hook_mlp_out"])


def mixer_layout(model, spec, layers, flow) -> tuple:
    """spec.mixer_layout of a hybrid: the mixer blocks' norms where they differ from the attention
    blocks' (same MLP, same norm kind); ``flow``: the probe of block 0 where that is a mixer block, else None."""
    i, mixer = spec.mixers[0]
    where = f"{type(layers[i]).__name__} at {spec.layers}.{i}"
    mlp_name = _module_child(layers[i], MLPS)
    if flow is None or i:
        flow = structure._probe(model, layers[i], get_path(model, spec.layers.rpartition(".")[0]), {})
    roles = block_roles(layers[i], flow, mixer, mlp_name, where)
    if roles.get("entry"):
        raise UnsupportedModelError(f"{where}: a norm of the embedding inside the first block of a hybrid is not served")
    kinds = {structure._norm_kind(getattr(layers[i], n), flow, n) for n in roles.values() if n}
    if mlp_name != (spec.mlp or None) or kinds != {spec.norm}:
        raise UnsupportedModelError(
            f"{where}: a mixer block with another MLP ({mlp_name}; the attention blocks have {spec.mlp}) or norms of "
            "another kind than the attention blocks' is not served"
        )
    roles["mlp_out"] = roles["ln2_post"] or spec.mlp
    return tuple((field, value) for field, value in roles.items() if getattr(spec, field) != value)


def describe(spec) -> str:
    """The mixer blocks, for structure.describe ("" where there are none)."""
    if not spec.mixers:
        return ""
    names = sorted({name for _, name in spec.mixers})
    return f", mixer blocks {[i for i, _ in spec.mixers]} ({'/'.join(names)})"
