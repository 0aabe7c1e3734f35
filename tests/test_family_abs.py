"""Absolute positions, GPT-2's Conv1D, BLOOM's per-head fused qkv and ALiBi (HOOKS.md "Families"),
on tiny random models through the structural path, against references built by hand on a twin."""

import math

import pytest
import torch

import tlshim

from sweep import VERIFIED, check
from tiny import build, tokens

pytestmark = pytest.mark.filterwarnings("ignore:tlshim has no spec")

FAMILY = ("gpt2", "gpt_neo", "opt", "bloom", "biogpt", "xglm", "mpt", "gpt_bigcode")


@pytest.mark.parametrize("model_type", FAMILY)
def test_the_sweeps_full_check_passes(model_type):
    assert check(model_type) == {"status": VERIFIED, "how": "structural"}


def installed(model_type, **config):
    model = build(model_type, **config)
    tlshim.install(model)
    return model, build(model_type, **config)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize(
    "model_type, table, offset",
    [("gpt2", "transformer.wpe.weight", 0), ("gpt_neo", "transformer.wpe.weight", 0), ("opt", "model.decoder.embed_positions.weight", 2),
     ("xglm", "model.embed_positions.weights", 2)],
)
def test_hook_pos_embed_is_the_added_row_of_the_table_broadcast_to_the_batch(model_type, table, offset):
    model, _ = installed(model_type)
    ids = tokens()
    _, cache = model.run_with_cache(ids, names_filter=lambda name: "embed" in name or name == "blocks.0.hook_resid_pre")
    rows = tlshim.spec.get_path(model, table)[offset : offset + ids.shape[1]]
    assert cache["hook_pos_embed"].shape == (*ids.shape, model.cfg.d_model)
    assert torch.equal(cache["hook_pos_embed"], rows.expand(ids.shape[0], -1, -1))
    assert torch.equal(cache["hook_embed"] + cache["hook_pos_embed"], cache["blocks.0.hook_resid_pre"])
    assert model.cfg.positional_embedding_type == ("sinusoidal" if model_type == "xglm" else "standard")
    assert "blocks.0.attn.hook_rot_q" not in model.hook_dict


@pytest.mark.parametrize("model_type, module", [("gpt2", "transformer.wpe"), ("opt", "model.decoder.embed_positions")])
def test_an_edit_of_hook_pos_embed_equals_the_same_edit_by_hand(model_type, module):
    model, twin = installed(model_type)
    ids = tokens()
    edited = model.run_with_hooks(ids, fwd_hooks=[("hook_pos_embed", lambda x, hook: x * 0.5)], use_cache=False)
    handle = tlshim.spec.get_path(twin, module).register_forward_hook(lambda m, args, out: out * 0.5)
    assert torch.equal(edited, logits(twin, ids))
    handle.remove()


def zero_head(x, hook):
    x = x.clone()
    x[:, :, 1] = 0
    return x


def test_gpt2_conv1d_hook_v_edit_and_weights():
    model, twin = installed("gpt2")
    ids, d, e = tokens(), model.cfg.d_model, model.cfg.d_head
    edited = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_v", zero_head)], use_cache=False)
    c_attn = twin.transformer.h[0].attn.c_attn  # Conv1D, weight (in, out): q, then k, then v

    def by_hand(module, args, out):
        out = out.clone()
        out[..., 2 * d + e : 2 * d + 2 * e] = 0
        return out

    c_attn.register_forward_hook(by_hand)
    assert torch.equal(edited, logits(twin, ids))
    attn = model.blocks[0].attn
    weight = model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(attn.W_Q, weight[:, :d].reshape(d, -1, e).transpose(0, 1))
    assert torch.equal(attn.W_V, weight[:, 2 * d :].reshape(d, -1, e).transpose(0, 1))
    _, cache = model.run_with_cache(ids, names_filter=lambda name: name.startswith("blocks.0."))
    x = cache["blocks.0.ln1.hook_normalized"] * model.blocks[0].ln1.weight + model.blocks[0].ln1.bias
    q = torch.einsum("bpd,hde->bphe", x, attn.W_Q) + attn.b_Q
    torch.testing.assert_close(cache["blocks.0.attn.hook_q"], q)


def test_bloom_per_head_fused_qkv_hook_v_edit_and_weights():
    model, twin = installed("bloom")
    ids, h, e = tokens(), model.cfg.n_heads, model.cfg.d_head
    edited = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_v", zero_head)], use_cache=False)

    def by_hand(module, args, out):  # (b, p, h, 3, e): q, k, v of head 1 side by side
        out = out.clone()
        out.view(*out.shape[:2], h, 3, e)[:, :, 1, 2] = 0
        return out

    twin.transformer.h[0].self_attention.query_key_value.register_forward_hook(by_hand)
    assert torch.equal(edited, logits(twin, ids))
    _, cache = model.run_with_cache(ids, names_filter=lambda name: name.startswith("blocks.0."))
    attn, ln1 = model.blocks[0].attn, model.blocks[0].ln1
    x = cache["blocks.0.ln1.hook_normalized"] * ln1.weight + ln1.bias
    for role in "qkv":
        want = torch.einsum("bpd,hde->bphe", x, getattr(attn, f"W_{role.upper()}")) + getattr(attn, f"b_{role.upper()}")
        torch.testing.assert_close(cache[f"blocks.0.attn.hook_{role}"], want)
    assert model.cfg.positional_embedding_type == "alibi"


