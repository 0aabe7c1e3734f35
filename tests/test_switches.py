"""The TransformerLens switches (set_use_*) and their hooks: hook_attn_in, hook_q/k/v_input, hook_mlp_in.

References are built by hand on a plain twin: an edit of one head's input copy equals recomputing that
head's rows of the projection from ln1(edited copy), spliced into the twin's projection output.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import tlshim
from fixtures.openelm_fixture import build_openelm_in_memory
import tiny
from models import ALL_ARCHS, build, tokens

LAYER = 1
#: arch -> (layers, ln1, ln2, {role: (projection, first row of that role)}), written out independently of tlshim's specs
PATHS = {arch: ("model.layers", "input_layernorm", "post_attention_layernorm",
                {r: (f"self_attn.{r}_proj", 0) for r in "qkv"}) for arch in ALL_ARCHS}
PATHS["gemma2"] = (*PATHS["gemma2"][:2], "pre_feedforward_layernorm", PATHS["gemma2"][3])
# the stand-in OpenELM's layer 1: 4 query heads, 2 kv heads of 16 in one fused qkv_proj
PATHS["openelm"] = ("transformer.layers", "attn_norm", "ffn_norm", {"q": ("attn.qkv_proj", 0), "k": ("attn.qkv_proj", None), "v": ("attn.qkv_proj", None)})
# Phi-3 through the structural path: one fused qkv_proj too
PATHS["phi3"] = ("model.layers", "input_layernorm", "post_attention_layernorm", {r: ("self_attn.qkv_proj", 0 if r == "q" else None) for r in "qkv"})


def get(root, path):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def pair(arch):
    if arch == "openelm":
        return tlshim.install(build_openelm_in_memory(seed=0)), build_openelm_in_memory(seed=0)
    if arch == "phi3":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unverified structural type warns at install
            return tlshim.install(tiny.build("phi3")), tiny.build("phi3")
    return tlshim.install(build(arch)), build(arch)


def heads_of(model):
    cfg = model.cfg
    n, g = cfg.n_heads, cfg.n_key_value_heads
    return (n[LAYER], g[LAYER]) if isinstance(n, list) else (n, g)


def rows(model, role, head):
    """The rows of ``head`` of ``role`` in its projection's output."""
    n, g = heads_of(model)
    d = model.cfg.d_head
    _, _, _, projections = PATHS[model.config.model_type]
    start = projections[role][1]
    if start is None:  # fused: q heads, then k heads, then v heads
        start = (n if role == "k" else n + g) * d
    return slice(start + head * d, start + (head + 1) * d)


def hand_edit(twin, model, edits):
    """Forward hooks on the twin: each (role, head, delta) recomputes that head's rows from ln1(x + delta)."""
    layers, ln1_path, _, projections = PATHS[model.config.model_type]
    layer = get(twin, f"{layers}.{LAYER}")
    ln1 = get(layer, ln1_path)
    seen = {}

    def capture(module, args):  # the residual of the model's own ln1 call, not of the calls below
        seen.setdefault("x", args[0])

    handles = [ln1.register_forward_pre_hook(capture)]
    for role, head, delta in edits:
        proj = get(layer, projections[role][0])
        where = rows(model, role, head)

        def splice(module, args, out, where=where, delta=delta, proj=proj):
            out = out.clone()
            full = torch.nn.functional.linear(ln1(seen["x"] + delta), proj.weight, proj.bias)  # every row, as the model's Linear
            out[..., where] = full[..., where]
            return out

        handles.append(proj.register_forward_hook(splice))
    return handles


def add_to_head(head, delta):
    def hook(t, hook):
        t = t.clone()
        t[:, :, head] += delta
        return t

    return hook


def logits(model, ids, **kwargs):
    return model(ids, use_cache=False, **kwargs).logits


