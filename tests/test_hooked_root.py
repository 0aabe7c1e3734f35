"""HookedRootModule / TransformerBridge housekeeping (tlshim/tl_hooked_root.py) against known answers:
the model's own cache, its own parameters and its own weights."""

import pytest
import torch

import tlshim

from models import build, require, tokens
from tiny import build as build_tiny

ARCHS = ("llama", "qwen2", "gemma2")


def installed(arch):
    require(arch)
    return tlshim.install(build(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_input_to_embed_gives_resid_pre_0_and_resumes_to_the_logits(arch):
    model, ids = installed(arch), tokens()
    logits, cache = model.run_with_cache(ids)
    residual, toks, shortformer, mask = model.input_to_embed(ids)
    assert torch.equal(residual, cache["blocks.0.hook_resid_pre"])
    assert torch.equal(toks, ids) and shortformer is None and mask is None
    assert torch.equal(model(residual, start_at_layer=0), logits)
    assert torch.equal(model.get_residual(cache["hook_embed"], 0, return_shortformer_pos_embed=False), cache["hook_embed"])


@pytest.mark.parametrize("arch", ARCHS)
def test_add_caching_hooks_fills_the_cache_run_with_cache_gives(arch):
    model, ids = installed(arch), tokens()
    _, expected = model.run_with_cache(ids)
    cache = model.add_caching_hooks()
    assert cache == {}
    model(ids)
    assert sorted(cache) == sorted(expected.keys())
    assert all(torch.equal(cache[name], expected[name]) for name in cache)
    model.reset_hooks()
    cache.clear()
    model(ids)
    assert cache == {}


def test_perma_hooks_survive_reset_and_list_hooks_shows_them():
    model, ids = installed("llama"), tokens()
    plain = model(ids).logits
    zero = lambda t, hook: t * 0  # noqa: E731
    model.add_perma_hook("blocks.1.hook_mlp_out", zero)
    model.add_hook("blocks.0.attn.hook_z", zero)
    assert sorted(model.list_hooks()) == ["blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"]
    assert list(model.list_hooks(including_permanent=False)) == ["blocks.0.attn.hook_z"]
    assert list(model.list_hooks("blocks.1.hook_mlp_out")) == ["blocks.1.hook_mlp_out"]
    model.reset_hooks()
    assert list(model.list_hooks()) == ["blocks.1.hook_mlp_out"]
    assert not torch.equal(model(ids).logits, plain)
    model.reset_hooks(including_permanent=True)
    assert model.list_hooks() == {} and torch.equal(model(ids).logits, plain)


def test_hook_lookups_and_checks():
    model = installed("llama")
    point = model.get_hook_point("blocks.0.attn.hook_q")
    assert point is model.hook_dict["blocks.0.attn.hook_q"] and model.get_hook_point("blocks.0.nope") is None
    assert model.mod_dict["blocks.0.hook_resid_post"] is model.hook_dict["blocks.0.hook_resid_post"]
    assert model.mod_dict["model.layers.0.self_attn"] is model.model.layers[0].self_attn
    assert "attn.hook_pattern" in model.block_hooks(0) and all(not n.startswith("blocks.") for n in model.block_hooks(1))
    with pytest.raises(ValueError, match="use_hook_mlp_in is False"):
        model.check_hooks_to_add(model.hook_dict["blocks.0.hook_mlp_in"], "blocks.0.hook_mlp_in", print)
    model.check_hooks_to_add(point, "blocks.0.attn.hook_q", print)
    model.check_and_add_hook(point, "blocks.0.attn.hook_q", lambda t, hook: None)
    assert list(model.list_hooks()) == ["blocks.0.attn.hook_q"]
    point.ctx["x"] = 1
    model.clear_contexts()
    assert point.ctx == {}


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_and_tl_named_weights(arch):
    model = installed(arch)
    assert model.n_params_total == sum(p.numel() for p in build(arch).parameters())
    params = model.tl_parameters()
    assert params["blocks.1.attn.W_Q"] is not None and torch.equal(params["blocks.1.attn.W_Q"], model.W_Q[1])
    assert params["blocks.1.attn.W_K"].shape == params["blocks.1.attn.W_Q"].shape  # GQA heads repeated, as TransformerBridge
    assert torch.equal(params["unembed.W_U"], model.W_U) and torch.equal(params["embed.W_E"], model.W_E)
    assert torch.equal(params["blocks.0.ln1.w"], model.blocks[0].ln1.w)
    assert dict(model.tl_named_parameters()).keys() == params.keys() == model.get_params().keys()


def test_layers_and_attention_layer_circuits():
    model = installed("llama")
    n = model.cfg.n_layers
    assert model.layer_types() == ["attn+mlp"] * n and model.composition_layer_indices() == list(range(n))
    assert model.block_submodules(0) == ["ln1", "attn", "ln2", "mlp"]
    assert model.attn_head_labels == model.all_head_labels
    indices, W_O = model.stack_params_for("attn", "attn.W_O")
    assert indices == list(range(n)) and torch.equal(W_O, model.W_O)
    for pair, whole in ((model.QK_for_attn_layers(), model.QK), (model.OV_for_attn_layers(), model.OV)):
        assert pair[0] == list(range(n)) and torch.equal(pair[1].AB, whole.AB)
    with pytest.raises(ValueError, match="no block has a submodule 'ssm'"):
        model.stack_params_for("ssm", "ssm.W")


def test_the_model_and_its_hf_generate():
    model, ids = installed("llama"), tokens(batch=1, seq=5)
    assert model.original_model is model and model.compatibility_mode is False
    plain = build("llama")
    out = model.hf_generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, plain.generate(ids, max_new_tokens=4, do_sample=False))
    assert model.get_pos_offset(None, 1) == 0


def test_rotary_models_have_no_w_pos():
    model = installed("llama")
    assert model.cfg.positional_embedding_type == "rotary"
    with pytest.raises(ValueError, match="no position embedding table"):
        model.W_pos
    with pytest.raises(ValueError, match="no position embedding table"):
        model.W_E_pos


@pytest.mark.filterwarnings("ignore:tlshim has no spec")
def test_absolute_positions_w_pos_and_get_residual():
    model = tlshim.install(build_tiny("gpt2"))
    ids = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.W_pos, model.transformer.wpe.weight)
    assert model.W_E_pos.shape == (model.cfg.d_vocab + model.cfg.n_ctx, model.cfg.d_model)
    _, cache = model.run_with_cache(ids)
    residual, _ = model.get_residual(cache["hook_embed"], 0)
    assert torch.allclose(residual, cache["blocks.0.hook_resid_pre"], atol=1e-6)
    assert torch.equal(model.input_to_embed(ids)[0], cache["blocks.0.hook_resid_pre"])
    assert torch.equal(model.get_params()["pos_embed.W_pos"], model.W_pos)
    assert model.real_components["pos_embed"] == ("transformer.wpe", model.transformer.wpe)


