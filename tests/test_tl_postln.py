"""Post-LN models against TransformerLens 4.3's TransformerBridge booted on a twin with the same
weights. tlshim follows HookedEncoder's names; the bridge names BERT's module boundaries, so some of
its names hold another of ours (PAIRS says which), and the test notices when the bridge changes.

Runs in the `tl` tox env (transformer-lens 4.3.0 installed); skipped where transformer-lens is absent.
"""

import pytest
import torch

from tiny import tokens

pytest.importorskip("transformer_lens.model_bridge", reason="transformer-lens is not installed (the `tl` tox env has it)")

from test_tl_abs import installed_and_bridge  # noqa: E402

SAME = ("hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k",
        "blocks.0.attn.hook_v", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_pre",
        "blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out")  # fmt: skip
#: (ours, the bridge's name holding the same values)
PAIRS = {
    "bert": [*((name, name) for name in SAME), *((f"blocks.0.{ln}.hook_{x}",) * 2 for ln in ("ln1", "ln2") for x in ("scale", "normalized")),
             ("ln_final.hook_scale",) * 2, ("ln_final.hook_normalized",) * 2,
             ("blocks.0.hook_resid_pre", "hook_embed"),  # the bridge's hook_embed: the embedding LayerNorm's output
             ("blocks.0.attn.hook_pattern", "blocks.0.attn.hook_attn_scores"),  # the bridge keeps the pattern there
             ("blocks.0.hook_resid_post", "blocks.0.hook_resid_mid"),  # the bridge's resid_mid: ln2's input
             ("blocks.0.hook_normalized_resid_post", "blocks.0.hook_resid_post")],  # the bridge's resid_post: the block's output
    "openai-gpt": [*((name, name) for name in SAME), ("hook_embed",) * 2, ("blocks.0.hook_attn_out",) * 2],
}  # fmt: skip


@pytest.mark.filterwarnings("ignore:tlshim has no spec")
@pytest.mark.parametrize("model_type", PAIRS)
def test_the_names_hold_the_bridges_values(model_type, tmp_path, monkeypatch):
    model, bridge = installed_and_bridge(model_type, tmp_path, monkeypatch)
    with torch.no_grad():
        logits, ours = model.run_with_cache(tokens())
        their_logits, theirs = bridge.run_with_cache(tokens())
    torch.testing.assert_close(logits, their_logits)
    compared = []
    for mine, their_name in PAIRS[model_type]:
        if their_name in theirs:
            want = theirs[their_name].expand_as(ours[mine])
            torch.testing.assert_close(ours[mine], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()), msg=f"{mine} / {their_name}")
            compared.append(their_name)
    assert len(compared) >= (20 if model_type == "bert" else 8), compared
