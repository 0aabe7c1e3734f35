"""tlshim: TransformerLens hook points and aliases injected in place into live HuggingFace causal LMs.

>>> import tlshim
>>> model = tlshim.install(model, tokenizer=tok)
>>> logits, cache = model.run_with_cache("a b c a b")
>>> tlshim.uninstall(model)
"""

from .activation_cache import ActivationCache
from .errors import ConflictError, HookNameError, HookOutputError, HookShapeError, TlshimError, UnsupportedModelError, UnsupportedVersionError
from .harvest import HarvestError, harvest
from .harvest_read import open_harvest
from .hook_points import HookPoint
from .install import install, is_installed, uninstall
from .loading import ReinitializedWeightsError, finish_loading, from_pretrained, loading, repair_buffers
from .recording import record_generation
from .registry import supported
from .verify import VerifyReport, verify

__all__ = [
    "ActivationCache",
    "ConflictError",
    "HarvestError",
    "HookNameError",
    "HookOutputError",
    "HookPoint",
    "HookShapeError",
    "ReinitializedWeightsError",
    "TlshimError",
    "UnsupportedModelError",
    "UnsupportedVersionError",
    "finish_loading",
    "from_pretrained",
    "harvest",
    "install",
    "is_installed",
    "loading",
    "open_harvest",
    "record_generation",
    "repair_buffers",
    "supported",
    "uninstall",
    "verify",
    "VerifyReport",
]
__version__ = "0.1.0"
