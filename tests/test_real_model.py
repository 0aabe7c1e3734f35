"""The real model, SmolLM2-135M-Instruct (tlshim.examples.smollm2): known answers, the HOOKS.md invariants,
the demo report's numbers, round trip and save.

Runs where the ``real`` extra is installed (tox.ini installs it in one env, the newest pinned
transformers); skipped with the reason elsewhere. The model is converted once per env into
$TLSHIM_CACHE (tox: under the env folder), and the report is made once per session.
Thresholds: measured on transformers 5.23.0, torch 2.13.0 CPU; the measured value is beside each.
"""

import filecmp
import os
import shutil
import subprocess

import pytest
import torch

import tlshim
from tlshim import examples, real_demo

from test_catalog import assert_invariants


@pytest.fixture(scope="session")
def real():
    if not (examples.checkpoint_dir() / "config.json").is_file():
        try:
            examples.gguf_path()
        except examples.MissingExtraError as error:
            pytest.skip(f"the real model is not available: {error}")
    return examples.smollm2()


@pytest.fixture(scope="session")
def model(real):
    return real[0]


@pytest.fixture(scope="session")
def report(model, tmp_path_factory):
    """The demo's four analyses and its report folder, made once."""
    pytest.importorskip("matplotlib", reason="the report draws with matplotlib (the real extra)")
    lines = []
    numbers = real_demo.run(model, tmp_path_factory.mktemp("report"), say=lines.append)
    return numbers | {"printed": "\n".join(lines)}


def test_the_capital_of_france_is_paris(model):
    tokens = model.to_tokens("The capital of France is", prepend_bos=False)  # as the report: SmolLM2's tokenizer adds no BOS
    with torch.no_grad():
        probs = model(tokens).logits[0, -1].softmax(-1)
    assert model.to_string(probs.argmax()) == " Paris"
    assert probs.max() > 0.7  # measured 0.773
    out = model.generate(tokens, max_new_tokens=2, do_sample=False)
    assert model.to_string(out[0, tokens.shape[1]:]) == " Paris."


def test_logit_lens_reads_the_logits_at_the_last_layer_bit_for_bit(report):
    lens = report["lens"]
    assert torch.equal(lens.logits[-1], lens.final_logits)
    assert lens.rank[-1] == 0 and lens.prob[-1] > 0.7
    # the answer appears only in the last layers: rank above 1000 up to layer 22 (measured at least 2004),
    # top-1 only at the last layer (measured rank 2 at layer 28)
    assert lens.rank[:23].min() > 1000 and (lens.rank[:-1] > 0).all()


def test_hooks_md_invariants_on_the_real_model(model):
    assert_invariants(model, model.to_tokens(["When Mary and John went to the store, John gave a drink to"]))


def test_induction_heads_ablation_breaks_copying(report):
    ind = report["induction"]
    # the model copies: loss on the repeats far below the first copy (measured 5.01 -> 0.375)
    assert ind.loss_first > 4 and ind.loss_repeat < 0.6
    # the 5 best heads (measured L18H6 0.73, L17H5 0.67, L17H4 0.56, L20H6 0.50, L17H3 0.41) ...
    assert ind.scores[ind.top[0]] > 0.6 and ind.scores[ind.top[-1]] > 0.3
    assert all(layer >= 10 for layer, _ in ind.top)
    # ... ablated through hook_z triple the repeat loss (measured 1.114), far more than 5 other heads drawn
    # at random (measured 0.550, mean of 8 draws), and leave the first copy, where nothing can be copied,
    # as it was (measured 5.005 against 5.014)
    assert ind.loss_repeat_ablated > ind.loss_repeat + 0.6
    assert ind.loss_repeat_ablated > ind.loss_repeat_control + 0.4
    assert abs(ind.loss_first_ablated - ind.loss_first) < 0.05


def test_ioi_patching(model, report):
    pt = report["patching"]
    # Mary over John on the clean prompt, John over Mary on the swapped one (measured 6.12 and -6.47)
    assert pt.clean_diff > 5 and pt.corrupt_diff < -5
    # the last layer's input at the final position carries nearly all of it (measured 0.944); at layer 0
    # the names' positions do (measured 0.74 and 0.88), the final position nothing (0 exactly: same token)
    assert pt.resid_pre[-1, -1] > 0.9 and pt.resid_pre[0, -1] == 0
    assert pt.resid_pre[0, 1] > 0.5 and pt.resid_pre[0, 9] > 0.5
    # one head moves the name: measured L23H3 0.578
    assert pt.heads.max() > 0.4
    # and the last layer's output at the final position restores it fully, bit for bit
    clean, corrupt = (model.to_tokens(text, prepend_bos=False) for text in (real_demo.IOI_CLEAN, real_demo.IOI_CORRUPT))
    name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean, names_filter=name)

        def patch(resid, hook):
            resid = resid.clone()
            resid[:, -1] = cache[name][:, -1]
            return resid

        patched = model.run_with_hooks(corrupt, fwd_hooks=[(name, patch)])
    assert torch.equal(patched[0, -1], clean_logits[0, -1])


