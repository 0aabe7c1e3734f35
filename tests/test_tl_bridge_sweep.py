"""scripts/bridge_sweep.py: its checks on the TransformerBridge's cache catch what they name, and a
known type gets its known verdict. Runs in the `tl` tox env; skipped where transformer-lens is absent.
"""

import importlib.util
import pathlib

import pytest
import torch

pytest.importorskip("transformer_lens.model_bridge", reason="transformer-lens is not installed (the `tl` tox env has it)")

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "bridge_sweep.py"
spec = importlib.util.spec_from_file_location("bridge_sweep", SCRIPT)
bridge_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bridge_sweep)

B, P, H, G, E, D = 2, 5, 4, 2, 3, 8


def attention_cache(seed=0):
    """One sequential block whose hooks hold what HOOKS.md says (GQA: 4 heads, 2 KV heads)."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.softmax(torch.randn(B, H, P, P, generator=g), -1)
    v = torch.randn(B, P, G, E, generator=g)
    z = torch.matmul(pattern, v.repeat_interleave(H // G, dim=2).transpose(1, 2)).transpose(1, 2)
    pre, attn_out, mlp_out = (torch.randn(B, P, D, generator=g) for _ in range(3))
    return {
        "hook_embed": pre, "blocks.0.hook_resid_pre": pre, "blocks.0.hook_attn_out": attn_out,
        "blocks.0.hook_resid_mid": pre + attn_out, "blocks.0.hook_mlp_out": mlp_out,
        "blocks.0.hook_resid_post": pre + attn_out + mlp_out,
        "blocks.0.attn.hook_q": torch.randn(B, P, H, E, generator=g), "blocks.0.attn.hook_k": torch.randn(B, P, G, E, generator=g),
        "blocks.0.attn.hook_v": v, "blocks.0.attn.hook_pattern": pattern, "blocks.0.attn.hook_z": z,
    }  # fmt: skip


def test_a_consistent_cache_has_no_failure():
    cache = attention_cache()
    assert bridge_sweep._chain(cache, 1) == []
    assert bridge_sweep._attention(cache, "blocks.0", B, P, sinks=False) == []


def test_the_residual_chain_names_what_does_not_add_up():
    cache = attention_cache()
    cache["blocks.0.hook_resid_mid"] = cache["blocks.0.hook_resid_mid"] + 1e-2
    assert bridge_sweep._chain(cache, 1) == [
        "blocks.0.hook_resid_mid != resid_pre + attn_out", "blocks.0.hook_resid_post != resid_mid + mlp_out"]
    del cache["blocks.0.hook_resid_mid"]  # a parallel block: the three-term sum
    assert bridge_sweep._chain(cache, 1) == []
    cache["hook_embed"] = cache["hook_embed"] * 2
    assert bridge_sweep._chain(cache, 1) == ["hook_embed (+ hook_pos_embed) differs from blocks.0.hook_resid_pre"]


def test_attention_checks_name_the_pattern_z_and_shapes():
    cache = attention_cache()
    cache["blocks.0.attn.hook_z"] = cache["blocks.0.attn.hook_z"].roll(1, dims=2)  # heads swapped
    assert bridge_sweep._attention(cache, "blocks.0", B, P, sinks=False) == ["blocks.0.attn.hook_z != pattern @ v"]
    cache = attention_cache()
    cache["blocks.0.attn.hook_pattern"] = cache["blocks.0.attn.hook_pattern"] * 0.9  # a sink's share: allowed only with sinks
    assert bridge_sweep._attention(cache, "blocks.0", B, P, sinks=True) == ["blocks.0.attn.hook_z != pattern @ v"]
    assert bridge_sweep._attention(cache, "blocks.0", B, P, sinks=False)[0].startswith("blocks.0.attn.hook_pattern rows do not sum to 1")
    cache = attention_cache()
    cache["blocks.0.attn.hook_q"] = cache["blocks.0.attn.hook_q"].transpose(1, 2)  # heads first, as the bridge keeps MLA's
    assert bridge_sweep._attention(cache, "blocks.0", B, P, sinks=False)[0].startswith("blocks.0.attn shapes not as documented")


@pytest.mark.parametrize("model_type, n", [("llama", 2), ("gpt_oss", 2), ("lfm2_moe", 1), ("mamba", 0)])
def test_the_native_attention_layers_are_counted(model_type, n):
    """gpt-oss's softmax spans one sink column more; LFM2's tiny build has one conv and one attention layer."""
    from tiny import build, tokens

    assert bridge_sweep._attention_layers(build(model_type), tokens()) == n


@pytest.mark.filterwarnings("ignore")
def test_llama_passes_all_but_the_resid_mid_edit():
    """Known answer (TransformerLens 4.3.0): logits bit for bit; the bridge's hook_resid_mid is ln2's input hook."""
    result = bridge_sweep.check("llama")
    assert result == {"status": bridge_sweep.PASSES_BUT_MID, "reason": bridge_sweep.MID_ONLY, "logits_max_diff": 0.0, "attention_layers": 2}


@pytest.mark.filterwarnings("ignore")
def test_a_type_it_does_not_know_does_not_boot():
    result = bridge_sweep.check("biogpt")
    assert result["status"] == bridge_sweep.NO_BOOT and "Could not determine supported architecture" in result["reason"]
