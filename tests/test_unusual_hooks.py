"""Issue 11, section 3: hooks that do unusual things (nested forwards, copies, reference cycles, ...)."""

import copy
import functools
import gc
import io
import pickle
import weakref

import pytest
import torch

import tlshim
from tlshim.errors import ConflictError
from models import D_MODEL, build, tokens
from test_roundtrip import assert_same, snapshot


def _vector(seed):
    return torch.randn(D_MODEL, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["blocks.1.attn.hook_rot_q", "blocks.1.attn.hook_pattern", "blocks.2.hook_resid_post"])
def test_a_hook_running_a_forward_of_the_same_model(attn, name):
    model, plain = tlshim.install(build("llama", attn)), build("llama", attn)
    ids, other = tokens(seed=0), tokens(seed=1)
    inner = []

    def nested(tensor, hook):
        inner.append(model(other).logits)  # the outer run's hooks are inactive in here
        return tensor * 1.5

    with torch.no_grad():
        got = model.run_with_hooks(ids, fwd_hooks=[(name, nested)])
        expected = model.run_with_hooks(ids, fwd_hooks=[(name, lambda t, hook: t * 1.5)])
        assert torch.equal(inner[0], plain(other).logits)
    assert torch.equal(got, expected) and not torch.equal(got, plain(ids).logits)
    assert not any("forward" in vars(module) for module in model.modules())


def test_a_nested_forward_after_a_resid_mid_edit_keeps_the_edit():
    model, plain = tlshim.install(build()), build()
    ids, other = tokens(seed=0), tokens(seed=1)
    vector = _vector(5)
    edit = ("blocks.2.hook_resid_mid", lambda t, hook: t + vector)
    inner = []

    def later(tensor, hook):  # inside the same layer, after the edit: the nested forward runs that layer too
        inner.append(model(other).logits)

    with torch.no_grad():
        got = model.run_with_hooks(ids, fwd_hooks=[edit, ("blocks.2.mlp.hook_post", later)])
        expected = model.run_with_hooks(ids, fwd_hooks=[edit])
        assert torch.equal(inner[0], plain(other).logits)
    assert torch.equal(got, expected) and not torch.equal(got, plain(ids).logits)


def test_a_hook_may_run_its_own_hooked_forward():
    model = tlshim.install(build("llama", "sdpa"))
    ids, other = tokens(seed=0), tokens(seed=1)
    with torch.no_grad():
        alone = model.run_with_cache(other, names_filter="blocks.0.attn.hook_pattern")[1]["blocks.0.attn.hook_pattern"]
        inner = []

        def nested(tensor, hook):
            inner.append(model.run_with_cache(other, names_filter="blocks.0.attn.hook_pattern")[1])

        _, outer = model.run_with_cache(ids, names_filter="blocks.0.attn.hook_pattern")
        model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_pattern", nested)])
    assert torch.equal(inner[0]["blocks.0.attn.hook_pattern"], alone)
    assert not torch.equal(outer["blocks.0.attn.hook_pattern"], alone)


def test_a_model_wide_hook_running_a_forward_does_not_recurse():
    model, plain = tlshim.install(build()), build()
    ids = tokens()
    calls = []

    def nested(tensor, hook):
        calls.append(1)
        model(ids)  # would fire this very hook again if it were active inside

    model.add_hook("blocks.0.hook_resid_post", nested)
    with torch.no_grad():
        model(ids)
    assert calls == [1]
    model.reset_hooks()
    assert torch.equal(model(ids).logits, plain(ids).logits)


def test_permanent_is_per_registration():
    model = tlshim.install(build())
    point = model.hook_dict["blocks.0.hook_resid_post"]

    def fn(tensor, hook):
        return None

    (permanent,) = model.add_hook(point.name, fn, is_permanent=True)
    permanent.remove()
    model.add_hook(point.name, fn)  # the same function, now temporary
    model.reset_hooks()
    assert not point.active

    model.add_hook(point.name, fn, is_permanent=True)
    model.add_hook(point.name, fn)
    model.reset_hooks()
    assert [hook.permanent for hook in point.fwd_hooks] == [True]
    model.reset_hooks(including_permanent=True)
    assert not point.active


def test_removing_forward_hooks_keeps_backward_hooks():
    model = tlshim.install(build())
    point = model.hook_dict["blocks.0.hook_resid_post"]
    model.add_hook(point.name, lambda t, hook: None, is_permanent=True)
    model.add_hook(point.name, lambda g, hook: None, dir="bwd", is_permanent=True)
    model.add_hook(point.name, lambda g, hook: None, dir="bwd")
    model.reset_hooks(direction="fwd", including_permanent=True)
    assert not point.fwd_hooks and len(point.bwd_hooks) == 2
    point.remove_hooks("fwd", including_permanent=True)
    assert len(point.bwd_hooks) == 2
    model.reset_hooks()
    assert [hook.permanent for hook in point.bwd_hooks] == [True]


