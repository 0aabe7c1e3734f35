"""The switches against TransformerLens 4.3's TransformerBridge on a twin with the same weights:
the switch hooks' values, an edit of one head's input copy, transformer_lens.patching's direct path
patching, and path-patching style code (per-head results into a later head's input or an MLP's input).

Runs in the `tl` tox env (transformer-lens 4.3.0 installed); skipped where transformer-lens is absent.
"""

import warnings

import pytest
import torch

import tlshim

from models import build, tokens
from test_tl_parity import word_tokenizer

bridge_module = pytest.importorskip(
    "transformer_lens.model_bridge", reason="transformer-lens is not installed (the `tl` tox env has it)"
)
patching = pytest.importorskip("transformer_lens.patching")

#: the bridge recomputes every head's q/k/v per head when a fork is on (tlshim keeps the model's own
#: values for the heads left unedited), so logits agree to float rounding
CLOSE = dict(rtol=1e-4, atol=1e-4)
#: (arch, build overrides): GQA llama, a model with as many kv heads as query heads (k/v direct paths), gemma2
CASES = {"llama": ("llama", {}), "llama-mha": ("llama", {"num_key_value_heads": 4}), "gemma2": ("gemma2", {})}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "tlshim switched")
        model = tlshim.install(build(arch, **overrides))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIP_NO_INDEX", "1")
        tokenizer = word_tokenizer(tmp_path_factory.mktemp("tokenizer"))
        bridge = bridge_module.TransformerBridge.boot_transformers(arch, hf_model=build(arch, **overrides), tokenizer=tokenizer, device="cpu")
    return model, bridge


@pytest.fixture(autouse=True)
def switches_off(pair):
    yield
    for m in pair:
        m.set_use_attn_in(False)
        m.set_use_split_qkv_input(False)
        m.set_use_hook_mlp_in(False)
        m.set_use_attn_result(False)


def both(pair, fn):
    return [fn(m) for m in pair]


def test_switch_hooks_hold_the_bridges_values(pair):
    ids = tokens()
    caches = []
    for m in pair:
        m.set_use_split_qkv_input(True)
        m.set_use_hook_mlp_in(True)
        m.set_use_attn_result(True)
        with torch.no_grad():
            caches.append(m.run_with_cache(ids)[1])
    ours, theirs = caches
    for i in range(pair[0].cfg.n_layers):
        for name in ("hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in"):
            torch.testing.assert_close(ours[f"blocks.{i}.{name}"], theirs[f"blocks.{i}.{name}"], **CLOSE)
    for name in ("hook_q_input", "hook_k_input", "hook_v_input"):  # upstream of every fork: bit for bit
        assert torch.equal(ours[f"blocks.0.{name}"], theirs[f"blocks.0.{name}"])
    for i in range(pair[0].cfg.n_layers):
        torch.testing.assert_close(ours["result", i], theirs["result", i], **CLOSE)
    for m in pair:
        m.set_use_split_qkv_input(False)
        m.set_use_attn_in(True)
    with torch.no_grad():
        got = [m.run_with_cache(ids, names_filter=lambda n: n.endswith("attn_in"))[1]["blocks.1.hook_attn_in"] for m in pair]
    torch.testing.assert_close(*got, **CLOSE)


@pytest.mark.parametrize("name, head", [("hook_q_input", 3), ("hook_k_input", 1), ("hook_v_input", 0), ("hook_attn_in", 0), ("hook_mlp_in", None)])
def test_an_edit_of_one_heads_copy_gives_the_bridges_logits(pair, name, head):
    ids = tokens()
    delta = torch.randn(ids.shape[1], pair[0].cfg.d_model, generator=torch.Generator().manual_seed(7))

    def edit(t, hook):
        t = t.clone()
        if head is None:
            t += delta
        else:
            t[:, :, head] += delta
        return t

    switch = {"hook_attn_in": "set_use_attn_in", "hook_mlp_in": "set_use_hook_mlp_in"}.get(name, "set_use_split_qkv_input")
    for m in pair:
        getattr(m, switch)(True)
    with torch.no_grad():
        clean = pair[0](ids).logits
        ours, theirs = both(pair, lambda m: m.run_with_hooks(ids, fwd_hooks=[(f"blocks.2.{name}", edit)]))
    torch.testing.assert_close(ours, theirs, **CLOSE)
    assert (ours - clean).abs().max() > 1e-2  # the edit did something


