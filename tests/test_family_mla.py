"""Multi-head latent attention (tlshim/family_mla.py): the latents, hook_q / hook_k / hook_v and the kernel's
rot_q / rot_k, each edit against the same edit made by hand on a plain twin, bit for bit; the KV cache of
latents; DeepSeek-V3.2's sparse indexer; W_Q where q is one linear map and the error elsewhere; cfg."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import CONFIG_MAPPING

import tlshim
from tlshim.catalog import expected_names
from tlshim.errors import HookOutputError, UnsupportedModelError

from tiny import build, tokens

#: q through q_a_proj -> q_a_layernorm -> q_b_proj; sarvam_mla has q_proj (no low rank)
TYPES = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite", "youtu", "sarvam_mla")
#: widths that differ from each other, so a head or part split in the wrong place shows
#: (set after the config is built: the fields it derives from them too; head_dim is what the rotary tables are
#: built for); every block dense (GLM's mlp_layer_types), as family_moe serves DeepSeek's router from 5.2x on only
DENSE = dict(first_k_dense_replace=2, mlp_layer_types=["dense", "dense"])
WIDTHS = dict(qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, qk_head_dim=12, head_dim=4, **DENSE)
#: the first version whose DeepSeek router family_moe serves (it returns (logits, weights, indices) there)
MOE_SERVED = Version("5.23")
NOPE, ROPE, V = 8, 4, 6


def _pair(model_type, **fields):
    """(installed model, plain twin) of the same weights."""
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {tlshim.registry.transformers_version()} has no {model_type}")
    model, twin = build(model_type, **{**WIDTHS, **fields}), build(model_type, **{**WIDTHS, **fields})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tlshim.install(model)
    return model, twin


@pytest.fixture(params=({}, {"q_lora_rank": None}), ids=("low_rank_q", "q_proj"))
def pair(request):
    model, twin = _pair("deepseek_v3", **request.param)
    yield model, twin
    tlshim.uninstall(model)


def _attn(model):
    return model.model.layers[0].self_attn


def _by_hand(twin, module, edit, ids):
    """The twin's logits with ``edit`` applied to ``module``'s output."""
    handle = module.register_forward_hook(lambda m, args, out: edit(out))
    try:
        with torch.no_grad():
            return twin(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()


def _hooked(model, name, fn, ids):
    with torch.no_grad():
        return model.run_with_hooks(ids, fwd_hooks=[(name, fn)], use_cache=False)


@pytest.mark.parametrize("model_type", TYPES)
def test_verify_holds(model_type):
    model, _ = _pair(model_type)
    report = tlshim.verify(model, tokens())
    assert report.ok, str(report)
    assert set(model.hook_dict) == expected_names(model._tlshim.spec, model.cfg.n_layers)
    assert "blocks.1.attn.hook_kv_latent" in model.hook_dict and "blocks.0.hook_q_input" not in model.hook_dict


@pytest.mark.parametrize("model_type", ("deepseek_v2", "deepseek_v3", "glm4_moe_lite"))
def test_moe_blocks_after_the_dense_ones(model_type):
    moe = dict(first_k_dense_replace=1, mlp_layer_types=["dense", "sparse"])
    try:
        model, _ = _pair(model_type, **moe)
    except UnsupportedModelError as err:  # a DeepSeek router family_moe does not read on this version (5.0, 5.12)
        assert "router of" in str(err) and Version(transformers.__version__) < MOE_SERVED
        return
    assert "blocks.0.mlp.hook_pre" in model.hook_dict and "blocks.0.mlp.hook_router_logits" not in model.hook_dict
    assert "blocks.1.mlp.hook_router_logits" in model.hook_dict and "blocks.1.mlp.hook_pre" not in model.hook_dict
    report = tlshim.verify(model, tokens())
    assert report.ok, str(report)


def test_shapes_and_cfg(pair):
    model, _ = pair
    _, cache = model.run_with_cache(tokens(), use_cache=False)
    h, b, p = model.cfg.n_heads, 2, 12
    assert (model.cfg.d_head, model.cfg.d_head_qk, model.cfg.rotary_dim, model.cfg.kv_lora_rank) == (V, NOPE + ROPE, ROPE, 32)
    for name, shape in {
        "q": (b, p, h, NOPE + ROPE), "k": (b, p, h, NOPE + ROPE), "v": (b, p, h, V), "rot_q": (b, p, h, NOPE + ROPE),
        "rot_k": (b, p, h, NOPE + ROPE), "z": (b, p, h, V), "kv_latent": (b, p, 32),
    }.items():
        assert cache[f"blocks.0.attn.hook_{name}"].shape == shape, name
    low_rank = _attn(model).q_lora_rank is not None
    assert ("blocks.0.attn.hook_q_latent" in cache) == low_rank
    assert model.cfg.q_lora_rank == (32 if low_rank else None)


def test_hook_k_holds_k_nope_and_the_unrotated_k_pe(pair):
    model, twin = pair
    attn = _attn(twin)
    seen = {}
    handles = [attn.kv_a_proj_with_mqa.register_forward_hook(lambda m, a, out: seen.setdefault("a", out)),
               attn.kv_b_proj.register_forward_hook(lambda m, a, out: seen.setdefault("b", out))]
    with torch.no_grad():
        twin(input_ids=tokens(), use_cache=False)
    for handle in handles:
        handle.remove()
    _, cache = model.run_with_cache(tokens(), use_cache=False)
    k, h = cache["blocks.0.attn.hook_k"], model.cfg.n_heads
    k_pe = seen["a"][..., 32:]
    assert torch.equal(k[..., NOPE:], k_pe[:, :, None].expand(-1, -1, h, -1))
    per_head = seen["b"].reshape(2, 12, h, NOPE + V)
    assert torch.equal(k[..., :NOPE], per_head[..., :NOPE])
    assert torch.equal(cache["blocks.0.attn.hook_v"], per_head[..., NOPE:])
    assert not torch.equal(cache["blocks.0.attn.hook_rot_k"][..., NOPE:], k[..., NOPE:])  # rotary turned k_pe


def _scale_head(head, factor, part=slice(None)):
    def fn(x, hook=None):
        x = x.clone()
        x[:, :, head, part] = x[:, :, head, part] * factor
        return x

    return fn


def _edit_heads(width, fn, h):
    """An edit of a (..., h * width) projection output, through its (..., h, width) view."""
    return lambda out: fn(out.reshape(*out.shape[:-1], h, width)).reshape(out.shape)


def test_hook_q_edit_equals_the_edit_by_hand(pair):
    model, twin = pair
    attn, h = _attn(twin), model.cfg.n_heads
    q = attn.q_b_proj if attn.q_lora_rank is not None else attn.q_proj
    ids = tokens()
    edited = _hooked(model, "blocks.0.attn.hook_q", _scale_head(1, 3.0), ids)
    assert torch.equal(edited, _by_hand(twin, q, _edit_heads(NOPE + ROPE, _scale_head(1, 3.0), h), ids))
    with torch.no_grad():
        assert not torch.equal(edited, twin(input_ids=ids, use_cache=False).logits)


def test_hook_v_and_k_nope_edits_equal_the_edit_by_hand(pair):
    model, twin = pair
    attn, h, ids = _attn(twin), model.cfg.n_heads, tokens()

    def by_hand(fn):
        # kv_b_proj's output is (b, 1, pos, h * (nope + v)) on 5.x, (b, pos, ...) before: edit through a (b, pos, h, .) view
        return _by_hand(twin, attn.kv_b_proj, lambda out: fn(out.reshape(2, 12, h, NOPE + V)).reshape(out.shape), ids)

    edited_v = _hooked(model, "blocks.0.attn.hook_v", _scale_head(2, 0.0), ids)
    assert torch.equal(edited_v, by_hand(_scale_head(2, 0.0, slice(NOPE, None))))
    edited_k = _hooked(model, "blocks.0.attn.hook_k", _scale_head(0, -2.0, slice(0, NOPE)), ids)
    assert torch.equal(edited_k, by_hand(_scale_head(0, -2.0, slice(0, NOPE))))
    assert not torch.equal(edited_k, edited_v)


def test_an_edit_of_k_pe_in_hook_k_raises_naming_hook_rot_k(pair):
    model, _ = pair
    with pytest.raises(HookOutputError, match="k_pe.*hook_rot_k"):
        _hooked(model, "blocks.0.attn.hook_k", _scale_head(0, 2.0), tokens())


def test_latent_edits_equal_the_edit_by_hand(pair):
    model, twin = pair
    attn, ids = _attn(twin), tokens()
    double = lambda x, hook=None: x * 2  # noqa: E731
    assert torch.equal(_hooked(model, "blocks.0.attn.hook_kv_latent", double, ids), _by_hand(twin, attn.kv_a_layernorm, double, ids))
    if attn.q_lora_rank is not None:
        assert torch.equal(_hooked(model, "blocks.0.attn.hook_q_latent", double, ids), _by_hand(twin, attn.q_a_layernorm, double, ids))


def test_rot_k_edit_equals_the_edit_of_the_kernels_keys_by_hand(pair, monkeypatch):
    model, twin = pair
    ids = tokens()
    edited = _hooked(model, "blocks.0.attn.hook_rot_k", _scale_head(1, 0.0, slice(NOPE, None)), ids)
    source = sys.modules[type(_attn(twin)).__module__]
    eager = source.eager_attention_forward

    def edited_keys(module, query, key, *args, **kwargs):
        if module is _attn(twin):  # key: (b, h, pos, e_qk), as the model hands it to its kernel
            key = key.clone()
            key[:, 1, :, NOPE:] = 0
        return eager(module, query, key, *args, **kwargs)

    monkeypatch.setattr(source, "eager_attention_forward", edited_keys)
    with torch.no_grad():
        by_hand = twin(input_ids=ids, use_cache=False).logits
    assert torch.equal(edited, by_hand)
    assert not torch.equal(edited, model(input_ids=ids, use_cache=False).logits)


def test_with_a_kv_cache_of_latents_the_hooks_see_the_new_positions(pair):
    model, twin = pair
    attn, h, ids = _attn(twin), model.cfg.n_heads, tokens()
    shapes = {}

    def record(x, hook):
        shapes[hook.name.split(".")[-1]] = tuple(x.shape)

    with torch.no_grad():
        first = model(input_ids=ids[:, :-1], use_cache=True)
        names = ("hook_k", "hook_v", "hook_rot_k", "hook_rot_q")
        step = model.run_with_hooks(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True,
                                    fwd_hooks=[(f"blocks.0.attn.{n}", record) for n in names] + [("blocks.0.attn.hook_v", _scale_head(3, 0.0))])
        plain = twin(input_ids=ids[:, :-1], use_cache=True)

        def zero_new_v(out):
            heads = out.reshape(2, out.shape[-2], h, NOPE + V).clone()
            heads[:, -1, 3, NOPE:] = 0
            return heads.reshape(out.shape)

        handle = attn.kv_b_proj.register_forward_hook(lambda m, a, out: zero_new_v(out))
        try:
            by_hand = twin(input_ids=ids[:, -1:], past_key_values=plain.past_key_values, use_cache=True).logits
        finally:
            handle.remove()
    assert shapes == {"hook_k": (2, 1, h, NOPE + ROPE), "hook_v": (2, 1, h, V), "hook_rot_k": (2, 1, h, NOPE + ROPE), "hook_rot_q": (2, 1, h, NOPE + ROPE)}
    assert torch.equal(step, by_hand)


def test_weights(pair):
    model, _ = pair
    attn, h = model.blocks[0].attn, model.cfg.n_heads
    assert attn.W_O.shape == (h, V, model.cfg.d_model)
    assert torch.equal(attn.W_O, attn.o_proj.weight.T.reshape(h, V, -1))
    if attn.q_lora_rank is None:
        assert torch.equal(attn.W_Q, attn.q_proj.weight.view(h, NOPE + ROPE, -1).transpose(1, 2))
    else:
        with pytest.raises(UnsupportedModelError, match="q_a_proj -> q_a_layernorm -> q_b_proj"):
            attn.W_Q
    for name in ("W_K", "W_V", "b_V"):
        with pytest.raises(UnsupportedModelError, match="kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj"):
            getattr(attn, name)


def test_an_idle_install_wraps_nothing(pair):
    model, twin = pair
    attn = _attn(model)
    assert all("forward" not in vars(m) for m in attn.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens(), use_cache=False).logits, twin(input_ids=tokens(), use_cache=False).logits)


@pytest.mark.parametrize("model_type", ("deepseek_v32", "glm_moe_dsa"))
def test_the_sparse_indexer_masks_hook_pattern_as_the_model_does(model_type):
    model, twin = _pair(model_type, index_topk=4)  # 12 positions, each query sees its 4 picked keys
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens(), use_cache=False)
        native = twin(input_ids=tokens(), use_cache=False).logits
    assert torch.equal(logits, native)
    seen = (cache["blocks.0.attn.hook_pattern"] > 0).sum(-1)
    assert seen.max() == 4 and seen[..., :4].tolist() == [[[1, 2, 3, 4]] * model.cfg.n_heads] * 2


@pytest.mark.parametrize("model_type, reason", [
    ("axk2", "q fused with an output gate"),
    ("dots3_note_text", "a per-head sigmoid gate"),
])
def test_what_is_not_served_is_refused_with_the_reason(model_type, reason):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {tlshim.registry.transformers_version()} has no {model_type}")
    with pytest.raises(UnsupportedModelError, match=reason):
        tlshim.install(build(model_type))


def test_backward_hooks_of_hook_k_and_hook_v_get_the_gradient_of_what_the_model_reads(pair):
    model, twin = pair
    attn, h, ids = _attn(twin), model.cfg.n_heads, tokens()
    kept = {}
    handle = attn.kv_b_proj.register_forward_hook(lambda m, a, out: kept.setdefault("out", out).retain_grad())
    try:
        twin(input_ids=ids, use_cache=False).logits.square().sum().backward()
    finally:
        handle.remove()
    want = kept["out"].grad.reshape(2, 12, h, NOPE + V)
    got = {}
    with model.hooks(bwd_hooks=[(f"blocks.0.attn.hook_{n}", lambda g, hook: got.setdefault(hook.name[-1], g)) for n in "kv"]):
        model(input_ids=ids, use_cache=False).logits.square().sum().backward()
    assert torch.equal(got["v"], want[..., NOPE:])
    assert torch.equal(got["k"][..., :NOPE], want[..., :NOPE]) and not got["k"][..., NOPE:].any()  # k_pe's part: unused


@pytest.mark.parametrize("model_type, fields", [("deepseek_v3", {}), ("deepseek_v32", {"index_topk": 4})])
def test_under_sdpa_hooked_kernel_inputs_keep_the_models_logits(model_type, fields):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {tlshim.registry.transformers_version()} has no {model_type}")
    model, twin = (build(model_type, attn_implementation="sdpa", **{**WIDTHS, **fields}) for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tlshim.install(model)
    identity = lambda x, hook: x.clone()  # noqa: E731  (an edit that changes nothing, through every path)
    names = [f"blocks.{i}.attn.hook_{n}" for i in range(2) for n in ("rot_q", "rot_k", "k", "v")]
    with torch.no_grad():
        hooked = model.run_with_hooks(tokens(), fwd_hooks=[(n, identity) for n in names], use_cache=False)
        assert torch.equal(hooked, twin(input_ids=tokens(), use_cache=False).logits)
