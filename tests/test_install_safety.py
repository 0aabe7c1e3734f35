"""Issue 11, section 2: never half-installed, never half-uninstalled."""

import functools

import pytest
import torch

import tlshim
from tlshim import journal
from tlshim.errors import ConflictError, TlshimError, UnsupportedModelError
from models import build, tokens
from test_roundtrip import assert_same, snapshot


def _replace_slots(model):
    """A user's changes on top of tlshim: an alias, a hook point, and a forward tlshim has wrapped."""
    model.add_hook("blocks.1.hook_resid_post", lambda t, hook: None, is_permanent=True)
    layer = model.model.layers[1]
    layer.forward = functools.partial(type(layer).forward, layer)
    model.blocks = torch.nn.ModuleList()  # nn.Module registers it as a submodule: tlshim's alias is gone
    model.model.layers[0].hook_resid_pre = "mine"


def test_uninstall_with_replaced_slots_changes_nothing_and_names_each():
    model = tlshim.install(build())
    ids = tokens()
    _replace_slots(model)
    with pytest.raises(ConflictError) as err:
        tlshim.uninstall(model)
    message = str(err.value)
    for slot in ("model.layers.1.forward", "model.blocks", "blocks.0.hook_resid_pre", "still installed", "force=True"):
        assert slot in message
    assert tlshim.is_installed(model)
    assert model.hook_dict["blocks.1.hook_resid_post"].active  # the permanent hook is still there
    assert "_tlshim" in vars(model) and "hook_embed" in vars(model)
    logits, cache = model.run_with_cache(ids, names_filter="blocks.2.hook_resid_post")  # still usable
    assert cache["blocks.2.hook_resid_post"].shape == (2, 12, 64)


def test_forced_uninstall_removes_what_is_still_tlshims_and_reports_the_rest():
    model, plain = build(), build()
    ids = tokens()
    tlshim.install(model)
    _replace_slots(model)
    with pytest.warns(UserWarning, match=r"left what had been replaced: .*model\.layers\.1\.forward.*model\.blocks"):
        tlshim.uninstall(model, force=True)
    assert not tlshim.is_installed(model)
    layer = model.model.layers[1]
    assert isinstance(vars(layer)["forward"], functools.partial)  # the user's, left in place
    assert vars(model.model.layers[0])["hook_resid_pre"] == "mine"
    left = {("", "blocks"), ("model.layers.0", "hook_resid_pre"), ("model.layers.1", "forward")}
    plain_modules = dict(plain.named_modules())
    for name, module in model.named_modules():
        if name == "blocks":  # the user's ModuleList
            continue
        assert type(module) is type(plain_modules[name]), name
        extra = {key for key in vars(module) if key not in vars(plain_modules[name])}
        assert {(name, key) for key in extra} <= left, (name, extra)
    assert torch.equal(model(ids).logits, plain(ids).logits)
    del vars(layer)["forward"], vars(model.model.layers[0])["hook_resid_pre"], model.blocks
    tlshim.install(model)  # and it installs again
    assert tlshim.is_installed(model)


def test_uninstall_after_a_config_proxy_was_replaced():
    model = tlshim.install(build("llama", "sdpa"))
    model.add_hook("blocks.0.attn.hook_pattern", lambda t, hook: None)
    attn = model.model.layers[0].self_attn
    attn.config = model.config
    with pytest.raises(ConflictError, match=r"model\.layers\.0\.self_attn\.config"):
        tlshim.uninstall(model)
    assert tlshim.is_installed(model)
    with pytest.warns(UserWarning, match="self_attn.config"):
        tlshim.uninstall(model, force=True)
    assert "forward" not in vars(attn) and vars(attn)["config"] is model.config


def test_one_module_at_two_places():
    model = build()
    model.model.layers[1] = model.model.layers[0]
    with pytest.raises(UnsupportedModelError, match=r"model\.model\.layers\.1 is the same module object as model\.model\.layers\.0"):
        tlshim.install(model)
    assert not tlshim.is_installed(model)
    assert not any(key.startswith("hook_") for module in model.modules() for key in vars(module))


