"""The contract: install changes nothing HF sees, and install + uninstall leaves no trace."""

import copy
import filecmp
import inspect
import io

import pytest
import torch

import tlshim

from models import ALL_ARCHS, ATTN_IMPLS, build, tokens

ARCHS = list(ALL_ARCHS)
ARCH_ATTN = [(arch, attn) for arch in ALL_ARCHS for attn in ATTN_IMPLS[arch]]


def snapshot(model, ids):
    return {
        "logits": model(ids).logits,
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(name, type(module), sorted(vars(module))) for name, module in model.named_modules()],
        "signatures": [(name, str(inspect.signature(module.forward))) for name, module in model.named_modules()],
        "params": [(name, p.data_ptr()) for name, p in model.named_parameters()],
    }


def assert_same(a, b):
    assert torch.equal(a["logits"], b["logits"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["modules"] == b["modules"]
    assert a["signatures"] == b["signatures"]
    assert a["params"] == b["params"]


@pytest.mark.filterwarnings("ignore:tlshim switched")
@pytest.mark.parametrize("arch, attn", ARCH_ATTN)
def test_install_then_uninstall_leaves_no_trace(arch, attn):
    model = build(arch, attn)
    ids = tokens()
    before = snapshot(model, ids)
    tlshim.install(model)
    assert tlshim.is_installed(model)
    model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, hook: None)])
    model.add_hook("blocks.1.hook_resid_post", lambda t, hook: None, is_permanent=True)
    tlshim.uninstall(model)
    assert not tlshim.is_installed(model)
    assert_same(before, snapshot(model, ids))


@pytest.mark.filterwarnings("ignore:tlshim switched")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("arch, attn", ARCH_ATTN)
def test_idle_installed_logits_equal_native(arch, attn, train, dtype):
    # an installed Gemma2 runs eager attention (see patches/gemma2), so its reference is the eager twin
    model = tlshim.install(build(arch, attn, dtype, train))
    twin = build(arch, "eager" if arch == "gemma2" else attn, dtype, train)
    ids = tokens()
    torch.manual_seed(1)
    got = model(ids)
    torch.manual_seed(1)
    assert torch.equal(got.logits, twin(ids).logits)
    assert type(got) is type(twin(ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_nothing_hf_sees_changes_while_installed(arch, tmp_path):
    model, twin = build(arch), build(arch)
    ids = tokens()
    tlshim.install(model)
    assert_same(
        {**snapshot(model, ids), "params": None, "modules": [(n, type(m).__name__) for n, m in model.named_modules()]},
        {**snapshot(twin, ids), "params": None, "modules": [(n, type(m).__name__) for n, m in twin.named_modules()]},
    )
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in twin.named_parameters()]
    assert repr(model) == repr(twin)
    model.save_pretrained(tmp_path / "installed")
    twin.save_pretrained(tmp_path / "plain")
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "installed").iterdir())
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "plain", tmp_path / "installed", files, shallow=False)
    assert mismatch == [] and errors == []


@pytest.mark.parametrize("arch", ARCHS)
def test_deepcopy_and_torch_save_keep_an_installed_model(arch):
    model = tlshim.install(build(arch))
    ids = tokens()
    _, want = model.run_with_cache(ids)
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, loaded):
        assert tlshim.is_installed(other)
        logits, cache = other.run_with_cache(ids)
        assert torch.equal(logits, model(ids).logits)
        for name in want.keys():
            assert torch.equal(cache[name], want[name]), name
        other.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, hook: t * 0)])
        assert model.hook_dict["blocks.0.hook_resid_pre"] is not other.hook_dict["blocks.0.hook_resid_pre"]
        tlshim.uninstall(other)
        assert type(other) is type(build(arch))
        assert not tlshim.is_installed(other)
    assert tlshim.is_installed(model)
