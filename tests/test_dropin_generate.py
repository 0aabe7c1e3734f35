"""Issue 5, generate: hooks live inside HF ``generate``, with and without a KV cache.

Every test runs on each architecture of ``ARCHS`` and compares with a plain twin (same weights, no
tlshim) driven by plain torch hooks, or with a no-cache forward over the final sequence.
"""

import pytest
import torch

import tlshim
from models import build

from dropin import (
    ARCH_ATTNS, ARCHS, add_to_layer_output, add_vector, assert_close_to_scale, asset_dir, at_layer, copied, fixture,
    greedy, installed, layers, left_pad, prompts, rounding_bound, static_cache, steering_vector, twin_attn,
)

LAYER = 1


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("arch", ARCHS)
def test_hooks_fire_at_every_step(arch, use_cache):
    model = tlshim.install(fixture(arch))
    (ids,) = prompts(arch, [9])
    ids, new, length = ids[None], 5, 9
    seen = []
    names = ["hook_embed", f"blocks.{LAYER}.attn.hook_q", f"blocks.{LAYER}.attn.hook_rot_k",
             f"blocks.{LAYER}.attn.hook_attn_scores", f"blocks.{LAYER}.attn.hook_pattern", f"blocks.{LAYER}.hook_resid_post"]
    with model.hooks(fwd_hooks=[(name, lambda t, hook: seen.append((hook.name, tuple(t.shape)))) for name in names]):
        greedy(model, ids, new=new, use_cache=use_cache)

    cfg = model.cfg
    h, g, e, d = at_layer(cfg.n_heads, LAYER), at_layer(cfg.n_key_value_heads, LAYER), cfg.d_head, cfg.d_model
    expected = []
    for step in range(new):  # one forward per new token: generate never runs the token it samples last
        keys = length + new if use_cache and static_cache(model) else length + step
        p = (length if step == 0 else 1) if use_cache else keys  # with a cache: only the new positions
        shapes = [(1, p, d), (1, p, h, e), (1, p, g, e), (1, h, p, keys), (1, h, p, keys), (1, p, d)]
        expected += list(zip(names, shapes))
    assert seen == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_steering_equals_plain_torch_hook(arch):
    model, plain = tlshim.install(fixture(arch)), fixture(arch)
    (ids,) = prompts(arch, [9])
    vector = steering_vector(arch)
    baseline, _ = greedy(plain, ids[None], new=8)

    with model.hooks(fwd_hooks=[(f"blocks.{LAYER}.hook_resid_post", add_vector(vector))]):
        steered, steered_scores = greedy(model, ids[None], new=8)
    handle = layers(plain)[LAYER].register_forward_hook(add_to_layer_output(vector))
    try:
        reference, reference_scores = greedy(plain, ids[None], new=8)
    finally:
        handle.remove()

    assert not torch.equal(steered, baseline), "the steering vector must change the generated tokens"
    assert torch.equal(steered, reference)
    assert torch.equal(steered_scores, reference_scores)
    assert not model.blocks[LAYER].__dict__.get("forward"), "the hook's wrapper is gone after the block"


@pytest.mark.parametrize("arch, attn", ARCH_ATTNS)
def test_read_only_pattern_hook_keeps_greedy_tokens(arch, attn):
    model, plain = installed(arch, attn), fixture(arch, twin_attn(arch, attn))
    ids, mask = left_pad(prompts(arch, [11, 7]))
    reference, reference_scores = greedy(plain, ids, mask, new=8)
    rows = []
    with model.hooks(fwd_hooks=[(f"blocks.{i}.attn.hook_pattern", lambda t, hook: rows.append(t.sum(-1)))
                                for i in range(model.cfg.n_layers)]):
        tokens, scores = greedy(model, ids, mask, new=8)
    assert len(rows) == 8 * model.cfg.n_layers
    assert torch.equal(tokens, reference)
    if asset_dir(arch) is not None:  # the trained induction fixture copies; a random model does not
        for row, seq in enumerate(prompts(arch, [11, 7])):
            assert copied(seq, tokens[row, ids.shape[1]:]) >= 0.75, f"the trained {arch} fixture should continue the copy"
    if twin_attn(arch, attn) == "eager":  # tlshim's kernel does HF eager's ops: the same bits
        assert torch.equal(scores, reference_scores)
    else:
        torch.testing.assert_close(scores, reference_scores, rtol=1e-5, atol=1e-4)


