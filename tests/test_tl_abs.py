"""The absolute-position / Conv1D / ALiBi family against TransformerLens 4.3's TransformerBridge booted
on a twin with the same weights: the names both expose hold the same values (hook_pos_embed broadcast
to the batch, as HookedTransformer gives it).

Runs in the `tl` tox env (transformer-lens 4.3.0 installed); skipped where transformer-lens is absent.
"""

import warnings

import pytest
import torch

import tlshim

from test_tl_parity import word_tokenizer
from tiny import build, tokens

bridge_module = pytest.importorskip(
    "transformer_lens.model_bridge", reason="transformer-lens is not installed (the `tl` tox env has it)"
)

TYPES = ("gpt2", "gpt_neo", "opt", "bloom")
#: the bridge's hook_attn_scores holds the softmax output on these (TransformerLens 4.3.0): there it is
#: compared with our hook_pattern instead, so the test notices when the bridge changes
SCORES_ARE_PATTERN = ("gpt_neo", "opt")
NAMES = ("hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_q", "blocks.0.attn.hook_v",
         "blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.0.hook_attn_out",
         "blocks.0.hook_resid_mid", "blocks.0.mlp.hook_post", "blocks.1.hook_resid_post")


def installed_and_bridge(model_type, tmp_path, monkeypatch):
    """A tiny ``model_type`` installed, and the bridge booted on its twin."""
    model = tlshim.install(build(model_type))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the bridge may pip-install torchvision while booting (TESTING.md)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = bridge_module.TransformerBridge.boot_transformers(model_type, hf_model=build(model_type), tokenizer=word_tokenizer(tmp_path), device="cpu")
    return model, bridge


@pytest.mark.filterwarnings("ignore:tlshim has no spec")
@pytest.mark.parametrize("model_type", TYPES)
def test_the_names_both_expose_hold_the_same_values(model_type, tmp_path, monkeypatch):
    model, bridge = installed_and_bridge(model_type, tmp_path, monkeypatch)
    ids = tokens()
    with torch.no_grad():
        _, ours = model.run_with_cache(ids)
        _, theirs = bridge.run_with_cache(ids)
    compared = []
    for name in NAMES:
        if name in theirs:
            got, want = ours[name], theirs[name].expand_as(ours[name])
            if name.endswith("hook_attn_scores") and model_type in SCORES_ARE_PATTERN:
                got = ours[name.replace("hook_attn_scores", "hook_pattern")]
            if name.endswith("hook_attn_scores"):  # masked: -inf there, the dtype's minimum as some kernels see it
                masked = want < -1e30
                assert (got[masked] < -1e30).all(), name
                got, want = got[~masked], want[~masked]
            # the bridge computes some attention itself (GPT-Neo): float rounding, relative to the values
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()), msg=name)
            compared.append(name)
    assert "hook_pos_embed" in compared or model_type == "bloom", compared
    assert len(compared) >= 8, compared