def test_direct_path_patching_gives_the_bridges_results(pair):
    model, bridge = pair
    gen = torch.Generator().manual_seed(11)
    clean_ids = torch.randint(3, 256, (2, 8), generator=gen)
    corrupted_ids = clean_ids.clone()
    corrupted_ids[:, 2] = torch.randint(3, 256, (2,), generator=gen)
    answer = clean_ids[:, -1]

    def metric(logits):
        return logits[torch.arange(2), -1, answer].mean()

    if model.cfg.use_normalization_before_and_after:  # Gemma2's post-attention norm: TransformerLens refuses, on both
        for m in pair:
            with torch.no_grad():
                _, clean_cache = m.run_with_cache(clean_ids)
            with pytest.raises(ValueError, match="normalized or scaled before the residual add"):
                patching.get_act_patch_direct_path(m, corrupted_ids, clean_cache, clean_cache, metric, 0, 1, verbose=False)
        return
    components = ["q", "k", "v"] if model.cfg.n_key_value_heads == model.cfg.n_heads else ["q"]
    results = []
    for m in pair:
        with torch.no_grad():
            _, clean_cache = m.run_with_cache(clean_ids)
            _, corrupted_cache = m.run_with_cache(corrupted_ids)
        results.append([patching.get_act_patch_direct_path(m, corrupted_ids, clean_cache, corrupted_cache, metric, src_layer=0, src_head=1,
                                                           component=c, verbose=False) for c in components])
        assert not m.cfg.use_split_qkv_input  # the sweep restores the switch
    for ours, theirs in zip(*results):
        assert ours.shape == (4, 4) and (ours[1:] != 0).all()
        torch.testing.assert_close(ours, theirs, **CLOSE)
    if components == ["q"]:  # GQA: TransformerLens refuses k/v the same way on both
        for m in pair:
            with pytest.raises(ValueError, match="GQA"):
                patching.get_act_patch_direct_path(m, corrupted_ids, clean_cache, corrupted_cache, metric, 0, 1, component="k", verbose=False)


def path_patch(model, clean_ids, corrupted_ids, sender, receivers):
    """Path patching as TransformerLens code writes it: the sender head's clean per-head result
    (use_attn_result) minus its corrupted one, added to each receiver's input copy alone."""
    layer, head = sender
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    with torch.no_grad():
        _, clean = model.run_with_cache(clean_ids, names_filter=lambda n: n.endswith("hook_result"))
        _, corrupted = model.run_with_cache(corrupted_ids, names_filter=lambda n: n.endswith("hook_result"))
        delta = clean["result", layer][:, :, head] - corrupted["result", layer][:, :, head]
        hooks = []
        for name, receiver_head in receivers:
            def add(t, hook, receiver_head=receiver_head):
                t = t.clone()
                if receiver_head is None:
                    return t + delta
                t[:, :, receiver_head] += delta
                return t

            hooks.append((name, add))
        return model.run_with_hooks(corrupted_ids, fwd_hooks=hooks)


def test_path_patching_code_gives_the_bridges_logits(pair):
    gen = torch.Generator().manual_seed(12)
    clean_ids = torch.randint(3, 256, (2, 10), generator=gen)
    corrupted_ids = torch.randint(3, 256, (2, 10), generator=gen)
    receivers = [("blocks.2.hook_q_input", 0), ("blocks.3.hook_v_input", 1), ("blocks.1.hook_mlp_in", None)]
    ours, theirs = both(pair, lambda m: path_patch(m, clean_ids, corrupted_ids, (1, 2), receivers))
    torch.testing.assert_close(ours, theirs, **CLOSE)
    with torch.no_grad():
        assert (ours - pair[0](corrupted_ids).logits).abs().max() > 1e-3


def test_cfg_fields_match_the_bridges(pair):
    model, bridge = pair
    # the bridge leaves rotary_dim None on Llama-family models; HookedTransformer (and tlshim) set it to the rotated width
    assert model.cfg.rotary_dim == model.cfg.d_head and bridge.cfg.rotary_dim in (None, model.cfg.d_head)
    for field in ("attention_dir", "positional_embedding_type", "final_rms", "parallel_attn_mlp", "use_attn_scale",
                  "normalization_type", "gated_mlp"):
        assert getattr(model.cfg, field) == getattr(bridge.cfg, field), field
    # (the bridge leaves attn_scale at -1 and n_params None: tlshim's are HookedTransformer's, test_switches.py)
    assert model.cfg.device == bridge.cfg.device == "cpu"
