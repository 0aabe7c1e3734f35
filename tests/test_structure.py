"""The structural path: a model type with no spec gets a layout read from its modules and checked on a
probing forward; tlshim.verify reports, hook name by hook name, what holds."""

import warnings

import pytest
import torch

import tlshim
from tlshim import registry

from tiny import build, tokens


def llama_under_another_name():
    """A tiny Llama whose model_type no spec names: it goes through the structural path (on every
    version of the matrix, unlike the Llama-layout types transformers added later)."""
    model = build("llama")
    model.config.model_type = "llama_like"
    return model


def test_an_unverified_type_installs_with_a_warning_saying_what_was_inferred(monkeypatch):
    monkeypatch.setattr(registry, "verified_types", lambda: frozenset())
    model = llama_under_another_name()
    with pytest.warns(UserWarning, match=r"inferred its layout from the modules: blocks at model\.layers.*tlshim\.verify"):
        tlshim.install(model)
    assert tlshim.verify(model).ok
    tlshim.uninstall(model)


def test_a_verified_type_installs_silently(monkeypatch):
    monkeypatch.setattr(registry, "verified_types", lambda: frozenset({"llama_like"}))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tlshim.install(llama_under_another_name())
    assert not [w for w in seen if "tlshim" in str(w.message)], [str(w.message) for w in seen]


@pytest.mark.filterwarnings("ignore:tlshim has no spec")
def test_structural_hooks_equal_a_llama_specs_on_the_same_weights():
    """The layout derived from a Llama's modules gives every hook Llama's spec gives, bit for bit."""
    derived, reference = llama_under_another_name(), build("llama")
    tlshim.install(derived)
    tlshim.install(reference)
    assert set(derived.hook_dict) == set(reference.hook_dict)
    ids = tokens()
    _, mine = derived.run_with_cache(ids, names_filter=lambda name: True)
    _, theirs = reference.run_with_cache(ids, names_filter=lambda name: True)
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name
    assert derived.cfg.to_dict() | {"original_architecture": None} == reference.cfg.to_dict() | {"original_architecture": None}


def test_the_probe_refuses_a_residual_that_is_not_a_plain_sum():
    model = build("granite", residual_multiplier=0.5)  # attention and MLP outputs scaled before the sum
    for layer in model.model.layers:  # by a factor that is no float attribute of the block (one is: Granite's)
        layer.residual_multiplier = torch.tensor(0.5)
    with pytest.raises(tlshim.UnsupportedModelError, match="residual stream is not block input \\+ attention output"):
        tlshim.install(model)
    assert not tlshim.is_installed(model)


@pytest.mark.filterwarnings("ignore:tlshim has no spec")
def test_verify_names_the_hook_whose_invariant_breaks():
    model = tlshim.install(llama_under_another_name())
    assert tlshim.verify(model).ok
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    try:
        report = tlshim.verify(model)
    finally:
        handle.remove()
    assert not report.ok and {f.name for f in report.failures} == {"logits"}
    assert "logits" in str(report)