def alibi_slopes(n_heads):  # BLOOM's and MPT's for a power of two: 2 ** (-8 (h + 1) / n)
    return torch.tensor([2 ** (-8 * (i + 1) / n_heads) for i in range(n_heads)])


def test_bloom_attn_scores_hold_alibi_as_the_kernel_adds_it():
    model, _ = installed("bloom")
    ids = tokens()
    _, cache = model.run_with_cache(ids, names_filter=lambda name: name.startswith("blocks.1.attn."))
    q, k = cache["blocks.1.attn.hook_q"], cache["blocks.1.attn.hook_k"]
    n = ids.shape[1]
    want = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(model.cfg.d_head)
    want = want + alibi_slopes(model.cfg.n_heads)[:, None, None] * torch.arange(n)[None, None, :]
    scores = cache["blocks.1.attn.hook_attn_scores"]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    torch.testing.assert_close(scores[..., causal], want[..., causal], rtol=1e-4, atol=1e-4)
    assert (scores[..., ~causal] == torch.finfo(scores.dtype).min).all()
    torch.testing.assert_close(cache["blocks.1.attn.hook_pattern"], scores.softmax(-1))


def test_an_edit_of_hook_pattern_reaches_the_output_as_it_would_in_the_kernel():
    """Uniform attention over the past, by hook, equals z computed by hand from hook_v."""
    model, _ = installed("bloom")
    ids, n = tokens(), tokens().shape[1]
    uniform = torch.ones(n, n).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: uniform.expand_as(p).clone())]):
        _, cache = model.run_with_cache(ids, names_filter=lambda name: name.startswith("blocks.0.attn."))
    want = torch.einsum("qk,bkhe->bqhe", uniform, cache["blocks.0.attn.hook_v"])
    torch.testing.assert_close(cache["blocks.0.attn.hook_z"], want)


def test_gpt_neo_scores_are_unscaled_and_local_layers_mask_outside_the_window():
    model, _ = installed("gpt_neo", window_size=4, attention_types=[[["global", "local"], 1]])
    assert not model.cfg.use_attn_scale and model.cfg.act_fn == "gelu_new"
    ids, n = tokens(), tokens().shape[1]
    _, cache = model.run_with_cache(ids, names_filter=lambda name: ".attn." in name)
    for layer, window in ((0, n), (1, 4)):
        q, k = cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_k"]
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"]
        offset = torch.arange(n)[:, None] - torch.arange(n)[None, :]
        seen = (offset >= 0) & (offset < window)
        torch.testing.assert_close(scores[..., seen], torch.einsum("bqhe,bkhe->bhqk", q, k)[..., seen])
        assert (scores[..., ~seen] < -1e30).all()


def test_opt_hooks_in_its_row_wise_mlp_have_batch_and_position_axes():
    model, twin = installed("opt")
    ids = tokens()
    _, cache = model.run_with_cache(ids)
    b, p = ids.shape
    assert cache["blocks.0.hook_resid_mid"].shape == (b, p, model.cfg.d_model)
    assert cache["blocks.0.ln2.hook_scale"].shape == (b, p, 1)
    assert cache["blocks.0.mlp.hook_post"].shape == (b, p, model.cfg.d_mlp)
    assert torch.equal(cache["blocks.0.hook_resid_mid"] + cache["blocks.0.hook_mlp_out"], cache["blocks.0.hook_resid_post"])
    assert tlshim.verify(model).ok
    # an edit at one position of the MLP's input projection, against the same edit of fc1's rows by hand
    def bump(x, hook):
        x = x.clone()
        x[1, 3] += 1.0
        return x

    edited = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.mlp.hook_pre", bump)], use_cache=False)

    def by_hand(module, args, out):
        out = out.clone()
        out[1 * p + 3] += 1.0
        return out

    twin.model.decoder.layers[0].fc1.register_forward_hook(by_hand)
    assert torch.equal(edited, logits(twin, ids))


@pytest.mark.parametrize("model_type, name", [("gpt2", "hook_pos_embed"), ("bloom", "blocks.1.attn.hook_pattern")])
def test_generate_with_a_kv_cache_fires_on_the_new_positions_and_changes_nothing(model_type, name):
    model, twin = installed(model_type)
    ids = tokens()[:, :5]
    seen = []
    with model.hooks(fwd_hooks=[(name, lambda x, hook: seen.append(tuple(x.shape)))]):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out, twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0))
    if name == "hook_pos_embed":
        assert seen == [(2, 5, 64), (2, 1, 64), (2, 1, 64)]
    else:  # (batch, heads, new queries, all keys)
        assert seen == [(2, 4, 5, 5), (2, 4, 1, 6), (2, 4, 1, 7)]


@pytest.mark.parametrize("model_type", ("gpt2", "opt", "bloom"))
def test_an_idle_install_wraps_no_forward(model_type):
    model, _ = installed(model_type)
    assert [name for name, module in model.named_modules() if "forward" in vars(module)] == []
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: None)]):
        assert [name for name, module in model.named_modules() if "forward" in vars(module)]
    assert [name for name, module in model.named_modules() if "forward" in vars(module)] == []
