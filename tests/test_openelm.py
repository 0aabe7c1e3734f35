"""OpenELM hooks: per-head q/k/v split out of qkv_proj, per-layer shapes, exact edits, invariants.

Built in memory here (the reference for every exact comparison); loading through transformers'
remote-code path is tested in test_openelm_loading.py. Forwards pass use_cache=False: the stand-in,
like the real remote code, builds a legacy cache that transformers v5 no longer has.
"""

import pytest
import torch
import torch.nn.functional as F

import tlshim
from tlshim.catalog import expected_names
from tlshim.registry import spec_for

from fixtures.openelm_fixture import build_openelm_in_memory
from test_roundtrip import assert_same

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
LAYER = 2


def pair():
    return tlshim.install(build_openelm_in_memory(seed=0)), build_openelm_in_memory(seed=0)


def logits_of(model, **kwargs):
    return model(IDS, use_cache=False, **kwargs).logits


def test_names_shapes_cfg_and_weights():
    model, _ = pair()
    cfg = model.cfg
    assert set(model.hook_dict) == expected_names(spec_for(model), 4)
    assert cfg.n_heads == [2, 4, 4, 4] and cfg.n_key_value_heads == [1, 2, 2, 2] and cfg.d_mlp == [32, 128, 192, 256]
    _, cache = model.run_with_cache(IDS, names_filter=lambda name: True, use_cache=False)
    for i in range(4):
        h, g, m = cfg.n_heads[i], cfg.n_key_value_heads[i], cfg.d_mlp[i]
        for name, shape in {
            "attn.hook_q": (2, 12, h, 16), "attn.hook_k": (2, 12, g, 16), "attn.hook_v": (2, 12, g, 16),
            "attn.hook_q_normed": (2, 12, h, 16), "attn.hook_k_normed": (2, 12, g, 16),
            "attn.hook_rot_q": (2, 12, h, 16), "attn.hook_rot_k": (2, 12, g, 16),
            "attn.hook_attn_scores": (2, h, 12, 12), "attn.hook_pattern": (2, h, 12, 12),
            "attn.hook_z": (2, 12, h, 16), "attn.hook_result": (2, 12, h, 64),
            "mlp.hook_pre": (2, 12, m), "mlp.hook_pre_linear": (2, 12, m), "mlp.hook_post": (2, 12, m),
        }.items():
            assert tuple(cache[f"blocks.{i}.{name}"].shape) == shape, (i, name)
        attn = model.blocks[i].attn
        assert attn.W_Q.shape == (h, 64, 16) and attn.W_K.shape == (g, 64, 16) and attn.W_O.shape == (h, 16, 64)
        assert model.blocks[i].mlp.W_gate.shape == (64, m) and model.blocks[i].mlp.W_out.shape == (m, 64)
    with pytest.raises(ValueError, match=r"blocks\[i\]\.attn\.W_Q"):
        model.W_Q
    assert torch.equal(model.W_U, model.transformer.token_embeddings.weight.T) and model.unembed.module is model.embed


def test_idle_logits_and_read_only_hooks():
    model, twin = pair()
    native = logits_of(twin)
    assert torch.equal(logits_of(model), native)
    logits, _ = model.run_with_cache(IDS, use_cache=False)
    assert ((logits - native).abs().max() / native.abs().max()) <= 1e-5
    logits, _ = model.run_with_cache(IDS, names_filter=lambda n: "pattern" not in n and "scores" not in n, use_cache=False)
    assert torch.equal(logits, native)


def test_invariants():
    model, _ = pair()
    logits, cache = model.run_with_cache(IDS, use_cache=False)
    assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])
    for i in range(4):
        b = f"blocks.{i}"
        n_rep = model.cfg.n_heads[i] // model.cfg.n_key_value_heads[i]
        assert torch.equal(cache[f"{b}.hook_resid_mid"], cache[f"{b}.hook_resid_pre"] + cache[f"{b}.hook_attn_out"])
        assert torch.equal(cache[f"{b}.hook_resid_post"], cache[f"{b}.hook_resid_mid"] + cache[f"{b}.hook_mlp_out"])
        attn = model.transformer.layers[i].attn
        assert torch.equal(cache[f"{b}.attn.hook_q_normed"], attn.q_norm(cache[f"{b}.attn.hook_q"].transpose(1, 2)).transpose(1, 2))
        q = cache[f"{b}.attn.hook_rot_q"].transpose(1, 2)
        k = cache[f"{b}.attn.hook_rot_k"].transpose(1, 2).repeat_interleave(n_rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) * 16**-0.5
        causal = torch.ones(12, 12, dtype=torch.bool).tril()
        got = cache[f"{b}.attn.hook_attn_scores"]
        torch.testing.assert_close(got[..., causal], scores[..., causal], rtol=1e-5, atol=1e-5)
        pattern = cache[f"{b}.attn.hook_pattern"]
        assert torch.equal(pattern, torch.softmax(got, dim=-1)) and torch.all(pattern[..., ~causal] == 0)
        v = cache[f"{b}.attn.hook_v"].repeat_interleave(n_rep, dim=2)
        assert torch.equal(cache[f"{b}.attn.hook_z"], torch.matmul(pattern, v.transpose(1, 2)).transpose(1, 2))
        assert not torch.allclose(cache[f"{b}.attn.hook_rot_q"], cache[f"{b}.attn.hook_q_normed"])
        gate = cache[f"{b}.mlp.hook_pre"]
        assert torch.equal(cache[f"{b}.mlp.hook_post"], F.silu(gate) * cache[f"{b}.mlp.hook_pre_linear"])
    final = cache["ln_final.hook_normalized"] * model.ln_final.w  # before the final norm's weight
    assert torch.equal(final, model.ln_final(cache["blocks.3.hook_resid_post"]))
    assert torch.equal(logits, F.linear(final, model.W_U.T))


