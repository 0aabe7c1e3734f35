"""Meta-tests: every patch module is registered, ranges never overlap, selection follows the version."""

import dataclasses
import pathlib

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import tlshim
from tlshim import registry

PATCHES = pathlib.Path(__file__).resolve().parent.parent / "patches"
PROBES = [Version(v) for v in ("4.47.1", "4.48.0", "4.50.3", "4.53.0", "5.0.0", "5.3.9", "5.4.0", "5.23.0", "5.23.9", "5.24.0", "5.99.0", "6.0.0")]


def test_every_patch_folder_is_registered_and_every_module_has_a_spec():
    folders = {p.name for p in PATCHES.iterdir() if (p / "__init__.py").exists()}
    assert folders == set(registry.ARCHITECTURES)
    for model_type in registry.ARCHITECTURES:
        modules = [p.stem for p in (PATCHES / model_type).glob("*.py") if p.stem != "__init__"]
        assert sorted(name.rsplit(".", 1)[1] for name, _ in registry.specs_of(model_type)) == sorted(modules)


@pytest.mark.parametrize("model_type", registry.ARCHITECTURES)
def test_ranges_of_one_architecture_never_overlap(model_type):
    ranges = [SpecifierSet(spec.versions) for _, spec in registry.specs_of(model_type)]
    for version in PROBES:
        assert sum(version in r for r in ranges) <= 1, (model_type, version)
    assert all(Version("4.47.1") not in r for r in ranges), "the support floor is 4.48"
    assert any(Version("5.23.0") in r for r in ranges)
    assert any(Version("5.24.0") in r for r in ranges)


def test_selection_follows_the_installed_version():
    assert registry.spec_in_range("gemma2", Version("5.3.0"))[0].endswith("gemma2.v4_48")
    assert registry.spec_in_range("gemma2", Version("5.4.0"))[0].endswith("gemma2.v5_4")
    assert registry.spec_in_range("gemma2", Version("5.24.0"))[0].endswith("gemma2.v5_24")
    assert registry.spec_in_range("smollm3", Version("4.52.4")) is None
    assert registry.spec_in_range("llama", Version("4.47.1")) is None


@pytest.mark.parametrize("model_type", [m for m in registry.ARCHITECTURES if m != "openelm"])
def test_the_cache_keyword_follows_the_5_24_rename(model_type):
    """5.24 hands attention its KV cache as `cache`; before, as past_key_values (past_key_value to 4.55)."""
    before = registry.spec_in_range(model_type, Version("5.23.0"))[1]
    after = registry.spec_in_range(model_type, Version("5.24.0"))[1]
    assert set(before.cache_kwargs) == {"past_key_values", "past_key_value"} and after.cache_kwargs == ("cache",)
    assert dataclasses.replace(after, versions=before.versions, cache_kwargs=before.cache_kwargs) == before


def test_supported_reports_every_architecture_and_doctor_prints_it():
    from tlshim import doctor

    info = tlshim.supported()
    assert set(info["architectures"]) == set(registry.ARCHITECTURES)
    assert info["transformers"] == str(registry.transformers_version())
    assert info["architectures"]["llama"]["supported"] is True
    text = doctor.report()
    for model_type in registry.ARCHITECTURES:
        assert model_type in text


def test_patches_install_as_tlshim_patches_only():
    """The top-level patches/ folder is the tlshim.patches package; no top-level 'patches' is installed."""
    import site
    import sys

    import tlshim.patches.llama as llama_patches

    origin = pathlib.Path(llama_patches.__file__).resolve()
    assert origin.parent.name == "llama" and origin.parent.parent.name == "patches"
    for folder in {*site.getsitepackages(), *[p for p in sys.path if p.endswith("site-packages")]}:
        assert not (pathlib.Path(folder) / "patches").exists(), f"a top-level 'patches' was installed in {folder}"


def test_the_installed_metadata_caps_no_dependency_of_torch():
    """Users with a newer torch can install tlshim: the metadata states a lower bound only (the pin to
    the local CPU wheel belongs to the project's own environments)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    torch_req = next(Requirement(r) for r in requires("tlshim") if Requirement(r).name == "torch")
    assert torch_req.specifier, "torch has a lower bound"
    assert all(spec.operator == ">=" for spec in torch_req.specifier), str(torch_req.specifier)
    assert Version("2.99.0") in torch_req.specifier
