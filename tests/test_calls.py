"""TransformerLens calling conventions beside HuggingFace's (tlshim/tl_calls.py, tl_generate.py): HF's
calls unchanged bit for bit and by type, TL's calls with TL's values (hand-computed references on the
plain twin), the token helpers' known answers on the shipped word-level tokenizers."""

import inspect
import threading
import warnings

import pytest
import torch

import tlshim
from dropin import ARCHS, fixture, tokenizer
from models import ALL_ARCHS, build, require, tokens
from tlshim.tl_calls import loss_fn
from tlshim.tl_generate import sample

PROMPT = "cat dog fox owl cat dog fox"  # the shipped llama's induction fixture continues it with " owl"


@pytest.fixture(scope="module")
def pair():
    """The shipped trained llama (its tokenizer prepends <bos>, pads on the right) and its plain twin."""
    model = tlshim.install(fixture("llama"), tokenizer=_asset_tokenizer("llama"))
    return model, fixture("llama")


def _asset_tokenizer(arch):
    import transformers
    from dropin import asset_dir

    return transformers.AutoTokenizer.from_pretrained(asset_dir(arch))


def ce(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)


# -- HF's calls stay HF's --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ALL_ARCHS))
def test_hf_calls_unchanged(arch):
    require(arch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "tlshim switched")
        model = tlshim.install(build(arch), tl_calls=False)
    twin = build(arch)
    ids = tokens()
    mask = torch.ones_like(ids)
    for args, kwargs in (((ids,), {}), ((), dict(input_ids=ids, labels=ids)), ((ids, mask), {})):
        ours, theirs = model(*args, **kwargs), twin(*args, **kwargs)
        assert type(ours) is type(theirs)
        assert torch.equal(ours.logits, theirs.logits)
        if "labels" in kwargs:
            assert torch.equal(ours.loss, theirs.loss)
    assert inspect.signature(model.forward) == inspect.signature(twin.forward)
    assert inspect.signature(model.generate) == inspect.signature(twin.generate)
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **greedy), twin.generate(ids, **greedy))
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **greedy), twin.generate(input_ids=ids, attention_mask=mask, **greedy))


def test_tl_calls_switch_routes_positional_calls_only(pair):
    model, twin = pair
    ids = model.to_tokens(PROMPT)
    want = twin(ids).logits
    assert not torch.is_tensor(model(ids))
    with model.tl_calls():
        assert torch.equal(model(ids), want)  # TL: the logits
        assert type(model(input_ids=ids)) is type(twin(input_ids=ids))  # keyword calls (transformers' own) stay HF's
        seen = []
        other = threading.Thread(target=lambda: seen.append(model(ids)))  # another thread: not switched
        other.start(), other.join()
        assert not torch.is_tensor(seen[0])
        with model.tl_calls(False):
            assert not torch.is_tensor(model(ids))
    assert not torch.is_tensor(model(ids))
    on = tlshim.install(fixture("llama"), tokenizer=model.tokenizer, tl_calls=True)
    assert torch.equal(on(ids), want)
    assert torch.equal(on.generate(ids, max_new_tokens=3, do_sample=False, verbose=False)[:, :-3], ids)  # TL's generate
    assert type(on(input_ids=ids, labels=ids)) is type(twin(input_ids=ids, labels=ids))
    with pytest.raises(TypeError, match="tl_callz.*did you mean 'tl_calls'"):
        tlshim.install(fixture("llama"), tl_callz=True)


# -- TL's forward ------------------------------------------------------------------------------------


def test_text_and_return_types(pair):
    model, twin = pair
    ids = model.to_tokens(PROMPT)
    want = twin(ids).logits
    assert torch.equal(model(PROMPT), want)
    assert torch.equal(model(ids, return_type="logits"), want)
    assert torch.equal(model(input_ids=ids, return_type="logits"), want)
    assert torch.equal(model(ids[0], "logits"), want)  # 1-d ids get a batch axis; return_type positional
    assert model(PROMPT, return_type=None) is None
    per_token = ce(want, ids)
    assert torch.allclose(model(PROMPT, return_type="loss"), per_token.mean(), atol=1e-6)
    assert torch.allclose(model(PROMPT, return_type="loss", loss_per_token=True), per_token, atol=1e-6)
    logits, loss = model(PROMPT, return_type="both")
    assert torch.equal(logits, want) and torch.allclose(loss, per_token.mean(), atol=1e-6)
    assert model.to_str_tokens(want[0, -1].argmax()) == ["owl"]  # the trained model's induction answer


