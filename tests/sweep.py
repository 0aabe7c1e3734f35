"""The sweep: every causal-LM type of the installed transformers, built tiny, checked end to end.

Per type (one forked child each, the imports paid once in the parent; 6 GiB and 120 s at most):
install (a spec, or the structural path); idle logits bit-identical to a plain twin; ``tlshim.verify``
(every name fires with its shape, HOOKS.md's invariants); an edit of hook_z equal to the same edit
made by hand on the twin's output projection (bit for bit) and one of hook_resid_mid equal to adding
the vector after the attention sub-layer by hand; uninstall gives back the exact model.
"""

from __future__ import annotations

import os

# before torch starts an OpenMP pool: a forked child of a process whose pool has run can hang
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib
import json
import resource
import signal
import sys
import tempfile
import traceback
import warnings

import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import tlshim
from tlshim.attention_output import z_reader
from tlshim.errors import UnsupportedModelError
from tlshim.family_mixer import mixer_out
from tlshim.spec import get_path

from tiny import NOT_RUNNABLE, build, tokens

VERIFIED, FAILED, UNSUPPORTED, NOT_RUN = "verified", "failed", "unsupported", "not runnable"
#: issue 10's must-pass list: each type passes on every matrix version that has it (openelm, loaded
#: from remote code and not in transformers' mapping, is tested by tests/test_openelm*.py)
NAMED = (
    "gpt2", "gpt_neox", "gpt_neo", "gptj", "opt", "bloom", "phi", "phi3", "gemma", "gemma2", "gemma3_text",
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "olmo", "olmo2", "olmoe",
    "gpt_oss", "granite", "falcon", "stablelm", "cohere", "starcoder2", "smollm3",
)  # fmt: skip


