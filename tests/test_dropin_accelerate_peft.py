"""Issue 5, accelerate and peft: offloaded and LoRA-adapted models install, hook and uninstall.

accelerate puts its hook in each module's instance ``forward`` and calls ``module._old_forward`` once
the offloaded weights are loaded; tlshim wraps that inner slot, so its hooks (hook_result included,
which reads W_O) run on the live weights. peft swaps q_proj etc. for LoRA layers around the
originals; tlshim finds the module by path when a hook goes live, so hook_q is the adapted output
(OpenELM: its fused qkv_proj is adapted, and hook_q / hook_v are that LoRA layer's query and value parts).
"""

import functools

import pytest
import torch
from packaging.version import Version

import tlshim
from models import TF_VERSION

from dropin import (
    ARCHS, LAYERS, add_vector, exact_kernel, fixture, greedy, layers, own_kernel_names, prompts,
    steering_vector,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),  # peft on tf 5.x
    # cpu_offload leaves every parameter on meta between calls, so generate guesses the model is there
    pytest.mark.filterwarnings("ignore:You are calling .generate.. with the `input_ids` being on a device type different"),
]


def last(model):
    """The last layer: offloaded to disk below."""
    return len(layers(model)) - 1


def accelerate_hooked(model):
    layer = layers(model)[last(model)]
    return "_hf_hook" in vars(layer) or any("_hf_hook" in vars(module) for module in layer.modules())


def ALL(name):
    return True  # every name, hook_result included


def need(name):
    return pytest.importorskip(name, reason=f"{name} is not installed (pip install tlshim[test])")


def device_map(model, near="cpu"):
    """Embeddings, the first half of the layers, norm, rotary tables and head on ``near``; the rest on disk."""
    path = LAYERS[model.config.model_type]
    n_layers = len(layers(model))
    owner, _, name = path.rpartition(".")
    dmap = {}
    for child, _ in model.get_submodule(owner).named_children():  # embeddings, norm, rotary_emb ...
        if child != name:
            dmap[f"{owner}.{child}"] = near
    dmap.update({f"{path}.{i}": near if i < n_layers // 2 else "disk" for i in range(n_layers)})
    for child, _ in model.named_children():  # lm_head (OpenELM's tied head is no module)
        if child != owner:
            dmap[child] = near
    return dmap


def offload(model, how, tmp_path):
    accelerate = need("accelerate")
    if how == "disk":
        # force_hooks: the CPU part gets accelerate's hooks too (on a CPU-only machine it would not)
        accelerate.dispatch_model(
            model, device_map(model), main_device="cpu", offload_dir=str(tmp_path), force_hooks=True
        )
    else:
        accelerate.cpu_offload(model, execution_device="cpu")  # every weight on meta, streamed from CPU
    return model


def _steer(model):
    return [(f"blocks.{last(model)}.hook_resid_post", add_vector(steering_vector(model.config.model_type)))]


#: architectures whose tied head is a functional matmul with the embedding weight, read outside the
#: embedding's forward: accelerate's cpu_offload, which streams each module's weights in for that
#: module's own forward, leaves it on meta there, and the matmul returns uninitialised memory: the
#: offloaded model's logits are not the model's, with or without tlshim (the hook points, all inside
#: module forwards, still see the model's activations)
FUNCTIONAL_HEAD = {"openelm"}


@functools.lru_cache(maxsize=None)
def not_offloaded(arch, device="cpu"):
    """The same model, not offloaded: its logits, cache, and steered and plain greedy runs."""
    model = tlshim.install(fixture(arch).to(device))
    ids = prompts(arch, [10])[0][None].to(device)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=ALL)
        with model.hooks(fwd_hooks=_steer(model)):
            _, steered_final = model.run_with_cache(ids, names_filter="ln_final.hook_normalized")
        own_logits = model(ids).logits  # with the model's own attention kernel (OpenELM: its sdpa call)
    with model.hooks(fwd_hooks=_steer(model)):
        steered = greedy(model, ids, new=5)
    return ids, logits, cache, steered, greedy(model, ids, new=5)[0], steered_final, own_logits


def _check_offloaded(model, arch, device="cpu", head_offloaded=False):
    assert accelerate_hooked(model)
    ids, ref_logits, ref_cache, ref_steered, ref_plain, ref_steered_final, _ = not_offloaded(arch, device)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=ALL)
    assert f"blocks.{last(model)}.attn.hook_result" in cache
    assert list(cache.keys()) == list(ref_cache.keys())
    for name in ref_cache.keys():  # hook_result of an offloaded layer included: it reads the live W_O
        assert torch.equal(cache[name], ref_cache[name]), name
    with torch.no_grad(), model.hooks(fwd_hooks=_steer(model)):  # the steering acts inside the offloaded model
        _, steered_final = model.run_with_cache(ids, names_filter="ln_final.hook_normalized")
    assert torch.equal(steered_final["ln_final.hook_normalized"], ref_steered_final["ln_final.hook_normalized"])
    if head_offloaded:  # what the head reads is on meta: its logits are no values to compare
        assert model.get_input_embeddings().weight.is_meta, "accelerate now feeds the functional head: test it fully"
        return ids
    assert torch.equal(logits, ref_logits)

    with model.hooks(fwd_hooks=_steer(model)):
        steered = greedy(model, ids, new=5)
    assert torch.equal(steered[0], ref_steered[0])
    # weights read back from an offload store can sit differently in memory, and a 1-row matmul over
    # them may round its last bit differently (seen with plain accelerate on the cached steps too)
    torch.testing.assert_close(steered[1], ref_steered[1], rtol=1e-5, atol=1e-5)
    assert not torch.equal(steered[0], ref_plain)
    return ids


