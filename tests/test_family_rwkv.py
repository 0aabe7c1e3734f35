"""RWKV on the mixer path (family_mixer): the time mix is the mixer (hook_mixer_out), the channel mix the
MLP (key -> relu^2 -> value, gated by sigmoid(receptance)), and the first block's own norm of the
embedding (pre_ln) is embed.ln, whose output is blocks.0.hook_resid_pre. Edits are checked against a
forward written here by hand from the twin's modules."""

import pytest
import torch

import tlshim
from tlshim.errors import UnsupportedModelError

from test_family_mixer import installed, run_hooked
from test_family_post import present
from tiny import build, tokens

pytestmark = pytest.mark.filterwarnings("ignore:tlshim has no spec")


def by_hand(twin, pre=lambda x: x, mixer=lambda x: x, mid=lambda x: x, mlp=lambda x: x):
    """The twin's logits computed block by block, with an edit after block 0's pre_ln, of its time mix's
    output, of the residual after it, or of its channel mix's output."""
    rwkv = twin.rwkv
    with torch.no_grad():
        block = rwkv.blocks[0]
        x = pre(block.pre_ln(rwkv.embeddings(tokens())))
        x = mid(x + mixer(block.attention(block.ln1(x))[0]))
        x = x + mlp(block.feed_forward(block.ln2(x))[0])
        for block in rwkv.blocks[1:]:
            x = block(x)[0]
        return twin.head(rwkv.ln_out(x))


def vector(d_model, seed):
    return torch.randn(d_model, generator=torch.Generator().manual_seed(seed))


def test_rwkv_names_hold_the_time_mix_the_channel_mix_and_the_first_blocks_embedding_norm():
    model, twin = installed("rwkv")
    rwkv = model.rwkv
    assert model.cfg.layer_types == ["mixer", "mixer"] and model.cfg.n_heads == 0 and model.cfg.d_mlp == 128
    assert model.embed.ln is rwkv.blocks[0].pre_ln and model.ln_final is rwkv.ln_out
    assert model.blocks[0].mixer is rwkv.blocks[0].attention and model.blocks[0].mlp is rwkv.blocks[0].feed_forward
    assert not [n for n in model.hook_dict if ".attn." in n]
    logits, cache = model.run_with_cache(tokens(), use_cache=False)
    assert torch.equal(logits, by_hand(twin))
    with torch.no_grad():
        block, ff = rwkv.blocks[1], rwkv.blocks[1].feed_forward
        assert torch.equal(cache["hook_embed"], rwkv.embeddings(tokens()))
        assert torch.equal(cache["blocks.0.hook_resid_pre"], rwkv.blocks[0].pre_ln(cache["hook_embed"]))
        assert torch.equal(cache["blocks.1.hook_mixer_out"], block.attention(block.ln1(cache["blocks.1.hook_resid_pre"]))[0])
        # the channel mix: token shift, key -> relu^2 (hook_pre -> hook_post) -> value, times sigmoid(receptance)
        z = block.ln2(cache["blocks.1.hook_resid_mid"])
        shifted = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1]], dim=1)
        mixed = lambda mix: z * mix + shifted * (1 - mix)  # noqa: E731
        assert torch.equal(cache["blocks.1.mlp.hook_pre"], ff.key(mixed(ff.time_mix_key)))
        assert torch.equal(cache["blocks.1.mlp.hook_post"], torch.square(torch.relu(cache["blocks.1.mlp.hook_pre"])))
        gate = torch.sigmoid(ff.receptance(mixed(ff.time_mix_receptance)))
        assert torch.equal(cache["blocks.1.hook_mlp_out"], gate * ff.value(cache["blocks.1.mlp.hook_post"]))
    assert torch.equal(cache["blocks.0.hook_resid_mid"], cache["blocks.0.hook_resid_pre"] + cache["blocks.0.hook_mixer_out"])
    report = tlshim.verify(model, tokens())
    assert report.ok, str(report)


@pytest.mark.parametrize(
    "name, edit",
    [
        ("blocks.0.hook_resid_pre", "pre"),
        ("blocks.0.hook_mixer_out", "mixer"),
        ("blocks.0.hook_resid_mid", "mid"),
        ("blocks.0.hook_mlp_out", "mlp"),
    ],
)
def test_rwkv_edits_equal_the_same_edit_in_a_forward_by_hand(name, edit):
    model, twin = installed("rwkv")
    v = vector(model.cfg.d_model, 3)
    steered = run_hooked(model, name, lambda x: x * 0.5 + v)
    assert torch.equal(steered, by_hand(twin, **{edit: lambda x: x * 0.5 + v}))
    assert not torch.equal(steered, by_hand(twin))


def test_an_edit_of_hook_embed_goes_through_the_first_blocks_norm():
    model, twin = installed("rwkv")
    v = vector(model.cfg.d_model, 4)
    steered = run_hooked(model, "hook_embed", lambda x: x + v)
    with torch.no_grad():
        want = by_hand(twin, pre=lambda x: twin.rwkv.blocks[0].pre_ln(twin.rwkv.embeddings(tokens()) + v))
    assert torch.equal(steered, want)


def test_rescale_every_acting_between_blocks_is_refused_naming_the_way_out():
    present("rwkv")
    with pytest.raises(UnsupportedModelError, match=r"RwkvConfig\.rescale_every = 1: .*halves the residual stream.*rescale_every=0"):
        tlshim.install(build("rwkv", rescale_every=1).eval())
    # where it cannot act (not fewer blocks than N: transformers' default 6 here) the model installs as it is
    model, twin = installed("rwkv", rescale_every=6)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens(), use_cache=False).logits, twin(input_ids=tokens(), use_cache=False).logits)
    assert tlshim.verify(model, tokens()).ok
    # the way out named in the error: the same model up to rounding and the norms' eps
    with torch.no_grad():
        halved = build("rwkv", rescale_every=1).eval()(input_ids=tokens(), use_cache=False).logits
        plain = twin(input_ids=tokens(), use_cache=False).logits
    assert not torch.equal(halved, plain) and torch.allclose(halved, plain, atol=1e-3 * plain.abs().max())
