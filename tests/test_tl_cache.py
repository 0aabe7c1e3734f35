"""TransformerLens 4.3's own analysis helpers on an installed model give the TransformerBridge's values on
the same weights: tools.analysis (direct_logit_attribution against the bridge in compatibility mode, as it
requires; logit_lens), ActivationCache's methods, head_detector, composition scores and OV / QK.

Runs in the `tl` tox env (transformer-lens 4.3.0 installed); skipped where transformer-lens is absent.
"""

import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers

import tlshim

from dropin import asset_dir, fixture_vocab
from models import require, tokens
from test_tl_parity import make, word_tokenizer

bridge_module = pytest.importorskip(
    "transformer_lens.model_bridge", reason="transformer-lens is not installed (the `tl` tox env has it)"
)
from transformer_lens import head_detector  # noqa: E402
from transformer_lens.tools.analysis import direct_logit_attribution  # noqa: E402
from transformer_lens.tools.analysis.logit_lens import logit_lens  # noqa: E402

#: qwen2: biases; gemma2: (1 + w) norms, soft-caps, post-norms; olmo: LayerNorm; a trained checkpoint
ARCHS = ["llama", "qwen2", "gemma2", "olmo", "trained-llama"]
CLOSE = dict(rtol=1e-5, atol=1e-5)


def boot(arch, name, tokenizer, compatibility=False):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIP_NO_INDEX", "1")  # the bridge may pip-install torchvision while booting (TESTING.md)
        bridge = bridge_module.TransformerBridge.boot_transformers(arch, hf_model=make(name), tokenizer=tokenizer, device="cpu")
    if compatibility:
        bridge.enable_compatibility_mode()
    return bridge.eval()


