"""Parity with TransformerLens 4.3's TransformerBridge on parallel-block models (GPT-NeoX with its
interleaved query_key_value and two norms, Phi with one shared norm and partial rotary, StableLM with
use_parallel_residual), booted on a tiny twin with the same weights: every hook name both expose
holds the same value, bit for bit. Runs in the `tl` tox env; skipped where transformer-lens is absent.
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


@pytest.mark.parametrize("model_type, fields", [("gpt_neox", {}), ("phi", {}), ("stablelm", {"use_parallel_residual": True})])
def test_every_shared_name_holds_the_bridges_value(model_type, fields, tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tlshim.install(build(model_type, **fields))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the bridge may pip-install torchvision while booting (TESTING.md)
    bridge = bridge_module.TransformerBridge.boot_transformers(
        model_type, hf_model=build(model_type, **fields), tokenizer=word_tokenizer(tmp_path), device="cpu"
    )
    with torch.no_grad():
        _, ours = model.run_with_cache(tokens(), use_cache=False)
        _, theirs = bridge.run_with_cache(tokens(), use_cache=False)
    shared = set(ours.keys()) & set(theirs.keys())
    wanted = {f"blocks.{i}.{name}" for i in range(model.cfg.n_layers) for name in ("attn.hook_v", "hook_attn_out", "hook_mlp_out", "hook_resid_post")}
    assert wanted <= shared and "blocks.0.hook_resid_mid" not in ours.keys()
    for name in sorted(shared):
        assert torch.equal(ours[name], theirs[name]), name