@pytest.mark.parametrize("field, value, said, found", [
    ("num_attention_heads", 8, "config.num_attention_heads (cfg.n_heads) is 8",
     "blocks.0.attn's q projection has 64 outputs = 4 heads of d_head 16"),
    ("num_key_value_heads", 4, "config.num_key_value_heads (cfg.n_key_value_heads) is 4",
     "blocks.0.attn's k projection has 32 outputs = 2 heads of d_head 16"),
    ("num_hidden_layers", 3, "config.num_hidden_layers (cfg.n_layers) is 3", "model.model.layers has 4"),
    ("hidden_size", 32, "config.hidden_size (cfg.d_model) is 32", "model.model.embed_tokens.weight has 64"),
    ("head_dim", 8, "config.head_dim (cfg.d_head) is 8", "blocks.0.attn.head_dim has 16"),
    ("intermediate_size", 64, "config.intermediate_size (cfg.d_mlp) is 64", "blocks.0.mlp's up projection has 128"),
])
def test_config_contradicting_the_modules(field, value, said, found):
    model = build()
    ids = tokens()
    before = snapshot(model, ids)
    setattr(model.config, field, value)
    with pytest.raises(UnsupportedModelError) as err:
        tlshim.install(model)
    assert f"{said} but {found}" in str(err.value)
    assert not tlshim.is_installed(model)
    setattr(model.config, field, {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
                                  "hidden_size": 64, "head_dim": 16, "intermediate_size": 128}[field])
    assert_same(before, snapshot(model, ids))


@pytest.mark.parametrize("add, message", [
    (lambda m: m.register_buffer("hook_embed", torch.zeros(1)), "model already has a buffer named 'hook_embed'"),
    (lambda m: m.add_module("blocks", torch.nn.ModuleList()), "model already has a submodule named 'blocks'"),
    (lambda m: m.model.layers[0].input_layernorm.register_buffer("hook_scale", torch.ones(1)),
     "blocks.0.ln1 already has a buffer named 'hook_scale'"),
    (lambda m: m.model.layers[2].register_parameter("hook_resid_mid", torch.nn.Parameter(torch.ones(1))),
     "blocks.2 already has a parameter named 'hook_resid_mid'"),
    (lambda m: m.model.layers[1].self_attn.register_buffer("W_Q", torch.ones(1)), "blocks.1.attn already has a buffer 'W_Q'"),
    (lambda m: m.add_module("cfg", torch.nn.Identity()), "model already has a submodule 'cfg'"),
])
def test_user_submodule_or_buffer_with_a_name_tlshim_adds(add, message):
    model = build()
    add(model)
    ids = tokens()
    before = snapshot(model, ids)
    with pytest.raises(ConflictError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tlshim.install(model)
    assert not tlshim.is_installed(model)
    assert_same(before, snapshot(model, ids))


def _failing_install(monkeypatch, undo_failures):
    """Fail the 60th apply of install, and the first ``undo_failures`` undos of the 30th record."""
    applied = []
    apply, undo = journal.DictEntry.apply, journal.DictEntry.undo
    failures = [undo_failures]

    def failing_apply(self):
        if len(applied) == 60:
            raise RuntimeError("injected apply failure")
        applied.append(self)
        apply(self)

    def failing_undo(self):
        if self is applied[30] and failures[0] > 0:
            failures[0] -= 1
            raise RuntimeError("injected undo failure")
        undo(self)

    monkeypatch.setattr(journal.DictEntry, "apply", failing_apply)
    monkeypatch.setattr(journal.DictEntry, "undo", failing_undo)
    return applied


def test_a_rollback_step_failing_once_still_leaves_the_model_exact(monkeypatch):
    model = build()
    ids = tokens()
    before = snapshot(model, ids)
    _failing_install(monkeypatch, undo_failures=1)
    with pytest.raises(RuntimeError, match="injected apply failure"):
        tlshim.install(model)
    assert not tlshim.is_installed(model)
    assert_same(before, snapshot(model, ids))


def test_a_rollback_step_that_keeps_failing_is_named(monkeypatch):
    model = build()
    applied = _failing_install(monkeypatch, undo_failures=2)
    with pytest.raises(TlshimError) as err:
        tlshim.install(model)
    stuck = applied[30]
    assert f"could not undo {stuck.where}" in str(err.value) and "injected undo failure" in str(err.value)
    assert isinstance(err.value.__cause__, RuntimeError) and "injected apply failure" in str(err.value.__cause__)
    assert not tlshim.is_installed(model)
    leftover = [(module, key) for module in model.modules() for key in vars(module) if key.startswith("hook_")]
    assert leftover == [(stuck.obj, stuck.key)]  # everything else was undone