@pytest.mark.parametrize("use_past_kv_cache", (True, False))
def test_generate_stream_yields_what_generate_gives(use_past_kv_cache):
    model, ids = installed("llama"), tokens(batch=2, seq=5)
    whole = model.generate(ids, max_new_tokens=7, do_sample=False, stop_at_eos=False, verbose=False)
    chunks = list(model.generate_stream(ids, max_new_tokens=7, max_tokens_per_yield=4, do_sample=False,
                                        stop_at_eos=False, use_past_kv_cache=use_past_kv_cache))
    # as in TransformerLens: the first batch is the prompt and the first token (yielded at once, being
    # over the limit), then batches of 4, then the rest
    assert [c.shape[1] for c in chunks] == [5 + 1, 4, 2]
    assert torch.equal(torch.cat(chunks, dim=-1), whole)


def test_generate_stream_pads_finished_rows_and_stops_when_all_are_done():
    model, ids = installed("llama"), tokens(batch=2, seq=5)
    first = model.generate(ids, max_new_tokens=1, do_sample=False, stop_at_eos=False, verbose=False)[:, -1]
    eos = int(first[0])  # row 0 ends at once; row 1 goes on (unless it picks the same token)
    chunks = list(model.generate_stream(ids, max_new_tokens=6, max_tokens_per_yield=100, do_sample=False, eos_token_id=eos))
    out = torch.cat(chunks, dim=-1)
    assert (out[0, 5:] == eos).all()
    assert out.shape[1] == 5 + (1 if int(first[1]) == eos else 6)


