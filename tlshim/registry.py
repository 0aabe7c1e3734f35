"""Which architectures tlshim supports, and which spec applies to the installed transformers version.

Each architecture is a folder ``patches/<model_type>/`` (imported as ``tlshim.patches.<model_type>``)
whose modules each define one ``SPEC`` with the PEP 440 range of transformers versions it covers.
"""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil
import warnings
from importlib import resources

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .errors import UnsupportedModelError, UnsupportedVersionError

#: model_type -> patch package; the one place architectures are registered.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "olmo", "smollm3", "openelm")

#: What the sweep says of a causal-LM type (tests/sweep.py)
SWEEP_STATUSES = ("verified", "failed", "unsupported", "not runnable")

#: The transformers versions the tox matrix runs (plus the newest release, whatever it is).
TESTED_VERSIONS = ("4.48.3", "4.53.3", "4.57.6", "5.0.0", "5.12.1", "5.23.0", "5.24.0")


@functools.cache
def transformers_version() -> Version:
    import transformers

    return Version(transformers.__version__)


@functools.cache
def specs_of(model_type: str) -> tuple:
    """Every (module name, spec) of one architecture's patch package."""
    package = importlib.import_module(f"tlshim.patches.{model_type}")
    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda info: _release(info.name)):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        found.append((module.__name__, module.SPEC))
    return tuple(found)


def _release(module_name: str) -> tuple:
    """(5, 4) for a patch module named v5_4: modules sort by the first release they cover."""
    return tuple(int(part) for part in module_name.lstrip("v").split("_"))


def spec_in_range(model_type: str, version: Version | None = None):
    """(module name, spec) whose range holds ``version``, or None."""
    version = version or transformers_version()
    for name, spec in specs_of(model_type):
        if version in SpecifierSet(spec.versions):
            return name, spec
    return None


def spec_for(model):
    """The spec to install on ``model``; raises naming what is supported and what to do.

    A model type with no patch package gets a spec derived from its modules (``structure``): silently
    where the project's sweep verified that type on the installed transformers version, else with a
    warning that says what was inferred and to run ``tlshim.verify(model)``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    version = transformers_version()
    if model_type not in ARCHITECTURES:
        return _derived_spec(model, model_type, version)
    found = spec_in_range(model_type, version)
    if found is None:
        ranges = "; ".join(spec.versions for _, spec in specs_of(model_type))
        raise UnsupportedVersionError(
            f"tlshim supports {model_type} with transformers {ranges}, but transformers {version} is installed. "
            f"Install a tested version, e.g. pip install 'transformers=={TESTED_VERSIONS[-1]}'."
        )
    return found[1]


def _derived_spec(model, model_type, version):
    from . import structure

    try:
        spec = structure.derive_spec(model)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(
            f"tlshim has no spec for model_type {model_type!r} ({type(model).__name__}) and cannot derive one "
            f"from its modules: {err}. Model types with a spec: {', '.join(ARCHITECTURES)}; "
            f"verified through the structural path on transformers {version}: {len(verified_types())} (tlshim doctor)."
        ) from None
    if model_type not in verified_types():
        warnings.warn(
            f"tlshim has no spec for model_type {model_type!r} and inferred its layout from the modules: "
            f"{structure.describe(spec)}. The project's sweep has not verified this type on transformers "
            f"{version}: check every hook with tlshim.verify(model).",
            stacklevel=4,
        )
    return spec


@functools.cache
def sweep_results() -> dict:
    """{model_type: result} of the project's sweep (scripts/sweep.py) on the installed transformers
    version (its major.minor), from the shipped table; {} where the sweep did not run on it."""
    table = json.loads(resources.files("tlshim").joinpath("sweep.json").read_text())
    version = transformers_version()
    return table.get("results", {}).get(f"{version.major}.{version.minor}", {})


def verified_types() -> frozenset:
    """The model types the sweep verified on the installed transformers version (install silently)."""
    return frozenset(t for t, result in sweep_results().items() if result["status"] == "verified")


def supported() -> dict:
    """The installed torch and transformers versions and, per architecture, which spec applies.

    >>> tlshim.supported()["architectures"]["llama"]["supported"]
    True
    """
    import torch

    version = transformers_version()
    report = {"torch": torch.__version__, "transformers": str(version), "tested_versions": list(TESTED_VERSIONS), "architectures": {}}
    report["sweep"] = {status: sorted(t for t, r in sweep_results().items() if r["status"] == status) for status in SWEEP_STATUSES}
    for model_type in ARCHITECTURES:
        found = spec_in_range(model_type, version)
        report["architectures"][model_type] = {
            "supported": found is not None,
            "spec": found[0] if found else None,
            "ranges": [spec.versions for _, spec in specs_of(model_type)],
        }
    return report
