"""Issue 5, left padding: a left-padded batch with an attention mask gives each prompt's own activations.

What can be bit-exact and what cannot: CPU matmul results depend on the matrix shapes (an 8x16 @ 16x8
product differs in the last bit from the same rows inside a 16x16 one), so a prompt inside a padded
batch and the same prompt alone agree to float32 rounding, not bit for bit, with any attention
implementation (HF's own forward included). What is bit-exact is that tlshim adds nothing to it: the
padded batch's activations are exactly the plain model's on the same batch, and pad keys get exactly 0.
OpenELM's remote code rotates by tensor position, not by the mask, so left padding moves its rotary
positions (hook_rot_q / hook_rot_k differ); the scores, being relative, and all the rest agree.
"""

import pytest
import torch

import tlshim

from dropin import (
    ARCH_ATTNS, ARCHS, add_vector, assert_close_to_scale, fixture, greedy, installed, layers, left_pad, prompts,
    rounding_bound, steering_vector, twin_attn,
)

LENGTHS = [12, 7, 4]
LAYER = 1
#: OpenELM's remote code rotates keys at 0..T-1 whatever the attention mask or position_ids say, so left
#: padding shifts every real token's rotary position (its own forward does that, with or without tlshim)
POSITIONS_FROM_LENGTHS = {"openelm"}


def _real(name, tensor, row, pad):
    """Row ``row`` of a batched cache entry at its real positions (queries and keys for attention)."""
    if name.endswith(("attn_scores", "pattern")):
        return tensor[row, :, pad:, pad:]
    return tensor[row, pad:]


@pytest.mark.parametrize("arch, attn", ARCH_ATTNS)
def test_left_padded_batch_gives_each_prompt_its_own_activations(arch, attn):
    model = installed(arch, attn)
    seqs = prompts(arch, LENGTHS)
    ids, mask = left_pad(seqs)
    with torch.no_grad():
        _, batch = model.run_with_cache(ids, attention_mask=mask)
        for row, seq in enumerate(seqs):
            pad = ids.shape[1] - len(seq)
            _, alone = model.run_with_cache(seq[None])
            for name in alone.keys():
                if arch in POSITIONS_FROM_LENGTHS and name.endswith(("hook_rot_q", "hook_rot_k")) and pad:
                    # rotated at positions shifted by the padding: other tensors, the same scores (RoPE is relative)
                    assert not torch.allclose(_real(name, batch[name], row, pad), alone[name][0], atol=1e-3), name
                    continue
                assert_close_to_scale(_real(name, batch[name], row, pad), alone[name][0], rounding_bound(arch), name)
            for i in range(model.cfg.n_layers):
                pattern = batch[f"blocks.{i}.attn.hook_pattern"][row, :, pad:]
                assert torch.equal(pattern[..., :pad], torch.zeros_like(pattern[..., :pad])), "weight on a pad key"
                torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))


@pytest.mark.parametrize("arch, attn", ARCH_ATTNS)
def test_padded_batch_is_exactly_the_plain_models(arch, attn):
    """tlshim adds no error: the padded batch through tlshim equals the plain model on the same batch."""
    model, plain = installed(arch, attn), fixture(arch, twin_attn(arch, attn))
    ids, mask = left_pad(prompts(arch, LENGTHS))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate uses, and run_with_cache derives
    outputs = {}
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
               for i, layer in enumerate(layers(plain))]
    try:
        with torch.no_grad():
            reference = plain(ids, attention_mask=mask, position_ids=position_ids)
            names = [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
            logits, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=names)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(logits, reference.logits)
    for i in range(model.cfg.n_layers):
        assert torch.equal(cache[f"blocks.{i}.hook_resid_post"], outputs[i])

    if twin_attn(arch, attn) == "eager":  # the patterns of HF's own eager kernel, bit for bit
        with torch.no_grad():
            attentions = plain(ids, attention_mask=mask, position_ids=position_ids, output_attentions=True).attentions
            _, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n.endswith("hook_pattern"))
        for i, pattern in enumerate(attentions):
            assert torch.equal(cache[f"blocks.{i}.attn.hook_pattern"], pattern)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_generate_with_left_padding_and_hooks(arch):
    model = tlshim.install(fixture(arch))
    seqs = prompts(arch, LENGTHS)
    ids, mask = left_pad(seqs)
    vector = steering_vector(arch)
    pads_seen = []

    def pad_weight(pattern, hook):
        if pattern.shape[0] == len(seqs):  # the batched run: the shortest prompt's pad keys get nothing
            pads_seen.append(pattern[-1, :, :, : ids.shape[1] - len(seqs[-1])][..., -1, :].abs().sum().item())

    hooks = [(f"blocks.{LAYER}.hook_resid_post", add_vector(vector)), (f"blocks.{LAYER}.attn.hook_pattern", pad_weight)]
    with model.hooks(fwd_hooks=hooks):
        batch, _ = greedy(model, ids, mask, new=6)
        alone = [greedy(model, seq[None], new=6)[0][0, len(seq):] for seq in seqs]
    assert pads_seen == [0.0] * 6
    for row, new_tokens in enumerate(alone):
        assert torch.equal(batch[row, ids.shape[1]:], new_tokens), f"prompt {row}"
    with torch.no_grad():
        unsteered, _ = greedy(model, ids, mask, new=6)
    assert not torch.equal(unsteered, batch), "the steering hook must act inside the batched generate"
