"""Every catalog name exists, fires with its documented shape, and the HOOKS.md invariants hold bit for bit."""

import pytest
import torch
import torch.nn.functional as F

import tlshim
from tlshim.catalog import expected_names
from tlshim.registry import spec_for
from tlshim.tl_switches import all_switched_on

from models import ALL_ARCHS, ATTN_IMPLS, build, tokens

ARCH_ATTN = [(arch, attn) for arch in ALL_ARCHS for attn in ATTN_IMPLS[arch]]


def shapes(model, batch, pos):
    cfg = model.cfg
    d, h, g, e, m, v = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    per_block = {
        "hook_resid_pre": (batch, pos, d), "ln1.hook_scale": (batch, pos, 1), "ln1.hook_normalized": (batch, pos, d),
        "attn.hook_q": (batch, pos, h, e), "attn.hook_k": (batch, pos, g, e), "attn.hook_v": (batch, pos, g, e),
        "attn.hook_q_normed": (batch, pos, h, e), "attn.hook_k_normed": (batch, pos, g, e),
        "attn.hook_rot_q": (batch, pos, h, e), "attn.hook_rot_k": (batch, pos, g, e),
        "attn.hook_attn_scores": (batch, h, pos, pos), "attn.hook_pattern": (batch, h, pos, pos),
        "attn.hook_z": (batch, pos, h, e), "attn.hook_result": (batch, pos, h, d),
        "hook_attn_out": (batch, pos, d), "hook_resid_mid": (batch, pos, d),
        "ln2.hook_scale": (batch, pos, 1), "ln2.hook_normalized": (batch, pos, d),
        "mlp.hook_pre": (batch, pos, m), "mlp.hook_pre_linear": (batch, pos, m), "mlp.hook_post": (batch, pos, m),
        "hook_mlp_out": (batch, pos, d), "hook_resid_post": (batch, pos, d),
        "hook_attn_in": (batch, pos, h, d), "hook_q_input": (batch, pos, h, d), "hook_k_input": (batch, pos, g, d),
        "hook_v_input": (batch, pos, g, d), "hook_mlp_in": (batch, pos, d),
    }
    out = {"hook_embed": (batch, pos, d), "ln_final.hook_scale": (batch, pos, 1), "ln_final.hook_normalized": (batch, pos, d),
           "hook_unembed": (batch, pos, v)}
    for i in range(cfg.n_layers):
        out.update({f"blocks.{i}.{k}": s for k, s in per_block.items()})
    return out


@pytest.mark.filterwarnings("ignore:tlshim switched")
@pytest.mark.parametrize("arch, attn", ARCH_ATTN)
def test_every_name_exists_fires_with_its_shape(arch, attn):
    model = tlshim.install(build(arch, attn))
    assert set(model.hook_dict) == expected_names(spec_for(model), model.cfg.n_layers)
    ids = tokens(2, 12)
    with all_switched_on(model.cfg):  # the switch hooks (off by default) fire too
        _, cache = model.run_with_cache(ids, names_filter=lambda name: True)
    assert set(cache.keys()) == set(model.hook_dict)
    expected = shapes(model, 2, 12)
    for name, value in cache.items():
        assert tuple(value.shape) == expected[name], name


def repeat_kv(x, n_rep):
    return x.repeat_interleave(n_rep, dim=2)


@pytest.mark.filterwarnings("ignore:tlshim switched")
@pytest.mark.parametrize("arch, attn", ARCH_ATTN)
def test_invariants_bit_for_bit(arch, attn):
    assert_invariants(tlshim.install(build(arch, attn)), tokens(2, 12))


