"""TransformerLens's weight processing in place (tlshim/process_weights.py) against hand-built references
from the HF weights of a plain twin: what each option writes, that the model's log-probabilities stay
the twin's, what cannot apply raises, and that uninstall gives every original parameter back."""

import warnings

import pytest
import torch
import transformers

import tlshim

import models
import tiny

#: (builder, type): RMSNorm with GQA (llama), q/k/v biases and a tied unembedding (qwen2), (1 + w) norms
#: and soft-capped logits (gemma2), LayerNorm with Conv1D and a tied unembedding (gpt2), LayerNorm with
#: biases and a learned position table at an offset (opt)
CASES = [("models", "llama"), ("models", "qwen2"), ("models", "gemma2"), ("tiny", "gpt2"), ("tiny", "opt")]


def build(kind, arch, seed=0):
    if kind == "models":
        models.require(arch)
        return models.build(arch, seed=seed)
    return tiny.build(arch, seed=seed)


def ids_for(kind):
    return models.tokens() if kind == "models" else tiny.tokens()


def snapshot(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("kind,arch", CASES)
def test_log_probs_stay_the_twins_and_uninstall_gives_every_weight_back(kind, arch):
    model, twin, ids = build(kind, arch), build(kind, arch), ids_for(kind)
    before, tied = snapshot(model), model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tlshim.install(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gemma2: center_unembed skipped (soft-capped logits)
        model.process_weights()
    with torch.no_grad():
        native = twin(ids).logits
        processed = model(ids).logits
    torch.testing.assert_close(processed.log_softmax(-1), native.log_softmax(-1), rtol=0, atol=5e-5)
    assert not torch.equal(processed, native)  # the weights did change
    for norm in (model.blocks[0].ln1, model.blocks[1].ln2, model.ln_final):
        assert torch.equal(norm.w, torch.ones_like(norm.w))
        assert getattr(norm, "bias", None) is None or not norm.bias.any()
    tlshim.uninstall(model)
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    with torch.no_grad():
        assert torch.equal(model(ids).logits, native)


def test_rms_fold_scales_the_readers_by_the_norm_weight_and_centers_the_unembedding():
    model, twin = tlshim.install(build("models", "llama")), build("models", "llama")
    model.process_weights()
    layer = twin.model.layers[1]
    w1, w2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
    q = (layer.self_attn.q_proj.weight * w1).T.reshape(64, 4, 16).permute(1, 0, 2)  # (head, d_model, d_head)
    torch.testing.assert_close(model.W_Q[1], q, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.W_gate[1], (layer.mlp.gate_proj.weight * w2).T, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.W_O[1], twin.model.layers[1].self_attn.o_proj.weight.T.reshape(4, 16, 64))
    W_U = (twin.lm_head.weight * twin.model.norm.weight).T
    torch.testing.assert_close(model.W_U, W_U - W_U.mean(-1, keepdim=True), rtol=0, atol=1e-6)
    assert model.cfg.normalization_type == "RMS" and model._tlshim.processed == {
        "fold_ln": True, "center_unembed": True, "fold_value_biases": True}


def test_value_biases_move_into_an_output_bias_the_model_did_not_have():
    model, twin = tlshim.install(build("models", "qwen2")), build("models", "qwen2")
    assert twin.model.layers[0].self_attn.o_proj.bias is None
    model.process_weights(fold_ln=False, center_unembed=False)
    attn = twin.model.layers[0].self_attn
    b_V = attn.v_proj.bias.view(2, 16).repeat_interleave(2, dim=0).reshape(-1)  # each query head's kv head
    expected = attn.o_proj.weight @ b_V
    torch.testing.assert_close(model.model.layers[0].self_attn.o_proj.bias, expected, rtol=0, atol=1e-6)
    assert not model.model.layers[0].self_attn.v_proj.bias.any()
    tlshim.uninstall(model)
    assert model.model.layers[0].self_attn.o_proj.bias is None
    assert "model.layers.0.self_attn.o_proj.bias" not in model.state_dict()


def test_layernorm_centering_makes_every_writer_mean_free():
    model = tlshim.install(build("tiny", "gpt2"))
    model.process_weights()
    for weight in (model.W_E, model.W_pos, model.W_O, model.W_out, model.b_O, model.b_out):
        torch.testing.assert_close(weight.mean(-1), torch.zeros(weight.shape[:-1]), rtol=0, atol=1e-6)
    W_in = model.W_in  # readers of a folded LayerNorm: mean-free over d_model
    torch.testing.assert_close(W_in.mean(-2), torch.zeros(W_in.shape[0], W_in.shape[-1]), rtol=0, atol=1e-6)
    assert model.lm_head.weight is not model.transformer.wte.weight  # untied, as TransformerLens does


def test_what_cannot_apply_raises_when_asked_for_and_is_skipped_with_a_warning_by_default():
    model = tlshim.install(build("models", "llama"))
    with pytest.raises(ValueError, match="center_writing_weights=True cannot apply.*LayerNorm"):
        model.process_weights(center_writing_weights=True)
    with pytest.raises(ValueError, match="refactor_factored_attn_matrices=True cannot apply.*rotary"):
        model.process_weights(refactor_factored_attn_matrices=True)
    gemma = tlshim.install(build("models", "gemma2"))
    with pytest.raises(ValueError, match="soft-capped"):
        gemma.process_weights(center_unembed=True)
    neox = tlshim.install(tiny.build("gpt_neox"))
    with pytest.raises(ValueError, match="fold_ln=True cannot apply.*interleaved"):
        neox.process_weights(fold_ln=True)
    with pytest.warns(UserWarning, match="skipped.*fold_ln"):
        neox.process_weights()
    assert neox._tlshim.processed == {"center_writing_weights": True, "center_unembed": True}


def test_a_second_call_warns_and_changes_nothing():
    model = tlshim.install(build("models", "llama"))
    model.process_weights()
    after = snapshot(model)
    with pytest.warns(UserWarning, match="already ran"):
        model.process_weights_()
    assert all(torch.equal(value, after[name]) for name, value in model.state_dict().items())


def test_compatibility_mode_without_processing_keeps_the_weights():
    model = tlshim.install(build("models", "llama"))
    before = snapshot(model)
    assert model.compatibility_mode is False
    model.enable_compatibility_mode(no_processing=True)
    assert model.compatibility_mode is True
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


@pytest.mark.parametrize("kind,arch", [("models", "qwen2"), ("tiny", "gpt2")])
def test_load_and_process_state_dict_loads_another_models_weights(kind, arch):
    other, ids = tlshim.install(build(kind, arch, seed=5)), ids_for(kind)
    model = tlshim.install(build(kind, arch))
    before = snapshot(model)
    model.load_and_process_state_dict(other.get_params(), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, other(ids).logits)
    with pytest.raises(KeyError, match="not a TransformerLens weight.*get_params"):
        model.load_and_process_state_dict({"blocks.0.attn.W_X": torch.zeros(1)})
    tlshim.uninstall(model)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


def test_load_and_process_with_the_defaults_equals_loading_then_processing():
    source = tlshim.install(build("tiny", "gpt2", seed=5))
    loaded = tlshim.install(build("tiny", "gpt2"))
    loaded.load_and_process_state_dict(source.get_params())
    source.process_weights()
    for name, value in source.get_params().items():
        torch.testing.assert_close(loaded.get_params()[name], value, rtol=0, atol=1e-6, msg=name)


def test_a_processed_model_saved_and_loaded_keeps_its_weights_and_still_uninstalls_to_the_original():
    import io

    model, ids = tlshim.install(build("models", "qwen2")), ids_for("models")
    original = snapshot(build("models", "qwen2"))
    model.process_weights()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    copy = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    with torch.no_grad():
        assert torch.equal(copy(ids).logits, model(ids).logits)
    tlshim.uninstall(copy)
    restored = copy.state_dict()
    assert sorted(restored) == sorted(original) and all(torch.equal(restored[k], original[k]) for k in original)


@pytest.mark.parametrize("arch", ["bert", "bart", "megatron-bert"])
def test_post_ln_blocks_are_not_folded_and_the_rest_keeps_the_log_probs(arch):
    """A post-LN block's norms read what the sub-layer wrote: folding them into W_Q etc. would change the
    output (BERT's log-probs by ~7). The default skips it with a warning; asking for it raises.
    Megatron-BERT's pre-LN blocks fold as usual."""
    if arch not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {arch}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, twin, ids = tlshim.install(tiny.build(arch)), tiny.build(arch), tiny.tokens()
    post = model.cfg.post_ln
    assert post == (arch != "megatron-bert")
    if post:
        with pytest.raises(ValueError, match="post-LN"):
            model.process_weights(fold_ln=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.process_weights()
    assert any("fold_ln (its blocks are post-LN" in str(w.message) for w in caught) == post
    with torch.no_grad():
        got, want = (torch.log_softmax(m(input_ids=ids).logits, -1) for m in (model, twin))
    assert (got - want).abs().max() < 5e-5
