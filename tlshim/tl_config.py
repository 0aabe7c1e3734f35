"""model.cfg: the TransformerLens config fields, derived from the HF config at install."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from .per_layer import per_layer
from .tl_config_fields import Device, TLConfigFields


@dataclass
class TLConfig(TLConfigFields):
    """TransformerLens's HookedTransformerConfig field names, with values read from the HF model.

    Per-layer quantities that differ between layers (OpenELM) are lists. ``device`` and ``dtype``
    follow the live model.
    """

    n_layers: int
    d_model: int
    n_heads: Any
    d_head: int
    d_mlp: Any
    d_vocab: int
    n_ctx: int
    act_fn: str
    normalization_type: str
    positional_embedding_type: str
    n_key_value_heads: Any = None
    d_vocab_out: int = -1
    eps: float = 1e-5
    rotary_base: float | None = None
    rotary_layers: list | None = None
    gated_mlp: bool = True
    final_rms: bool = True
    tie_word_embeddings: bool = False
    window_size: int | None = None
    attn_scores_soft_cap: float = -1.0
    output_logits_soft_cap: float = -1.0
    #: the factor the logits are multiplied by after the unembedding (Cohere's logit_scale)
    logit_scale: float = 1.0
    original_architecture: str = ""
    model_name: str = ""
    tokenizer_name: str | None = None
    default_prepend_bos: bool = True
    tokenizer_prepends_bos: bool = False
    tokenizer_appends_eos: bool = False
    default_padding_side: str = "right"
    attn_only: bool = False
    parallel_attn_mlp: bool = False
    #: post-LN blocks (BERT, BART): each norm follows its sub-layer's residual add (family_postln)
    post_ln: bool = False
    use_attn_scale: bool = True
    #: multi-head latent attention (family_mla): q's and k's head width (d_head is v's) and the latent ranks
    d_head_qk: int | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    #: per block, "attention" or "mixer" (a state-space or hybrid model: tlshim.family_mixer); None: all attention
    layer_types: list | None = None
    _model_ref: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        for name in ("n_heads", "n_key_value_heads", "d_mlp"):
            setattr(self, name, per_layer(name, getattr(self, name)))
        # held weakly: the config lives on the model, and a cycle would keep the model alive past ``del``
        if self._model_ref is not None and not isinstance(self._model_ref, weakref.ref):
            self._model_ref = weakref.ref(self._model_ref)

    def __getstate__(self):
        state = dict(vars(self))
        state["_model_ref"] = self._model_ref() if self._model_ref is not None else None
        return state

    def __setstate__(self, state):
        vars(self).update(state)
        self.__post_init__()

    @property
    def device(self):
        return Device(next(self._model_ref().parameters()).device)

    @property
    def dtype(self):
        return next(self._model_ref().parameters()).dtype

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
