"""The shipped induction model and the demo: a real trained model, found and ablated through tlshim."""

import importlib.util

import torch

import tlshim
from tlshim import demo
from tlshim.induction import find_induction_head, repeated_tokens


def test_shipped_model_has_an_induction_head_whose_ablation_breaks_copying():
    model, tokenizer = demo.load("llama")
    assert tlshim.is_installed(model) and model.cfg.n_layers == 2
    tokens = repeated_tokens(tokenizer, seed=7)
    assert model.to_str_tokens(tokens[0])[0] == tokenizer.bos_token
    report = find_induction_head(model, tokens)
    assert report.score > 0.8
    assert report.accuracy > 0.9
    assert report.ablated_accuracy < report.accuracy / 2
    # ablating any other head leaves the copying intact: the test finds *the* head
    other = (report.head + 1) % model.cfg.n_heads

    def ablate(z, hook):
        z = z.clone()
        z[:, :, other] = 0
        return z

    logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{report.layer}.attn.hook_z", ablate)])
    positions = torch.arange(25, 48)
    assert (logits[:, positions].argmax(-1) == tokens[:, positions + 1]).float().mean() > 0.9


def test_demo_prints_the_table_names_the_head_and_draws_it(tmp_path, capsys):
    out = tmp_path / "pattern.png"
    assert demo.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "induction head: blocks.1.attn head" in printed and "ablated through" in printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.exists() and out.stat().st_size > 1000
    else:
        assert "pip install 'tlshim[plot]'" in printed and not out.exists()
