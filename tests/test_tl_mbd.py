"""ModernBERT's decoder against TransformerLens 4.3's TransformerBridge booted on a twin with the same
weights: which of our names hold which of its values (the bridge's hook_embed is the embedding norm's
output, its ln_final the model's final norm before the LM head; ours is the head's norm, see README).

Runs in the `tl` tox env (transformer-lens 4.3.0 installed); skipped where transformer-lens is absent.
"""

import pytest
import torch

import tlshim

from tiny import build, tokens

bridge_module = pytest.importorskip("transformer_lens.model_bridge", reason="transformer-lens is not installed (the `tl` tox env has it)")

from test_tl_parity import word_tokenizer  # noqa: E402

TYPE = "modernbert-decoder"
SAME = [f"blocks.{i}.{name}" for i in (0, 1) for name in ("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z",
        "hook_attn_out", "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")]  # fmt: skip
#: (ours, the bridge's name holding the same values)
PAIRS = [
    *((name, name) for name in SAME),
    ("hook_embed", "embed.hook_out"),
    ("blocks.0.hook_resid_pre", "hook_embed"),  # the bridge's hook_embed: the embedding norm's output
    ("embed.ln.hook_scale", "embed_ln.hook_scale"),
    ("embed.ln.hook_normalized", "embed_ln.hook_normalized"),
    ("blocks.1.ln1.hook_scale",) * 2,
    ("blocks.1.ln1.hook_normalized",) * 2,
    ("blocks.1.hook_resid_post", "ln_final.hook_in"),  # the bridge's ln_final: the model's final norm
    ("hook_unembed",) * 2,
]


@pytest.mark.filterwarnings("ignore:tlshim has no spec")
def test_the_names_hold_the_bridges_values(tmp_path, monkeypatch):
    model = tlshim.install(build(TYPE))
    twin = build(TYPE)
    twin.config.architectures = [type(twin).__name__]  # as a saved checkpoint has it (TESTING.md)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    bridge = bridge_module.TransformerBridge.boot_transformers(TYPE, hf_model=twin, tokenizer=word_tokenizer(tmp_path), device="cpu")
    with torch.no_grad():
        logits, ours = model.run_with_cache(tokens())
        their_logits, theirs = bridge.run_with_cache(tokens())
    torch.testing.assert_close(logits, their_logits)
    for mine, their_name in PAIRS:
        want = theirs[their_name]
        torch.testing.assert_close(ours[mine], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()), msg=f"{mine} / {their_name}")
    # the bridge's mlp.hook_pre is Wi's whole output; ours are its two halves
    torch.testing.assert_close(torch.cat((ours["blocks.1.mlp.hook_pre"], ours["blocks.1.mlp.hook_pre_linear"]), -1), theirs["blocks.1.mlp.hook_pre"])
    # our ln_final is the LM head's norm: logits = its output @ W_U + b_U; the bridge's is the final norm before the head
    head = model.lm_head
    assert torch.allclose(theirs["ln_final.hook_out"], model.model.final_norm(ours["blocks.1.hook_resid_post"]), atol=1e-5)
    assert torch.allclose(head.norm(head.act(head.dense(theirs["ln_final.hook_out"]))) @ model.W_U + model.b_U, logits, atol=1e-4)