def test_steering_changes_the_continuation(report):
    plain, steered = report["steering"]
    # measured: " the perfect person to help me with my project. ..." / " just a bunch of arrogant, ..."
    assert plain.startswith(" the perfect person") and "arrogant" in steered


def test_the_demo_prints_the_headline_numbers(report):
    printed = report["printed"]
    for expected in ("top heads: L18H6 0.73", "loss on the repeats 0.37", "' Paris' is top-1 from layer 29",
                     "clean 6.12, corrupted -6.47", "steered: \"I think you are just a bunch of arrogant"):
        assert expected in printed, expected


def test_round_trip_and_save_pretrained_byte_identical(real, tmp_path):
    model, tokenizer = real
    plain, _ = examples.smollm2(install=False)
    tokens = model.to_tokens(real_demo.FACT)
    with torch.no_grad():
        installed_logits = model(tokens).logits
        assert torch.equal(installed_logits, plain(tokens).logits)
    model.save_pretrained(tmp_path / "installed")
    plain.save_pretrained(tmp_path / "plain")
    names = sorted(os.listdir(tmp_path / "plain"))
    assert sorted(os.listdir(tmp_path / "installed")) == names and "model.safetensors" in names
    assert filecmp.cmpfiles(tmp_path / "installed", tmp_path / "plain", names, shallow=False)[1:] == ([], [])
    tlshim.uninstall(model)
    try:
        assert not hasattr(model, "blocks")
        assert model.state_dict().keys() == plain.state_dict().keys()
        assert all(torch.equal(value, plain.state_dict()[key]) for key, value in model.state_dict().items())
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, installed_logits)
    finally:
        tlshim.install(model, tokenizer=tokenizer)


def chromium(*args):
    """Headless Chromium (Debian's ``chromium`` package); its stdout."""
    browser = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
    if browser is None:
        pytest.skip("no headless browser: install Debian's chromium package (apt-get install chromium) to check the report renders")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=120).stdout


def colored_fraction(png):
    """Share of pixels with a saturated colour: heat maps and plots have them, text and a broken-image icon do not."""
    from PIL import Image

    with Image.open(png) as image:
        saturation = torch.frombuffer(bytearray(image.convert("HSV").getchannel("S").tobytes()), dtype=torch.uint8)
    return float((saturation > 80).float().mean())


def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    page = report["page"]
    figures = sorted(p.name for p in page.parent.glob("*.png"))
    assert figures == ["induction.png", "logit_lens.png", "patching_heads.png", "patching_resid_pre.png"]
    # every <img> decoded, at its file's size: the page with a script that lists what the browser decoded
    probe = page.parent / "probe.html"
    probe.write_text(page.read_text().replace("</body>", "<script>window.onload = () => document.body.dataset.decoded = "
                                              "[...document.images].map(i => `${i.src.split('/').pop()}:${i.naturalWidth}x${i.naturalHeight}`)"
                                              ".sort().join(' ')</script></body>"))
    dom = chromium("--dump-dom", probe.as_uri())
    probe.unlink()
    sizes = []
    for name in figures:
        with Image.open(page.parent / name) as image:
            sizes.append(f"{name}:{image.width}x{image.height}")
    assert f'data-decoded="{" ".join(sizes)}"' in dom
    # and drawn: the screenshot is coloured by the figures (the page without them is not)
    chromium("--window-size=1200,4000", f"--screenshot={tmp_path / 'report.png'}", page.as_uri())
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(page, bare / "index.html")
    chromium("--window-size=1200,4000", f"--screenshot={tmp_path / 'bare.png'}", (bare / "index.html").as_uri())
    assert colored_fraction(tmp_path / "report.png") > 0.05 and colored_fraction(tmp_path / "bare.png") < 0.005  # measured 0.068, 0.0000


def test_harvest_of_real_text_reads_back_as_run_with_cache(real, tmp_path):
    """tlshim.harvest on the real model: English text packed into contexts of 32 tokens (BOS first),
    a residual and an MLP name, read back equal to run_with_cache on the same contexts bit for bit."""
    from tlshim.harvest_data import build_contexts

    from test_harvest import assert_equal_to_run_with_cache

    model, tokenizer = real
    texts = [
        "The capital of France is Paris, and the capital of Italy is Rome.",
        "When Mary and John went to the store, John gave a drink to Mary.",
        "Interpretability asks which parts of a network compute which features, and why.",
        "A transformer adds each attention layer's output to the residual stream.",
    ] * 3
    names = ["blocks.10.hook_resid_post", "blocks.20.mlp.hook_post"]
    manifest = tlshim.harvest(model, texts, names, tmp_path, tokenizer=tokenizer, context_size=32, batch_size=2, shard_rows=96, progress=False)
    contexts = list(build_contexts(texts, tokenizer, 32).tokens.view(-1, 32))
    h = assert_equal_to_run_with_cache(model, tmp_path, contexts)
    assert manifest["contexts"] == len(contexts) >= 4 and len(h) == 32 * len(contexts)
    assert manifest["shapes"]["blocks.20.mlp.hook_post"] == [model.cfg.d_mlp]
