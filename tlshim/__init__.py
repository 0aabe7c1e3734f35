"""tlshim: TransformerLens hook points and aliases injected in place into live HuggingFace causal LMs.

>>> import tlshim
>>> model = tlshim.install(model, tokenizer=tok)
>>> logits, cache = model.run_with_cache("a b c a b")
>>> tlshim.uninstall(model)
"""

from .activation_cache import ActivationCache
from .errors import ConflictError, HookNameError, HookShapeError, TlshimError, UnsupportedModelError, UnsupportedVersionError
from .hook_points import HookPoint
from .install import install, is_installed, uninstall
from .recording import record_generation
from .registry import supported

__all__ = [
    "ActivationCache",
    "ConflictError",
    "HookNameError",
    "HookPoint",
    "HookShapeError",
    "TlshimError",
    "UnsupportedModelError",
    "UnsupportedVersionError",
    "install",
    "is_installed",
    "record_generation",
    "supported",
    "uninstall",
]
__version__ = "0.1.0"
