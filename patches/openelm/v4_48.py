"""OpenELM's remote code under transformers 4.48 and later (its module layout does not change with
the transformers version; the v5 load-time fixes live in tlshim.loading)."""

from tlshim.attention import SdpaCallSite
from tlshim.sites import HeadsFirstSite
from tlshim.spec import ArchSpec, fused_gate_up_params, fused_qkv_params

from . import head_counts, openelm_cfg, repair_loaded_buffers

SPEC = ArchSpec(
    versions=">=4.48,<6",
    layers="transformer.layers",
    embed="transformer.token_embeddings",
    final_norm="transformer.norm",
    unembed="transformer.token_embeddings",
    attn="attn",
    mlp="ffn",
    ln1="attn_norm",
    ln2="ffn_norm",
    attn_out="attn",
    mlp_out="ffn",
    q_proj="qkv_proj",
    k_proj="qkv_proj",
    v_proj="qkv_proj",
    o_proj="out_proj",
    q_norm="q_norm",
    k_norm="k_norm",
    qk_norm_site=HeadsFirstSite,
    rotary="pos_embedding",
    attn_site=SdpaCallSite,
    gate_proj="proj_1",
    up_proj="proj_1",
    down_proj="proj_2",
    head_counts=head_counts,
    linear_params=fused_qkv_params,
    mlp_params=fused_gate_up_params,
    tl_config=openelm_cfg,
    prepare=(repair_loaded_buffers,),
)
