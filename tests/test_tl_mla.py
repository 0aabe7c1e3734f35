"""Parity with TransformerLens 4.3's TransformerBridge on multi-head latent attention (DeepSeek-V2/V3), booted on
a tiny twin with the same weights. The names both expose for the same quantity hold the same values, bit for
bit: the latents, hook_v, pattern, scores, z and the residual stream. The bridge's hook_q / hook_k are the
tensors entering the kernel (tlshim's hook_rot_q / hook_rot_k; tlshim's hook_q / hook_k are before rotary, see
README "Multi-head latent attention"). Runs in the `tl` tox env; skipped where transformer-lens is absent.
"""

import warnings

import pytest
import torch
from test_tl_parity import word_tokenizer
from tiny import build, tokens

import tlshim

bridge_module = pytest.importorskip(
    "transformer_lens.model_bridge", reason="transformer-lens is not installed (the `tl` tox env has it)"
)

SAME = ("attn.hook_q_latent", "attn.hook_kv_latent", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
        "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")  # fmt: skip


def _heads_last(ours, theirs):
    """The bridge's value as (batch, pos, heads, d) where it keeps (batch, heads, pos, d)."""
    return theirs if theirs.shape == ours.shape else theirs.transpose(1, 2)


@pytest.mark.parametrize("model_type", ("deepseek_v2", "deepseek_v3"))
def test_the_shared_quantities_hold_the_bridges_values(model_type, tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tlshim.install(build(model_type))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the bridge may pip-install torchvision while booting (TESTING.md)
    twin = build(model_type)
    twin.config.architectures = [type(twin).__name__]  # the bridge picks its adapter by class name
    bridge = bridge_module.TransformerBridge.boot_transformers(model_type, hf_model=twin, tokenizer=word_tokenizer(tmp_path), device="cpu")
    with torch.no_grad():
        _, ours = model.run_with_cache(tokens(), use_cache=False)
        _, theirs = bridge.run_with_cache(tokens(), use_cache=False)
    for i in range(model.cfg.n_layers):
        for name in SAME:
            key = f"blocks.{i}.{name}"
            assert torch.equal(ours[key], _heads_last(ours[key], theirs[key])), key
        for tl_name, name in (("hook_q", "hook_rot_q"), ("hook_k", "hook_rot_k"), ("hook_v", "hook_v")):
            ours_value, key = ours[f"blocks.{i}.attn.{name}"], f"blocks.{i}.attn.{tl_name}"
            assert torch.equal(ours_value, _heads_last(ours_value, theirs[key])), key