def slice_edit(start, stop, factor):
    def hook(module, args, output):
        output = output.clone()
        output[..., start:stop] *= factor
        return output

    return hook


@pytest.mark.parametrize("name, head, factor", [("q", 1, 0.0), ("k", 1, 0.5), ("v", 0, 2.0)])
def test_qkv_edits_equal_editing_qkv_proj_output(name, head, factor):
    model, twin = pair()
    h, g = model.cfg.n_heads[LAYER], model.cfg.n_key_value_heads[LAYER]
    first = {"q": 0, "k": h, "v": h + g}[name] + head

    def edit(t, hook):
        t = t.clone()
        t[:, :, head] *= factor
        return t

    got = model.run_with_hooks(IDS, fwd_hooks=[(f"blocks.{LAYER}.attn.hook_{name}", edit)], use_cache=False)
    handle = twin.transformer.layers[LAYER].attn.qkv_proj.register_forward_hook(slice_edit(first * 16, (first + 1) * 16, factor))
    want = logits_of(twin)
    handle.remove()
    assert torch.equal(got, want)
    assert not torch.equal(got, logits_of(twin))


@pytest.mark.parametrize("name, half", [("pre", 0), ("pre_linear", 1)])
def test_gate_and_up_edits_equal_editing_proj_1_output(name, half):
    model, twin = pair()
    m = model.cfg.d_mlp[LAYER]
    got = model.run_with_hooks(IDS, fwd_hooks=[(f"blocks.{LAYER}.mlp.hook_{name}", lambda t, hook: t * 3)], use_cache=False)
    handle = twin.transformer.layers[LAYER].ffn.proj_1.register_forward_hook(slice_edit(half * m, (half + 1) * m, 3))
    want = logits_of(twin)
    handle.remove()
    assert torch.equal(got, want)


def test_z_ablation_and_uniform_pattern():
    model, twin = pair()

    def ablate(z, hook):
        z = z.clone()
        z[:, :, 3] = 0
        return z

    got = model.run_with_hooks(IDS, fwd_hooks=[(f"blocks.{LAYER}.attn.hook_z", ablate)], use_cache=False)
    with torch.no_grad():
        twin.transformer.layers[LAYER].attn.out_proj.weight[:, 48:64] = 0
    assert torch.equal(got, logits_of(twin))

    twin = build_openelm_in_memory(seed=0)
    seen = {}
    handle = twin.transformer.layers[LAYER].attn.qkv_proj.register_forward_hook(lambda m, a, out: seen.setdefault("qkv", out))
    logits_of(twin)
    handle.remove()
    v = seen["qkv"].view(2, 12, 8, 16)[:, :, 6:].repeat_interleave(2, dim=2)
    uniform = torch.ones(12, 12).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    z = torch.einsum("qk,bkhe->bqhe", uniform, v)
    handle = twin.transformer.layers[LAYER].attn.out_proj.register_forward_pre_hook(lambda m, a: (z.flatten(-2),))
    want = logits_of(twin)
    handle.remove()
    got = model.run_with_hooks(
        IDS, fwd_hooks=[(f"blocks.{LAYER}.attn.hook_pattern", lambda p, hook: uniform.expand(p.shape))], use_cache=False
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_backward_hooks_and_round_trip():
    model = build_openelm_in_memory(seed=0)
    before = {"logits": logits_of(model), "state_dict": dict(model.state_dict()), "modules": [(n, type(m), sorted(vars(m))) for n, m in model.named_modules()], "signatures": [], "params": []}
    tlshim.install(model)
    names = ["blocks.1.attn.hook_q", "blocks.1.attn.hook_rot_k", "blocks.1.attn.hook_pattern", "blocks.2.mlp.hook_pre", "blocks.3.hook_resid_mid"]
    acts, grads = {}, {}
    with model.hooks([(n, lambda t, hook: acts.__setitem__(hook.name, t)) for n in names],
                     [(n, lambda g, hook: grads.__setitem__(hook.name, g)) for n in names]):
        loss = model(IDS, labels=IDS, use_cache=False).loss
        want = torch.autograd.grad(loss, [acts[n] for n in names], retain_graph=True)
        loss.backward()
    for name, expected in zip(names, want):
        assert torch.equal(grads[name], expected), name
    tlshim.uninstall(model)
    model.zero_grad(set_to_none=True)
    after = {"logits": logits_of(model), "state_dict": dict(model.state_dict()), "modules": [(n, type(m), sorted(vars(m))) for n, m in model.named_modules()], "signatures": [], "params": []}
    assert_same(before, after)


def test_install_repairs_uninitialised_buffers():
    """What transformers v5 leaves in non-persistent buffers of remote code loaded without tlshim."""
    model, twin = build_openelm_in_memory(seed=0), build_openelm_in_memory(seed=0)
    with torch.no_grad():
        model.transformer.causal_mask.copy_(torch.rand(model.transformer.causal_mask.shape) > 0.5)
        for layer in model.transformer.layers:
            layer.attn.pos_embedding.inv_freq.fill_(1e22)
    assert not torch.equal(logits_of(model), logits_of(twin))
    tlshim.install(model)
    assert torch.equal(logits_of(model), logits_of(twin))
