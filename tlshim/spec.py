"""ArchSpec: what tlshim needs to know about one architecture under one range of transformers versions.

Data plus a few small functions, so a new transformers layout is a new spec, not a branch in core code.
The defaults describe the Llama family, the general path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce

from . import norms
from .attention import AttnSite
from .sites import Site


def get_path(root, path: str):
    """Resolve a dotted attribute path ("" is the root itself)."""
    return reduce(getattr, path.split("."), root) if path else root


def llama_head_counts(attn, config):
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    return n_heads, n_kv, attn.head_dim


def is_conv1d(module) -> bool:
    """GPT-2's Conv1D: a linear layer keeping its weight as (in, out)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def out_width(module) -> int:
    """The output width of an nn.Linear or a Conv1D."""
    return module.weight.shape[1] if is_conv1d(module) else module.out_features


def linear_params(spec, attn, role):
    """(weight, bias) of the q/k/v/o projection of ``attn`` in nn.Linear layout (out, in)."""
    proj = get_path(attn, getattr(spec, f"{role}_proj"))
    return (proj.weight.T if is_conv1d(proj) else proj.weight), proj.bias


def mlp_linear_params(spec, mlp, role):
    """(weight, bias) of the gate/up/down projection of ``mlp`` in nn.Linear layout (out, in)."""
    proj = get_path(mlp, getattr(spec, f"{role}_proj"))
    return (proj.weight.T if is_conv1d(proj) else proj.weight), proj.bias


def fused_qkv_params(spec, attn, role):
    """(weight, bias) of q, k or v: rows of one fused projection holding all q heads, then the k heads,
    then the v heads (Phi-3, OpenELM), split by the spec's head counts; o as it is."""
    weight, bias = linear_params(spec, attn, role)
    if role == "o":
        return weight, bias
    n_heads, n_kv, d_head = spec.head_counts(attn, getattr(attn, "config", None))
    start = {"q": 0, "k": n_heads, "v": n_heads + n_kv}[role] * d_head
    rows = slice(start, start + (n_heads if role == "q" else n_kv) * d_head)
    return weight[rows], None if bias is None else bias[rows]


def fused_gate_up_params(spec, mlp, role):
    """(weight, bias) of gate or up: the first or second half of one fused projection; down as it is."""
    weight, bias = mlp_linear_params(spec, mlp, role)
    if role == "down":
        return weight, bias
    half = weight.shape[0] // 2
    rows = slice(0, half) if role == "gate" else slice(half, None)
    return weight[rows], None if bias is None else bias[rows]


def llama_family_cfg(model):
    """TransformerLens config fields of a Llama-family model (Mistral, Qwen2, Qwen3 read the same names)."""
    config = model.config
    n_heads = config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    return dict(
        n_layers=config.num_hidden_layers,
        d_model=config.hidden_size,
        n_heads=n_heads,
        d_head=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
        n_key_value_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        d_mlp=config.intermediate_size,
        d_vocab=config.vocab_size,
        d_vocab_out=config.vocab_size,
        n_ctx=config.max_position_embeddings,
        act_fn=getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None),
        eps=getattr(config, "rms_norm_eps", 1e-5),
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_base=rope.get("rope_theta", getattr(config, "rope_theta", None)),
        gated_mlp=True,
        final_rms=True,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        window_size=getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None,
    )