def test_text_batches_pad_as_tl(pair):
    model, twin = pair
    short, long = "cat dog fox", "owl cat dog fox owl"
    right = model([short, long])  # right padding: unmasked, as TransformerLens (causal: real tokens unaffected)
    torch.testing.assert_close(right[0, :4], twin(model.to_tokens(short)).logits[0], rtol=1e-5, atol=1e-5)
    left = model([short, long], padding_side="left")
    torch.testing.assert_close(left[0, -4:], twin(model.to_tokens(short)).logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left[1], twin(model.to_tokens(long)).logits[0], rtol=1e-5, atol=1e-5)
    # the loss of a left-padded batch leaves the pads out (TransformerLens's masked mean)
    ids = model.to_tokens([short, long], padding_side="left")
    mask = (ids != model.tokenizer.pad_token_id).long()
    loss = model([short, long], padding_side="left", return_type="loss", loss_per_token=True)
    assert torch.equal(loss[0, :2], torch.zeros(2)) and loss[0, 2] > 0
    assert torch.allclose(loss_fn(left, ids, mask), loss.sum() / (mask[:, :-1] & mask[:, 1:]).sum())


def test_stop_and_start_at_layer(pair):
    model, twin = pair
    ids = model.to_tokens(PROMPT)
    logits, cache = model.run_with_cache(ids)
    n = model.cfg.n_layers
    assert torch.equal(model(ids, stop_at_layer=0), cache["blocks.0.hook_resid_pre"])
    assert torch.equal(model(ids, stop_at_layer=1), cache["blocks.1.hook_resid_pre"])
    assert torch.equal(model(ids, stop_at_layer=-1), cache[f"blocks.{n - 1}.hook_resid_pre"])
    assert torch.equal(model(ids, stop_at_layer=n), cache[f"blocks.{n - 1}.hook_resid_post"])
    resid = cache["blocks.1.hook_resid_pre"]
    assert torch.equal(model(resid, start_at_layer=1), logits)
    assert torch.allclose(model(resid, start_at_layer=1, tokens=ids, return_type="loss"), ce(logits, ids).mean(), atol=1e-6)
    assert torch.equal(model(cache["blocks.0.hook_resid_pre"], start_at_layer=0, stop_at_layer=1), resid)
    _, partial = model.run_with_cache(resid, start_at_layer=1)
    assert not any(name.startswith("blocks.0.") or name == "hook_embed" for name in partial.keys())
    assert torch.equal(partial["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"])
    _, early = model.run_with_cache(ids, stop_at_layer=1)
    assert not any(name.startswith("blocks.1.") for name in early.keys()) and "blocks.0.hook_resid_post" in early.keys()
    # a hook still edits what the residual stream carries
    edited = model.run_with_hooks(ids, stop_at_layer=1, fwd_hooks=[("blocks.0.hook_resid_post", lambda t, hook: t * 2)])
    assert torch.equal(edited, 2 * resid)


@pytest.mark.parametrize("arch", ARCHS)
def test_tl_forward_on_every_architecture(arch):
    """Loss, stop_at_layer and start_at_layer on each drop-in fixture (OpenELM's per-layer heads included)."""
    require(arch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "tlshim switched")
        model = tlshim.install(fixture(arch))
    twin = fixture(arch)
    ids = tokens() % model.cfg.d_vocab
    with torch.no_grad():
        want = twin(ids, use_cache=False).logits
        logits, cache = model.run_with_cache(ids, names_filter=lambda n: "resid_pre" in n, return_type="logits")
        assert torch.equal(logits, want)
        torch.testing.assert_close(model(ids, return_type="loss"), ce(want, ids).mean(), rtol=1e-6, atol=1e-6)
        last = model.cfg.n_layers - 1
        resid = model(ids, stop_at_layer=last)
        assert torch.equal(resid, cache[f"blocks.{last}.hook_resid_pre"])
        assert torch.equal(model(resid, start_at_layer=last), want)


