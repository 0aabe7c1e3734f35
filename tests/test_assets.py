"""The shipped induction models (tlshim/assets/<arch>) load without tlshim's hooks and still copy.

Built by ``scripts/train_induction.py``; each folder holds a model trained on repeated random
word sequences and its WordLevel tokenizer. OpenELM is remote code: its folder carries the
project's stand-in beside the weights, loaded with ``trust_remote_code`` inside ``tlshim.loading()``.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

import tlshim
from models import require
from tlshim.demo import ARCHS, ASSETS
from tlshim.induction import repeated_half_accuracy, repeated_tokens

HALF = 24


def _folder(arch: str) -> Path:
    require(arch)
    folder = Path(str(ASSETS / arch))
    assert (folder / "config.json").is_file(), f"missing asset {folder}"
    return folder


def _load_plain(folder: Path):
    with tlshim.loading():
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", trust_remote_code=True)
    tlshim.finish_loading(model)
    assert not tlshim.is_installed(model)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_matches_config(arch):
    folder = _folder(arch)
    with tlshim.loading():  # OpenELM's config class needs it under transformers v5 (OPENELM.md P1)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    assert config.model_type == arch
    assert config.architectures and config.architectures[0].endswith("ForCausalLM")
    assert len(tok) == config.vocab_size == 68
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        config.bos_token_id,
        config.eos_token_id,
        config.pad_token_id,
    )
    ids = tok("cat dog sun")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 4 and tok.unk_token_id not in ids
    assert tok.decode(ids[1:]) == "cat dog sun"


@pytest.mark.parametrize("arch", ARCHS)
def test_asset_copies_repeated_half_without_tlshim(arch):
    folder = _folder(arch)
    model = _load_plain(folder)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = repeated_tokens(PreTrainedTokenizerFast.from_pretrained(folder), half=HALF, batch=64, seed=2024)
    with torch.no_grad():
        logits = model(ids).logits
    assert repeated_half_accuracy(logits, ids, HALF) > 0.9
    # and the installed model gives the very same logits
    with torch.no_grad():
        assert torch.equal(tlshim.install(model)(ids).logits, logits)


def test_openelm_asset_ships_the_tested_standin_code():
    """The remote code beside the shipped OpenELM weights is the stand-in the test suite checks."""
    try:
        from tests.fixtures.openelm_fixture import STANDIN_DIR, STANDIN_FILES
    except ImportError:  # tests/ itself on sys.path
        from fixtures.openelm_fixture import STANDIN_DIR, STANDIN_FILES
    folder = _folder("openelm")
    for name in STANDIN_FILES:
        assert (folder / name).read_bytes() == (STANDIN_DIR / name).read_bytes(), name
