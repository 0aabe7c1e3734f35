"""Plan an install: resolve every module a spec names and build hook points, sites and journal records.

Nothing here touches the model; ``install`` applies the records afterwards, all or nothing.
"""

from __future__ import annotations

import functools
import weakref

import torch

from . import attention_output, family_mixer, family_mla, family_moe, family_postln, identity_norm, shared_norm
from . import family_parallel as parallel
from .block_call import Blocks
from .errors import UnsupportedModelError
from .family_abs import ROWS_POINTS, BatchSite, PosEmbedSite, RowsLayerSite
from .family_post import MidInputSite
from .hook_points import HookPoint
from .journal import ClassSwap, DictEntry
from .sites import LayerSite, MlpOutSite, NormSite, OutProjSite, RotarySite, Site, SplitSite
from .spec import get_path, out_width
from .unembed import unembed_alias
from .weights import AttnWeights, EmbedWeights, MlpWeights, NormWeights, TiedEmbedWeights, UnembedWeights


class Plan:
    def __init__(self, model, spec):
        self.model, self.spec = model, spec
        self.hook_dict: dict[str, HookPoint] = {}
        self.sites: dict[str, Site] = {}
        self.entries: list = []
        self.swaps: list = []
        self._swapped: set = set()
        self._paths: dict = {}  # id(module) -> the path its site was planned at

    def module(self, path):
        try:
            return get_path(self.model, path)
        except AttributeError as err:
            raise AttributeError(f"the {self.spec_name()} spec expects a module at {path!r}: {err}") from None

    def spec_name(self):
        return getattr(self.model.config, "model_type", type(self.model).__name__)

    def site(self, path, cls=Site, *args):
        """The one site of the module at ``path``, made on first use (a spec that gives one module
        two incompatible roles is a spec error)."""
        if path not in self.sites:
            module = self.module(path)
            first = self._paths.setdefault(id(module), path)
            if first != path:
                raise UnsupportedModelError(
                    f"model.{path} is the same module object as model.{first} (one module at two places, "
                    f"e.g. layers[1] = layers[0]); tlshim needs one module per place: give each place its "
                    f"own copy (copy.deepcopy) before tlshim.install"
                )
            site = self.sites[path] = cls(module, path, *args)
            layers = self.spec.layers
            if path.startswith(layers + "."):
                layer = ".".join(path.split(".")[: layers.count(".") + 2])
                layer_site = site if layer == path else self.sites.get(layer)
                site.checkpoint_owners = ((self.module(layer), layer_site), (self.module(layers.rpartition(".")[0]), None))
            parent, _, attr = path.rpartition(".")
            site.locate = functools.partial(getattr, self.module(parent), attr)
        if not isinstance(self.sites[path], cls):
            raise TypeError(f"{path} is planned as a {type(self.sites[path]).__name__} and as a {cls.__name__}")
        return self.sites[path]

    def point(self, name, owner, attr, *sites):
        point = HookPoint(name, sites)
        self.hook_dict[name] = point
        self.entries.append(DictEntry(owner, attr, point, where=name.rpartition(".")[0] or "model"))
        return point

    def alias(self, owner, attr, target, where):
        current = vars(owner).get(attr, getattr(type(owner), attr, None))
        if current is target:
            return
        if attr in owner._modules and owner._modules[attr] is target:
            return
        self.entries.append(DictEntry(owner, attr, target, where=where))

    def swap(self, module, mixin, where):
        if id(module) in self._swapped:
            return
        self._swapped.add(id(module))
        self.swaps.append(ClassSwap(module, mixin, self.spec, where))


class _WeakPath:
    """get_path(model, path) through a weak reference to the model; picklable (torch.save of a whole
    installed model), the model then pickled with it as the object it already is."""

    def __init__(self, model, path):
        self.ref, self.path = weakref.ref(model), path

    def __call__(self):
        return get_path(self.ref(), self.path)

    def __getstate__(self):
        return self.ref(), self.path

    def __setstate__(self, state):
        self.__init__(*state)


