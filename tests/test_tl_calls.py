"""TransformerLens's calling conventions and its own helpers, unchanged, on installed models, against
TransformerLens 4.3's TransformerBridge on a twin with the same weights and tokenizer: TL calls of
the model (text, return_type, loss_per_token, padding, stop/start_at_layer), run_with_cache's
backward recipe, the token helpers, generate, and evals.sanity_check / evaluate_on_dataset /
ioi_eval / utilities.test_prompt.

Runs in the `tl` tox env; skipped where transformer-lens is absent.
"""

import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers

import tlshim

from dropin import asset_dir
from models import require
from test_tl_parity import make, word_tokenizer

bridge_module = pytest.importorskip(
    "transformer_lens.model_bridge", reason="transformer-lens is not installed (the `tl` tox env has it)"
)
from transformer_lens import evals  # noqa: E402
from transformer_lens import utilities  # noqa: E402

#: tiny random models with a word tokenizer that adds no BOS (TL prepends one), and the shipped trained
#: checkpoints with theirs (it adds one)
ARCHS = ["llama", "qwen2", "trained-llama", "trained-gemma2", "trained-olmo", "trained-smollm3"]


def ioi_words():
    """Every word of TL's default IOI dataset (a word-level tokenizer of them has ids below 68: every vocab)."""
    words = {"John", "Mary", "and", "went", "to", "the", "buy", ".", "handed", "Then", ",", "gave"}
    return sorted(words | {noun for nouns in evals.IOIDataset.get_default_nouns().values() for noun in nouns})


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    name = request.param
    arch = name.removeprefix("trained-")
    require(arch)
    if name == arch:
        tokenizer = word_tokenizer(tmp_path_factory.mktemp("tokenizer"))
        words = [f"t{i}" for i in (5, 9, 17, 33, 5, 9, 17)]
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(asset_dir(arch))
        words = ["cat", "dog", "fox", "owl", "cat", "dog", "fox"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "tlshim switched")
        model = tlshim.install(make(name), tokenizer=tokenizer)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIP_NO_INDEX", "1")  # the bridge may pip-install torchvision while booting (TESTING.md)
        bridge = bridge_module.TransformerBridge.boot_transformers(arch, hf_model=make(name), tokenizer=tokenizer, device="cpu")
    return SimpleNamespace(arch=arch, model=model, bridge=bridge, text=" ".join(words), words=words)


def test_cfg_token_fields(pair):
    """TL's own detection on the installed tokenizer (the bridge boots on a copy it makes add BOS itself)."""
    from transformer_lens.model_bridge.sources._bridge_builder import detect_tokenizer_bos_eos

    cfg = pair.model.cfg
    assert (cfg.tokenizer_prepends_bos, cfg.tokenizer_appends_eos) == detect_tokenizer_bos_eos(pair.model.tokenizer)
    assert cfg.default_prepend_bos == pair.bridge.cfg.default_prepend_bos
    assert cfg.default_padding_side == pair.model.tokenizer.padding_side == pair.bridge.tokenizer.padding_side


def test_token_helpers_as_the_bridge(pair):
    m, b, text, words = pair.model, pair.bridge, pair.text, pair.words
    short = " ".join(words[:2])
    for args in ((text,), ([short, text],), (text, False), ([short, text], True, "left"), ([short, text], False, "right")):
        assert torch.equal(m.to_tokens(*args), b.to_tokens(*args)), args
        if isinstance(args[0], str):
            assert m.to_str_tokens(*args) == b.to_str_tokens(*args), args
    assert m.to_str_tokens([short, text]) == b.to_str_tokens([short, text])
    ids = b.to_tokens(text)
    assert m.to_str_tokens(ids) == b.to_str_tokens(ids) and m.to_string(ids) == b.to_string(ids)
    assert m.to_string(ids[0]) == b.to_string(ids[0])
    token = m.to_single_token(words[1])
    assert token == b.to_single_token(words[1]) and m.to_single_str_token(token) == b.to_single_str_token(token)
    for mode in ("first", "last"):
        assert m.get_token_position(words[1], text, mode=mode) == b.get_token_position(words[1], text, mode=mode)
        assert m.get_token_position(token, ids, mode=mode) == b.get_token_position(token, ids, mode=mode)


