"""Shared pieces of the drop-in tests (test_dropin_*.py): models, a tokenizer, left padding, plain steering.

``fixture(arch)`` gives the model the behaviour tests use: the trained induction model shipped in
``tlshim/assets/<arch>/`` when it is there (``TLSHIM_ASSETS`` may point at another assets folder),
else the tiny random model of models.py. Either way, each call builds a bit-identical fresh copy, so
a second call is the plain twin that the installed one is compared with.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors

import tlshim
from models import DROPIN_ARCHS, VOCAB, build, dtype_kwarg, require

ARCHS = list(DROPIN_ARCHS)
ASSETS = Path(os.environ.get("TLSHIM_ASSETS") or Path(tlshim.__file__).parent / "assets")
SPECIALS = ["<bos>", "<eos>", "<pad>", "<unk>"]
BOS, EOS, PAD = 0, 1, 2


def asset_dir(arch):
    """The trained induction fixture of ``arch``, or None while it is not shipped."""
    path = ASSETS / arch
    return path if (path / "config.json").exists() else None


def fixture(arch, attn="eager", dtype=torch.float32):
    """A fresh copy of the behaviour fixture (trained when shipped, tiny random otherwise)."""
    path = asset_dir(arch)
    if path is None:
        return build(arch, attn, dtype)
    require(arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, **dtype_kwarg(dtype))
    return model.eval()


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
        return VOCAB
    return transformers.AutoConfig.from_pretrained(path).vocab_size


def left_pad(seqs, pad=PAD):
    """(ids, attention_mask) of a left-padded batch."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return ids, mask


def steering_vector(d_model, scale=4.0, seed=7):
    return scale * torch.randn(d_model, generator=torch.Generator().manual_seed(seed))


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