@dataclass(frozen=True)
class ArchSpec:
    """Module paths (dotted, relative to the model or to one decoder layer) and per-arch functions."""

    versions: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    #: where hook_embed fires: the embedding's output, or (scaled after it) the first layer's input
    embed_hook_on_first_layer: bool = False
    #: a module after the embedding whose output is what enters the residual stream (OPT's project_in,
    #: BLOOM's word_embeddings_layernorm): hook_embed fires there
    embed_out: str | None = None
    #: the absolute position embedding module whose output is added to the embedding (hook_pos_embed)
    pos_embed: str | None = None
    #: whether attention applies rotary (hook_rot_q / hook_rot_k exist)
    rotary_hooks: bool = True
    #: whether the layer runs its MLP on (batch * pos, d) rows (OPT)
    mlp_rows: bool = False
    #: None where the head reads the last block's output directly (post-LN BART, OpenAI GPT)
    final_norm: str | None = "model.norm"
    unembed: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    #: the pre-norms; both None in a post-norm-only block (OLMo2), whose attention and MLP read the residual
    ln1: str | None = "input_layernorm"
    ln2: str | None = "post_attention_layernorm"
    ln1_post: str | None = None
    ln2_post: str | None = None
    attn_out: str = "self_attn"
    mlp_out: str = "mlp"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    q_norm: str | None = None
    k_norm: str | None = None
    #: q/k norms over the whole projection before the head split (OLMo2), not per head
    qk_norm_whole: bool = False
    #: q/k norms applied after rotary (NanoChat): hook_q_normed is then what enters the kernel
    qk_norm_after_rotary: bool = False
    #: a norm of the value heads (Gemma 4's weight-free v_norm): hook_v fires on its output, what attention uses
    v_norm: str | None = None
    #: a one-element tensor of the decoder layer its output is multiplied by (Gemma 4's layer_scalar)
    layer_scalar: str | None = None
    #: the name of a float attribute of each block that what a sub-layer adds is its output times (Granite's
    #: residual_multiplier): hook_attn_out / hook_mlp_out are after it, else None
    residual_multiplier: str | None = None
    #: the module (relative to the layer) whose output a sub-layer after the MLP adds (Gemma 4's per-layer input)
    per_layer_out: str | None = None
    gate_proj: str | None = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    norm: norms.Norm = norms.RMS
    #: attention and MLP both read the block input (no resid_mid); ln2 == ln1 where they share one norm
    parallel: bool = False
    #: fn(n_heads, n_kv) -> (groups, order) of a fused q/k/v projection laid out in groups
    #: (family_parallel.GroupedQkvSite); None: all q heads, then k, then v
    qkv_groups: object = None
    #: Site subclass for the q/k/v projections, built as cls(module, path, config); None = plain Site
    qkv_site: type | None = None
    #: Site class of the q/k norms (HeadsFirstSite where they see (batch, heads, pos, d_head))
    qk_norm_site: type = Site
    #: a rotary module (relative to attn) whose (q, k) output carries rot_q / rot_k, where the
    #: attention does not go through transformers' attention registry (OpenELM)
    rotary: str | None = None
    #: Site class of the attention module: it serves hook_attn_scores / hook_pattern
    attn_site: type = AttnSite
    #: the keyword(s) under which the decoder layer hands the attention module its KV cache
    #: (``past_key_value`` to 4.55, ``past_key_values`` to 5.23, ``cache`` from 5.24)
    cache_kwargs: tuple = ("past_key_values", "past_key_value")
    linear_params: object = linear_params
    mlp_params: object = mlp_linear_params
    head_counts: object = llama_head_counts
    tl_config: object = llama_family_cfg
    #: the mixture-of-experts layout of the blocks that have one (family_moe.MoeSpec), else None
    moe: object = None
    #: a gate or a sub-norm between the attention kernel and o_proj (attention_output.AttnOutput), else None
    attn_output: object = None
    #: the multi-head latent attention layout (family_mla.MlaSpec), else None
    mla: object = None
    #: BERT / BART-style layouts (family_postln.PostLn: post-LN or not, the attention kernel's module,
    #: token types, embedding norm), else None
    postln: object = None
    #: extra install steps of this architecture: fn(model, spec) -> list of journal records
    prepare: tuple = field(default_factory=tuple)
    #: the blocks whose sequence mixer is not attention (Mamba, linear attention, a convolution), as
    #: (index, child name) pairs (family_mixer); every other block has the attention above
    mixers: tuple = ()
    #: the mixer blocks' own layout where it differs from the attention blocks' (OLMo-Hybrid: pre-norm
    #: mixer blocks, post-norm-only attention blocks), as (field, value) pairs of this spec
    mixer_layout: tuple = ()

    def mixer(self, i):
        """The child name of block i's non-attention mixer, or None for an attention block."""
        return dict(self.mixers).get(i)

    def weights(self, attn, role):
        return self.linear_params(self, attn, role)

    def mlp_weights(self, mlp, role):
        return self.mlp_params(self, mlp, role)
