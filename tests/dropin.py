"""Shared pieces of the drop-in tests (test_dropin_*.py): models, a tokenizer, left padding, plain steering.

``fixture(arch)`` gives the model the behaviour tests use: the trained induction model shipped in
``tlshim/assets/<arch>/`` when it is there (``TLSHIM_ASSETS`` may point at another assets folder),
else the tiny random model of models.py (OpenELM: the seeded stand-in of fixtures/openelm_fixture.py,
saved once per session and loaded through transformers' remote-code path with tlshim's loading
fixes, as a user loads Apple's checkpoints). Either way, each call builds a bit-identical fresh copy,
so a second call is the plain twin that the installed one is compared with.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors

import tlshim
from models import ATTN_IMPLS, DROPIN_ARCHS, VOCAB, build, dtype_kwarg, require

try:
    from tests.fixtures.openelm_fixture import save_openelm
except ImportError:  # tests/ itself on sys.path (pytest's default rootdir-less import mode)
    from fixtures.openelm_fixture import save_openelm

#: OpenELM (remote code: the project's stand-in of Apple's) joins the transformers-native DROPIN_ARCHS
ARCHS = [*DROPIN_ARCHS, "openelm"]
ASSETS = Path(os.environ.get("TLSHIM_ASSETS") or Path(tlshim.__file__).parent / "assets")
SPECIALS = ["<bos>", "<eos>", "<pad>", "<unk>"]
BOS, EOS, PAD = 0, 1, 2
#: where each architecture keeps its decoder layers (the plain torch hooks of the references go there)
LAYERS = {arch: "model.layers" for arch in ARCHS}
LAYERS["openelm"] = "transformer.layers"
#: OpenELM's remote attention calls sdpa itself whatever the config says: it has no eager kernel
ATTNS = {arch: ATTN_IMPLS.get(arch, ("sdpa",)) for arch in ARCHS}
#: (arch, attn) pairs of the tests run with each attention implementation
ARCH_ATTNS = [(arch, attn) for arch in ARCHS for attn in ATTNS[arch]]


def exact_kernel(arch):
    """Whether tlshim's attention kernel (which runs while an attention-internal hook is on) does the very
    ops of the model's own, so results are bit-exact: HF eager, yes; a model calling sdpa itself, no."""
    return "eager" in ATTNS[arch]


def own_kernel_names(name):
    """A names_filter leaving out the hooks that need tlshim's attention kernel (scores and pattern)."""
    return not name.endswith(("hook_attn_scores", "hook_pattern"))


def at_layer(value, layer):
    """A cfg field at one layer: OpenELM's head counts and MLP widths are per-layer lists."""
    return value[layer] if isinstance(value, (list, tuple)) else value


def layers(model):
    """The decoder layers of a plain (or installed) model, found by its architecture's path."""
    arch = model.config.model_type
    owner = model
    for part in LAYERS.get(arch, "model.layers").split("."):
        owner = getattr(owner, part)
    return owner


def static_cache(model):
    """Whether ``generate`` gives ``model`` a fixed-size cache: its attention then spans every slot of it
    (the random Gemma2 of models.py on transformers 4.48, whose config asks for a hybrid cache)."""
    return getattr(model.generation_config, "cache_implementation", None) in ("static", "hybrid", "sliding_window")


def twin_attn(arch, attn):
    """The attention implementation of the plain twin of ``fixture(arch, attn)`` once installed:
    tlshim switches Gemma2 to eager (sdpa drops its soft-capping), every other model keeps its own."""
    return "eager" if arch == "gemma2" else attn


def installed(arch, attn=None, **kwargs):
    """``tlshim.install(fixture(arch, attn))``; Gemma2 loaded with sdpa must warn that it is switched."""
    model = fixture(arch, attn, **kwargs)
    if arch == "gemma2" and attn not in (None, "eager"):
        with pytest.warns(UserWarning, match="switched this Gemma2 model from 'sdpa' to eager"):
            return tlshim.install(model)
    return tlshim.install(model)


def asset_dir(arch):
    """The trained induction fixture of ``arch``, or None while it is not shipped."""
    path = ASSETS / arch
    return path if (path / "config.json").exists() else None


def fixture(arch, attn=None, dtype=torch.float32):
    """A fresh copy of the behaviour fixture (trained when shipped, tiny random otherwise), with the
    attention implementation ``attn`` (default: the first of ``ATTNS[arch]``, eager where there is one)."""
    attn = attn or ATTNS[arch][0]
    assert attn in ATTNS[arch], f"{arch} is not tested with {attn} attention"
    if arch == "openelm":
        return load(checkpoint_dir(arch), dtype=dtype)
    path = asset_dir(arch)
    if path is None:
        return build(arch, attn, dtype)
    require(arch)
    return load(path, attn=attn, dtype=dtype)


def load(path, attn="eager", dtype=torch.float32):
    """A saved checkpoint loaded as a user would: remote code (OpenELM) through ``tlshim.from_pretrained``
    with ``install=False`` (transformers v5 needs its loading fixes), the others with plain from_pretrained."""
    if "auto_map" in json.loads((Path(path) / "config.json").read_text()):  # into the session's modules cache
        model = tlshim.from_pretrained(path, install=False, **dtype_kwarg(dtype))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, **dtype_kwarg(dtype))
    return model.eval()


_SESSION = {}


def _session_dir(name):
    """A folder kept for the whole test session (removed at exit)."""
    if name not in _SESSION:
        _SESSION[name] = tempfile.mkdtemp(prefix=f"tlshim-dropin-{name}-")
        atexit.register(shutil.rmtree, _SESSION[name], True)
    return Path(_SESSION[name])


