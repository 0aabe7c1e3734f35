"""Install refuses a config that contradicts the modules: tlshim splits heads and reads sizes by the
config, so a contradiction would give wrongly split hook_q / W_Q instead of an error."""

from __future__ import annotations

from .errors import UnsupportedModelError
from .spec import get_path

#: the HF config field behind each TransformerLens field, where the model's config has it
_HF_FIELDS = {
    "n_layers": "num_hidden_layers", "d_model": "hidden_size", "n_heads": "num_attention_heads",
    "n_key_value_heads": "num_key_value_heads", "d_head": "head_dim", "d_mlp": "intermediate_size",
}


def check_config(model, spec, cfg):
    """Raise naming each field whose config value contradicts the modules, with both values."""
    problems = []

    def compare(field, said, found, where):
        if said is not None and said != found:
            hf = _HF_FIELDS.get(field)
            name = f"config.{hf} (cfg.{field})" if hf and _has(model.config, hf) else f"cfg.{field}"
            problems.append(f"{name} is {said} but {where} has {found}")

    layers = get_path(model, spec.layers)
    compare("n_layers", cfg.n_layers, len(layers), f"model.{spec.layers}")
    width = get_path(model, spec.embed).weight.shape[-1]
    compare("d_model", cfg.d_model, width, f"model.{spec.embed}.weight")
    for i, layer in enumerate(layers):
        if spec.mixer(i):  # no attention; its MLP as any other (family_mixer)
            continue
        attn, mlp = get_path(layer, spec.attn), get_path(layer, spec.mlp)
        n_heads, n_kv, d_head = spec.head_counts(attn, getattr(attn, "config", None))
        compare("n_heads", _at(cfg.n_heads, i), n_heads, f"blocks.{i}.attn")
        compare("n_key_value_heads", _at(cfg.n_key_value_heads, i), n_kv, f"blocks.{i}.attn")
        compare("d_head", cfg.d_head, d_head, f"blocks.{i}.attn.head_dim")
        roles = (("q", "n_heads", n_heads), ("k", "n_key_value_heads", n_kv), ("v", "n_key_value_heads", n_kv))
        for role, field, n in roles if spec.mla is None else ():  # MLA: family_mla.detect checked the widths
            rows, cols = spec.weights(attn, role)[0].shape
            if rows != n * d_head:
                compare(field, n, f"{rows} outputs = {rows / d_head:g} heads of d_head {d_head}", f"blocks.{i}.attn's {role} projection")
            compare("d_model", cfg.d_model, cols, f"blocks.{i}.attn's {role} projection (inputs)")
        if spec.moe is None or not spec.moe.is_moe(mlp):  # experts: per expert, see family_moe
            compare("d_mlp", _at(cfg.d_mlp, i), spec.mlp_weights(mlp, "up")[0].shape[0], f"blocks.{i}.mlp's up projection")
    if problems:
        raise UnsupportedModelError(
            "the model's config contradicts its modules, so tlshim would split heads and read sizes wrongly: "
            + "; ".join(dict.fromkeys(problems)) + ". Restore the config the weights were built with"
        )


def _has(config, name) -> bool:
    try:  # a per-layer field of a heterogeneous config (Gemma 4) refuses a global read
        getattr(config, name)
        return True
    except Exception:
        return False


def _at(value, i):
    return value[i] if isinstance(value, (list, tuple)) else value