def check(model_type: str) -> dict:
    """{"status": one of the four, "how": spec or structural, "reason": why not verified}."""
    built = build_pair(model_type)
    if isinstance(built, dict):
        return built
    model, twin, ids, native = built
    before = _snapshot(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tlshim.install(model)
    except UnsupportedModelError as err:
        return {"status": UNSUPPORTED, "reason": _short(err).split("cannot derive one from its modules: ")[-1].split(". Model types")[0]}
    how = "spec" if model.config.model_type in tlshim.registry.ARCHITECTURES else "structural"
    try:
        failures = _failures(model, twin, ids, native)
        tlshim.uninstall(model)
        if not _same_model(_snapshot(model), before):
            failures.append("uninstall did not give back the exact model")
    except Exception as err:
        failures = [f"raised {_short(err)}"]
    if failures:
        return {"status": FAILED, "how": how, "reason": "; ".join(failures[:3])}
    return {"status": VERIFIED, "how": how}


def build_pair(model_type: str):
    """(model, its twin, input ids, the twin's logits), or the "not runnable" result of a type that does
    not run tiny on input_ids."""
    if model_type in NOT_RUNNABLE:
        return {"status": NOT_RUN, "reason": NOT_RUNNABLE[model_type]}
    try:
        model, twin = build(model_type), build(model_type)
        ids = tokens()
        with torch.no_grad():
            native = twin(input_ids=ids, use_cache=False).logits
    except Exception as err:  # the type itself does not run tiny on input_ids
        return {"status": NOT_RUN, "reason": _short(err)}
    return model, twin, ids, native


def _failures(model, twin, ids, native):
    failures = []
    with torch.no_grad():
        if not torch.equal(model(input_ids=ids, use_cache=False).logits, native):
            failures.append("idle logits differ from native")
        report = tlshim.verify(model, ids)
        failures += [f"{f.name}: {f.check} {f.detail}".strip() for f in report.failures]
        spec, d_head = model._tlshim.spec, model.cfg.d_head
        # the hook_z edit on the first attention block; on a model with none, hook_mixer_out's (family_mixer)
        first = next((i for i in range(model.cfg.n_layers) if not spec.mixer(i)), None)
        # o_proj, or a gated model's sub-norm: what reads hook_z's values
        z_name, z_path = (f"blocks.{first}.attn.hook_z", f"{spec.layers}.{first}.{spec.attn}.{z_reader(spec)}") if first is not None else ("blocks.0.hook_mixer_out", None)
        d_head = d_head or model.cfg.d_model // 4
        zeroed = model.run_with_hooks(ids, fwd_hooks=[(z_name, _zero_head0 if z_path else lambda x, hook: _zero_columns(x, d_head))], use_cache=False)
        if z_path:
            handle = get_path(twin, z_path).register_forward_pre_hook(lambda m, args: (_zero_columns(args[0], d_head),))
        else:
            handle = get_path(twin, f"{spec.layers}.0.{mixer_out(spec, 0)}").register_forward_hook(lambda m, args, out: _zero_columns(out, d_head))
        try:
            by_hand = twin(input_ids=ids, use_cache=False).logits
        finally:
            handle.remove()
        if not torch.equal(zeroed, by_hand):
            failures.append(f"an edit of {z_name} differs from the same edit by hand")
        vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
        # a parallel block has no resid_mid: the same vector added to hook_attn_out is its equivalent (mixer_out in a mixer-only block)
        name = "blocks.0.hook_attn_out" if model.cfg.parallel_attn_mlp else "blocks.0.hook_resid_mid"
        name = "blocks.0.hook_mixer_out" if name not in model.hook_dict and spec.mixer(0) else name
        steered = model.run_with_hooks(ids, fwd_hooks=[(name, lambda x, hook: x + vector)], use_cache=False)
        attn_out = get_path(twin, f"{spec.layers}.0.{mixer_out(spec, 0) if spec.mixer(0) else spec.attn_out}")
        factor = getattr(get_path(twin, f"{spec.layers}.0"), spec.residual_multiplier) if spec.residual_multiplier else 1.0
        handle = attn_out.register_forward_hook(lambda m, args, out: _add_to_first(out, vector / factor))  # the block multiplies it (Granite)
        try:
            by_hand = twin(input_ids=ids, use_cache=False).logits
        finally:
            handle.remove()
        if (steered - by_hand).abs().max() > 1e-5 * by_hand.abs().max():  # the sum order differs: not bit for bit
            failures.append(f"an edit of {name} differs from adding the vector after attention by hand")
        failures += _moe_failures(model, twin, ids, spec)
    return failures


def _moe_failures(model, twin, ids, spec):
    """Zeroed routing weights in the first MoE block equal zeroing its experts' output by hand (bit for bit)."""
    moe_blocks = [i for i in range(model.cfg.n_layers) if f"blocks.{i}.mlp.hook_expert_weights" in model.hook_dict]
    if not moe_blocks:
        return []
    i = moe_blocks[0]
    zeroed = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{i}.mlp.hook_expert_weights", lambda w, hook: torch.zeros_like(w))], use_cache=False)
    experts = get_path(twin, f"{spec.layers}.{i}.{spec.mlp}.{spec.moe.experts}")
    modules = experts if isinstance(experts, torch.nn.ModuleList) else [experts]
    handles = [m.register_forward_hook(lambda m, args, out: torch.zeros_like(out)) for m in modules]
    try:
        by_hand = twin(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return [] if torch.equal(zeroed, by_hand) else ["an edit of hook_expert_weights differs from zeroing the experts by hand"]


def _zero_head0(z, hook):
    z = z.clone()
    z[:, :, 0] = 0
    return z


def _zero_columns(x, width):
    if isinstance(x, tuple):  # a mixer returning (output, state): RecurrentGemma's recurrent block
        return (_zero_columns(x[0], width), *x[1:])
    x = x.clone()
    x[..., :width] = 0
    return x


def _add_to_first(out, vector):
    return (out[0] + vector, *out[1:]) if isinstance(out, tuple) else out + vector


def _snapshot(model):
    return [(name, type(m), tuple(sorted(vars(m)))) for name, m in model.named_modules()], {
        k: v.detach().clone() for k, v in model.state_dict().items()
    }


def _same_model(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def _short(err) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if str(err) else type(err).__name__


def _import_once(model_types):
    """Import each type's config and modeling classes in the parent, so the forked children share them."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    for model_type in model_types:
        try:
            CONFIG_MAPPING[model_type]
            module = importlib.import_module(f"transformers.models.{model_type_to_module_name(model_type)}")
            getattr(module, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        except Exception:  # the child reports what fails
            pass


def sweep(model_types=None, memory_gib=6, seconds=120, progress=False, checker=None) -> dict:
    """{model_type: check(...)} for the given types (all of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES by default);
    ``checker`` replaces ``check`` (scripts/bridge_sweep.py checks the TransformerBridge)."""
    results = {}
    model_types = model_types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    _import_once(model_types)
    for model_type in model_types:
        # the result goes through a file: a pipe would stay open in any process the child leaves behind
        with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
            pid = os.fork()
            if pid == 0:
                resource.setrlimit(resource.RLIMIT_AS, (memory_gib << 30, memory_gib << 30))
                signal.alarm(seconds)
                try:
                    result = (checker or check)(model_type)
                except BaseException as err:  # a crash of the check itself is a finding too
                    result = {"status": FAILED, "reason": f"the check crashed: {_short(err)}", "trace": traceback.format_exc()[-500:]}
                with open(out.name, "w") as handle:
                    json.dump(result, handle)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            text = out.read()
        results[model_type] = json.loads(text) if text else {"status": NOT_RUN, "reason": f"the child died (status {status}: memory or time limit)"}
        if progress:
            print(f"{model_type}: {results[model_type]['status']}", file=sys.stderr, flush=True)
    return results


if __name__ == "__main__":
    print(json.dumps(sweep(sys.argv[1:] or None, progress=True), indent=1))