def assert_invariants(model, ids):
    """Every HOOKS.md invariant on one run of ``ids`` (also run on the real model, test_real_model.py)."""
    logits, cache = model.run_with_cache(ids, names_filter=lambda name: True)
    n, seq = model.cfg.n_layers, ids.shape[1]
    assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])
    for i in range(n):
        b = f"blocks.{i}"
        if i + 1 < n:
            assert torch.equal(cache[f"{b}.hook_resid_post"], cache[f"blocks.{i + 1}.hook_resid_pre"])
        assert torch.equal(cache[f"{b}.hook_resid_mid"], cache[f"{b}.hook_resid_pre"] + cache[f"{b}.hook_attn_out"])
        assert torch.equal(cache[f"{b}.hook_resid_post"], cache[f"{b}.hook_resid_mid"] + cache[f"{b}.hook_mlp_out"])
        scores, pattern = cache[f"{b}.attn.hook_attn_scores"], cache[f"{b}.attn.hook_pattern"]
        assert torch.equal(pattern, torch.softmax(scores, dim=-1, dtype=torch.float32))
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        assert torch.all(pattern[..., ~causal] == 0) and torch.all(scores[..., ~causal] <= torch.finfo(scores.dtype).min)
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)), rtol=0, atol=1e-6)
        attn = model.blocks[i].attn
        n_rep = model.cfg.n_heads // model.cfg.n_key_value_heads
        v = repeat_kv(cache[f"{b}.attn.hook_v"], n_rep)
        z = torch.matmul(pattern, v.transpose(1, 2)).transpose(1, 2)
        assert torch.equal(cache[f"{b}.attn.hook_z"], z)
        o_weight = attn.W_O.flatten(0, 1).T
        o_out = F.linear(cache[f"{b}.attn.hook_z"].flatten(-2), o_weight)
        torch.testing.assert_close(cache[f"{b}.attn.hook_result"].sum(-2) + attn.b_O, o_out, rtol=1e-5, atol=1e-5)
        post_norm = getattr(model.blocks[i], "ln1_post", None)
        assert torch.equal(cache[f"{b}.hook_attn_out"], post_norm(o_out) if post_norm is not None else o_out)
        for ln in ("ln1", "ln2"):
            x = cache[f"{b}.hook_resid_pre"] if ln == "ln1" else cache[f"{b}.hook_resid_mid"]
            check_norm(model, getattr(model.blocks[i], ln), x, cache[f"{b}.{ln}.hook_scale"], cache[f"{b}.{ln}.hook_normalized"])
    check_norm(model, model.ln_final, cache[f"blocks.{n - 1}.hook_resid_post"], cache["ln_final.hook_scale"], cache["ln_final.hook_normalized"])
    unembedded = F.linear(model.ln_final(cache[f"blocks.{n - 1}.hook_resid_post"]), model.W_U.T)
    cap = model.cfg.output_logits_soft_cap
    assert torch.equal(logits, torch.tanh(unembedded / cap) * cap if cap > 0 else unembedded)


def check_norm(model, module, x, scale, normalized):
    """hook_scale is the divisor the norm applied (eps included); hook_normalized is TransformerLens's,
    (x (- mean)) / scale in float32 before the weight, and the norm's output is it times w, bit for bit."""
    output = module(x)
    if module.w is None:  # a parameter-free norm (OLMo v1): hook_normalized is its output
        assert torch.equal(normalized, output)
    if model.cfg.normalization_type == "LN":
        eps = model.cfg.eps
        x = x - x.mean(-1, keepdim=True)
    else:
        eps = module.eps if hasattr(module, "eps") else module.variance_epsilon
    torch.testing.assert_close(scale, (x.pow(2).mean(-1, keepdim=True) + eps).sqrt(), rtol=1e-6, atol=0)
    assert normalized.dtype == torch.float32
    torch.testing.assert_close(normalized, x / scale, rtol=1e-5, atol=1e-6)
    if module.w is not None:
        assert not torch.allclose(module.w, torch.ones_like(module.w), atol=0.05), "the fixture's norm weights are random"
        assert torch.equal(output, module.w * normalized)


@pytest.mark.parametrize("arch", [a for a in ALL_ARCHS if a != "smollm3"])
def test_rotary_changes_q_and_k(arch):
    model = tlshim.install(build(arch))
    _, cache = model.run_with_cache(tokens(1, 8))
    before = "q_normed" if "blocks.0.attn.hook_q_normed" in cache else "q"
    assert torch.equal(cache["blocks.0.attn.hook_rot_q"][:, 0], cache[f"blocks.0.attn.hook_{before}"][:, 0])
    assert not torch.allclose(cache["blocks.0.attn.hook_rot_q"][:, 1:], cache[f"blocks.0.attn.hook_{before}"][:, 1:])