def test_hook_aliases_resolve_to_their_points_and_rotary_emb_is_the_models():
    model = installed("llama")
    aliases = model.hook_aliases
    assert aliases["blocks.2.attn.hook_q_input"] == "blocks.2.hook_q_input"
    assert len(aliases) == 4 * model.cfg.n_layers  # attn_in, q/k/v input per block
    model.set_use_split_qkv_input(True)
    assert all(model.get_hook_point(alias) is model.hook_dict[name] for alias, name in aliases.items())
    assert model.rotary_emb is model.model.rotary_emb


@pytest.mark.filterwarnings("ignore:tlshim has no spec")
def test_models_without_rotary_say_so():
    with pytest.raises(ValueError, match="no rotary embedding module"):
        tlshim.install(build_tiny("gpt2")).rotary_emb


def test_supported_models_and_check_model_support():
    model = installed("llama")
    listed = model.list_supported_models()
    assert {"llama", "mistral", "qwen2", "gemma2"} <= set(listed) and listed == sorted(listed)
    assert model.list_supported_models(architecture="llama") == ["llama"]
    assert set(model.list_supported_models(verified_only=True)) <= set(listed)
    assert model.check_model_support("llama")["is_supported"] is True
    unknown = model.check_model_support("no_such_type")
    assert unknown["is_supported"] is False and unknown["architecture_id"] == "no_such_type"


def test_check_model_support_reads_a_local_checkpoint(tmp_path):
    build("qwen2").config.save_pretrained(tmp_path)
    found = tlshim.install(build("llama")).check_model_support(str(tmp_path))
    assert found["architecture_id"] == "qwen2" and found["is_supported"] is True


def test_context_level_counts_the_threads_hook_blocks():
    model, ids = installed("llama"), tokens(batch=1, seq=4)
    seen = []
    assert model.context_level == 0
    with model.hooks():
        with model.hooks():
            model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, hook: seen.append(model.context_level))])
        assert model.context_level == 1
    assert seen == [3] and model.context_level == 0


def test_real_components_are_the_hf_modules():
    model = installed("llama")
    found = model.real_components
    assert found["embed"] == ("model.embed_tokens", model.model.embed_tokens)
    assert found["unembed"] == ("lm_head", model.lm_head) and found["ln_final"] == ("model.norm", model.model.norm)
    assert found["blocks"] == ("model.layers", list(model.model.layers)) and "pos_embed" not in found


def _unchanged(model, before):
    return all(torch.equal(value, before[name]) for name, value in model.get_params().items())


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_layer_norm_reproduces_q_and_logits_from_the_normalized_stream(arch):
    model, ids = installed(arch), tokens()
    before = {name: value.clone() for name, value in model.get_params().items()}
    logits, cache = model.run_with_cache(ids)
    folded = model.fold_layer_norm(model.get_params(), fold_biases=False, center_weights=False)
    assert "blocks.0.ln1.w" not in folded and "ln_final.w" not in folded and _unchanged(model, before)
    x = cache["blocks.1.hook_resid_pre"] / cache["blocks.1.ln1.hook_scale"]
    q = torch.einsum("bpd,hde->bphe", x, folded["blocks.1.attn.W_Q"]) + folded.get("blocks.1.attn.b_Q", 0)
    assert torch.allclose(q, cache["blocks.1.attn.hook_q"], atol=1e-4)
    if model.cfg.output_logits_soft_cap > 0:  # Gemma 2 soft-caps the logits after the unembed
        return
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"] / cache["ln_final.hook_scale"]
    assert torch.allclose(final @ folded["unembed.W_U"], logits, atol=1e-4)