def test_end_of_hooks_block_removes_every_hook_even_when_one_removal_raises():
    model, plain = tlshim.install(build()), build()
    ids = tokens()
    layer = model.model.layers[1]
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.attn.hook_pattern", "blocks.3.mlp.hook_post"]
    with pytest.raises(ConflictError, match=r"model\.layers\.1\.forward was replaced"):
        with model.hooks(fwd_hooks=[(name, lambda t, hook: None) for name in names]):
            layer.forward = functools.partial(type(layer).forward, layer)  # replaces tlshim's wrapper
    assert not any(point.active for point in model.hook_dict.values())
    del layer.forward
    assert not any("forward" in vars(module) for module in model.modules())
    assert torch.equal(model(ids).logits, plain(ids).logits)


def test_shallow_copy_is_refused():
    model = tlshim.install(build())
    with pytest.raises(TypeError, match=r"copy\.copy of a model with tlshim installed.*copy\.deepcopy"):
        copy.copy(model)
    tlshim.uninstall(model)
    assert copy.copy(model) is not model  # a plain model copies as before


def _torch_roundtrip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m)), "torch.save": _torch_roundtrip}


@pytest.mark.parametrize("how", list(COPIES))
def test_deep_copies_are_independent_installed_models(how):
    model, plain = tlshim.install(build("llama", "sdpa")), build("llama", "sdpa")
    ids = tokens()
    twin = COPIES[how](model)
    assert tlshim.is_installed(twin) and twin.cfg.device == model.cfg.device
    vector = _vector(6)
    with torch.no_grad():
        steered = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_post", lambda t, hook: t + vector)])
        assert torch.equal(twin.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_post", lambda t, hook: t + vector)]), steered)
    tlshim.uninstall(twin)
    assert tlshim.is_installed(model) and not tlshim.is_installed(twin)
    assert torch.equal(twin(ids).logits, plain(ids).logits)
    assert torch.equal(model(ids).logits, plain(ids).logits)


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("where", ["run_with_hooks", "add_hook"])
def test_copying_with_a_hook_active_is_a_clear_error(how, where):
    model = tlshim.install(build("llama", "sdpa"))
    ids = tokens()
    before = snapshot(model, ids)
    pattern = "blocks.0.attn.hook_pattern"
    with pytest.raises(TypeError, match="when no hook is active"):
        if where == "add_hook":
            model.add_hook(pattern, lambda t, hook: None, is_permanent=True)
            COPIES[how](model)
        else:
            with model.hooks(fwd_hooks=[(pattern, lambda t, hook: None)]):
                COPIES[how](model)
    model.reset_hooks(including_permanent=True)
    assert_same(before, snapshot(model, ids))
    COPIES[how](model)  # and it copies once no hook is active


@pytest.mark.parametrize("work", ["install", "hooks", "uninstall"])
def test_an_installed_model_is_freed_by_its_last_reference(work):
    gc.collect()
    gc.disable()  # freed by reference counting alone, as a plain model is
    try:
        model = build("llama", "sdpa")
        plain_ref = weakref.ref(build("llama", "sdpa"))
        assert plain_ref() is None
        tlshim.install(model)
        if work != "install":
            with torch.no_grad():
                model.run_with_cache(tokens())
                model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, hook: t * 1)])
            model.add_hook("blocks.1.hook_resid_post", _no_op, is_permanent=True)
        if work == "uninstall":
            tlshim.uninstall(model)
        ref = weakref.ref(model)
        del model
        assert ref() is None
    finally:
        gc.enable()


def _no_op(tensor, hook):
    return None


def _ablate_head(tensor, hook):
    return tensor * torch.tensor([1.0, 0.0, 1.0, 1.0])[:, None, None]


CHECKPOINT_EDITS = {
    "mlp_post": ("blocks.1.mlp.hook_post", lambda t, hook: t * 1.5),
    "pattern": ("blocks.1.attn.hook_pattern", _ablate_head),
    "ln2": ("blocks.2.ln2.hook_normalized", lambda t, hook: t * 0.5),
    "resid_mid": ("blocks.2.hook_resid_mid", lambda t, hook: t * 1.5 + _vector(7)),
    "rot_k": ("blocks.0.attn.hook_rot_k", lambda t, hook: t * 0.5),
}


def _grads_after_run_with_hooks(model, ids, edit):
    logits = model.run_with_hooks(ids, fwd_hooks=[edit] if edit else [])
    logits.logsumexp(-1).mean().backward()  # after run_with_hooks has returned
    return {name: param.grad for name, param in model.named_parameters()}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("edit", list(CHECKPOINT_EDITS))
def test_checkpointed_layers_recompute_with_the_hooks_of_their_forward(edit, mode):
    model = tlshim.install(build(train=True))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    ids = tokens()
    got = _grads_after_run_with_hooks(model, ids, CHECKPOINT_EDITS[edit])
    expected = _grads_after_run_with_hooks(tlshim.install(build(train=True)), ids, CHECKPOINT_EDITS[edit])
    plain = build(train=True)
    plain(ids).logits.logsumexp(-1).mean().backward()
    assert any(not torch.equal(param.grad, expected[name]) for name, param in plain.named_parameters())
    for name, grad in got.items():
        assert torch.equal(grad, expected[name]), name
    assert not any(point.active for point in model.hook_dict.values())
    assert not any("forward" in vars(module) for module in model.modules())
    assert not any(type(vars(module).get("_gradient_checkpointing_func")).__name__ == "Replaying" for module in model.modules())