def plan_install(model, spec) -> Plan:
    plan = Plan(model, spec)
    layers = plan.module(spec.layers)
    first_layer = f"{spec.layers}.0"

    if spec.embed_out is not None and spec.embed_out == spec.final_norm:  # one norm before and after the blocks
        final_sites = shared_norm.plan(plan, spec, model)
    else:
        embed_site = plan.site(first_layer, LayerSite) if spec.embed_hook_on_first_layer else plan.site(spec.embed_out or spec.embed)
        embed_point = plan.point("hook_embed", model, "hook_embed", embed_site)
        (embed_site.in_points if spec.embed_hook_on_first_layer else embed_site.out_points).append((embed_point, None))
        final_sites = (plan.site(spec.final_norm, NormSite, spec.norm, None),) if spec.final_norm else ()
    if spec.pos_embed:
        pos_site = plan.site(spec.pos_embed, PosEmbedSite)
        batch_site = plan.site(family_postln.common_parent(spec.layers, spec.pos_embed), BatchSite)
        pos_site.out_points.append((plan.point("hook_pos_embed", model, "hook_pos_embed", pos_site, batch_site), None))

    if spec.postln:
        family_postln.plan_embeddings(plan, _plan_norm)

    for i in range(len(layers)):
        _plan_layer(plan, i)

    # no norm after the blocks (post-LN BART, OpenAI GPT): no ln_final hooks, model.ln_final the identity
    final_module = final_sites[0].module if final_sites else torch.nn.Identity()
    if final_sites:
        final = final_sites[0]
        final.scale_point = plan.point("ln_final.hook_scale", final.module, "hook_scale", *final_sites)
        final.out_points.append((plan.point("ln_final.hook_normalized", final.module, "hook_normalized", *final_sites), None))
    if spec.unembed != spec.embed:  # the output projection's logits (before a soft-cap), TransformerBridge's hook_unembed
        unembed_site = plan.site(spec.unembed)
        unembed_site.locate = _WeakPath(model, spec.unembed)  # lm_head's parent is the model: no cycle through it
        unembed_site.out_points.append((plan.point("hook_unembed", model, "hook_unembed", unembed_site), None))

    plan.alias(model, "blocks", Blocks(layers, model), "model")
    plan.alias(model, "embed", plan.module(spec.embed), "model")
    plan.alias(model, "unembed", unembed_alias(model, plan.module(spec.unembed)), "model")
    plan.alias(model, "ln_final", final_module, "model")
    if spec.unembed == spec.embed:
        plan.swap(plan.module(spec.embed), TiedEmbedWeights, "embed")
    else:
        plan.swap(plan.module(spec.embed), EmbedWeights, "embed")
        plan.swap(plan.module(spec.unembed), UnembedWeights, "unembed")
    if spec.final_norm:
        plan.swap(final_module, NormWeights, "ln_final")
    return plan