def _real_positions_equal(record, cache, mask, exact, rel=2e-5):
    """Every name's recorded tensor equals the no-cache one at each real (unpadded) query position."""
    real = mask.bool()
    assert set(record.keys()) == set(cache.keys()) - {"hook_unembed"}  # generate computes the last position's logits only
    for name in record.keys():
        got, want = record[name], cache[name]
        assert got.shape == want.shape, name
        if name.endswith(("attn_scores", "pattern")):
            got, want = got.transpose(1, 2)[real], want.transpose(1, 2)[real]
        else:
            got, want = got[real], want[real]
        if exact:
            assert torch.equal(got, want), name
        else:
            assert_close_to_scale(got, want, rel=rel, msg=name)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("arch", ARCHS)
def test_record_generation_equals_no_cache_forward(arch, use_cache):
    model = tlshim.install(fixture(arch))
    ids, mask = left_pad(prompts(arch, [10, 6]))
    with tlshim.record_generation(model) as record:
        out, _ = greedy(model, ids, mask, new=6, use_cache=use_cache)
    # generate never runs the token it samples last: the record covers out[:, :-1]
    seq = out[:, :-1]
    full_mask = torch.cat([mask, torch.ones(len(seq), seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    with torch.no_grad():
        _, cache = model.run_with_cache(seq, attention_mask=full_mask)
    assert record["blocks.0.hook_resid_post"].shape == (2, 15, model.cfg.d_model)
    assert record[f"blocks.{LAYER}.attn.hook_pattern"].shape == (2, at_layer(model.cfg.n_heads, LAYER), 15, 15)
    # without a cache the last step reruns the whole sequence: the very forward run_with_cache does
    _real_positions_equal(record, cache, full_mask, exact=not use_cache, rel=rounding_bound(arch))
    assert all(not point.active for point in model.hook_dict.values())


@pytest.mark.parametrize("arch", ["gemma2", "mistral"])
def test_record_generation_with_a_sliding_window_cache(arch):
    """A window (4) shorter than the sequence: with a cache, a sliding layer's step sees only its last
    keys (transformers >= 4.57; 4.48's Gemma2 HybridCache: a static cache wider than the sequence for
    the global layers); the record puts each key at its position, as the no-cache forward has it."""
    model = tlshim.install(build(arch, sliding_window=4))  # the trained fixtures' windows exceed their context
    ids, mask = left_pad(prompts(arch, [10, 6]))
    with tlshim.record_generation(model) as record:
        out, _ = greedy(model, ids, mask, new=6)
    seq = out[:, :-1]
    full_mask = torch.cat([mask, torch.ones(len(seq), seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    with torch.no_grad():
        _, cache = model.run_with_cache(seq, attention_mask=full_mask)
    _real_positions_equal(record, cache, full_mask, exact=False)
    pattern = record["blocks.0.attn.hook_pattern"]
    assert torch.equal(pattern[:, :, -1, :-4], torch.zeros_like(pattern[:, :, -1, :-4]))  # outside the window


def test_record_generation_leaves_out_the_logits_and_names_where_they_are():
    """generate computes logits for the last position only: hook_unembed is not recorded by default, and
    asking for it names generate's own output_logits."""
    model = tlshim.install(fixture("llama"))
    ids, mask = left_pad(prompts("llama", [10, 6]))
    with tlshim.record_generation(model) as record:
        greedy(model, ids, mask, new=2)
    assert "hook_unembed" in model.hook_dict and "hook_unembed" not in record.names
    with pytest.raises(ValueError, match="output_logits=True"):
        with tlshim.record_generation(model, ["hook_unembed", "blocks.0.hook_resid_post"]):
            pass
