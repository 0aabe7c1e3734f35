"""Issue 5, pipeline and save/load: an installed model inside ``transformers.pipeline`` and through
``save_pretrained`` / ``from_pretrained``."""

import filecmp
import json
import os
import shutil

import pytest
import torch
import transformers
from packaging.version import Version

import tlshim

from dropin import (
    ARCHS, add_to_layer_output, add_vector, at_layer, checkpoint_dir, fixture, greedy, layers, load, prompts,
    static_cache, steering_vector, tokenizer,
)
from models import TF_VERSION

LAYER = 1


@pytest.mark.parametrize("arch", ARCHS)
def test_text_generation_pipeline_runs_hooks(arch):
    tok = tokenizer(arch)
    model, plain = tlshim.install(fixture(arch), tokenizer=tok), fixture(arch)
    text = tok.decode(prompts(arch, [9])[0][1:])  # the tokenizer adds <bos> itself
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_full_text=False)
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    plain_pipe = transformers.pipeline("text-generation", model=plain, tokenizer=tok)

    shapes = []
    with model.hooks(fwd_hooks=[(f"blocks.{LAYER}.attn.hook_pattern", lambda t, hook: shapes.append(tuple(t.shape)))]):
        generated = pipe(text, **kwargs)[0]["generated_text"]
    assert generated == plain_pipe(text, **kwargs)[0]["generated_text"]
    n_prompt = len(tok(text)["input_ids"])
    h = at_layer(model.cfg.n_heads, LAYER)
    keys = [n_prompt + 6] * 6 if static_cache(model) else [n_prompt + i for i in range(6)]
    assert shapes == [(1, h, n_prompt, keys[0])] + [(1, h, 1, keys[i]) for i in range(1, 6)]

    # an edit made through tlshim inside the pipeline equals the same edit as a plain torch hook
    vector = steering_vector(arch)
    with model.hooks(fwd_hooks=[(f"blocks.{LAYER}.hook_resid_post", add_vector(vector))]):
        steered = pipe(text, **kwargs)[0]["generated_text"]
    handle = layers(plain)[LAYER].register_forward_hook(add_to_layer_output(vector))
    try:
        assert steered == plain_pipe(text, **kwargs)[0]["generated_text"]
    finally:
        handle.remove()
    assert steered != generated


def _same_files(left, right):
    names = sorted(os.listdir(left))
    assert names == sorted(os.listdir(right))
    match, mismatch, errors = filecmp.cmpfiles(left, right, names, shallow=False)
    assert (mismatch, errors) == ([], []), f"files differ from the plain model's: {mismatch + errors}"
    return names


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_is_byte_identical_and_reloads(arch, tmp_path):
    model, plain = tlshim.install(fixture(arch)), fixture(arch)
    ids = prompts(arch, [10])[0][None]
    with model.hooks(fwd_hooks=[(f"blocks.{LAYER}.attn.hook_z", lambda t, hook: None)]):  # a live wrapper too
        model.save_pretrained(tmp_path / "installed")
    plain.save_pretrained(tmp_path / "plain")
    names = _same_files(tmp_path / "installed", tmp_path / "plain")
    assert "config.json" in names and any(name.endswith(".safetensors") for name in names)
    if "auto_map" in json.loads((tmp_path / "plain" / "config.json").read_text()):  # remote code: its files too
        source = checkpoint_dir(arch)
        for name in sorted(p.name for p in source.glob("*.py")):
            if name not in names:
                # transformers before 4.57 registers no auto class on the remote model class: its save
                # copies the config's file only, with or without tlshim, and the user copies the rest
                assert name == "modeling_openelm.py" and TF_VERSION < Version("4.57"), name
                shutil.copyfile(source / name, tmp_path / "installed" / name)
            assert (tmp_path / "installed" / name).read_bytes() == (source / name).read_bytes(), name

    reloaded = load(tmp_path / "installed")  # remote code (OpenELM): with tlshim's loading fixes
    assert type(reloaded).__name__ == type(plain).__name__
    tlshim.install(reloaded.eval())
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)
        reloaded_logits, reloaded_cache = reloaded.run_with_cache(ids)
    assert torch.equal(logits, reloaded_logits)
    assert list(cache.keys()) == list(reloaded_cache.keys())
    for name in cache.keys():
        assert torch.equal(cache[name], reloaded_cache[name]), name
    assert torch.equal(greedy(model, ids)[0], greedy(reloaded, ids)[0])

    # and an uninstalled reload saves the same weights again (its config differs only by where it was
    # loaded from: transformers < 5 writes that path as _name_or_path)
    tlshim.uninstall(reloaded)
    reloaded.save_pretrained(tmp_path / "again")
    for name in names:
        if name == "config.json":
            again, plain_config = (json.loads((tmp_path / d / name).read_text()) for d in ("again", "plain"))
            again.pop("_name_or_path", None), plain_config.pop("_name_or_path", None)
            assert again == plain_config
        else:
            assert filecmp.cmp(tmp_path / "again" / name, tmp_path / "plain" / name, shallow=False), name