@pytest.mark.parametrize("arch, order, how", [
    (arch, order, how) for arch in ARCHS
    for order, how in [("install_first", "disk"), ("dispatch_first", "disk"), ("dispatch_first", "cpu_offload")]
])
def test_offloaded_model_installs_and_hooks_fire(arch, order, how, tmp_path):
    model = fixture(arch)
    if arch == "gemma2" and how == "cpu_offload" and TF_VERSION < Version("4.53"):
        # transformers 4.48's Gemma2 builds its HybridCache from a parameter's dtype and device in the
        # forward, and reads a meta tensor under cpu_offload: the plain model fails, the installed one alike
        ids = prompts(arch, [10])[0][None]
        for m in (tlshim.install(offload(model, how, tmp_path)), offload(fixture(arch), how, tmp_path)):
            with pytest.raises(RuntimeError, match="meta tensors"), torch.no_grad():
                m(ids)
        return
    if order == "install_first":
        offload(tlshim.install(model), how, tmp_path)
    else:
        tlshim.install(offload(model, how, tmp_path))
    head_offloaded = how == "cpu_offload" and arch in FUNCTIONAL_HEAD
    ids = _check_offloaded(model, arch, head_offloaded=head_offloaded)

    tlshim.uninstall(model)  # accelerate's hooks stay and keep working
    assert accelerate_hooked(model)
    if head_offloaded:  # the plain offloaded model's head reads a meta weight as well
        assert model.get_input_embeddings().weight.is_meta
        return
    with torch.no_grad():
        assert torch.equal(model(ids).logits, not_offloaded(arch)[-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a device_map spanning GPU and CPU)")
@pytest.mark.parametrize("arch", ARCHS)
def test_device_map_spanning_gpu_and_cpu(arch, tmp_path):
    model = fixture(arch)
    dmap = device_map(model, near=0)
    dmap[f"{LAYERS[arch]}.1"] = "cpu"  # offloaded to CPU: streamed to the GPU at each forward
    need("accelerate").dispatch_model(model, dmap, main_device="cuda", offload_dir=str(tmp_path))
    tlshim.install(model)
    _check_offloaded(model, arch, "cuda")


#: the modules LoRA adapts: the query and value projections (OpenELM's are fused into qkv_proj)
LORA_TARGETS = {"openelm": ["qkv_proj"]}


def lora(model):
    peft = need("peft")
    targets = LORA_TARGETS.get(model.config.model_type, ["q_proj", "v_proj"])
    # init_lora_weights=False: a non-zero B, so the LoRA delta is there to be seen
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, lora_dropout=0.0)
    torch.manual_seed(1)
    return peft.get_peft_model(model, config)


