"""Issue 5, accelerate and peft: offloaded and LoRA-adapted models install, hook and uninstall.

accelerate puts its hook in each module's instance ``forward`` and calls ``module._old_forward`` once
the offloaded weights are loaded; tlshim wraps that inner slot, so its hooks (hook_result included,
which reads W_O) run on the live weights. peft swaps q_proj etc. for LoRA layers around the
originals; tlshim finds the module by path when a hook goes live, so hook_q is the adapted output.
"""

import functools

import pytest
import torch

import tlshim

from dropin import ARCHS, add_vector, fixture, greedy, prompts, steering_vector

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),  # peft on tf 5.x
    # cpu_offload leaves every parameter on meta between calls, so generate guesses the model is there
    pytest.mark.filterwarnings("ignore:You are calling .generate.. with the `input_ids` being on a device type different"),
]


def last(model):
    """The last layer: offloaded to disk below."""
    return model.config.num_hidden_layers - 1


def accelerate_hooked(model):
    layer = model.model.layers[last(model)]
    return "_hf_hook" in vars(layer) or "_hf_hook" in vars(layer.self_attn.q_proj)


def ALL(name):
    return True  # every name, hook_result included


def need(name):
    return pytest.importorskip(name, reason=f"{name} is not installed (pip install tlshim[test])")


def device_map(n_layers, near="cpu"):
    """Embeddings, the first half of the layers, norm and head on ``near``; the rest on disk."""
    layers = {f"model.layers.{i}": near if i < n_layers // 2 else "disk" for i in range(n_layers)}
    return {"model.embed_tokens": near, "model.rotary_emb": near, **layers, "model.norm": near, "lm_head": near}


def offload(model, how, tmp_path):
    accelerate = need("accelerate")
    if how == "disk":
        # force_hooks: the CPU part gets accelerate's hooks too (on a CPU-only machine it would not)
        accelerate.dispatch_model(model, device_map(model.config.num_hidden_layers), main_device="cpu",
                                  offload_dir=str(tmp_path), force_hooks=True)
    else:
        accelerate.cpu_offload(model, execution_device="cpu")  # every weight on meta, streamed from CPU
    return model


def _steer(model):
    return [(f"blocks.{last(model)}.hook_resid_post", add_vector(steering_vector(model.cfg.d_model)))]


@functools.lru_cache(maxsize=None)
def not_offloaded(arch, device="cpu"):
    """The same model, not offloaded: its logits, cache, and steered and plain greedy runs."""
    model = tlshim.install(fixture(arch).to(device))
    ids = prompts(arch, [10])[0][None].to(device)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=ALL)
    with model.hooks(fwd_hooks=_steer(model)):
        steered = greedy(model, ids, new=5)
    return ids, logits, cache, steered, greedy(model, ids, new=5)[0]


def _check_offloaded(model, arch, device="cpu"):
    assert accelerate_hooked(model)
    ids, ref_logits, ref_cache, ref_steered, ref_plain = not_offloaded(arch, device)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=ALL)
    assert f"blocks.{last(model)}.attn.hook_result" in cache
    assert torch.equal(logits, ref_logits)
    assert list(cache.keys()) == list(ref_cache.keys())
    for name in ref_cache.keys():  # hook_result of an offloaded layer included: it reads the live W_O
        assert torch.equal(cache[name], ref_cache[name]), name

    with model.hooks(fwd_hooks=_steer(model)):
        steered = greedy(model, ids, new=5)
    assert torch.equal(steered[0], ref_steered[0])
    # weights read back from an offload store can sit differently in memory, and a 1-row matmul over
    # them may round its last bit differently (seen with plain accelerate on the cached steps too)
    torch.testing.assert_close(steered[1], ref_steered[1], rtol=1e-5, atol=1e-5)
    assert not torch.equal(steered[0], ref_plain)
    return ids, ref_logits


@pytest.mark.parametrize(
    "order, how", [("install_first", "disk"), ("dispatch_first", "disk"), ("dispatch_first", "cpu_offload")]
)
@pytest.mark.parametrize("arch", ARCHS)
def test_offloaded_model_installs_and_hooks_fire(arch, order, how, tmp_path):
    model = fixture(arch)
    if order == "install_first":
        offload(tlshim.install(model), how, tmp_path)
    else:
        tlshim.install(offload(model, how, tmp_path))
    ids, ref_logits = _check_offloaded(model, arch)

    tlshim.uninstall(model)  # accelerate's hooks stay and keep working
    assert accelerate_hooked(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a device_map spanning GPU and CPU)")
@pytest.mark.parametrize("arch", ARCHS)
def test_device_map_spanning_gpu_and_cpu(arch, tmp_path):
    model = fixture(arch)
    dmap = device_map(model.config.num_hidden_layers, near=0)
    dmap["model.layers.1"] = "cpu"  # offloaded to CPU: streamed to the GPU at each forward
    need("accelerate").dispatch_model(model, dmap, main_device="cuda", offload_dir=str(tmp_path))
    tlshim.install(model)
    _check_offloaded(model, arch, "cuda")


