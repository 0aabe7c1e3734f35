"""Bad input gets a clear error; install is all or nothing; hooks never outlive their run."""

import pytest
import torch
import transformers

import tlshim
from tlshim import journal
from tlshim.errors import HookNameError, HookShapeError, UnsupportedModelError, UnsupportedVersionError
from tlshim import registry

from models import build, tokens
from test_roundtrip import assert_same, snapshot


def test_install_twice_warns_and_changes_nothing():
    model = tlshim.install(build())
    state = vars(model)["_tlshim"]
    with pytest.warns(UserWarning, match="already installed"):
        assert tlshim.install(model) is model
    assert vars(model)["_tlshim"] is state


def test_uninstall_clean_model_warns():
    model = build()
    with pytest.warns(UserWarning, match="not installed"):
        tlshim.uninstall(model)


def test_unsupported_model_type_lists_supported_types_and_version():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(UnsupportedModelError) as err:
        tlshim.install(model)
    message = str(err.value)
    assert "'gpt2'" in message and transformers.__version__ in message
    for model_type in registry.ARCHITECTURES:
        assert model_type in message


def test_version_outside_every_range_names_version_ranges_and_fix(monkeypatch):
    from packaging.version import Version

    monkeypatch.setattr(registry, "transformers_version", lambda: Version("4.40.2"))
    model = build()
    with pytest.raises(UnsupportedVersionError) as err:
        tlshim.install(model)
    assert "4.40.2" in str(err.value) and ">=4.48" in str(err.value) and "pip install" in str(err.value)
    assert not tlshim.is_installed(model)


@pytest.mark.parametrize("fail_at", ["first", "hook point", "class swap", "last"])
def test_install_is_all_or_nothing(monkeypatch, fail_at):
    model = build()
    ids = tokens()
    before = snapshot(model, ids)
    applied = []
    apply_entry, apply_swap = journal.DictEntry.apply, journal.ClassSwap.apply

    def should_fail(record):
        return {
            "first": not applied,
            "hook point": getattr(record, "key", None) == "hook_pattern" and len(applied) > 50,
            "class swap": isinstance(record, journal.ClassSwap) and getattr(record, "where", "") == "blocks.2.mlp",
            "last": getattr(record, "key", None) == "_tlshim",
        }[fail_at]

    def failing(original):
        def apply(self):
            if should_fail(self):
                raise RuntimeError("injected failure")
            applied.append(self)
            original(self)

        return apply

    monkeypatch.setattr(journal.DictEntry, "apply", failing(apply_entry))
    monkeypatch.setattr(journal.ClassSwap, "apply", failing(apply_swap))
    with pytest.raises(RuntimeError, match="injected failure"):
        tlshim.install(model)
    assert not tlshim.is_installed(model)
    assert_same(before, snapshot(model, ids))


def test_unknown_hook_name_suggests_the_closest():
    model = tlshim.install(build())
    ids = tokens()
    for call in (
        lambda: model.add_hook("blocks.0.hook_resid_pree", lambda t, hook: None),
        lambda: model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_patern", lambda t, hook: None)]),
        lambda: model.run_with_cache(ids, names_filter=["blocks.0.attn.hook_patern"]),
    ):
        with pytest.raises(HookNameError) as err:
            call()
        assert "blocks.0.hook_resid_pre" in str(err.value) or "blocks.0.attn.hook_pattern" in str(err.value)
    assert all(not point.active for point in model.hook_dict.values())


def test_wrong_shape_names_the_hook():
    model = tlshim.install(build())
    with pytest.raises(HookShapeError, match=r"blocks\.1\.attn\.hook_z.*\(2, 12, 4, 16\)"):
        model.run_with_hooks(tokens(), fwd_hooks=[("blocks.1.attn.hook_z", lambda t, hook: t[:, :, :2])])
    assert all(not point.active for point in model.hook_dict.values())
    assert "forward" not in vars(model.model.layers[1].self_attn.o_proj)


def test_exception_in_hook_propagates_and_leaves_no_hook():
    model = tlshim.install(build())
    ids = tokens()

    def broken(tensor, hook):
        raise ZeroDivisionError("inside the hook")

    with pytest.raises(ZeroDivisionError):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.2.attn.hook_pattern", broken)])
    with pytest.raises(ZeroDivisionError):
        with model.hooks(fwd_hooks=[("blocks.2.hook_resid_mid", broken)]):
            model(ids)
    assert all(not point.active for point in model.hook_dict.values())
    assert not any("forward" in vars(module) for module in model.modules())
    assert "config" in vars(model.model.layers[2].self_attn)
    assert type(vars(model.model.layers[2].self_attn)["config"]) is type(model.config)
