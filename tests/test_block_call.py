"""model.blocks[i](resid): TransformerLens's block call returns the residual after the block; HF's layer
call through the same object is unchanged."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import tlshim
from fixtures.openelm_fixture import build_openelm_in_memory
from models import ALL_ARCHS, build, tokens

NO_PATTERN = lambda n: "pattern" not in n and "scores" not in n  # noqa: E731  (OpenELM's pattern is not its sdpa's)


def installed(arch):
    return tlshim.install(build_openelm_in_memory(seed=0) if arch == "openelm" else build(arch))


@pytest.mark.parametrize("arch", [*ALL_ARCHS, "openelm"])
def test_block_call_maps_resid_pre_to_resid_post_bit_for_bit(arch):
    model = installed(arch)
    ids = tokens()
    _, cache = model.run_with_cache(ids, names_filter=NO_PATTERN, use_cache=False)
    for i, block in enumerate(model.blocks):
        assert torch.equal(block(cache[f"blocks.{i}.hook_resid_pre"]), cache[f"blocks.{i}.hook_resid_post"])
    # chaining the blocks from the embedding gives the final residual (sliding windows and NoPE layers included)
    resid = cache["blocks.0.hook_resid_pre"]
    for block in model.blocks:
        resid = block(resid)
    assert torch.equal(resid, cache[f"blocks.{len(model.blocks) - 1}.hook_resid_post"])


def test_block_call_fires_that_blocks_hooks_only_and_respects_padding():
    model = installed("llama")
    ids = tokens()
    _, cache = model.run_with_cache(ids)
    fired = []
    with model.hooks(fwd_hooks=[(lambda n: n.startswith("blocks."), lambda t, hook: fired.append(hook.name))]):
        model.blocks[2](cache["blocks.2.hook_resid_pre"])
    assert fired and {name.split(".")[1] for name in fired} == {"2"}  # the capturing forward fires nothing
    # a 2-D padding mask reaches the layer as the model's own mask: masked keys change nothing at real positions
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out = model.blocks[0](cache["blocks.0.hook_resid_pre"], attention_mask=mask)
    assert torch.equal(out[1], cache["blocks.0.hook_resid_post"][1]) and not torch.equal(out[0], cache["blocks.0.hook_resid_post"][0])


def test_blocks_stay_the_layers_for_everything_else():
    model = installed("llama")
    layers = model.model.layers
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == len(layers)
    assert model.blocks[1] == layers[1] and model.blocks[1].attn is layers[1].self_attn
    assert isinstance(model.blocks[-1], torch.nn.Module) and model.blocks[-1].hook_resid_post is layers[-1].hook_resid_post
    assert [b.hook_resid_pre.name for b in model.blocks[1:3]] == ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
    with pytest.raises(NotImplementedError, match="past_kv_cache_entry"):
        model.blocks[0](torch.zeros(1, 3, 64), past_kv_cache_entry=object())
    # an HF-style call (keywords the HF layer takes) is the layer's own
    twin = build("llama")
    ids = tokens()
    captured = {}
    handle = layers[0].register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    model(ids, use_cache=False)
    handle.remove()
    hf_out = model.blocks[0](*captured["args"], **captured["kwargs"])
    own = twin.model.layers[0](*captured["args"], **captured["kwargs"])
    assert type(hf_out) is type(own) and torch.equal(hf_out[0] if isinstance(hf_out, tuple) else hf_out, own[0] if isinstance(own, tuple) else own)
    # copies and pickles keep a working model.blocks of their own
    clone = copy.deepcopy(model)
    assert clone.blocks[0].hook_resid_pre is clone.model.layers[0].hook_resid_pre
    again = pickle.loads(pickle.dumps(model))
    _, cache = again.run_with_cache(ids)
    assert torch.equal(again.blocks[1](cache["blocks.1.hook_resid_pre"]), cache["blocks.1.hook_resid_post"])
    tlshim.uninstall(model)
    assert "blocks" not in vars(model)
