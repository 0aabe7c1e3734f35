"""Parity with TransformerLens 4.3's TransformerBridge, booted on a twin with the same weights: every
hook name both expose holds the same value, every norm's hook_scale / hook_normalized among them, an
edit of them means the same, and the cache's norm methods give TransformerLens's own results. On the
tiny fixtures (random norm weights) of every supported architecture, and on the shipped trained
checkpoints (trained norm weights far from one).

Runs in the `tl` tox env (transformer-lens 4.3.0 installed); skipped where transformer-lens is absent.
"""

import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers

import tlshim

from dropin import asset_dir, fixture, fixture_vocab
from models import ALL_ARCHS, VOCAB, build, require, tokens

bridge_module = pytest.importorskip(
    "transformer_lens.model_bridge", reason="transformer-lens is not installed (the `tl` tox env has it)"
)

#: "trained-<arch>": the checkpoint shipped in tlshim/assets (OpenELM's needs remote code: left out)
ARCHS = [*ALL_ARCHS, "openelm", *(f"trained-{arch}" for arch in ("llama", "gemma2", "olmo", "smollm3"))]
#: the bridge computes OpenELM's attention itself (its logits differ from native by ~3e-5), so values
#: downstream of layer 0 agree to float rounding there; on every other architecture, bit for bit
CLOSE = {"openelm": dict(rtol=1e-4, atol=3e-4)}


def make(arch):
    if arch.startswith("trained-"):
        return fixture(arch.removeprefix("trained-"))
    if arch == "openelm":
        from fixtures.openelm_fixture import build_openelm_in_memory

        return build_openelm_in_memory(seed=0)
    return build(arch)


def word_tokenizer(path, words=None):
    """A word-level tokenizer, saved to ``path`` and reloaded (the bridge reads its path; nothing is fetched).
    Its words: "t0" ... (t1 BOS, t2 EOS, t0 pad and unknown), or ``words`` after those three."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB)} if words is None else {w: i for i, w in enumerate(["t0", "t1", "t2", *words])}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t0")
    tok.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    """tlshim's model and cache, the bridge and its cache, on twins with the same weights and input."""
    name = request.param
    arch = name.removeprefix("trained-")
    if arch != "openelm":
        require(arch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "tlshim switched")
        model = tlshim.install(make(name))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIP_NO_INDEX", "1")  # the bridge may pip-install torchvision while booting (TESTING.md)
        if name == arch:
            tokenizer = word_tokenizer(tmp_path_factory.mktemp("tokenizer"))
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(asset_dir(arch))
        bridge = bridge_module.TransformerBridge.boot_transformers(arch, hf_model=make(name), tokenizer=tokenizer, device="cpu")
    ids = tokens() if name == arch else tokens() % fixture_vocab(arch)
    kwargs = {"use_cache": False} if arch == "openelm" else {}  # the stand-in's legacy cache (test_openelm.py)
    with torch.no_grad():
        _, ours = model.run_with_cache(ids, **kwargs)
        _, theirs = bridge.run_with_cache(ids, **kwargs)
    return SimpleNamespace(arch=arch, model=model, bridge=bridge, ours=ours, theirs=theirs, ids=ids, kwargs=kwargs)


def same(arch, got, want, msg):
    if arch in CLOSE:
        torch.testing.assert_close(got, want, **CLOSE[arch], msg=msg)
    else:
        assert torch.equal(got, want), msg


def as_catalog(pair, name, value):
    """The bridge's value in the catalog's layout and meaning, where the two differ by design."""
    if name.endswith(("hook_q_normed", "hook_k_normed")):
        return value.transpose(1, 2)  # the bridge keeps (batch, head, pos, d_head); the catalog (batch, pos, head, d_head)
    clip = getattr(pair.model.config, "clip_qkv", None)  # OLMo: tlshim's hold the clamped values the model uses
    if clip is not None and name.endswith(("attn.hook_q", "attn.hook_k", "attn.hook_v")):
        return value.clamp(-clip, clip)
    return value