def _plan_layer(plan: Plan, i: int):
    spec = plan.spec
    if spec.mixer(i):
        return family_mixer.plan_layer(plan, i)
    base = f"{spec.layers}.{i}"
    block = f"blocks.{i}"
    rel = lambda path: f"{base}.{path}" if path else base  # noqa: E731
    layer_site = plan.site(base, RowsLayerSite if spec.mlp_rows else LayerSite)
    layer_site.scalar = spec.layer_scalar
    layer = layer_site.module
    attn = plan.module(rel(spec.attn))
    n_heads, n_kv, _ = spec.head_counts(attn, getattr(attn, "config", None))

    layer_site.in_points.append((plan.point(f"{block}.hook_resid_pre", layer, "hook_resid_pre", layer_site), None))

    aliases = {"attn": attn}
    identity = spec.ln1 and identity_norm.is_identity(plan.module(rel(spec.ln1)))  # block 0 of ModernBERT: no ln1 hooks
    ln1 = plan.site(rel(spec.ln1)) if identity else _plan_norm(plan, rel(spec.ln1), f"{block}.ln1") if spec.ln1 else None
    if ln1 and not identity:
        aliases["ln1"] = ln1.module

    if spec.mla is not None:
        family_mla.plan_qkv(plan, spec, base, block, attn)
    else:
        qkv = [(f"hook_{role}", f"{spec.attn}.{getattr(spec, role + '_proj')}", n) for role, n in (("q", n_heads), ("k", n_kv), ("v", n_kv))]
        attention_output.plan_query(plan, rel)  # a q_proj that also gives the gate (Qwen3-Next)
        if spec.v_norm:  # hook_v is the normed value heads attention uses (Gemma 4)
            qkv[2] = ("hook_v", f"{spec.attn}.{spec.v_norm}", None)
        _plan_projections(plan, qkv, base, block, attn, "attn")
    for role in ("q", "k"):
        norm_path = getattr(spec, f"{role}_norm")
        if norm_path:
            site = plan.site(rel(f"{spec.attn}.{norm_path}"), spec.qk_norm_site)
            point = plan.point(f"{block}.attn.hook_{role}_normed", attn, f"hook_{role}_normed", site)
            # a per-head norm already sees the heads axis; a whole-vector one (OLMo2) is split here
            site.out_points.append((point, (n_heads if role == "q" else n_kv) if spec.qk_norm_whole else None))

    attn_site = plan.site(rel(_join(spec.attn, spec.postln and spec.postln.kernel)), spec.attn_site, spec.cache_kwargs)
    attn_site.head_counts = (n_heads, n_kv)
    rot_site = plan.site(rel(f"{spec.attn}.{spec.rotary}"), RotarySite) if spec.rotary else attn_site
    for name in ("rot_q", "rot_k") if spec.rotary_hooks else ():
        setattr(rot_site, name, plan.point(f"{block}.attn.hook_{name}", attn, f"hook_{name}", rot_site))
    attn_site.scores = plan.point(f"{block}.attn.hook_attn_scores", attn, "hook_attn_scores", attn_site)
    attn_site.pattern = plan.point(f"{block}.attn.hook_pattern", attn, "hook_pattern", attn_site)

    o_path = rel(f"{spec.attn}.{spec.o_proj}")
    o_site = plan.site(o_path, OutProjSite, None, n_heads, _OutWeights(spec, attn))
    if spec.attn_output:  # hook_z at the kernel; the gate and sub-norms have their own hooks
        attention_output.plan_block(plan, rel, block, attn, attn_site, n_heads, _plan_norm)
    else:
        o_site.in_points.append((plan.point(f"{block}.attn.hook_z", attn, "hook_z", o_site), n_heads))
    o_site.result_point = plan.point(f"{block}.attn.hook_result", attn, "hook_result", o_site)

    attn_out_site = plan.site(rel(spec.attn_out))
    if spec.residual_multiplier:  # hook_attn_out is what is added: the output times the block's multiplier
        attn_out_site.factor = getattr(layer, spec.residual_multiplier)
    attn_out_site.out_points.append((plan.point(f"{block}.hook_attn_out", layer, "hook_attn_out", attn_out_site), None))
    plan.swap(attn, AttnWeights, f"{block}.attn")
    plan_block_rest(plan, i, layer_site, ln1, aliases)


def plan_block_rest(plan: Plan, i: int, layer_site, ln1, aliases):
    """The MLP sub-layer (where spec.mlp is not None), hook_resid_post and the block's aliases, after the
    attention sub-layer or a mixer (family_mixer)."""
    spec = plan.spec
    base, block = f"{spec.layers}.{i}", f"blocks.{i}"
    rel = lambda path: f"{base}.{path}" if path else base  # noqa: E731
    layer = layer_site.module
    if spec.mlp is not None:
        _plan_mlp(plan, base, block, layer_site, ln1, aliases)
    if spec.per_layer_out:  # Gemma 4: a third sub-layer, after the MLP, adds this
        site = plan.site(rel(spec.per_layer_out))
        site.out_points.append((plan.point(f"{block}.hook_per_layer_out", layer, "hook_per_layer_out", site), None))
        layer_site.tail = True
    if not family_postln.post_ln(spec):  # post-LN: resid_post is ln2's input (family_postln.plan_block)
        layer_site.out_points.append((plan.point(f"{block}.hook_resid_post", layer, "hook_resid_post", layer_site), None))

    for name in ROWS_POINTS if spec.mlp_rows else ():  # they learn (batch, pos) from the layer's input
        plan.hook_dict[f"{block}.{name}"]._sites += (layer_site,)
    for name in ("ln1_post", "ln2_post"):
        if getattr(spec, name):
            aliases[name] = plan.module(rel(getattr(spec, name)))
    for name, target in aliases.items():
        plan.alias(layer, name, target, block)
        if name.startswith("ln"):
            plan.swap(target, NormWeights, f"{block}.{name}")
    if spec.mlp is not None:
        plan.swap(aliases["mlp"], MlpWeights, f"{block}.mlp")


