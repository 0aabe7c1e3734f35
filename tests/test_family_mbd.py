"""ModernBERT's decoder on the structural path (tlshim/identity_norm.py): block 0 has an Identity where later
blocks have their pre-attention norm (the embedding module's norm comes before it), a GLU MLP with one fused
Wi (activated half first), and an LM head transform whose norm is ln_final. Edits equal blocks by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CONFIG_MAPPING

import tlshim

from tiny import build, tokens

pytestmark = pytest.mark.filterwarnings("ignore:tlshim has no spec")

TYPE = "modernbert-decoder"


def _present():
    if TYPE not in CONFIG_MAPPING:
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {TYPE}")


@pytest.fixture(scope="module")
def model():
    _present()
    return tlshim.install(build(TYPE))


def rotate(t, cos, sin):
    half = t.shape[-1] // 2
    return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin


def rotary(model, x, kind):
    """(cos, sin) of this layer kind: one module taking the kind (transformers 5), or one per kind (4.57)."""
    positions = torch.arange(x.shape[1])[None]
    if hasattr(model.model, "rotary_emb"):
        return model.model.rotary_emb(x, positions, kind)
    return (model.model.local_rotary_emb if kind == "sliding_attention" else model.model.global_rotary_emb)(x, positions)


def block_by_hand(model, i, x, z_edit=None, mid_edit=None, pre_edit=None, post_edit=None):
    """ModernBertDecoderLayer i by hand: x + attn(attn_norm(x)), then + Wo(act(a) * g) with (a, g) = Wi(mlp_norm(mid))."""
    edit = lambda f, t: t if f is None else f(t)  # noqa: E731
    layer, n = model.model.layers[i], x.shape[1]
    at, h = layer.attn, layer.attn_norm(x)
    split = lambda t: t.view(*t.shape[:-1], model.cfg.n_heads, -1).transpose(1, 2)  # noqa: E731
    kind = model.config.layer_types[i]
    cos, sin = rotary(model, x, kind)
    q, k, v = rotate(split(at.q_proj(h)), cos[:, None], sin[:, None]), rotate(split(at.k_proj(h)), cos[:, None], sin[:, None]), split(at.v_proj(h))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    query, key = torch.arange(n)[:, None], torch.arange(n)[None]
    hidden = key > query
    if at.sliding_window:
        hidden |= query - key >= at.sliding_window
    z = (scores.masked_fill(hidden, torch.finfo(scores.dtype).min).softmax(-1) @ v).transpose(1, 2)
    mid = edit(mid_edit, x + at.Wo(edit(z_edit, z).flatten(-2)))
    a, g = layer.mlp.Wi(layer.mlp_norm(mid)).chunk(2, -1)
    return mid + layer.mlp.Wo(edit(post_edit, layer.mlp.act(edit(pre_edit, a)) * g))


def test_layout_names(model):
    spec, cfg = model._tlshim.spec, model.cfg
    assert isinstance(model.model.layers[0].attn_norm, torch.nn.Identity)
    assert spec.ln1 == "attn_norm" and (spec.gate_proj, spec.up_proj, spec.down_proj) == ("Wi", "Wi", "Wo") and spec.o_proj == "Wo"
    assert not hasattr(model.blocks[0], "ln1") and model.blocks[1].ln1 is model.model.layers[1].attn_norm
    assert not [n for n in model.hook_dict if n.startswith("blocks.0.ln1.")] and "blocks.1.ln1.hook_scale" in model.hook_dict
    assert model.embed.ln is model.model.embeddings.norm and model.ln_final is model.lm_head.norm
    assert cfg.gated_mlp and cfg.post_embedding_ln and cfg.normalization_type == "LN" and not cfg.post_ln and cfg.positional_embedding_type == "rotary"
    assert tlshim.verify(model, tokens()).ok


def test_embedding_norm_and_head(model):
    ids = tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=lambda name: True, use_cache=False)
        emb = model.model.embeddings
        assert torch.equal(cache["hook_embed"], emb.tok_embeddings.weight[ids])
        assert torch.equal(cache["blocks.0.hook_resid_pre"], emb.norm(cache["hook_embed"]))
        embedded = cache["hook_embed"]
        want = (embedded - embedded.mean(-1, keepdim=True)) / cache["embed.ln.hook_scale"]
        assert torch.allclose(cache["embed.ln.hook_normalized"], want, atol=1e-5)
        # ln_final is the head's norm, after the final norm and the head's dense + activation (no hooks)
        last, head = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"], model.lm_head
        assert torch.allclose(cache["ln_final.hook_normalized"], F.layer_norm(head.act(head.dense(model.model.final_norm(last))), (model.cfg.d_model,)), atol=1e-5)
        final = cache["ln_final.hook_normalized"] * head.norm.weight + (0 if head.norm.bias is None else head.norm.bias)
        assert torch.allclose(final @ model.W_U + model.b_U, logits, atol=1e-4)


@pytest.mark.parametrize("i", (0, 1))
@pytest.mark.parametrize(
    "hook, kwarg",
    (("attn.hook_z", "z_edit"), ("hook_resid_mid", "mid_edit"), ("mlp.hook_pre", "pre_edit"), ("mlp.hook_post", "post_edit")),
)
def test_edits_equal_the_block_by_hand(model, i, hook, kwarg):
    ids, b = tokens(), f"blocks.{i}"
    names = lambda name: name in (f"{b}.hook_resid_pre", f"{b}.hook_resid_post")  # noqa: E731
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=names, use_cache=False)
        x = cache[f"{b}.hook_resid_pre"]
        assert torch.allclose(cache[f"{b}.hook_resid_post"], block_by_hand(model, i, x), atol=1e-5)
        if hook == "attn.hook_z":
            fn = lambda t: t.index_fill(2, torch.tensor([1]), 0)  # noqa: E731
        else:
            width = x.shape[-1] if hook == "hook_resid_mid" else model.cfg.d_mlp
            fn = (lambda v: lambda t: t + v)(torch.randn(width, generator=torch.Generator().manual_seed(3)))  # noqa: E731
        with model.hooks(fwd_hooks=[(f"{b}.{hook}", lambda t, hook: fn(t))]):
            _, edited = model.run_with_cache(ids, names_filter=names, use_cache=False)
        want = block_by_hand(model, i, x, **{kwarg: fn})
        assert not torch.allclose(want, cache[f"{b}.hook_resid_post"], atol=1e-3)  # the edit matters
        assert torch.allclose(edited[f"{b}.hook_resid_post"], want, atol=1e-5)


def test_split_qkv_input_in_block_0_copies_the_residual(model):
    """Block 0 has no ln1: its q/k/v inputs are copies of hook_resid_pre (the embedding norm's output)."""
    model.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens(), names_filter=lambda n: n.startswith("blocks.0."), use_cache=False)
        x = cache["blocks.0.hook_resid_pre"]
        assert torch.equal(cache["blocks.0.hook_q_input"], x[:, :, None].expand_as(cache["blocks.0.hook_q_input"]))
        assert torch.equal(logits, model(tokens(), use_cache=False).logits)
    finally:
        model.set_use_split_qkv_input(False)


