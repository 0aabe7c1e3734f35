"""TransformerLens's analysis API on an installed model, by known answers: direct logit attribution of a
full decomposition sums to the true logit difference, decompositions sum to the residual stream,
factored circuits and composition scores equal their dense definitions, and per-layer head counts
(OpenELM) refuse to act as one number. (Parity with TransformerLens itself: test_tl_cache.py.)"""

import warnings

import pytest
import torch

import tlshim
from tlshim.tl_switches import switched_off

from dropin import fixture, tokenizer
from models import ALL_ARCHS, build, require, tokens

CLOSE = dict(rtol=1e-4, atol=1e-4)


def installed(arch, **overrides):
    require(arch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "tlshim switched")
        return tlshim.install(build(arch, **overrides))


def run(model, ids=None):
    ids = tokens() if ids is None else ids
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)
    return ids, logits, cache


def raw_logit_diff(model, cache, right, wrong):
    """The last position's logit difference before any soft-cap and b_U, from the native modules."""
    hidden = model.ln_final(cache["blocks.3.hook_resid_post"])[:, -1]
    w_u = model.unembed.module.weight
    return ((w_u[right] - w_u[wrong]) * hidden).sum(-1)


#: every architecture whose residual stream is a plain sum of component outputs (Gemma2 adds post-norms)
SUMMING = [a for a in ALL_ARCHS if a != "gemma2"]


@pytest.mark.parametrize("arch", list(ALL_ARCHS))
def test_dla_of_a_full_decomposition_sums_to_the_logit_difference(arch):
    """TransformerLens's recipe (decompose, apply_ln_to_stack at the final norm, dot with the token
    directions) recovers the true logit difference: the final norm's (random) weight is in the directions."""
    model = installed(arch)
    ids, logits, cache = run(model)
    right, wrong = ids[:, -1], ids[:, -2]
    want = raw_logit_diff(model, cache, right, wrong)
    stack = cache.decompose_resid(pos_slice=-1)
    got = cache.logit_attrs(stack, right, incorrect_tokens=wrong, pos_slice=-1)
    assert got.shape == (stack.shape[0], 2)
    torch.testing.assert_close(got.sum(0), want, **CLOSE)
    if model.ln_final.w is not None:  # the bare W_U columns miss the weight
        bare = (cache.apply_ln_to_stack(stack, pos_slice=-1).sum(0) * (model.W_U[:, right] - model.W_U[:, wrong]).T).sum(-1)
        assert not torch.allclose(want, bare, atol=1e-2)
    heads = cache.stack_head_results(pos_slice=-1, incl_remainder=True)
    torch.testing.assert_close(cache.logit_attrs(heads, right, incorrect_tokens=wrong, pos_slice=-1).sum(0), want, **CLOSE)
    if arch != "gemma2":
        full = cache.get_full_resid_decomposition(pos_slice=-1)
        torch.testing.assert_close(cache.logit_attrs(full, right, incorrect_tokens=wrong, pos_slice=-1).sum(0), want, **CLOSE)


