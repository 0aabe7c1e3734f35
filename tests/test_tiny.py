"""tests/tiny.py builds the types whose configs derive fields from the sizes (Mamba heads, MLA widths,
per-layer tables) or hold sizes as None: tiny, bitwise repeatable, running on input_ids."""

import pytest
import torch
import transformers
from transformers import CONFIG_MAPPING

from tiny import D_MODEL, VOCAB, build, tiny_config, tokens

#: once "not runnable tiny", each for the reason given
ONCE_NOT_RUNNABLE = {
    "mamba2": "heads * head_dim must equal expand * hidden_size",
    "ministral": "head_dim None",
    "deepseek_v2": "num_experts_per_tok None",
    "gemma4_text": "a per-layer config",
    "longcat_flash": "an MLA query width derived from the sizes",
    "reformer": "is_decoder and the axial position sizes",
}


@pytest.mark.parametrize("model_type", sorted(ONCE_NOT_RUNNABLE))
def test_a_type_whose_config_derives_fields_builds_tiny_and_runs(model_type):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    assert tiny_config(model_type).vocab_size == VOCAB
    model, twin = build(model_type), build(model_type)
    assert model.get_input_embeddings().embedding_dim == D_MODEL
    with torch.no_grad():
        logits = model(input_ids=tokens(), use_cache=False).logits
        assert torch.equal(logits, twin(input_ids=tokens(), use_cache=False).logits)
    assert logits.shape == (*tokens().shape, VOCAB)