def test_sliding_layer_masks_as_the_model_does():
    """Block 1 is a sliding-window layer: with a window shorter than the prompt, hook_pattern is zero
    outside it and a hook_z edit still equals the block by hand."""
    _present()
    model = tlshim.install(build(TYPE, sliding_window=4, layer_types=["full_attention", "sliding_attention"]))
    assert model.config.layer_types[1] == "sliding_attention" and model.model.layers[1].attn.sliding_window == 4
    assert tlshim.verify(model, tokens()).ok
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens(), names_filter=lambda n: n.startswith("blocks.1."), use_cache=False)
        n = cache["blocks.1.attn.hook_pattern"].shape[-1]
        outside = torch.arange(n)[:, None] - torch.arange(n)[None] >= 4
        assert (cache["blocks.1.attn.hook_pattern"][..., outside] == 0).all()
        x = cache["blocks.1.hook_resid_pre"]
        fn = lambda t: t.index_fill(2, torch.tensor([0]), 0)  # noqa: E731
        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", lambda t, hook: fn(t))]):
            _, edited = model.run_with_cache(tokens(), names_filter=lambda n: n == "blocks.1.hook_resid_post", use_cache=False)
        assert torch.allclose(edited["blocks.1.hook_resid_post"], block_by_hand(model, 1, x, z_edit=fn), atol=1e-5)


def test_idle_logits_bit_exact_under_sdpa_and_uninstall():
    _present()
    plain = build(TYPE, attn_implementation="sdpa")
    with torch.no_grad():
        want = plain(tokens(), use_cache=False).logits
        model = tlshim.install(plain)
        assert torch.equal(model(tokens(), use_cache=False).logits, want)
        tlshim.uninstall(model)
        assert not hasattr(model, "blocks") and torch.equal(model(tokens(), use_cache=False).logits, want)


def test_process_weights_skips_folding_a_block_without_its_pre_norm():
    """Block 0 reads the residual with no ln1: fold_ln and center_writing_weights do not apply (they
    changed the log-probs by ~0.9 when they ran); what runs keeps them."""
    _present()
    model = tlshim.install(build(TYPE))
    with torch.no_grad():
        want = model(tokens(), use_cache=False).logits.log_softmax(-1)
    with pytest.warns(UserWarning, match="fold_ln .a block reads the residual stream with no pre-norm"):
        model.process_weights()
    assert model._tlshim.processed == {"center_unembed": True, "fold_value_biases": True}
    with torch.no_grad():
        assert torch.allclose(model(tokens(), use_cache=False).logits.log_softmax(-1), want, atol=1e-5)
    with pytest.raises(ValueError, match="fold_ln=True cannot apply.*no pre-norm of its own"):
        tlshim.install(build(TYPE)).process_weights(fold_ln=True)
