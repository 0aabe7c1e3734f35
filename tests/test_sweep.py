"""The sweep (tests/sweep.py): every causal-LM type built tiny, installed, verified, edited, uninstalled.

CI policy: on every matrix version the issue's named types (sweep.NAMED, each a test of its own that
names the type) and the types with a spec pass; on a version the shipped table (tlshim/sweep.json,
written by scripts/sweep.py --write) covers, the whole sweep runs (the newest version): every type it
lists as verified still passes, so the structural path cannot regress silently, and the whole sweep
reaches the table's count.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import transformers
from packaging.version import Version
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tlshim import registry

from sweep import NAMED, VERIFIED

SWEEP = pathlib.Path(__file__).with_name("sweep.py")


def sweep(model_types=None) -> dict:
    """tests/sweep.py in a fresh process with one OpenMP thread: forking a process whose OpenMP pool
    has run (as pytest's may have) can hang the children."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SWEEP), *(model_types or ())], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)

VERSION = Version(transformers.__version__)
TABLE = json.loads((pathlib.Path(registry.__file__).parent / "sweep.json").read_text())
RESULTS = TABLE.get("results", {}).get(f"{VERSION.major}.{VERSION.minor}")


@pytest.fixture(scope="module")
def named_results():
    """One sweep of the named types and the types with a spec that this version has."""
    return sweep(sorted(t for t in {*NAMED, *registry.ARCHITECTURES} if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))


def test_every_type_with_a_spec_passes_the_sweep(named_results):
    results = {t: named_results[t] for t in registry.ARCHITECTURES if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
    assert {t: r for t, r in results.items() if r["status"] != VERIFIED} == {}
    assert {r["how"] for r in results.values()} == {"spec"}


@pytest.mark.parametrize("model_type", NAMED)
def test_every_named_type_passes_the_sweep(model_type, named_results):
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip(f"transformers {VERSION} has no {model_type}")
    assert named_results[model_type]["status"] == VERIFIED, named_results[model_type]


def test_the_whole_sweep_keeps_every_verified_type():
    if RESULTS is None:
        # no sweep of this transformers version is shipped: no type counts as verified here, so every
        # type without a spec installs with the warning (the sweep itself runs on the version it covers)
        assert registry.verified_types() == frozenset()
        return
    results = sweep()
    lost = sorted(t for t, r in RESULTS.items() if r["status"] == VERIFIED and results[t]["status"] != VERIFIED)
    assert lost == [], {t: results[t] for t in lost}
    verified = sum(r["status"] == VERIFIED for r in results.values())
    assert verified >= sum(r["status"] == VERIFIED for r in RESULTS.values())
    assert set(results) == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def test_a_derived_spec_is_refused_with_the_part_that_was_not_found():
    import tlshim
    from tiny import build

    model = build("llama")  # under a name no spec has, its query projection renamed to one no table knows
    model.config.model_type = "llama_like"
    for layer in model.model.layers:
        layer.self_attn.query = layer.self_attn.q_proj
        del layer.self_attn.q_proj
    with pytest.raises(tlshim.UnsupportedModelError, match="cannot derive one from its modules: .*attention|projections|norm"):
        tlshim.install(model)