@pytest.fixture(scope="module", params=ARCHS)
def trio(request, tmp_path_factory):
    """tlshim's model, the bridge as booted and the bridge in compatibility mode, on twins with the same weights."""
    name = request.param
    arch = name.removeprefix("trained-")
    require(arch)
    tokenizer = (word_tokenizer(tmp_path_factory.mktemp("tokenizer")) if name == arch
                 else transformers.AutoTokenizer.from_pretrained(asset_dir(arch)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "tlshim switched")
        model = tlshim.install(make(name), tokenizer=tokenizer).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge, compat = boot(arch, name, tokenizer), boot(arch, name, tokenizer, compatibility=True)
    ids = tokens() if name == arch else tokens() % fixture_vocab(arch)
    return SimpleNamespace(arch=arch, model=model, bridge=bridge, compat=compat, ids=ids)


@pytest.mark.parametrize("unit", ["component", "head", "layer"])
def test_direct_logit_attribution(trio, unit):
    """TL's DLA on the installed model (unfolded weights) equals DLA on the compatibility-mode bridge (folded)."""
    right, wrong = trio.ids[:, -1], trio.ids[:, -2]
    ours = direct_logit_attribution(trio.model, trio.ids, right, wrong, unit=unit)
    theirs = direct_logit_attribution(trio.compat, trio.ids, right, wrong, unit=unit)
    assert ours.labels == theirs.labels
    if unit == "head" and trio.arch == "qwen2":
        # compatibility mode folds the value biases into b_O (the remainder): the heads differ by design, not their sum
        torch.testing.assert_close(ours.attribution.sum(0), theirs.attribution.sum(0), rtol=1e-4, atol=1e-4)
        return
    torch.testing.assert_close(ours.attribution, theirs.attribution, rtol=1e-4, atol=1e-4)
    if unit == "component" and trio.arch != "gemma2":  # Gemma2's logits are soft-capped after W_U
        logits = trio.model(trio.ids).logits[:, -1]
        want = logits.gather(-1, right[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]
        torch.testing.assert_close(ours.attribution.sum(0), want, rtol=1e-4, atol=1e-4)


def test_logit_lens(trio):
    ours, theirs = logit_lens(trio.model, trio.ids), logit_lens(trio.bridge, trio.ids)
    assert ours.labels == theirs.labels
    with torch.no_grad():
        _, cache = trio.model.run_with_cache(trio.ids)
    assert torch.equal(cache.logit_lens().values, ours.values)
    cap = trio.model.cfg.output_logits_soft_cap
    if cap > 0:  # TL applies it through the bridge's adapter, which an installed model has not: model.unembed does
        assert not torch.allclose(ours.values, theirs.values, atol=1e-2)
        ours.readout.values = torch.tanh(ours.values / cap) * cap
    torch.testing.assert_close(ours.values, theirs.values, **CLOSE)


METHODS = {  # cache -> a result
    "get_full_resid_decomposition": lambda c: c.get_full_resid_decomposition(pos_slice=-1, apply_ln=True),
    "get_full_resid_decomposition, mlp layers": lambda c: c.get_full_resid_decomposition(
        layer=c.model.cfg.n_layers - 1, mlp_input=True, expand_neurons=False),
    "get_full_resid_decomposition, projected": lambda c: c.get_full_resid_decomposition(apply_ln=True, project_output_onto=torch.linspace(-1, 1, c.model.cfg.d_model)),
    "stack_neuron_results": lambda c: c.stack_neuron_results(2, incl_remainder=True, apply_ln=True),
    "stack_neuron_results, projected": lambda c: c.stack_neuron_results(
        2, apply_ln=True, incl_remainder=True, project_output_onto=torch.ones(c.model.cfg.d_model, 2), pos_slice=-1),
    "get_neuron_results": lambda c: c.get_neuron_results(1, neuron_slice=(2, 9), pos_slice=-1),
    "stack_activation": lambda c: c.stack_activation("resid_post"),
    "apply_slice_to_batch_dim": lambda c: c.apply_slice_to_batch_dim(1).decompose_resid(pos_slice=-1, apply_ln=True),
    "negative layer": lambda c: c["resid_post", -1],
    "stack_head_results, layer 0": lambda c: c.stack_head_results(layer=0, pos_slice=-1),
    "accumulated_resid, pos_slice -1": lambda c: c.accumulated_resid(pos_slice=-1, apply_ln=True),
}


def one_token_word(tokenizer):
    """A string that is exactly one token of ``tokenizer``."""
    for i in range(3, 200):
        word = tokenizer.decode([i])
        if tokenizer(word, add_special_tokens=False)["input_ids"] == [i]:
            return word
    raise AssertionError("no single-token word found")


@pytest.mark.parametrize("method", list(METHODS))
def test_cache_methods(trio, method):
    with torch.no_grad():
        _, ours = trio.model.run_with_cache(trio.ids)
        _, theirs = trio.bridge.run_with_cache(trio.ids)
    got, want = METHODS[method](ours), METHODS[method](theirs)
    assert got.shape == want.shape, method
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=method)


def test_analysis_api(trio):
    model, bridge = trio.model, trio.bridge
    assert model.all_head_labels == bridge.all_head_labels
    torch.testing.assert_close(model.OV.AB, bridge.OV.AB)
    torch.testing.assert_close(model.QK.AB, bridge.QK.AB)
    for mode in "QKV":
        torch.testing.assert_close(model.all_composition_scores(mode), bridge.all_composition_scores(mode).scores, rtol=1e-4, atol=1e-6)
    last = model.cfg.n_layers - 1
    torch.testing.assert_close(model.accumulated_bias(last, mlp_input=True), bridge.accumulated_bias(last, mlp_input=True))



LOGIT_ATTRS = {  # (cache, ids, a one-token string) -> a result; differences, as compatibility mode centres W_U
    "last position": lambda c, ids, word: c.logit_attrs(c.decompose_resid(pos_slice=-1), ids[:, -1], incorrect_tokens=ids[:, -2], pos_slice=-1),
    "per position": lambda c, ids, word: c.logit_attrs(c.accumulated_resid(), ids, incorrect_tokens=ids.roll(1, -1)),
    "string token": lambda c, ids, word: c.logit_attrs(c.decompose_resid(pos_slice=-1), word, incorrect_tokens=int(ids[0, 0]), pos_slice=-1),
}


@pytest.mark.parametrize("case", list(LOGIT_ATTRS))
def test_logit_attrs(trio, case):
    """The directions carry the final norm's weight, as the compatibility-mode bridge's W_U; a string is one token."""
    word = one_token_word(trio.model.tokenizer)
    with torch.no_grad():
        _, ours = trio.model.run_with_cache(trio.ids)
        _, theirs = trio.compat.run_with_cache(trio.ids)
    got, want = LOGIT_ATTRS[case](ours, trio.ids, word), LOGIT_ATTRS[case](theirs, trio.ids, word)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["previous_token_head", "duplicate_token_head", "induction_head"])
def test_head_detector(trio, kind, monkeypatch):
    seq = trio.bridge.to_string(trio.ids[0, :8].repeat(2))
    # the same tokens on both sides (to_tokens' BOS conventions are test_tl_*'s of the token helpers)
    monkeypatch.setattr(trio.model, "to_tokens", lambda text, **kwargs: trio.bridge.to_tokens(text))
    with torch.no_grad():
        theirs = head_detector.detect_head(trio.bridge, seq, kind)
        ours = head_detector.detect_head(trio.model, seq, kind)
    assert not torch.all(theirs == theirs[0, 0])
    torch.testing.assert_close(ours, theirs, **CLOSE)


def test_per_head_helpers_on_per_layer_heads_name_what_to_use(tmp_path):
    from fixtures.openelm_fixture import build_openelm_in_memory

    model = tlshim.install(build_openelm_in_memory(seed=0), tokenizer=word_tokenizer(tmp_path))
    seq = "t5 t6 t7 t5 t6 t7"
    with torch.no_grad():  # the stand-in's legacy KV cache needs use_cache=False (test_openelm.py)
        _, cache = model.run_with_cache(model.to_tokens(seq), remove_batch_dim=True, use_cache=False)
    with pytest.raises(TypeError, match=r"cfg.n_heads\[layer\]"):
        head_detector.detect_head(model, seq, "induction_head", cache=cache)