def test_backward_recipe(pair):
    """TL's run_with_cache(..., return_type="loss", incl_bwd=True): the loss's gradient at each hook."""
    model, twin = pair
    ids = model.to_tokens(PROMPT)
    loss, cache = model.run_with_cache(ids, return_type="loss", incl_bwd=True, names_filter=lambda n: "resid_post" in n)
    kept = {}
    handle = twin.model.layers[0].register_forward_hook(lambda m, a, out: kept.setdefault("out", out[0] if isinstance(out, tuple) else out).retain_grad())
    ref = ce(twin(ids).logits, ids).mean()
    ref.backward()
    handle.remove()
    assert torch.allclose(loss, ref, atol=1e-6)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post_grad"], kept["out"].grad, rtol=1e-5, atol=1e-7)
    model.zero_grad()
    with pytest.raises(ValueError, match="return_type='loss'.*labels"):
        model.run_with_cache(ids, incl_bwd=True)


def test_bad_tl_arguments(pair):
    model, _ = pair
    ids = model.to_tokens(PROMPT)
    with pytest.raises(ValueError, match="return_type must be one of"):
        model(ids, return_type="logit")
    with pytest.raises(ValueError, match="stop_at_layer=7 is out of range: the model has 2 blocks"):
        model(ids, stop_at_layer=7)
    with pytest.raises(ValueError, match="start_at_layer takes the residual stream"):
        model(ids, start_at_layer=1)
    with pytest.raises(ValueError, match="past_kv_cache.*past_key_values"):
        model(ids, past_kv_cache=object())
    with pytest.raises(ValueError, match="no loss"):
        model(ids, stop_at_layer=1, return_type="loss")


# -- tokens --------------------------------------------------------------------------------------------


def test_token_helpers_known_answers(pair):
    model, _ = pair
    tok = model.tokenizer
    cfg = model.cfg
    assert (cfg.tokenizer_prepends_bos, cfg.default_prepend_bos, cfg.default_padding_side, cfg.tokenizer_appends_eos) == (True, True, "right", False)
    cat, dog, bos, pad = (tok.convert_tokens_to_ids(t) for t in ("cat", "dog", "<bos>", "<pad>"))
    assert model.to_tokens("cat dog").tolist() == [[bos, cat, dog]]
    assert model.to_tokens("cat dog", prepend_bos=False).tolist() == [[cat, dog]]
    assert model.to_tokens(["cat", "cat dog"]).tolist() == [[bos, cat, pad], [bos, cat, dog]]
    assert model.to_tokens(["cat", "cat dog"], padding_side="left", prepend_bos=False).tolist() == [[pad, cat], [cat, dog]]
    long = "cat " * (cfg.n_ctx + 5)
    assert model.to_tokens(long).shape[1] == cfg.n_ctx and model.to_tokens(long, truncate=False).shape[1] == cfg.n_ctx + 6
    assert model.to_str_tokens("cat dog") == ["<bos>", "cat", "dog"]
    assert model.to_str_tokens("cat dog", prepend_bos=False) == ["cat", "dog"]
    assert model.to_str_tokens(["cat", "dog fox"]) == [["<bos>", "cat"], ["<bos>", "dog", "fox"]]
    assert model.to_str_tokens(torch.tensor([[cat, dog]])) == ["cat", "dog"] == model.to_str_tokens([cat, dog])
    assert model.to_single_token("dog") == dog and model.to_single_str_token(dog) == "dog"
    assert model.get_token_position("dog", "cat dog cat dog") == 2
    assert model.get_token_position(dog, "cat dog cat dog", mode="last") == 4
    assert model.get_token_position("dog", torch.tensor([cat, dog]), mode="first") == 1
    assert model.to_string(torch.tensor([cat, dog])) == "cat dog" and model.to_string(torch.tensor([[cat], [dog]])) == ["cat", "dog"]
    with pytest.raises(AssertionError, match="'cat dog' is not a single token: it is 2 tokens"):
        model.to_single_token("cat dog")
    with pytest.raises(ValueError, match="does not occur"):
        model.get_token_position("fox", "cat dog")
    with pytest.raises(ValueError, match="mode must be 'first' or 'last'"):
        model.get_token_position("dog", "cat dog", mode="middle")
    with pytest.raises(TypeError, match="int token id"):
        model.to_single_str_token("dog")


