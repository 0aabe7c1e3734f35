"""hook_unembed against TransformerLens 4.3's TransformerBridge (its alias of unembed.hook_out), booted on
a twin with the same weights. Runs in the `tl` tox env; skipped where transformer-lens is absent."""

import warnings

import pytest
import torch

import tlshim

import models
import tiny
from test_tl_parity import word_tokenizer

bridge_module = pytest.importorskip(
    "transformer_lens.model_bridge", reason="transformer-lens is not installed (the `tl` tox env has it)"
)


@pytest.mark.parametrize("kind,arch", [("models", "llama"), ("models", "gemma2"), ("tiny", "gpt2")])
def test_hook_unembed_holds_the_bridges_value(kind, arch, tmp_path, monkeypatch):
    build, tokens = (models.build, models.tokens) if kind == "models" else (tiny.build, tiny.tokens)
    model = tlshim.install(build(arch))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the bridge may pip-install torchvision while booting (TESTING.md)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = bridge_module.TransformerBridge.boot_transformers(arch, hf_model=build(arch), tokenizer=word_tokenizer(tmp_path), device="cpu")
    ids = tokens()
    with torch.no_grad():
        _, ours = model.run_with_cache(ids, names_filter="hook_unembed")
        _, theirs = bridge.run_with_cache(ids, names_filter="hook_unembed")
    # GPT-2: the bridge computes its attention itself (float rounding)
    torch.testing.assert_close(ours["hook_unembed"], theirs["hook_unembed"], rtol=0, atol=2e-5)