def test_forward_calls_as_the_bridge(pair):
    m, b, text = pair.model, pair.bridge, pair.text
    short = " ".join(pair.words[:3])
    ids = b.to_tokens(text)
    with torch.no_grad():
        assert torch.equal(m(text), b(text))
        assert torch.equal(m(ids, return_type="loss"), b(ids, return_type="loss"))
        assert torch.equal(m(text, return_type="loss", loss_per_token=True), b(text, return_type="loss", loss_per_token=True))
        for side in ("right", "left"):
            ours, theirs = m([short, text], padding_side=side, return_type="both"), b([short, text], padding_side=side, return_type="both")
            mask = b.to_tokens([short, text], padding_side=side) != b.tokenizer.pad_token_id
            torch.testing.assert_close(ours[0][mask], theirs[0][mask], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-6)
        for stop in (0, 1, -1):
            assert torch.equal(m(ids, stop_at_layer=stop), b(ids, stop_at_layer=stop)), stop
        resid = m(ids, stop_at_layer=1)
        assert torch.equal(m(resid, start_at_layer=1), b(resid, start_at_layer=1))
        assert m(text, return_type=None) is None and b(text, return_type=None) is None


def test_backward_recipe_as_the_bridge(pair):
    ids = pair.bridge.to_tokens(pair.text)
    names = lambda name: name.endswith(("hook_resid_post", "hook_resid_pre"))  # noqa: E731
    ours, ours_cache = pair.model.run_with_cache(ids, return_type="loss", incl_bwd=True, names_filter=names)
    theirs, theirs_cache = pair.bridge.run_with_cache(ids, return_type="loss", incl_bwd=True, names_filter=names)
    pair.model.zero_grad(), pair.bridge.zero_grad()
    assert torch.equal(ours, theirs)
    grads = [name for name in ours_cache.keys() if name.endswith("_grad")]
    assert len(grads) == 2 * pair.model.cfg.n_layers
    for name in grads:
        torch.testing.assert_close(ours_cache[name], theirs_cache[name], rtol=1e-5, atol=1e-8, msg=name)


def test_generate_as_the_bridge(pair):
    m, b, text = pair.model, pair.bridge, pair.text
    greedy = dict(max_new_tokens=4, do_sample=False, verbose=False)
    assert m.generate(text, **greedy) == b.generate(text, **greedy)
    ids = b.to_tokens(text)
    assert torch.equal(m.generate(ids, **greedy), b.generate(ids, **greedy))
    assert torch.equal(m.generate(text, return_type="tokens", use_past_kv_cache=False, **greedy), b.generate(text, return_type="tokens", **greedy))
    for seed in (0, 1):
        torch.manual_seed(seed)
        ours = m.generate(ids, max_new_tokens=6, temperature=0.8, top_k=5, verbose=False, stop_at_eos=False)
        torch.manual_seed(seed)
        theirs = b.generate(ids, max_new_tokens=6, temperature=0.8, top_k=5, verbose=False, stop_at_eos=False)
        assert torch.equal(ours, theirs), seed


def test_evals_as_the_bridge(pair, tmp_path):
    m, b = pair.model, pair.bridge
    with torch.no_grad():
        assert torch.equal(evals.sanity_check(m), evals.sanity_check(b))
    rows = [{"tokens": t} for t in b.to_tokens([pair.text] * 4)]
    loader = torch.utils.data.DataLoader(rows, batch_size=2)
    assert evals.evaluate_on_dataset(m, loader, device="cpu") == evals.evaluate_on_dataset(b, loader, device="cpu")
    dataset = evals.IOIDataset(word_tokenizer(tmp_path, ioi_words()), num_samples=12, seed=0, symmetric=True)
    results = []
    for model in (m, b):
        torch.manual_seed(0)  # ioi_eval shuffles
        results.append(evals.ioi_eval(model, dataset=dataset, batch_size=4))
    assert results[0].keys() == results[1].keys() == {"Logit Difference", "Accuracy"}
    assert results[0]["Logit Difference"] != 0
    for key in results[0]:
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-5, abs=1e-6), key


def test_test_prompt_as_the_bridge(pair, capsys):
    """test_prompt calls ``model(tokens)`` for the logits: a TL call once tl_calls is on."""
    prompt, answer = " ".join(pair.words[:-1]), pair.words[-1]
    with pair.model.tl_calls(), torch.no_grad():
        utilities.test_prompt(prompt, answer, pair.model, prepend_space_to_answer=False, top_k=3)
    ours = capsys.readouterr().out
    with torch.no_grad():
        utilities.test_prompt(prompt, answer, pair.bridge, prepend_space_to_answer=False, top_k=3)
    theirs = capsys.readouterr().out
    assert "Top 0th token" in ours and ours == theirs
