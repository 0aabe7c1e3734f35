"""Post-LN blocks (BERT and its kin, the post-LN BART decoders, OpenAI GPT): each sub-layer's output is
added to the residual and the sum normalized, so the block's output is a norm's output.

Names follow TransformerLens's HookedEncoder (BertBlock): attention reads the block input x;
hook_resid_mid = x + hook_attn_out (ln1's input); the MLP reads ln1's output; hook_resid_post =
ln1(resid_mid) + hook_mlp_out (ln2's input); hook_normalized_resid_post = ln2(resid_post) = the
block's output = the next block's hook_resid_pre. An embedding LayerNorm after the sum of the token,
token-type and position embeddings has ``embed.ln.hook_scale`` / ``embed.ln.hook_normalized``, and
its output is blocks.0.hook_resid_pre. ln_final is the norm after the blocks (BERT: its LM head's
LayerNorm, after the head's dense + activation, which have no hook); where the head reads the last
block's output directly (BART, OpenAI GPT) there is no ln_final hook and ``model.ln_final`` is the
identity.

Pre-LN blocks in BERT's layout (Megatron-BERT, RoBERTa-PreLayerNorm, XLM-RoBERTa-XL: the residual
adds inside the attention's output module and the block's output module) and pre-LN decoders with an
embedding norm (mBART) are planned as any pre-norm block, with these embeddings and head.

Every role is read off one probing forward of the first block (what each norm reads and what is added).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError
from .sites import Site, first_output
from .spec import ArchSpec, fused_qkv_params, get_path, linear_params, out_width

#: names of the embedding added as token types (data; position embeddings are the other added one)
TOKEN_TYPE = ("token_type_embeddings",)


@dataclass(frozen=True)
class PostLn:
    """What a spec of this family adds: whether the blocks are post-LN (else pre-LN in BERT's layout:
    Megatron-BERT), the attention module's child that runs the attention kernel (BERT's ``self``; ""
    for the module itself), the token-type embedding and the embedding norm (model paths)."""

    post: bool = True
    kernel: str = ""
    token_type: str | None = None
    embed_norm: str | None = None
    pos_after_norm: bool = False


def derive(model):
    """The spec of a model whose blocks are post-LN (or pre-LN in BERT's layout), else None."""
    from . import structure as s

    layers_path, layers = s._decoder_layers(model)
    layer, where = layers[0], f"{type(layers[0]).__name__} at {layers_path}.0"
    outside = {
        f"/{name}": m
        for name, m in model.named_modules()
        if not name.startswith(layers_path + ".") and (isinstance(m, nn.Embedding) or _is_norm(m, s))
    }
    try:
        flow = s._probe(model, layer, get_path(model, layers_path.rpartition(".")[0]), outside)
    except UnsupportedModelError:
        return None  # a model that does not run: the pre-norm path's reason stands
    roles = _post_ln_roles(layer, flow, where, s)
    if roles is not None:
        return _spec(model, layers_path, layers, flow, outside, roles)
    roles = _pre_ln_roles(layer, flow, s)
    try:
        return None if roles is None else _spec(model, layers_path, layers, flow, outside, roles)
    except UnsupportedModelError:
        return None  # a pre-LN block this family does not serve either: the pre-norm path's refusal stands


def _spec(model, layers_path, layers, flow, outside, roles):
    from . import family_abs
    from . import structure as s

    layer, x = layers[0], flow.inputs[""]
    ln1, ln2, o_path, up, down, post = roles
    attn_name, (q, k, v, o) = _attention(layer, o_path, model.config, f"{layers_path}.0", s)
    mlp_name = common_parent(up, down)
    attn = get_path(layer, attn_name)
    kernel = q.rpartition(".")[0]
    s._refuse_unserved(attn, s.UNSERVED_ATTENTION, f"{layers_path}.0.{attn_name}")
    s._same_structure_in_every_layer(layers, layers_path, (attn_name, q, k, v, o), (mlp_name, _rel(mlp_name, up), _rel(mlp_name, down)))
    entry = _embedding_entry(model, flow, outside, x)
    if not (post or kernel or entry["embed_norm"] or entry["token_type"]):
        return None  # a pre-LN block with plain embeddings, not in BERT's layout: the pre-norm path's refusal stands
    norm_kind = s._norm_kind(get_path(layer, ln1), flow, ln1)
    if s._norm_kind(get_path(layer, ln2), flow, ln2) is not norm_kind:
        raise UnsupportedModelError(f"the norms of {type(layer).__name__} are of different kinds")
    # the norm the head reads last: BERT's LM-head LayerNorm, also after a pre-LN encoder's final norm
    final = [n for n, m in model.named_modules() if _is_norm(m, s) and f"/{n}" not in flow.inputs and not n.startswith(layers_path + ".")]
    if not (final or post):
        raise UnsupportedModelError(f"no norm module after the pre-LN blocks of {type(model).__name__}")
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no output embedding module (get_output_embeddings() is None)")
    own_scores = bool(entry["pos_embed"])
    attn_site = s._attention_site(model, layer, get_path(attn, kernel), f"{layers_path}.0.{attn_name}", (q, k, v, o), own_scores)
    sizes = s._sizes(model, len(layers), attn, out_width(get_path(layer, up)), get_path(layer, ln1), norm_kind)
    sizes.update(gated_mlp=False, parallel_attn_mlp=False, post_ln=post, post_embedding_ln=bool(entry["embed_norm"]))
    fused = q == k
    spec = ArchSpec(
        versions="",
        layers=layers_path,
        embed=s._path_of(model, model.get_input_embeddings(), "input embedding"),
        pos_embed=entry["pos_embed"],
        rotary_hooks=attn_site is not family_abs.SoftmaxAttnSite and not entry["pos_embed"],
        final_norm=final[-1] if final else None,
        unembed=s._path_of(model, unembed, "output embedding"),
        attn=attn_name,
        mlp=mlp_name,
        ln1=ln1,
        ln2=ln2,
        attn_out=f"{attn_name}.{o}",
        mlp_out=down,
        q_proj=q,
        k_proj=k,
        v_proj=v,
        o_proj=o,
        gate_proj=None,
        up_proj=_rel(mlp_name, up),
        down_proj=_rel(mlp_name, down),
        norm=norm_kind,
        head_counts=functools.partial(s._same_counts, s.structural_head_counts(attn, model.config)),
        linear_params=fused_qkv_params if fused else linear_params,
        tl_config=functools.partial(s._structural_cfg, sizes),
        attn_site=attn_site,
        cache_kwargs=tuple(name for name in s.CACHE_KWARGS if name in s._parameters(get_path(attn, kernel).forward)),
        postln=PostLn(post, kernel, entry["token_type"], entry["embed_norm"], entry["pos_after_norm"]),
    )
    sizes["positional_embedding_type"] = family_abs.positional_embedding_type(model, spec)
    sizes["use_attn_scale"] = family_abs.scales_scores(attn)
    return spec


def _is_norm(module, s) -> bool:
    return s._looks_like_norm(module) and not module._modules  # not RobertaPreLayerNormIntermediate


def _post_ln_roles(layer, flow, where, s):
    """(ln1, ln2, o, up, down, True) of a post-LN block: its output is ln2's, ln1 reads x + o's output,
    up reads ln1's output and ln2 reads that + down's output. None where the output is no norm's."""
    x, out = flow.inputs[""], first_output(flow.outputs[""])
    norms, linears, readers = _parts(layer, flow, s)
    ln2 = next((n for n in norms if s._same(flow.outputs[n], out)), None)
    if ln2 is None:
        return None
    found = [(n, p) for n in norms if n != ln2 for p in linears if _adds_up(flow.inputs[n], x, flow.outputs[p])]
    if not found:
        raise UnsupportedModelError(f"{where}: the block ends in a norm (post-LN), but no norm reads block input + an output projection")
    ln1, o_path = found[0]
    y1 = flow.outputs[ln1]
    down = next((p for p in linears if _adds_up(flow.inputs[ln2], y1, flow.outputs[p])), None)
    up = next((p for p in readers if s._same(flow.inputs[p], y1)), None)
    if down is None or up is None:
        raise UnsupportedModelError(f"{where}: post-LN, but ln2's input is not ln1's output + an MLP projection read from it")
    return ln1, ln2, o_path, up, down, True


def _pre_ln_roles(layer, flow, s):
    """(ln1, ln2, o, up, down, False) of a pre-LN block whose residual adds sit in sub-modules
    (Megatron-BERT, RoBERTa-PreLayerNorm): ln1 reads x, ln2 reads x + o's output (resid_mid), up reads
    ln2's output and the block gives resid_mid + down's output. None where that does not hold."""
    x, out = flow.inputs[""], first_output(flow.outputs[""])
    norms, linears, readers = _parts(layer, flow, s)
    ln1 = next((n for n in norms if s._same(flow.inputs[n], x)), None)
    found = [(n, p) for n in norms if n != ln1 for p in linears if _adds_up(flow.inputs[n], x, flow.outputs[p])]
    if ln1 is None or not found:
        return None
    ln2, o_path = found[0]
    mid = flow.inputs[ln2]
    down = next((p for p in linears if _adds_up(out, mid, flow.outputs[p])), None)
    up = next((p for p in readers if s._same(flow.inputs[p], flow.outputs[ln2])), None)
    return None if down is None or up is None else (ln1, ln2, o_path, up, down, False)


def _adds_up(total, a, b) -> bool:
    from .structure import _same

    return isinstance(b, torch.Tensor) and b.shape == a.shape and _same(total, a + b)


def _parts(layer, flow, s):
    """(norms, projections giving d_model, projections) of the block that ran on the probe."""
    x = flow.inputs[""]
    norms = [n for n, m in layer.named_modules() if n and _is_norm(m, s) and n in flow.inputs]
    projections = [n for n, m in layer.named_modules() if s._is_projection(m) and n in flow.inputs]
    wide = [n for n in projections if flow.outputs[n].shape[-1] == x.shape[-1]]
    return norms, wide, projections


def _attention(layer, o_path, config, where, s):
    """(attention module path, (q, k, v, o) relative to it): the closest module above the output
    projection whose projections one of the structural tables names, with that output projection."""
    parts = o_path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        attn_name = ".".join(parts[:cut])
        try:
            names = s._attention_projections(get_path(layer, attn_name), config, where)
        except UnsupportedModelError:
            continue
        if names[3] == ".".join(parts[cut:]):
            return attn_name, names
    raise UnsupportedModelError(f"no q/k/v projections found next to the attention output projection {o_path} of {where}")


def common_parent(a, b):
    """The longest common module path above two paths ("" for the root): the module whose forward runs both."""
    common = []
    for x, y in zip(a.split(".")[:-1], b.split(".")[:-1]):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _rel(parent, path):
    return path[len(parent) + 1 :] if parent else path


def _embedding_entry(model, flow, outside, x):
    """{"pos_embed", "token_type", "embed_norm", "pos_after_norm"}: model paths of the modules whose
    outputs are added to the token embedding, of the norm of that sum (or None), and whether the
    positions are added after that norm (BlenderbotSmall) rather than before it (BERT, BART)."""
    from .structure import _same

    seen = {n: m for n, m in outside.items() if n in flow.outputs}
    embedding = model.get_input_embeddings()
    token = next((n for n, m in seen.items() if m is embedding), None)
    if token is None:
        raise UnsupportedModelError(f"the token embedding of {type(model).__name__} is not run before its first block")
    norms = [n for n, m in seen.items() if not isinstance(m, nn.Embedding)]
    added = [n for n, m in seen.items() if isinstance(m, nn.Embedding) and n != token and flow.outputs[n].shape[-1] == x.shape[-1]]
    token_type = next((n for n in added if n.rpartition(".")[2] in TOKEN_TYPE), None)
    positions = [n for n in added if n != token_type]
    pos = positions[0] if len(positions) == 1 else None
    parts = [n for n in (token_type, pos) if n]

    def add(total, names):
        for name in names:
            if flow.outputs[name].shape[-2:] != total.shape[-2:]:
                return None
            total = total + flow.outputs[name]
        return total

    path = lambda n: n[1:] if n else None  # noqa: E731
    for norm in norms if len(norms) == 1 else [None]:  # no norm, or the one run before the first block
        for cut in range(len(parts), -1, -1):  # the parts added before the norm, then after it
            before = add(flow.outputs[token], parts[:cut])
            if before is None:
                continue
            if norm is None and _same(x, before) or norm and _same(flow.inputs[norm], before) and _same(x, add(flow.outputs[norm], parts[cut:])):
                return {"pos_embed": path(pos), "token_type": path(token_type), "embed_norm": path(norm), "pos_after_norm": pos in parts[cut:]}
    raise UnsupportedModelError(
        f"the first block of {type(model).__name__} does not read (a norm of) the token embedding + "
        f"the other embeddings run before it ({', '.join(n[1:] for n in added) or 'none'})"
    )


# ------------------------------------------------------------------------------------ install plan


def post_ln(spec) -> bool:
    """Whether the spec's blocks are post-LN (planned and verified by this module)."""
    return bool(spec.postln and spec.postln.post)


def plan_embeddings(plan, norm_points):
    """hook_token_type_embed and the embedding norm's embed.ln.hook_scale / hook_normalized;
    ``norm_points(plan, path, name)`` is layout's planner of one norm's points."""
    post = plan.spec.postln
    if post.token_type:
        site = plan.site(post.token_type, Site)
        site.out_points.append((plan.point("hook_token_type_embed", plan.model, "hook_token_type_embed", site), None))
    if post.embed_norm:
        norm = norm_points(plan, post.embed_norm, "embed.ln")
        plan.alias(plan.module(plan.spec.embed), "ln", norm.module, "embed")


def plan_block(plan, block, layer, layer_site, ln1, rel, norm_points):
    """resid_mid on ln1's input, resid_post on ln2's input, normalized_resid_post on the block's output:
    an edit of either input reaches what the block computes after it by the model's own forward."""
    mid = plan.point(f"{block}.hook_resid_mid", layer, "hook_resid_mid", ln1)
    ln1.in_points.append((mid, None))
    ln2 = norm_points(plan, rel(plan.spec.ln2), f"{block}.ln2")
    ln2.in_points.append((plan.point(f"{block}.hook_resid_post", layer, "hook_resid_post", ln2), None))
    point = plan.point(f"{block}.hook_normalized_resid_post", layer, "hook_normalized_resid_post", layer_site)
    layer_site.out_points.append((point, None))
    return ln2


# ------------------------------------------------------------------------------------ verify


def check_entry(model, cache, same):
    """hook_embed (+ hook_token_type_embed) + hook_pos_embed, through the embedding norm where there is
    one (the positions after it where the model adds them after), is blocks.0.hook_resid_pre."""
    after = model._tlshim.spec.postln.pos_after_norm
    total = cache["hook_embed"]
    for name in ("hook_token_type_embed", "hook_pos_embed"):
        total = total + cache[name] if name in cache and not (after and name == "hook_pos_embed") else total
    norm = getattr(model.embed, "ln", None)
    with torch.no_grad():
        entered = norm(total) if norm is not None else total
    entered = entered + cache["hook_pos_embed"] if after else entered
    check = "(embed + token types + positions, through embed.ln) equals blocks.0.hook_resid_pre"
    same("hook_embed", check, entered, cache["blocks.0.hook_resid_pre"])


def check_block(cache, b, block, same, last):
    """HOOKS.md's post-LN block: resid_post = ln1(resid_mid) + mlp_out, normalized_resid_post = ln2(resid_post)."""
    with torch.no_grad():
        after_attn = block.ln1(cache[f"{b}.hook_resid_mid"])
        out = block.ln2(cache[f"{b}.hook_resid_post"])
    same(f"{b}.hook_resid_post", "= ln1(resid_mid) + mlp_out", cache[f"{b}.hook_resid_post"], after_attn + cache[f"{b}.hook_mlp_out"])
    same(f"{b}.hook_normalized_resid_post", "= ln2(resid_post)", cache[f"{b}.hook_normalized_resid_post"], out)
    if not last:
        i = int(b.split(".")[1])
        same(f"{b}.hook_normalized_resid_post", "equals the next block's hook_resid_pre", out, cache[f"blocks.{i + 1}.hook_resid_pre"])


def unembed_input(model, cache, n_layers):
    """What the unembedding reads on the verifying forward: ln_final's normalized input through its weights,
    or (no final norm) the last block's output."""
    if "ln_final.hook_normalized" not in cache:
        return cache[f"blocks.{n_layers - 1}.hook_normalized_resid_post"]
    spec = model._tlshim.spec
    return spec.norm.weigh(model.ln_final, cache["ln_final.hook_normalized"], cache["ln_final.hook_normalized"].dtype)
