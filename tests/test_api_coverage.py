"""scripts/api_coverage.py: the saved TransformerLens name lists, checked on an installed model."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "api_coverage.py"
spec = importlib.util.spec_from_file_location("api_coverage", SCRIPT)
api_coverage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(api_coverage)


@pytest.fixture(scope="module")
def result():
    import json

    return api_coverage.check(json.loads(api_coverage.NAMES.read_text()))


def test_every_surface_is_listed(result):
    kinds = {surface.split()[0] for surface in result}
    assert kinds == {"TransformerBridge", "HookedTransformer", "HookedSAETransformer", "ActivationCache"}
    assert all(len(found) >= 8 for found in result.values())


def test_names_are_told_apart(result):
    bridge = next(found for surface, found in result.items() if surface.startswith("TransformerBridge"))
    cache = next(found for surface, found in result.items() if surface.startswith("ActivationCache"))
    assert bridge["run_with_cache"] == "tlshim" and bridge["W_Q"] == "tlshim" and bridge["blocks"] == "tlshim"
    assert bridge["generate"] == "HF"  # HF's own generate: the name is there with HF's meaning
    assert bridge["diffusion_generate"] is None  # a diffusion model's, not a causal LM's
    assert cache["logit_attrs"] == "tlshim"
    sae = next(found for surface, found in result.items() if surface.startswith("HookedSAETransformer"))
    assert {name for name, where in sae.items() if where is None} == set()


def test_the_table_lists_every_name(result):
    table = api_coverage.table(result)
    assert table.startswith(api_coverage.START) and table.endswith(api_coverage.END)
    for found in result.values():
        for name in found:
            assert f"| `{name}` |" in table