def test_dla_on_the_trained_model_with_string_tokens():
    model = tlshim.install(fixture("llama"), tokenizer=tokenizer("llama"))
    ids = model.to_tokens("the cat sat on the mat and the cat")
    _, logits, cache = run(model, ids)
    right, wrong = model.to_str_tokens(ids)[-2], model.to_str_tokens(ids)[-3]
    r, w = model.tokens_to_residual_directions(right), model.tokens_to_residual_directions(wrong)
    assert r.shape == (model.cfg.d_model,)
    got = cache.logit_attrs(cache.decompose_resid(pos_slice=-1), right, incorrect_tokens=wrong, pos_slice=-1).sum(0)
    tid = lambda s: model.tokenizer(s, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    torch.testing.assert_close(got, logits[:, -1, tid(right)] - logits[:, -1, tid(wrong)], **CLOSE)
    assert not torch.allclose(r, model.W_U[:, tid(right)])
    with pytest.raises(ValueError, match="tokens"):
        model.tokens_to_residual_directions("the cat sat")


def test_tokens_to_residual_directions_fold_the_final_norm_weight():
    model = installed("gemma2")  # the (1 + w) norm: its effective weight
    ids = torch.tensor([[3, 7], [9, 11]])
    want = model.W_U[:, ids].movedim(0, -1) * (1 + model.model.norm.weight)
    torch.testing.assert_close(model.tokens_to_residual_directions(ids), want)
    torch.testing.assert_close(model.tokens_to_residual_directions(5), model.W_U[:, 5] * (1 + model.model.norm.weight))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_logit_lens_renormalises_each_entry_and_ends_at_the_logits(arch):
    model = installed(arch)
    _, logits, cache = run(model)
    stack = cache.accumulated_resid(apply_ln=True)
    for i in (0, 2):
        torch.testing.assert_close(stack[i], model.ln_final(cache["resid_pre", i]))
    assert torch.equal(model.unembed(stack[-1]), logits)  # Gemma2: the final soft-cap included


def test_pos_slice_int_drops_the_position_axis():
    model = installed("llama")
    _, _, cache = run(model)
    for stack in (cache.decompose_resid(pos_slice=-1), cache.accumulated_resid(pos_slice=-1, apply_ln=True),
                  cache.stack_head_results(pos_slice=-1, apply_ln=True), cache.get_full_resid_decomposition(pos_slice=-1)):
        assert stack.shape[1:] == (2, 64)
    assert cache.decompose_resid(pos_slice=(2, 5)).shape[1:] == (2, 3, 64)


def test_negative_layer_indices():
    _, _, cache = run(installed("llama"))
    assert cache["resid_post", -1] is cache["blocks.3.hook_resid_post"]
    assert cache["pattern", -2, "attn"] is cache["blocks.2.attn.hook_pattern"]
    assert ("q", -1) in cache


def test_neuron_results_sum_to_the_mlp_output():
    model = installed("llama", mlp_bias=True, attention_bias=True)
    _, _, cache = run(model)
    neurons = cache.get_neuron_results(1)
    assert neurons.shape == (2, 12, 128, 64)
    torch.testing.assert_close(neurons.sum(-2) + model.blocks[1].mlp.b_out, cache["mlp_out", 1], **CLOSE)
    direction = torch.randn(64)
    torch.testing.assert_close(cache.get_neuron_results(1, project_output_onto=direction), neurons @ direction, **CLOSE)
    assert cache.get_neuron_results(1, neuron_slice=5, pos_slice=-1).shape == (2, 64)
    stack, labels = cache.stack_neuron_results(2, return_labels=True, incl_remainder=True)
    assert stack.shape == (2 * 128 + 1, 2, 12, 64) and labels[:2] == ["L0N0", "L0N1"] and labels[-1] == "remainder"
    torch.testing.assert_close(stack.sum(0), cache["resid_pre", 2], **CLOSE)
    one, labels = cache.stack_neuron_results(2, neuron_slice=7, return_labels=True)
    assert labels == ["L0N7", "L1N7"] and torch.equal(one[1], neurons[..., 7, :])
    scaled = cache.stack_neuron_results(2, apply_ln=True, incl_remainder=True, project_output_onto=direction, pos_slice=-1)
    torch.testing.assert_close(scaled, cache.stack_neuron_results(2, apply_ln=True, incl_remainder=True, pos_slice=-1) @ direction, **CLOSE)


@pytest.mark.parametrize("arch", SUMMING)
def test_full_decomposition_sums_to_the_residual_stream(arch):
    overrides = dict(mlp_bias=True, attention_bias=True) if arch == "llama" else {}
    model = installed(arch, **overrides)
    _, _, cache = run(model)
    stack, labels = cache.get_full_resid_decomposition(return_labels=True)
    n_heads = len(model.all_head_labels)
    assert labels[:n_heads] == model.all_head_labels and labels[-2:] == ["embed", "bias"]
    assert len(labels) == stack.shape[0] == n_heads + 4 * 128 + 2
    torch.testing.assert_close(stack.sum(0), cache["resid_post", -1], **CLOSE)
    mid, labels = cache.get_full_resid_decomposition(layer=2, mlp_input=True, expand_neurons=False, return_labels=True)
    assert labels[-4:] == ["0_mlp_out", "1_mlp_out", "embed", "bias"]
    torch.testing.assert_close(mid.sum(0), cache["resid_mid", 2], **CLOSE)


def test_accumulated_bias():
    model = installed("llama", mlp_bias=True, attention_bias=True)
    layers = model.model.layers
    want = layers[0].self_attn.o_proj.bias + layers[0].mlp.down_proj.bias + layers[1].self_attn.o_proj.bias
    torch.testing.assert_close(model.accumulated_bias(1, mlp_input=True), want)
    torch.testing.assert_close(model.accumulated_bias(1, include_mlp_biases=False), layers[0].self_attn.o_proj.bias)
    assert torch.equal(installed("llama").accumulated_bias(4), torch.zeros(64))


def test_cache_slicing_stacking_autodiff():
    _, _, cache = run(installed("llama"))
    one = cache.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim and torch.equal(one["resid_pre", 2], cache["resid_pre", 2][1])
    first = cache.apply_slice_to_batch_dim((0, 1))
    assert first.has_batch_dim and first["pattern", 0].shape[0] == 1
    assert torch.equal(one.decompose_resid(pos_slice=-1), cache.decompose_resid(pos_slice=-1)[:, 1])
    assert torch.equal(cache.stack_activation("pattern"), torch.stack([cache["pattern", i] for i in range(4)]))
    assert cache.stack_activation("resid_post", layer=2).shape == (2, 2, 12, 64)
    assert cache.has_embed and not cache.has_pos_embed
    assert cache.ssm_layers() == []
    with pytest.raises(RuntimeError, match="no SSM mixer layers"):
        cache.compute_ssm_state()
    try:
        cache.toggle_autodiff(False)
        assert not torch.is_grad_enabled()
    finally:
        cache.toggle_autodiff(True)
    assert torch.is_grad_enabled()


def test_logit_lens_names_what_it_needs():
    import importlib.util

    _, _, cache = run(installed("llama"))
    if importlib.util.find_spec("transformer_lens") is not None:
        pytest.skip("transformer_lens is installed here: test_tl_cache.py compares its logit_lens")
    with pytest.raises(ImportError, match="accumulated_resid"):
        cache.logit_lens()


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_factored_circuits_and_composition_scores(arch):
    model = installed(arch)
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    ov, qk = model.OV, model.QK
    assert tuple(ov.shape) == (4, 4, 64, 64)
    l, h = 2, 3
    torch.testing.assert_close(ov.AB[l, h], model.W_V[l, h // group] @ model.W_O[l, h])
    torch.testing.assert_close(qk.AB[l, h], model.W_Q[l, h] @ model.W_K[l, h // group].T)
    dense = lambda m: m / m.norm()  # noqa: E731
    scores = {mode: model.all_composition_scores(mode) for mode in "QKV"}
    assert scores["Q"].shape == (4, 4, 4, 4)
    a, b = ov.AB[0, 1], {"Q": qk.AB[2, 3], "K": qk.AB[2, 3].T, "V": ov.AB[2, 3]}
    for mode in "QKV":
        torch.testing.assert_close(scores[mode][0, 1, 2, 3], (dense(a) @ dense(b[mode])).norm(), rtol=1e-3, atol=1e-5)
        assert torch.all(scores[mode][2, :, 1] == 0) and torch.all(scores[mode][1, :, 1] == 0)
    with pytest.raises(ValueError, match="'Q', 'K', 'V'"):
        model.all_composition_scores("X")


def test_own_factored_matrix():
    from tlshim.factored import FactoredMatrix

    torch.manual_seed(0)
    m = FactoredMatrix(torch.randn(3, 8, 4, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64))
    U, S, V = m.svd()
    torch.testing.assert_close(U @ torch.diag_embed(S) @ V.transpose(-2, -1), m.AB)
    torch.testing.assert_close(m.norm(), m.AB.norm(dim=(-2, -1)))
    torch.testing.assert_close(m.T.AB, m.AB.transpose(-2, -1))
    torch.testing.assert_close(m[1].AB, m.AB[1])
    square = FactoredMatrix(torch.randn(8, 4, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64))
    eig = torch.linalg.eigvals(square.AB).abs().sort().values[-4:]  # rank 4: the other four are zero
    torch.testing.assert_close(square.eigenvalues.abs().sort().values, eig)


def test_head_labels_and_hook_utilities():
    model = installed("llama")
    assert model.all_head_labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"] == model.all_head_labels()[:5]
    assert len(model.hook_points()) == len(model.hook_dict)
    ids, _, want = run(model)
    cache, fwd, bwd = model.get_caching_hooks(lambda n: n.endswith("hook_resid_post"))
    assert bwd == [] and len(fwd) == 4
    with model.hooks(fwd_hooks=fwd), torch.no_grad():
        model(ids)
    assert cache.keys() == {f"blocks.{i}.hook_resid_post" for i in range(4)}
    assert torch.equal(cache["blocks.2.hook_resid_post"], want["resid_post", 2])
    everything = {}
    model.cache_all(everything)
    with torch.no_grad():
        model(ids)
    # hook_result too (computed because it is hooked); the switch hooks are off, as in TransformerLens
    assert set(everything) == {name for name in model.hook_dict if not name.endswith(switched_off(model.cfg))}
    assert torch.equal(everything["blocks.1.attn.hook_pattern"], want["pattern", 1])
    model.remove_all_hook_fns()
    everything.clear()
    with torch.no_grad():
        model(ids)
    assert everything == {}


def test_openelm_per_layer_heads_and_tied_unembed():
    from fixtures.openelm_fixture import build_openelm_in_memory

    model = tlshim.install(build_openelm_in_memory(seed=0))
    cfg = model.cfg
    assert cfg.n_heads == [2, 4, 4, 4] and cfg.n_heads[1] == 4
    with pytest.raises(TypeError, match=r"cfg.n_heads\[layer\]"):
        range(cfg.n_heads)
    with pytest.raises(TypeError, match="differs between layers"):
        cfg.n_layers * cfg.n_heads
    assert model.all_head_labels[:3] == ["L0H0", "L0H1", "L1H0"] and len(model.all_head_labels) == 14
    x = torch.randn(2, 3, cfg.d_model)
    torch.testing.assert_close(model.unembed(x), x @ model.W_U)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens() % cfg.d_vocab, use_cache=False)
    torch.testing.assert_close(model.unembed(model.ln_final(cache["resid_post", -1])), logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="per-layer form"):
        model.OV
    assert cache.stack_head_results().shape[0] == 14
    full, labels = cache.get_full_resid_decomposition(return_labels=True)  # each layer its own heads and width
    assert len(labels) == full.shape[0] == 14 + sum(cfg.d_mlp) + 2 and "L0N31" in labels and "L0N32" not in labels
    torch.testing.assert_close(full.sum(0), cache["resid_post", -1], **CLOSE)


def test_one_head_count_is_an_int():
    model = installed("llama")
    assert model.cfg.n_heads == 4 and isinstance(model.cfg.n_heads, int)
    assert model.cfg.n_key_value_heads == 2 and model.cfg.d_mlp == 128


def test_caching_hooks_slice_positions_per_hook_layout():
    model = installed("llama")
    ids, _, want = run(model)
    cache, fwd, _ = model.get_caching_hooks(["blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern", "blocks.1.hook_resid_post"],
                                            remove_batch_dim=True, pos_slice=-1)
    with model.hooks(fwd_hooks=fwd), torch.no_grad():
        model(ids[:1])
    assert torch.equal(cache["blocks.1.attn.hook_z"], want["z", 1][0, -1])
    assert torch.equal(cache["blocks.1.attn.hook_pattern"], want["pattern", 1][0, :, -1])
    assert torch.equal(cache["blocks.1.hook_resid_post"], want["resid_post", 1][0, -1])