def test_tokenizer_without_bos_gets_one(tmp_path):
    """A tokenizer that adds no BOS: TL's default prepends it (its string), prepend_bos=False does not."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    inner = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="t1", eos_token="t2", pad_token="t0")
    model = tlshim.install(build("llama"), tokenizer=tok)
    assert model.cfg.tokenizer_prepends_bos is False
    assert model.to_tokens("t5 t6").tolist() == [[1, 5, 6]]
    assert model.to_tokens("t5 t6", prepend_bos=False).tolist() == [[5, 6]]
    model.cfg.default_prepend_bos = False
    assert model.to_tokens("t5 t6").tolist() == [[5, 6]]
    qwen = tlshim.install(build("qwen2"), tokenizer=tok)  # TransformerLens tokenizes Qwen without a BOS
    assert qwen.cfg.default_prepend_bos is False and qwen.to_tokens("t5 t6").tolist() == [[5, 6]]
    assert qwen.to_tokens("t5 t6", prepend_bos=True).tolist() == [[1, 5, 6]]


def test_loss_fn_hand_computed():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [1.0, 1.0]]]))
    ids = torch.tensor([[0, 1, 0]])
    per = torch.tensor([[-torch.log(torch.tensor(0.5)), -torch.log(torch.tensor(0.25))]])
    assert torch.allclose(loss_fn(logits, ids, per_token=True), per)
    assert torch.allclose(loss_fn(logits, ids), per.mean())
    assert torch.allclose(loss_fn(logits, ids, torch.tensor([[1, 1, 0]])), per[0, 0])


# -- generate ------------------------------------------------------------------------------------------


def test_generate_text(pair):
    model, twin = pair
    ids = model.to_tokens(PROMPT)
    hf = twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert model.generate(PROMPT, max_new_tokens=3, do_sample=False, verbose=False) == PROMPT + " owl cat dog"
    assert torch.equal(model.generate(PROMPT, max_new_tokens=3, do_sample=False, return_type="tokens", verbose=False), hf)
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False, verbose=False, use_past_kv_cache=False), hf)
    assert model.generate([PROMPT, "owl cat dog fox owl cat"], max_new_tokens=2, do_sample=False, verbose=False) == [
        PROMPT + " owl cat", "owl cat dog fox owl cat dog fox"]
    torch.manual_seed(0)
    sampled = model.generate(PROMPT, max_new_tokens=5, temperature=0.7, top_k=3, verbose=False)
    assert sampled.startswith(PROMPT) and len(model.to_str_tokens(sampled)) == len(model.to_str_tokens(PROMPT)) + 5


def test_sample_as_tl():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    assert sample(logits, None, temperature=0.0).tolist() == [1]
    assert sample(logits, None, top_k=1).tolist() == [1]
    assert sample(logits, None, top_p=0.01).tolist() == [1]
    # after the temperature, 10 per earlier occurrence: token 1 (seen twice) drops to 2 / 0.5 - 20 < 1 / 0.5
    assert sample(logits, torch.tensor([[1, 1]]), temperature=0.5, freq_penalty=10.0, top_k=1).tolist() == [2]
    assert sample(logits, torch.tensor([[1, 1]]), temperature=0.05, freq_penalty=0.5, top_k=1).tolist() == [1]
    torch.manual_seed(0)
    draws = torch.stack([sample(logits, None, top_k=2) for _ in range(2000)])
    share = (draws == 1).float().mean().item()
    assert set(draws.unique().tolist()) == {1, 2} and abs(share - 1 / (1 + torch.e ** -1)) < 0.04