def test_centering_leaves_the_model_and_centers_the_weights():
    model = installed("llama")
    before = {name: value.clone() for name, value in model.get_params().items()}
    written = model.center_writing_weights(model.get_params())
    for key in ("embed.W_E", "blocks.2.attn.W_O", "blocks.2.mlp.W_out"):
        assert torch.allclose(written[key].mean(-1), torch.zeros(()), atol=1e-6)
    unembed = model.center_unembed(model.get_params())["unembed.W_U"]
    shift = model.W_U - unembed  # a constant per d_model row: logits move by one number per position
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-6)
    assert _unchanged(model, before)


def test_fold_value_biases_keeps_attn_out():
    model, ids = installed("qwen2"), tokens()
    _, cache = model.run_with_cache(ids)
    params, folded = model.get_params(), model.fold_value_biases(model.get_params())
    assert not torch.equal(params["blocks.1.attn.b_V"], torch.zeros_like(params["blocks.1.attn.b_V"]))
    assert torch.equal(folded["blocks.1.attn.b_V"], torch.zeros_like(params["blocks.1.attn.b_V"]))
    z = cache["blocks.1.attn.hook_z"] - params["blocks.1.attn.b_V"]  # what z is with b_V = 0
    out = torch.einsum("bphe,hed->bpd", z, folded["blocks.1.attn.W_O"]) + folded["blocks.1.attn.b_O"]
    assert torch.allclose(out, cache["blocks.1.hook_attn_out"], atol=1e-5)


@pytest.mark.filterwarnings("ignore:tlshim has no spec")
def test_refactor_keeps_the_circuits_and_refuses_rotary():
    model = tlshim.install(build_tiny("gpt2"))
    params = model.get_params()
    new = model.refactor_factored_attn_matrices(params)

    def qk(p, l):
        eff = lambda w, b: torch.cat([p[f"blocks.{l}.attn.{w}"], p[f"blocks.{l}.attn.{b}"][:, None]], 1)  # noqa: E731
        return eff("W_Q", "b_Q") @ eff("W_K", "b_K").transpose(-2, -1)

    for l in range(model.cfg.n_layers):
        assert torch.allclose(qk(new, l), qk(params, l), atol=1e-4)
        ov = lambda p: p[f"blocks.{l}.attn.W_V"] @ p[f"blocks.{l}.attn.W_O"]  # noqa: E731
        assert torch.allclose(ov(new), ov(params), atol=1e-5)
        W_O = new[f"blocks.{l}.attn.W_O"]
        assert torch.allclose(W_O @ W_O.transpose(-2, -1), torch.eye(W_O.shape[1]).expand(W_O.shape[0], -1, -1), atol=1e-4)
    with pytest.raises(ValueError, match="rotary"):
        installed("llama").refactor_factored_attn_matrices({})


def test_fill_missing_keys_and_loading_without_processing(tmp_path):
    model, ids = installed("llama"), tokens()
    own = {"blocks.0.attn.W_Q": torch.zeros(1)}
    filled = model.fill_missing_keys(own)
    assert filled.keys() == model.get_params().keys() and filled["blocks.0.attn.W_Q"] is own["blocks.0.attn.W_Q"]
    build("llama").save_pretrained(tmp_path)
    loaded = model.from_pretrained_no_processing(str(tmp_path), attn_implementation="eager")
    assert "blocks.0.hook_resid_pre" in loaded.hook_dict
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_boot_transformers_installs_a_given_model_or_loads_one(tmp_path):
    ids = tokens()
    given = build("llama")
    booted = tlshim.install(build("qwen2")).boot_transformers("ignored", hf_model=given)
    assert booted is given and "blocks.0.hook_resid_pre" in booted.hook_dict
    build("llama").save_pretrained(tmp_path)
    loaded = booted.boot_transformers(str(tmp_path), hf_config_overrides={"attn_implementation": "eager"}, dtype=torch.float64)
    assert loaded.W_E.dtype == torch.float64 and "blocks.0.hook_resid_pre" in loaded.hook_dict
    assert torch.allclose(loaded(ids).logits.float(), build("llama")(ids).logits, atol=1e-4)