def _plan_mlp(plan, base, block, layer_site, ln1, aliases):
    spec, layer = plan.spec, layer_site.module
    rel = lambda path: f"{base}.{path}" if path else base  # noqa: E731
    mlp = aliases["mlp"] = plan.module(rel(spec.mlp))
    moe = spec.moe is not None and spec.moe.is_moe(mlp)
    if moe:
        family_moe.plan_block(plan, spec.moe, base, block, spec.mlp, layer_site)
    mlp_out_site = plan.site(rel(spec.mlp_out), parallel.CopyOutSite if spec.parallel else MlpOutSite, layer_site)
    if spec.residual_multiplier:  # hook_mlp_out is what is added (Granite)
        mlp_out_site.factor = getattr(layer, spec.residual_multiplier)
    if spec.parallel:
        shared = spec.ln2 == spec.ln1
        aliases["ln2"] = (parallel.share_norm(plan, ln1, block) if shared else _plan_norm(plan, rel(spec.ln2), f"{block}.ln2")).module
    elif family_postln.post_ln(spec):
        aliases["ln2"] = family_postln.plan_block(plan, block, layer, layer_site, ln1, rel, _plan_norm).module
    else:
        # resid_mid fires at the pre-MLP norm's input, or at the MLP's own in a post-norm-only block
        if spec.ln2:
            mid_site = plan.site(rel(spec.ln2), NormSite, spec.norm, None, layer_site)
        else:
            mid_site = plan.site(rel(spec.mlp), MidInputSite, layer_site)
        mid = layer_site.mid_point = plan.point(f"{block}.hook_resid_mid", layer, "hook_resid_mid", mid_site, layer_site, mlp_out_site)
        mid_site.in_points.append((mid, None))
        if spec.ln2:
            aliases["ln2"] = _plan_norm(plan, rel(spec.ln2), f"{block}.ln2", layer_site).module

    if not moe:
        mlp_names = (("gate", "hook_pre"), ("up", "hook_pre_linear")) if spec.gate_proj else (("up", "hook_pre"),)
        mlp_points = [(attr, _join(spec.mlp, getattr(spec, role + "_proj")), None) for role, attr in mlp_names]
        _plan_projections(plan, mlp_points, base, block, mlp, "mlp")
        down = plan.site(rel(_join(spec.mlp, attention_output.post_reader(spec))))
        down.in_points.append((plan.point(f"{block}.mlp.hook_post", mlp, "hook_post", down), None))
    mlp_out_site.out_points.append((plan.point(f"{block}.hook_mlp_out", layer, "hook_mlp_out", mlp_out_site), None))


def _plan_norm(plan, path, name, layer_site=None):
    """A pre-norm's site with its hook_scale and hook_normalized."""
    site = plan.site(path, NormSite, plan.spec.norm, None, layer_site)
    site.scale_point = plan.point(f"{name}.hook_scale", site.module, "hook_scale", site)
    site.out_points.append((plan.point(f"{name}.hook_normalized", site.module, "hook_normalized", site), None))
    return site


def _plan_projections(plan, points, base, block, owner, prefix):
    """Hook points on projection outputs, given as (attribute, path, n_heads). Points sharing a path
    (a fused projection) each fire on their share of its output, split by heads, in the order given."""
    by_path: dict = {}
    for attr, path, n_heads in points:
        by_path.setdefault(f"{base}.{path}", []).append((attr, n_heads))
    for path, entries in by_path.items():
        if len(entries) == 1:
            (attr, n_heads), spec = entries[0], plan.spec
            own_site = prefix == "attn" and spec.qkv_site
            site = plan.site(path, spec.qkv_site, plan.model.config) if own_site else plan.site(path)
            site.out_points.append((plan.point(f"{block}.{prefix}.{attr}", owner, attr, site), n_heads))
            continue
        if prefix == "attn" and plan.spec.qkv_groups:
            parallel.plan_grouped_qkv(plan, path, entries, block, owner, entries[0][1], entries[1][1])
            continue
        site = plan.site(path, SplitSite)
        site.clip = getattr(owner, "clip_qkv", None) if prefix == "attn" else None
        width, units = out_width(plan.module(path)), sum(n or 1 for _, n in entries)
        for attr, n_heads in entries:
            point = plan.point(f"{block}.{prefix}.{attr}", owner, attr, site)
            site.add(point, n_heads, width * (n_heads or 1) // units)


def _join(*parts):
    """A dotted path of the non-empty parts (an MLP that is the decoder layer itself: OPT)."""
    return ".".join(part for part in parts if part)


class _OutWeights:
    """The live (weight, bias) of one attention's output projection, read at each call."""

    def __init__(self, spec, attn):
        self.spec, self.attn = spec, attn

    def __call__(self):
        return self.spec.weights(self.attn, "o")