def test_every_shared_name_holds_the_bridges_value(pair):
    ours, theirs = pair.ours, pair.theirs
    norms = {name for name in ours.keys() if name.split(".")[-1] in ("hook_scale", "hook_normalized")}
    assert len(norms) == 2 * (2 * pair.model.cfg.n_layers + 1) and norms <= set(theirs.keys()), "every norm hook is compared"
    for name in sorted(set(ours.keys()) & set(theirs.keys())):
        want = as_catalog(pair, name, theirs[name])
        if pair.arch == "olmo" and name.endswith("hook_normalized"):
            # parameter-free: tlshim's is the norm's own output (F.layer_norm), the bridge's (x - mean) * rsqrt
            torch.testing.assert_close(ours[name], want, rtol=1e-6, atol=1e-6, msg=name)
            continue
        same(pair.arch, ours[name], want, name)


def test_normalized_is_before_the_weight(pair):
    """On both sides the norm's output is hook_normalized times the (random) weight, not hook_normalized."""
    for prefix, ln in (("blocks.1.ln1", pair.model.blocks[1].ln1), ("ln_final", pair.model.ln_final)):
        output = pair.theirs[f"{prefix}.hook_out"]
        if ln.w is None:  # parameter-free (OLMo v1)
            torch.testing.assert_close(pair.ours[f"{prefix}.hook_normalized"], output, rtol=1e-6, atol=1e-6)
            continue
        same(pair.arch, pair.ours[f"{prefix}.hook_normalized"] * ln.w, output, prefix)
        assert not torch.allclose(pair.ours[f"{prefix}.hook_normalized"], output, atol=1e-2), prefix


EDITS = {
    "blocks.1.ln1.hook_normalized": lambda t, hook: t + torch.linspace(-1, 1, t.shape[-1]),
    "blocks.1.ln2.hook_normalized": lambda t, hook: t * torch.linspace(0, 2, t.shape[-1]),
    "ln_final.hook_normalized": lambda t, hook: t + torch.linspace(-1, 1, t.shape[-1]),
    "blocks.1.ln1.hook_scale": lambda t, hook: t * 2,
}


@pytest.mark.parametrize("name", list(EDITS))
def test_an_edit_gives_the_bridges_logits(pair, name):
    """An edit means the same on both sides: before the weight, which then multiplies the edited value."""
    hooks = [(name, EDITS[name])]
    ours = pair.model.run_with_hooks(pair.ids, fwd_hooks=hooks, **pair.kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "A forward hook edited")  # the bridge leaves its native path
        if pair.arch == "olmo":
            # the 4.3 bridge reads a weight a parameter-free norm has not; test_edits.py checks tlshim's by hand
            with pytest.raises(AttributeError, match="weight"):
                pair.bridge.run_with_hooks(pair.ids, fwd_hooks=hooks, **pair.kwargs)
            return
        theirs = pair.bridge.run_with_hooks(pair.ids, fwd_hooks=hooks, **pair.kwargs)
    torch.testing.assert_close(ours, theirs, **CLOSE.get(pair.arch, dict(rtol=1e-5, atol=1e-5)), msg=name)
    assert not torch.allclose(ours, pair.model(pair.ids, **pair.kwargs).logits, atol=1e-2), name


METHODS = {  # (cache, ids, n_layers) -> a result
    "accumulated_resid, logit lens": lambda c, ids, n: c.accumulated_resid(apply_ln=True),
    "accumulated_resid, incl_mid": lambda c, ids, n: c.accumulated_resid(layer=n - 1, incl_mid=True, apply_ln=True),
    "accumulated_resid, mlp_input": lambda c, ids, n: c.accumulated_resid(layer=1, mlp_input=True, apply_ln=True, pos_slice=-1),
    "decompose_resid": lambda c, ids, n: c.decompose_resid(apply_ln=True),
    "decompose_resid, mlp_input": lambda c, ids, n: c.decompose_resid(layer=n - 1, mlp_input=True, apply_ln=True, pos_slice=(2, 8)),
    "apply_ln_to_stack, batch_slice": lambda c, ids, n: c.apply_ln_to_stack(
        c.accumulated_resid(layer=n - 1)[:, :1], layer=n - 1, batch_slice=(0, 1)),
    # logit_attrs: against the bridge in compatibility mode (its W_U carries the final norm's weight), test_tl_cache.py
}


@pytest.mark.parametrize("method", list(METHODS))
def test_cache_methods_agree_with_transformerlens(pair, method):
    n = pair.model.cfg.n_layers
    got, want = METHODS[method](pair.ours, pair.ids, n), METHODS[method](pair.theirs, pair.ids, n)
    assert got.shape == want.shape, method
    torch.testing.assert_close(got, want, **CLOSE.get(pair.arch, dict(rtol=1e-5, atol=1e-5)), msg=method)