def lora(model):
    peft = need("peft")
    # init_lora_weights=False: a non-zero B, so the LoRA delta is there to be seen
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_dropout=0.0)
    torch.manual_seed(1)
    return peft.get_peft_model(model, config)


def _check_adapted(adapted, plain_adapted, ids):
    """hook_q / hook_v are the LoRA layers' outputs (base + delta); logits and generate unchanged."""
    with torch.no_grad():
        logits, cache = adapted.run_with_cache(ids)
        assert torch.equal(logits, plain_adapted(ids).logits)
        for i, layer in enumerate(adapted.get_base_model().model.layers):
            x = cache[f"blocks.{i}.ln1.hook_normalized"]
            q_proj = layer.self_attn.q_proj
            want = q_proj(x).view(cache[f"blocks.{i}.attn.hook_q"].shape)
            assert torch.equal(cache[f"blocks.{i}.attn.hook_q"], want)
            assert not torch.equal(want, q_proj.base_layer(x).view(want.shape)), "the LoRA delta must show"
            v_proj = layer.self_attn.v_proj
            assert torch.equal(cache[f"blocks.{i}.attn.hook_v"], v_proj(x).view(cache[f"blocks.{i}.attn.hook_v"].shape))
    hooks = [(f"blocks.1.hook_resid_post", add_vector(steering_vector(adapted.cfg.d_model)))]
    with adapted.hooks(fwd_hooks=hooks):
        steered = greedy(adapted, ids, new=6)[0]
    assert not torch.equal(steered, greedy(plain_adapted, ids, new=6)[0])
    assert torch.equal(greedy(adapted, ids, new=6)[0], greedy(plain_adapted, ids, new=6)[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_install_on_peft_model_then_uninstall_and_merge(arch):
    ids = prompts(arch, [10])[0][None]
    plain_adapted = lora(fixture(arch))
    adapted = lora(fixture(arch))
    assert tlshim.install(adapted) is adapted  # the peft wrapper is accepted and returned
    assert tlshim.is_installed(adapted) and tlshim.is_installed(adapted.get_base_model())
    _check_adapted(adapted, plain_adapted, ids)

    tlshim.uninstall(adapted)
    assert not tlshim.is_installed(adapted)
    merged = adapted.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, plain_adapted(ids).logits, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapt_installed_model_then_merge_while_installed(arch):
    ids = prompts(arch, [10])[0][None]
    plain_adapted = lora(fixture(arch))
    adapted = lora(tlshim.install(fixture(arch)))
    assert tlshim.is_installed(adapted)
    _check_adapted(adapted, plain_adapted, ids)

    merged = adapted.merge_and_unload()  # LoRA layers replaced by merged nn.Linear: hooks follow them
    assert tlshim.is_installed(merged)
    with torch.no_grad():
        logits, cache = merged.run_with_cache(ids)
        torch.testing.assert_close(logits, plain_adapted(ids).logits, rtol=1e-5, atol=1e-4)
        attn = merged.model.layers[0].self_attn
        x = cache["blocks.0.ln1.hook_normalized"]
        assert torch.equal(cache["blocks.0.attn.hook_q"], attn.q_proj(x).view(cache["blocks.0.attn.hook_q"].shape))
    tlshim.uninstall(merged)
    assert not any(key.startswith("hook_") for key in vars(merged.model.layers[0].self_attn))


@pytest.mark.parametrize("arch", ARCHS[:1])
def test_hook_live_while_accelerate_adds_and_removes_its_hooks(arch, tmp_path):
    """accelerate moves a live tlshim wrapper into _old_forward (dispatch) or back to forward (removal):
    the hook keeps firing, and releasing it leaves exactly accelerate's own entries."""
    accelerate = need("accelerate")
    model = tlshim.install(fixture(arch))
    ids = prompts(arch, [10])[0][None]
    name = f"blocks.{last(model)}.hook_resid_post"
    seen = []
    model.add_hook(name, lambda t, hook: seen.append(t.shape))
    offload(model, "disk", tmp_path)
    layer = model.model.layers[last(model)]
    with torch.no_grad():
        logits = model(ids).logits
    assert len(seen) == 1
    model.reset_hooks()
    assert vars(layer)["_old_forward"] == type(layer).forward.__get__(layer), "tlshim's wrapper is gone"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
        assert torch.equal(model.run_with_hooks(ids, fwd_hooks=[(name, lambda t, hook: seen.append(t.shape))]), logits)
    assert len(seen) == 2

    model.add_hook(name, lambda t, hook: seen.append(t.shape))  # now wrapping accelerate's _old_forward
    accelerate.hooks.remove_hook_from_module(model, recurse=True)  # puts _old_forward back as forward
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    assert len(seen) == 3
    model.reset_hooks()
    assert "_old_forward" not in vars(layer) and vars(layer)["forward"] == type(layer).forward.__get__(layer)
    tlshim.uninstall(model)
