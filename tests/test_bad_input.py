"""Issue 11, section 4: bad input gets a clear error naming what is wrong, and the model stays intact."""

import numpy as np
import pytest
import torch

import tlshim
from tlshim.errors import HookOutputError, HookShapeError
from models import build, tokens

NAME = "blocks.1.hook_resid_post"


def _assert_intact(model, plain, ids):
    assert not any(point.active for point in model.hook_dict.values())
    assert not any("forward" in vars(module) for module in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)


@pytest.fixture
def pair():
    return tlshim.install(build()), build()


@pytest.mark.parametrize("given, found, hint", [
    (None, "NoneType", ""),
    ("meta-llama/Llama-3.2-1B", "str", "tlshim.from_pretrained('meta-llama/Llama-3.2-1B')"),
    ({"model.embed_tokens.weight": torch.zeros(2)}, "dict", "state_dict"),
    (torch.zeros(3), "Tensor", ""),
])
def test_install_of_something_not_a_model(given, found, hint):
    with pytest.raises(TypeError) as err:
        tlshim.install(given)
    message = str(err.value)
    assert "torch.nn.Module" in message and f"got {found}" in message and hint in message


def test_misspelled_install_option_lists_the_valid_ones():
    model = build()
    with pytest.raises(TypeError) as err:
        tlshim.install(model, keep_attn_implementaton=True)
    message = str(err.value)
    assert "'keep_attn_implementaton'" in message and "did you mean 'keep_attn_implementation'" in message
    assert "Valid options: tokenizer; keep_attn_implementation" in message
    assert not tlshim.is_installed(model)


@pytest.mark.parametrize("tokenizer", ["gpt2", 42, object()])
def test_a_tokenizer_that_is_not_a_tokenizer(tokenizer):
    model = build()
    with pytest.raises(TypeError, match=f"tokenizer must be a HuggingFace tokenizer.*got {type(tokenizer).__name__}"):
        tlshim.install(model, tokenizer=tokenizer)
    assert not tlshim.is_installed(model)


@pytest.mark.parametrize("names_filter", [3, 1.5, torch.tensor([1]), ["blocks.0.hook_resid_pre", 7], {"a": 1}])
def test_names_filter_of_a_wrong_type(pair, names_filter):
    model, plain = pair
    with pytest.raises(TypeError, match="a name \\(str\\), a list of names or a filter function"):
        model.run_with_cache(tokens(), names_filter=names_filter)
    _assert_intact(model, plain, tokens())


def test_fwd_hooks_given_as_one_pair_or_a_dict(pair):
    model, plain = pair
    fn = lambda t, hook: t * 0  # noqa: E731
    with pytest.raises(TypeError, match=r"got one pair: pass \[\('blocks.1.hook_resid_post', fn\)\]"):
        model.run_with_hooks(tokens(), fwd_hooks=(NAME, fn))
    with pytest.raises(TypeError, match=r"got a dict: pass list\(your_dict.items\(\)\)"):
        model.run_with_hooks(tokens(), fwd_hooks={NAME: fn})
    with pytest.raises(TypeError, match="bwd_hooks takes a list of \\(name, fn\\) pairs; one item is str"):
        with model.hooks(bwd_hooks=[NAME]):
            pass
    with pytest.raises(TypeError, match="fwd_hooks takes a list of \\(name, fn\\) pairs, got int"):
        model.run_with_hooks(tokens(), fwd_hooks=5)
    _assert_intact(model, plain, tokens())


@pytest.mark.parametrize("fn", [None, 3, "t * 0"])
def test_hook_that_is_not_callable_is_rejected_when_added(pair, fn):
    model, plain = pair
    message = f"the hook for {NAME} must be a function fn\\(tensor, hook\\).*got {type(fn).__name__}"
    with pytest.raises(TypeError, match=message):
        model.add_hook(NAME, fn)
    with pytest.raises(TypeError, match=message):
        model.add_hook([NAME, "blocks.0.hook_resid_pre"], fn)
    with pytest.raises(TypeError, match=message):
        model.run_with_hooks(tokens(), fwd_hooks=[(NAME, fn)])
    with pytest.raises(TypeError, match=message):
        model.hook_dict[NAME].add_hook(fn)
    _assert_intact(model, plain, tokens())


@pytest.mark.parametrize("make, found", [
    (lambda t: t.long(), "torch.int64 tensor on cpu, expected torch.float32 on cpu"),
    (lambda t: t.half(), "torch.float16 tensor on cpu, expected torch.float32 on cpu"),
    (lambda t: torch.empty_like(t, device="meta"), "torch.float32 tensor on meta, expected torch.float32 on cpu"),
    (lambda t: t.numpy(), "a ndarray, expected None or a torch.Tensor of shape (2, 12, 64), torch.float32, on cpu"),
    (lambda t: t.tolist(), "a list, expected None or a torch.Tensor"),
    (lambda t: 0.0, "a float, expected None or a torch.Tensor"),
])
def test_hook_returning_another_type_dtype_or_device(pair, make, found):
    model, plain = pair

    def steer(tensor, hook):
        return make(tensor.detach())

    with pytest.raises(HookOutputError) as err:
        with torch.no_grad():
            model.run_with_hooks(tokens(), fwd_hooks=[(NAME, steer)])
    assert f"hook 'test_hook_returning_another_type_dtype_or_device.<locals>.steer' on {NAME} returned" in str(err.value)
    assert found in str(err.value)
    _assert_intact(model, plain, tokens())


def test_hook_returning_another_shape_is_a_hook_output_error(pair):
    model, plain = pair
    with pytest.raises(HookShapeError) as err:
        model.run_with_hooks(tokens(), fwd_hooks=[(NAME, lambda t, hook: t[:, :3])])
    assert isinstance(err.value, HookOutputError) and "(2, 3, 64)" in str(err.value)
    _assert_intact(model, plain, tokens())


def test_backward_hook_returning_another_dtype(pair):
    model, plain = pair
    ids = tokens()
    with pytest.raises(HookOutputError, match="returned as gradient a torch.float64 tensor on cpu, expected torch.float32"):
        with model.hooks(bwd_hooks=[(NAME, lambda g, hook: g.double())]):
            model(ids, labels=ids).loss.backward()
    model.zero_grad()
    _assert_intact(model, plain, ids)


def test_hook_returning_a_numpy_array_of_the_right_shape_is_not_accepted(pair):
    model, plain = pair
    with pytest.raises(HookOutputError, match="a ndarray"):
        with torch.no_grad():
            model.run_with_hooks(tokens(), fwd_hooks=[(NAME, lambda t, hook: np.zeros(t.shape, np.float32))])
    _assert_intact(model, plain, tokens())
