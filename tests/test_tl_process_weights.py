"""In-place weight processing against TransformerLens 4.3's TransformerBridge in compatibility mode,
booted on a twin with the same weights: the processed W_Q, W_K, W_O, W_in, W_E, W_U, b_U (and the
biases where the model has them) and the logits.

Runs in the `tl` tox env (transformer-lens 4.3.0 installed); skipped where transformer-lens is absent.
"""

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

#: RMSNorm (llama, qwen2 with biases, gemma2 with (1 + w) norms and a soft-cap, smollm3), weight-free
#: LayerNorm with clipped q/k/v (olmo), LayerNorm with biases, Conv1D / learned positions (gpt2, opt, gpt_neo)
CASES = [("models", a) for a in ("llama", "qwen2", "gemma2", "olmo", "smollm3")] + [("tiny", a) for a in ("gpt2", "opt", "gpt_neo")]
NAMES = ("W_Q", "W_K", "W_O", "W_in", "W_E", "W_U", "b_U", "b_Q", "b_V", "b_O", "b_in", "b_out")
#: OLMo clips q/k/v after the projection: float rounding of the centred weights reaches the logits there
LOGITS_ATOL = {"olmo": 2e-4}


def twins(kind, arch, tmp_path, monkeypatch):
    """(installed model, TransformerBridge on a twin with the same weights, token ids): tests/models.py's
    fixtures (kind "models") or tests/tiny.py's."""
    build, tokens = (models.build, models.tokens) if kind == "models" else (tiny.build, tiny.tokens)
    if kind == "models":
        models.require(arch)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the bridge may pip-install torchvision while booting (TESTING.md)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = bridge_module.TransformerBridge.boot_transformers(arch, hf_model=build(arch), tokenizer=word_tokenizer(tmp_path), device="cpu")
    return tlshim.install(build(arch)), bridge, tokens()


@pytest.mark.parametrize("kind,arch", CASES)
def test_processed_weights_and_logits_equal_the_bridges_in_compatibility_mode(kind, arch, tmp_path, monkeypatch):
    model, bridge, ids = twins(kind, arch, tmp_path, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge.enable_compatibility_mode()
        model.enable_compatibility_mode()
    compared = []
    for name in NAMES:
        try:
            theirs = getattr(bridge, name)
        except (ValueError, AttributeError):  # a bias this model does not have: the bridge has no such weight
            continue
        torch.testing.assert_close(getattr(model, name), theirs.detach(), rtol=0, atol=1e-6, msg=name)
        compared.append(name)
    assert {"W_Q", "W_K", "W_O", "W_in", "W_E", "W_U", "b_U"} <= set(compared), compared
    with torch.no_grad():
        ours, theirs = model(ids, return_type="logits"), bridge(ids, return_type="logits")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=LOGITS_ATOL.get(arch, 2e-5))