ARCHS = [*ALL_ARCHS, "openelm", "phi3"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("role, head", [("q", 2), ("k", 1), ("v", 1)])
def test_split_input_edit_equals_recomputing_that_head_by_hand(arch, role, head):
    model, twin = pair(arch)
    ids = tokens()
    delta = torch.randn(ids.shape[1], model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    clean = logits(twin, ids)
    model.set_use_split_qkv_input(True)
    name = f"blocks.{LAYER}.hook_{role}_input"
    cache = {}
    hooks = [(name, add_to_head(head, delta)), (f"blocks.{LAYER}.attn.hook_{role}", lambda t, hook: cache.update(after=t))]
    edited = model.run_with_hooks(ids, fwd_hooks=hooks, use_cache=False)
    handles = hand_edit(twin, model, [(role, head, delta)])
    try:
        expected = logits(twin, ids)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(edited, expected)
    assert not torch.equal(edited, clean)
    # the other heads of that role keep the model's own values bit for bit
    _, native = model.run_with_cache(ids, names_filter=f"blocks.{LAYER}.attn.hook_{role}", use_cache=False)
    others = [h for h in range(cache["after"].shape[2]) if h != head]
    assert torch.equal(cache["after"][:, :, others], native[f"blocks.{LAYER}.attn.hook_{role}"][:, :, others])


@pytest.mark.parametrize("arch", ["llama", "gemma2", "openelm", "phi3"])
def test_attn_in_feeds_q_of_every_head_and_k_v_of_the_first_kv_heads(arch):
    model, twin = pair(arch)
    ids = tokens()
    delta = torch.randn(ids.shape[1], model.cfg.d_model, generator=torch.Generator().manual_seed(4))
    model.set_use_attn_in(True)
    for head, roles in ((0, "qkv"), (heads_of(model)[0] - 1, "q")):  # the last query head has no kv copy
        edited = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{LAYER}.hook_attn_in", add_to_head(head, delta))], use_cache=False)
        handles = hand_edit(twin, model, [(role, head, delta) for role in roles])
        try:
            assert torch.equal(edited, logits(twin, ids))
        finally:
            for handle in handles:
                handle.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_observing_is_bit_identical_and_shapes_are_tl_shapes(arch):
    model, twin = pair(arch)
    ids = tokens()
    clean = logits(twin, ids)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    # (OpenELM's pattern is computed outside its sdpa call, so pattern and scores are left out here)
    logits_seen, cache = model.run_with_cache(ids, names_filter=lambda n: "pattern" not in n and "scores" not in n, use_cache=False)
    assert torch.equal(logits_seen, clean)
    n, g = heads_of(model)
    b, p, d = *ids.shape, model.cfg.d_model
    assert cache[f"blocks.{LAYER}.hook_q_input"].shape == (b, p, n, d)
    assert cache[f"blocks.{LAYER}.hook_k_input"].shape == (b, p, g, d)
    assert cache[f"blocks.{LAYER}.hook_v_input"].shape == (b, p, g, d)
    # each copy is the residual entering ln1; mlp_in is the residual entering the MLP's norm
    resid_pre = cache[f"blocks.{LAYER}.hook_resid_pre"]
    assert torch.equal(cache[f"blocks.{LAYER}.hook_q_input"], resid_pre.unsqueeze(2).expand(b, p, n, d))
    assert torch.equal(cache[f"blocks.{LAYER}.hook_mlp_in"], cache[f"blocks.{LAYER}.hook_resid_mid"])
    assert torch.equal(logits(model, ids), clean)  # idle again


@pytest.mark.parametrize("arch", ["llama", "gemma2", "openelm"])
def test_mlp_in_edit_changes_the_mlp_input_not_the_residual(arch):
    model, twin = pair(arch)
    ids = tokens()
    delta = torch.randn(ids.shape[1], model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    model.set_use_hook_mlp_in(True)
    name = f"blocks.{LAYER}"
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.startswith(name + ".hook_"), use_cache=False)
    seen = {}
    hooks = [(f"{name}.hook_mlp_in", lambda t, hook: t + delta)] + [
        (f"{name}.hook_{n}", lambda t, hook: seen.update({hook.name: t})) for n in ("resid_mid", "mlp_out", "resid_post")]
    edited = model.run_with_hooks(ids, fwd_hooks=hooks, use_cache=False)
    layers, _, ln2, _ = PATHS[arch]
    handle = get(twin, f"{layers}.{LAYER}.{ln2}").register_forward_pre_hook(lambda module, args: (args[0] + delta, *args[1:]))
    try:
        assert torch.equal(edited, logits(twin, ids))
    finally:
        handle.remove()
    assert torch.equal(seen[f"{name}.hook_resid_mid"], cache[f"{name}.hook_resid_mid"])
    assert not torch.equal(seen[f"{name}.hook_mlp_out"], cache[f"{name}.hook_mlp_out"])
    assert torch.equal(seen[f"{name}.hook_resid_post"], seen[f"{name}.hook_resid_mid"] + seen[f"{name}.hook_mlp_out"])


def test_switches_gate_names_as_transformer_bridge_does():
    model, _ = pair("llama")
    ids = tokens()
    for name, switch in (("blocks.0.hook_q_input", "use_split_qkv_input"), ("blocks.0.attn.hook_k_input", "use_split_qkv_input"),
                         ("blocks.0.hook_attn_in", "use_attn_in"), ("blocks.0.hook_mlp_in", "use_hook_mlp_in")):
        with pytest.raises(ValueError, match=f"because {switch} is False. Call model.set_{switch}"):
            model.run_with_hooks(ids, fwd_hooks=[(name, lambda t, hook: None)])
    # a filter skips switched-off names; the default cache leaves them and hook_result out
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("_input"))
    assert len(cache) == 0
    _, cache = model.run_with_cache(ids, names_filter=["blocks.0.hook_q_input", "blocks.0.hook_resid_pre"])  # a list too
    assert list(cache) == ["blocks.0.hook_resid_pre"]
    _, cache = model.run_with_cache(ids)
    assert not [k for k in cache if k.endswith(("_input", "attn_in", "mlp_in", "hook_result"))]
    model.set_use_attn_result(True)
    model.set_use_attn_in(True)
    _, cache = model.run_with_cache(ids)
    assert {f"blocks.{i}.attn.hook_result" for i in range(4)} | {f"blocks.{i}.hook_attn_in" for i in range(4)} <= set(cache)
    with pytest.raises(ValueError, match="mutually exclusive"):
        model.set_use_split_qkv_input(True)
    model.set_use_attn_in(False)
    model.set_use_split_qkv_input(True)
    with pytest.raises(ValueError, match="mutually exclusive"):
        model.set_use_attn_in(True)
    # TransformerBridge's names under attn reach the same point; the hook sees the block-level name
    names = []
    model.run_with_hooks(ids, fwd_hooks=[("blocks.2.attn.hook_v_input", lambda t, hook: names.append(hook.name))])
    assert names == ["blocks.2.hook_v_input"]
    assert model.blocks[2].attn.hook_v_input is model.blocks[2].hook_v_input


def test_cfg_fields_tl_code_reads():
    model, _ = pair("llama")
    cfg = model.cfg
    assert cfg.device == "cpu" and "cpu" == cfg.device and cfg.device == torch.device("cpu") and torch.device("cpu") == cfg.device
    assert cfg.device != "cuda" and cfg.device.type == "cpu" and torch.zeros(1, device=cfg.device).device.type == "cpu"
    assert (cfg.rotary_dim, cfg.attn_scale, cfg.attention_dir, cfg.seed) == (16, 4.0, "causal", None)
    assert not (cfg.use_attn_result or cfg.use_split_qkv_input or cfg.use_attn_in or cfg.use_hook_mlp_in or cfg.use_local_attn)
    # TransformerLens's parameter count: 4 d_model x d_head matrices per head, 3 MLP matrices, per layer
    assert cfg.n_params == 4 * (64 * 16 * 4 * 4 + 64 * 128 * 3)
    assert cfg.original_architecture == "LlamaForCausalLM" and cfg.positional_embedding_type == "rotary"
    gemma = pair("gemma2")[0].cfg
    assert gemma.attn_scale == 4.0 and gemma.use_local_attn and gemma.attn_types == ["local", "global"] * 2
    assert gemma.use_normalization_before_and_after and not gemma.use_qk_norm
    assert pair("openelm")[0].cfg.use_qk_norm  # (Qwen3 needs transformers >= 4.51; OpenELM is in every version)
