"""hook_unembed against TransformerLens 4.3's TransformerBridge (its alias of unembed.hook_out), booted on
a twin with the same weights. Runs in the `tl` tox env; skipped where transformer-lens is absent."""

import pytest
import torch

from test_tl_process_weights import twins


@pytest.mark.parametrize("kind,arch", [("models", "llama"), ("models", "gemma2"), ("tiny", "gpt2")])
def test_hook_unembed_holds_the_bridges_value(kind, arch, tmp_path, monkeypatch):
    model, bridge, ids = twins(kind, arch, tmp_path, monkeypatch)
    with torch.no_grad():
        _, ours = model.run_with_cache(ids, names_filter="hook_unembed")
        _, theirs = bridge.run_with_cache(ids, names_filter="hook_unembed")
    # GPT-2: the bridge computes its attention itself (float rounding)
    torch.testing.assert_close(ours["hook_unembed"], theirs["hook_unembed"], rtol=0, atol=2e-5)