def checkpoint_dir(arch):
    """The folder ``fixture(arch)`` loads from: the shipped asset, the session's OpenELM stand-in, or None
    (a tiny model built from its config)."""
    path = asset_dir(arch)
    if path is None and arch == "openelm":
        return _openelm_standin()
    return path


def _openelm_standin():
    """The seeded OpenELM stand-in (4 layers, per-layer head counts), saved once per session."""
    folder = _session_dir("openelm") / "openelm"
    if not (folder / "model.safetensors").exists():
        save_openelm(folder, seed=0)
    return folder


def tokenizer(arch):
    """The fixture's tokenizer: the shipped one, or a word-level one ("w4" ...) over the tiny vocabulary."""
    path = asset_dir(arch)
    if path is not None:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    else:
        vocab = {word: i for i, word in enumerate(SPECIALS + [f"w{i}" for i in range(len(SPECIALS), VOCAB)])}
        core = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
        )
    tok.padding_side = "left"
    return tok


def prompts(arch, lengths, seed=0):
    """Token-id prompts of the given lengths, each [bos] + x + x[:m] (an induction task), m = (length - 1) // 3.

    On the trained fixture the next len(x) - m tokens are determined (they copy x[m:]; see
    ``copied``); on a random model it is just a deterministic prompt.
    """
    generator = torch.Generator().manual_seed(seed)
    vocab = fixture_vocab(arch)
    out = []
    for length in lengths:
        m = (length - 1) // 3
        x = len(SPECIALS) + torch.randperm(vocab - len(SPECIALS), generator=generator)[: length - 1 - m]
        out.append(torch.cat([torch.tensor([BOS]), x, x[:m]]))
    return out


def copied(prompt, new_tokens):
    """The share of ``new_tokens`` that continue the copy in ``prompt`` (as prompts() builds it)."""
    m = (len(prompt) - 1) // 3
    x = prompt[1 : len(prompt) - m]
    want = x[m:][: len(new_tokens)]
    return (new_tokens[: len(want)] == want).float().mean().item()


def fixture_vocab(arch):
    path = asset_dir(arch)
    if path is None:
        return VOCAB  # the stand-in OpenELM's too
    return json.loads((path / "config.json").read_text())["vocab_size"]


def left_pad(seqs, pad=PAD):
    """(ids, attention_mask) of a left-padded batch."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return ids, mask


@functools.lru_cache(maxsize=None)
def steering_vector(arch, scale=8.0):
    """A steering vector for ``arch``'s fixture: the direction of its last token's unembedding, of norm
    ``scale * sqrt(d_model)``, read from the plain model's own output (or tied input) embedding.

    A direction the model reads out moves its greedy tokens on every fixture, which each steering test
    asserts; a random one of that size leaves the tokens of some trained induction fixtures as they are.
    """
    model = fixture(arch)
    head = model.get_output_embeddings()  # None for OpenELM's tied head (a matmul with the embedding)
    row = (head if head is not None else model.get_input_embeddings()).weight[-1].detach().float()
    return scale * math.sqrt(row.numel()) * row / row.norm()


def add_to_layer_output(vector):
    """A plain torch forward hook for an HF decoder layer that adds ``vector`` to its output."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + vector.to(output[0].dtype), *output[1:])
        return output + vector.to(output.dtype)

    return hook


def add_vector(vector):
    """The same steering as a tlshim hook (on blocks.i.hook_resid_post)."""

    def hook(tensor, hook):
        return tensor + vector.to(tensor.dtype)

    return hook


def greedy(model, ids, mask=None, new=8, **kwargs):
    """Greedy generate with the per-step scores; ``mask`` defaults to all ones (no pad-token guessing)."""
    mask = torch.ones_like(ids) if mask is None else mask
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
        pad_token_id=PAD, output_scores=True, return_dict_in_generate=True, **kwargs,
    )
    return out.sequences, torch.stack(out.scores, 1)


def rounding_bound(arch):
    """``assert_close_to_scale``'s bound for ``arch``'s fixture. The tiny random OLMo (no shipped asset)
    has its q/k/v weights scaled up so that its clamp bites (TESTING.md): scores reach O(100), and the
    rounding of differently shaped matmuls grows to 1e-4 of a pattern's scale by the last layer (HF's
    own forward, padded batch against prompt alone, shows 6e-5 there)."""
    return 5e-4 if arch == "olmo" and asset_dir(arch) is None else 2e-5


def assert_close_to_scale(got, want, rel=2e-5, msg=""):
    """|got - want| <= rel * max|want| everywhere: float32 rounding of a differently shaped computation.

    CPU matmul results depend on the matrix shapes (a cached step multiplies 1-row matrices, a padded
    batch bigger ones), so such runs agree to rounding, not bit for bit; the bound is relative to the
    tensor's scale because these models' activations reach O(50).
    """
    assert got.shape == want.shape, msg
    finite = torch.isfinite(want) & (want.abs() < torch.finfo(want.dtype).max / 2)  # masked scores: dtype min
    assert torch.equal(finite, torch.isfinite(got) & (got.abs() < torch.finfo(got.dtype).max / 2)), msg
    scale = want[finite].abs().max() if finite.any() else torch.tensor(0.0)
    worst = (got[finite] - want[finite]).abs().max() if finite.any() else torch.tensor(0.0)
    assert worst <= rel * scale, f"{msg}: max |diff| {worst.item():.3g} > {rel} * {scale.item():.3g}"
