"""hook_unembed, is_caching, move_model_modules_to_device and a peft-wrapped model called with text,
against the model's own logits and a plain twin."""

import warnings

import pytest
import torch

import tlshim

import models
import tiny


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_hook_unembed_holds_the_output_projections_logits_and_an_edit_flows_into_them(arch):
    models.require(arch)
    model, ids = tlshim.install(models.build(arch)), models.tokens()
    logits, cache = model.run_with_cache(ids)
    unembed = cache["hook_unembed"]
    assert unembed.shape == (*ids.shape, model.cfg.d_vocab_out)
    torch.testing.assert_close(unembed, model.unembed.module(cache["ln_final.hook_normalized"] * model.ln_final.w), rtol=0, atol=1e-5)
    cap = model.cfg.output_logits_soft_cap
    assert torch.equal(logits, torch.tanh(unembed / cap) * cap if cap > 0 else unembed)
    edited = model.run_with_hooks(ids, fwd_hooks=[("hook_unembed", lambda x, hook: x * 0.5)])
    assert torch.equal(edited, torch.tanh(unembed * 0.5 / cap) * cap if cap > 0 else unembed * 0.5)


def test_hook_unembed_is_absent_where_the_unembedding_is_the_embedding_module():
    from fixtures.openelm_fixture import build_openelm_in_memory

    model = tlshim.install(build_openelm_in_memory(seed=0))
    assert "hook_unembed" not in model.hook_dict and "hook_embed" in model.hook_dict


def test_is_caching_while_model_wide_caching_hooks_are_attached():
    model, ids = tlshim.install(models.build("llama")), models.tokens()
    assert model.is_caching is False
    cache = {}
    model.cache_some(cache, lambda name: name.endswith("hook_resid_post"))
    assert model.is_caching is True
    model(ids)
    assert len(cache) == model.cfg.n_layers
    model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: None)
    model.reset_hooks()
    assert model.is_caching is False
    model.run_with_cache(ids)  # scoped hooks: not model-wide caching
    assert model.is_caching is False


def test_move_model_modules_to_device_refuses_an_accelerate_placed_model():
    model, ids = tlshim.install(models.build("llama")), models.tokens()
    expected = model(ids).logits
    model.move_model_modules_to_device()
    assert all(p.device == torch.device("cpu") for p in model.parameters()) and torch.equal(model(ids).logits, expected)
    model.hf_device_map = {"": "cpu"}
    with pytest.raises(ValueError, match="accelerate"):
        model.move_model_modules_to_device()


def test_a_peft_wrapped_installed_model_called_with_text_follows_transformerlens():
    from dropin import fixture, tokenizer
    from test_dropin_accelerate_peft import lora

    tok = tokenizer("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, adapted = lora(fixture("llama")), lora(fixture("llama"))
    tlshim.install(adapted, tokenizer=tok)
    text = "w4 w5 w6 w7"
    ids = adapted.to_tokens(text)
    with torch.no_grad():
        expected = plain(ids).logits
        assert torch.equal(adapted(text), expected)
        assert torch.equal(adapted(text, return_type="loss"), adapted.loss_fn(expected, ids))
        assert torch.equal(adapted.run_with_cache(text)[0], expected)


def _bert_tokenizer(path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "down"]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    return BertTokenizerFast.from_pretrained(path)


def test_to_sentence_pair_tokens_marks_the_segments_and_they_reach_the_token_type_embedding(tmp_path):
    tokenizer = _bert_tokenizer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tlshim.install(tiny.build("bert"), tokenizer=tokenizer)
    pair = model.to_sentence_pair_tokens("the cat", "sat down")
    vocab = tokenizer.get_vocab()
    want = [vocab[w] for w in ("[CLS]", "the", "cat", "[SEP]", "sat", "down", "[SEP]")]
    assert pair["input_ids"].tolist() == [want]
    assert pair["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    assert pair["attention_mask"].tolist() == [[1] * 7]
    _, cache = model.run_with_cache(**pair)
    token_types = model.bert.embeddings.token_type_embeddings(pair["token_type_ids"])
    assert torch.equal(cache["hook_token_type_embed"], token_types)
    assert not torch.equal(token_types[0, 0], token_types[0, -1])  # the two segments differ


def test_to_sentence_pair_tokens_names_a_tokenizer_without_segments(tmp_path):
    from tokenizers import Tokenizer, models as word_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(word_models.WordLevel({f"t{i}": i for i in range(8)}, unk_token="t0"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="t0", pad_token="t0", model_input_names=["input_ids", "attention_mask"])
    model = tlshim.install(tiny.build("llama"), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="no token_type_ids marking the second sentence.*segment-aware tokenizer"):
        model.to_sentence_pair_tokens("t3 t4", "t5")
