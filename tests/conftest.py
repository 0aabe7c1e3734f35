import os

import pytest
import torch

# scripts/test.sh runs two tox envs at once on two cores and sets OMP_NUM_THREADS=1: one torch
# thread per pytest process then, not two each (oversubscribed small matmuls run slower).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))


@pytest.fixture(scope="session", autouse=True)
def _hf_modules_cache(tmp_path_factory):
    """Remote code (OpenELM) is copied into one private modules cache for the whole session, not into
    ~/.cache/huggingface/modules. One for every test: Python binds the ``transformers_modules`` package to
    the first cache it is imported from, and a module new to a second cache could not be imported."""
    import transformers.dynamic_module_utils as dynamic_module_utils

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
        yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