def _q_proj(arch, layer):
    """The decoder layer's (LoRA-adapted) module that computes the queries."""
    return layer.attn.qkv_proj if arch == "openelm" else layer.self_attn.q_proj


def _q_and_v(config, layer, x, base=False):
    """Queries and values of ``x`` [batch, pos, d_model] by the layer's own modules, flat over heads:
    through the LoRA layers (base + delta), or their base layers only."""
    def run(proj):
        return (proj.base_layer if base else proj)(x)

    if config.model_type == "openelm":  # all query heads, then key heads, then value heads
        attn = layer.attn
        q, _, v = run(attn.qkv_proj).split(
            [n * attn.head_dim for n in (attn.num_q_heads, attn.num_k_heads, attn.num_v_heads)], dim=-1)
        return q, v
    q, v = run(layer.self_attn.q_proj), run(layer.self_attn.v_proj)
    clip = getattr(config, "clip_qkv", None)  # OLMo clamps q, k and v
    return (q, v) if clip is None else (q.clamp(-clip, clip), v.clamp(-clip, clip))


def _check_adapted(adapted, plain_adapted, ids):
    """hook_q / hook_v are the LoRA layers' outputs (base + delta); logits and generate unchanged."""
    config = adapted.get_base_model().config
    names = None if exact_kernel(config.model_type) else own_kernel_names  # logits of the model's own kernel
    with torch.no_grad():
        logits, cache = adapted.run_with_cache(ids, names_filter=names)
        assert torch.equal(logits, plain_adapted(ids).logits)
        for i, layer in enumerate(layers(adapted.get_base_model())):
            x = adapted.get_base_model().blocks[i].ln1(cache[f"blocks.{i}.hook_resid_pre"])  # ln1's output
            hook_q, hook_v = cache[f"blocks.{i}.attn.hook_q"], cache[f"blocks.{i}.attn.hook_v"]
            q, v = _q_and_v(config, layer, x)
            assert torch.equal(hook_q, q.view(hook_q.shape)) and torch.equal(hook_v, v.view(hook_v.shape))
            assert not torch.equal(q, _q_and_v(config, layer, x, base=True)[0]), "the LoRA delta must show"
    hooks = [(f"blocks.1.hook_resid_post", add_vector(steering_vector(config.model_type)))]
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
    assert type(_q_proj(arch, layers(merged)[0])) is torch.nn.Linear
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
        logits, cache = merged.run_with_cache(ids, names_filter=None if exact_kernel(arch) else own_kernel_names)
        torch.testing.assert_close(logits, plain_adapted(ids).logits, rtol=1e-5, atol=1e-4)
        layer = layers(merged)[0]
        x = merged.blocks[0].ln1(cache["blocks.0.hook_resid_pre"])  # ln1's output
        hook_q = cache["blocks.0.attn.hook_q"]
        assert torch.equal(hook_q, _q_and_v(merged.config, layer, x)[0].view(hook_q.shape))
    tlshim.uninstall(merged)
    assert not any(key.startswith("hook_") for key in vars(_q_proj(arch, layer)))
    assert not any(key.startswith("hook_") for key in vars(layer.attn if arch == "openelm" else layer.self_attn))


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
    layer = layers(model)[last(model)]
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
