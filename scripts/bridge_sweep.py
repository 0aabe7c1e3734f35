"""TransformerLens's TransformerBridge on every causal-LM type, built tiny as tlshim's sweep builds it.

    .tox/tl/bin/python scripts/bridge_sweep.py              # every type; print the summary
    .tox/tl/bin/python scripts/bridge_sweep.py --write      # also write benchmarks/bridge_sweep.json
    .tox/tl/bin/python scripts/bridge_sweep.py gpt2 llama   # just these types
    .tox/bridge524/bin/python scripts/bridge_sweep.py --write   # transformers 5.24 (`tox -e bridge524 --notest` builds it)

Per type (one forked child each, as tests/sweep.py runs them): the tiny model of tests/tiny.py, with
``config.architectures`` set as a saved checkpoint has it, goes to ``TransformerBridge.boot_transformers``;
a twin built with the same seed is the native reference; both run with ``use_cache=False``. The
bridge's own hooks must hold what ../shared/HOOKS.md says: logits equal native HF logits; hook_embed
(+ hook_pos_embed), every block's hook_resid_pre / hook_resid_post, and on as many blocks as the native
forward computes softmax attentions attn.hook_q / k / v / pattern / z, hook_attn_out and hook_mlp_out,
fire with their shapes; the residual chain adds up; pattern rows sum to 1; z = pattern @ v; zeroing
head 0 of hook_z, and adding a vector at hook_resid_mid (hook_attn_out where a block has none), give
the logits of the same edit made by hand on the twin (at the module the bridge maps each hook to).
Values compare within TOLERANCE of the reference's largest magnitude (float32); the logits' largest
difference is recorded (0.0 where bit for bit). Where every check holds but the resid_mid edit, and
that edit equals adding the vector to the MLP norm's input alone (the bridge's hook_resid_mid is that
norm's hook_in), the status says so: PASSES_BUT_MID.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys
import tempfile
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: see tests/sweep.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["PIP_NO_INDEX"] = "1"  # the bridge may pip-install torchvision while booting (TESTING.md)

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import transformers  # noqa: E402
from packaging.version import Version  # noqa: E402

from sweep import FAILED, NOT_RUN, _add_to_first, _short, _zero_columns, _zero_head0, build_pair, sweep  # noqa: E402

PASSES, NO_BOOT = "passes", "does not boot"
#: every check holds but one: an edit of hook_resid_mid reaches the MLP's input and not the residual stream
PASSES_BUT_MID, MID_ONLY = "passes but the resid_mid edit", "an edit of hook_resid_mid changes only the MLP's input"
TABLE = ROOT / "benchmarks" / "bridge_sweep.json"
#: |a - b| <= TOLERANCE * max(1, max |b|): float rounding where the bridge computes in another order
TOLERANCE = 1e-4
SOFTMAX = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)
SEQUENTIAL = ("hook_resid_mid", "hook_attn_out", "hook_mlp_out")
ATTENTION = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z", "hook_attn_out")


def check(model_type: str) -> dict:
    """{"status": passes / failed / does not boot / not runnable, "reason": what, "logits_max_diff": ...}."""
    built = build_pair(model_type)
    if isinstance(built, dict):  # not runnable tiny
        return built
    model, twin, ids, native = built
    n_attention = _attention_layers(twin, ids)
    from test_tl_parity import word_tokenizer
    from transformer_lens.model_bridge import TransformerBridge

    model.config.architectures = [type(model).__name__]  # as a saved checkpoint has it (TESTING.md)
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(model_type, hf_model=model, tokenizer=word_tokenizer(folder), device="cpu")
    except Exception as err:
        return {"status": NO_BOOT, "reason": _short(err)}
    result = {}
    try:
        failures = _failures(bridge, twin, ids, native, n_attention, result)
    except Exception as err:
        failures = [f"raised {_short(err)}"]
    if failures == [MID_ONLY]:
        return {"status": PASSES_BUT_MID, "reason": MID_ONLY, **result}
    if failures:
        return {"status": FAILED, "reason": "; ".join(failures[:3]), "failures": len(failures), **result}
    return {"status": PASSES, **result}


def _attention_layers(model, ids) -> int:
    """How many softmax attentions the native forward computes: softmax calls over (batch, head, query,
    key) scores (HF's own output_attentions misses the attention layers of some hybrids)."""
    pos, seen = ids.shape[1], []

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            x = args[0] if args else None
            if func in SOFTMAX and isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[-2] == pos and x.shape[-1] >= pos:
                seen.append(func)  # (a gpt-oss sink adds a key column)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(input_ids=ids, use_cache=False)
    return len(seen)


def _close(a, b) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= TOLERANCE * max(1.0, float(b.abs().max())))


def _failures(bridge, twin, ids, native, n_attention, result):
    failures = []
    batch, pos = ids.shape
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits, cache = bridge.run_with_cache(ids, use_cache=False)
    logits = getattr(logits, "logits", logits).detach()
    result["logits_max_diff"] = float((logits - native).abs().max()) if logits.shape == native.shape else None
    if not _close(logits, native):
        failures.append(f"logits differ from native (max difference {result['logits_max_diff']})")
    exposed = set(bridge.hook_dict)
    failures += [f"{name} does not fire" for name in sorted(exposed) if _catalog(name) and name not in cache]
    n_layers = len(bridge.blocks)
    needed = ["hook_embed", *(f"blocks.{i}.{n}" for i in range(n_layers) for n in ("hook_resid_pre", "hook_resid_post"))]
    attention = [i for i in range(n_layers) if f"blocks.{i}.attn.hook_pattern" in exposed]
    if len(attention) < n_attention:
        failures.append(f"attention hooks on {len(attention)} of the model's {n_attention} attention layers")
    needed += [f"blocks.{i}.{n}" for i in attention for n in (*ATTENTION, "hook_mlp_out")]
    missing = [name for name in needed if name not in cache]
    if missing:
        return failures + [f"{', '.join(missing[:4])} not exposed"]
    d_model = cache["hook_embed"].shape[-1]
    for name, value in cache.items():
        if _catalog(name) and ".attn." not in name:  # the residual-width names (attention's: _attention)
            want = (batch, pos, 1) if name.endswith("hook_scale") else (batch, pos, d_model)
            if tuple(value.shape) != want:
                failures.append(f"{name} has shape {tuple(value.shape)}, expected {want}")
    failures += _chain(cache, n_layers)
    for i in attention:
        failures += _attention(cache, f"blocks.{i}", batch, pos, _has_sinks(twin))
    if attention and not failures:
        failures += _edits(bridge, twin, ids, attention[0], cache)
    result["attention_layers"] = len(attention)
    return failures


def _catalog(name: str) -> bool:
    """A catalog name of the brief's list (HOOKS.md) that this sweep checks."""
    last = name.split(".", 2)[-1] if name.startswith("blocks.") else name
    return last in ("hook_embed", "ln_final.hook_normalized", "ln_final.hook_scale", "hook_resid_pre", "hook_resid_post", *SEQUENTIAL, *ATTENTION[:5])


def _chain(cache, n_layers):
    """hook_embed (+ hook_pos_embed) = resid_pre 0; resid_post i = resid_pre i+1; each block's sum."""
    failures = []
    entered = cache["hook_embed"]
    pos_embed = cache["hook_pos_embed"] if "hook_pos_embed" in cache else None
    if pos_embed is not None and pos_embed.shape[-2:] == entered.shape[-2:]:  # a learned table (not a rotary alias)
        entered = entered + pos_embed
    if not _close(entered, cache["blocks.0.hook_resid_pre"]):
        failures.append("hook_embed (+ hook_pos_embed) differs from blocks.0.hook_resid_pre")
    for i in range(n_layers):
        b = f"blocks.{i}"
        if i + 1 < n_layers and not _close(cache[f"{b}.hook_resid_post"], cache[f"blocks.{i + 1}.hook_resid_pre"]):
            failures.append(f"{b}.hook_resid_post differs from the next hook_resid_pre")
        pre, post = cache[f"{b}.hook_resid_pre"], cache[f"{b}.hook_resid_post"]
        if f"{b}.hook_attn_out" not in cache or f"{b}.hook_mlp_out" not in cache:
            continue  # a mixer block: only the chain
        attn_out, mlp_out = cache[f"{b}.hook_attn_out"], cache[f"{b}.hook_mlp_out"]
        if f"{b}.hook_resid_mid" in cache:
            mid = cache[f"{b}.hook_resid_mid"]
            if not _close(mid, pre + attn_out):
                failures.append(f"{b}.hook_resid_mid != resid_pre + attn_out")
            if not _close(post, mid + mlp_out):
                failures.append(f"{b}.hook_resid_post != resid_mid + mlp_out")
        elif not _close(post, pre + attn_out + mlp_out):
            failures.append(f"{b}.hook_resid_post != resid_pre + attn_out + mlp_out (no hook_resid_mid)")
    return failures


def _attention(cache, b, batch, pos, sinks):
    """Shapes (q b p h e, k / v b p g e, pattern b h p p, z b p h e), pattern rows, z = pattern @ v."""
    q, k, v = (cache[f"{b}.attn.hook_{n}"] for n in "qkv")
    pattern, z = cache[f"{b}.attn.hook_pattern"], cache[f"{b}.attn.hook_z"]
    h = pattern.shape[1] if pattern.dim() == 4 else -1
    g, e = (v.shape[2], v.shape[3]) if v.dim() == 4 else (-1, -1)
    shapes_ok = (
        pattern.shape == (batch, h, pos, pos) and q.dim() == k.dim() == 4 and q.shape[:3] == (batch, pos, h)
        and k.shape[:3] == (batch, pos, g) and q.shape[3] == k.shape[3] and v.shape[:2] == (batch, pos)
        and g > 0 and h % g == 0 and z.shape == (batch, pos, h, e)
    )  # fmt: skip
    if not shapes_ok:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip("qkv", (q, k, v))) + f", pattern {tuple(pattern.shape)}, z {tuple(z.shape)}"
        return [f"{b}.attn shapes not as documented ({shapes})"]
    failures = []
    rows = pattern.sum(-1)
    if not (_close(rows, torch.ones_like(rows)) or (sinks and bool((rows <= 1 + TOLERANCE).all()))):
        failures.append(f"{b}.attn.hook_pattern rows do not sum to 1 ({float(rows.min()):.3g} to {float(rows.max()):.3g})")
    want = torch.matmul(pattern, v.repeat_interleave(h // g, dim=2).transpose(1, 2)).transpose(1, 2)
    if not _close(z, want):
        failures.append(f"{b}.attn.hook_z != pattern @ v")
    return failures


def _has_sinks(model) -> bool:
    """Attention sinks (gpt-oss): pattern rows sum to 1 minus the sink's share, in HF itself (HOOKS.md)."""
    return any(name.split(".")[-1] == "sinks" for name, _ in model.named_parameters())


def _edits(bridge, twin, ids, i, cache):
    """hook_z's head 0 zeroed, and a vector added at resid_mid (attn_out without one), against the same
    edits made by hand on the twin, at the modules the bridge maps those hooks to."""
    failures = []
    b = f"blocks.{i}"
    o_proj = _module_of(bridge, twin, bridge.hook_dict[f"{b}.attn.hook_z"], "hook_in")
    if o_proj is None:
        failures.append(f"{b}.attn.hook_z is the input of no module (no edit by hand to compare)")
    else:
        d_head = cache[f"{b}.attn.hook_z"].shape[-1]
        zeroed = _run_with_hooks(bridge, ids, [(f"{b}.attn.hook_z", _zero_head0)])
        by_hand = _by_hand(twin, ids, o_proj.register_forward_pre_hook(lambda m, args: (_zero_columns(args[0], d_head), *args[1:])))
        if not _close(zeroed, by_hand):
            failures.append(f"an edit of {b}.attn.hook_z differs from the same edit by hand")
    vector = torch.randn(cache["hook_embed"].shape[-1], generator=torch.Generator().manual_seed(3))
    name = f"{b}.hook_resid_mid" if f"{b}.hook_resid_mid" in cache else f"{b}.hook_attn_out"
    steered = _run_with_hooks(bridge, ids, [(name, lambda x, hook: x + vector)])
    attn_out = _module_of(bridge, twin, bridge.hook_dict[f"{b}.hook_attn_out"], "hook_out")
    if attn_out is not None:
        by_hand = _by_hand(twin, ids, attn_out.register_forward_hook(lambda m, args, out: _add_to_first(out, vector)))
        if _close(steered, by_hand):
            return failures
    # (a hook_attn_out past a module's output, Granite's after its residual multiplier, has no hand-made twin)
    differs = f"an edit of {name} differs from adding the vector after attention by hand" if attn_out else f"{b}.hook_attn_out is the output of no module"
    return failures + [_mlp_input_only(bridge, twin, ids, name, vector, steered) or differs]


def _mlp_input_only(bridge, twin, ids, name, vector, steered):
    """MID_ONLY where the edit equals adding the vector to the input of the module that reads the hook
    (the bridge's hook_resid_mid is ln2's hook_in: the residual stream itself keeps the unedited value)."""
    reader = _module_of(bridge, twin, bridge.hook_dict[name], "hook_in")
    if reader is None:
        return None
    by_hand = _by_hand(twin, ids, reader.register_forward_pre_hook(lambda m, args: (args[0] + vector, *args[1:])))
    return MID_ONLY if _close(steered, by_hand) else None


def _module_of(bridge, twin, hook_point, role):
    """The twin's module at the path of the HF module whose ``role`` (hook_in / hook_out) is ``hook_point``."""
    for component in bridge.modules():
        if getattr(component, role, None) is hook_point and getattr(component, "original_component", None) is not None:
            # the bridge nests its components in the HF tree: the HF attribute path is the one the twin has
            for path, module in bridge.original_model.named_modules(remove_duplicate=False):
                if module is component.original_component:
                    try:
                        return twin.get_submodule(path.replace("._original_component", ""))
                    except AttributeError:
                        continue
    return None


def _run_with_hooks(bridge, ids, hooks):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "A forward hook edited ...": the bridge leaves its native path
        out = bridge.run_with_hooks(ids, fwd_hooks=hooks, use_cache=False)
    return getattr(out, "logits", out).detach()


def _by_hand(twin, ids, handle):
    try:
        with torch.no_grad():
            return twin(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()


def _import_bridge():
    """transformer-lens in the parent, so the forked children share it (its import takes seconds)."""
    import test_tl_parity  # noqa: F401
    import transformer_lens.model_bridge  # noqa: F401


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*")
    parser.add_argument("--write", action="store_true", help="merge the results into benchmarks/bridge_sweep.json")
    parser.add_argument("--seconds", type=int, default=300, help="time limit per type")
    args = parser.parse_args(argv)
    _import_bridge()
    key = "{0.major}.{0.minor}".format(Version(transformers.__version__))
    table = json.loads(TABLE.read_text()) if TABLE.exists() else {}
    results = {}
    for model_type, result in _each(args.types, args.seconds):
        results[model_type] = result
        if args.write:  # as it goes: a partial table is on disk while the sweep runs
            table.setdefault("results", {}).setdefault(key, {})[model_type] = result
            table["transformer_lens"] = _version("transformer-lens")
            TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(summary(results, key))
    return 0


def _each(model_types, seconds):
    """(model_type, result) one type at a time, each in its own forked child (tests/sweep.py)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for model_type in model_types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        result = sweep([model_type], seconds=seconds, progress=True, checker=check)[model_type]
        if result["status"] == NOT_RUN and "the child died" in result.get("reason", ""):
            result["status"] = FAILED  # (no build died in tlshim's sweep or here so far: the bridge hit the limit)
        yield model_type, result


def _version(package):
    from importlib.metadata import version

    return version(package)


def summary(results, key) -> str:
    counts = collections.Counter(r["status"] for r in results.values())
    runnable = len(results) - counts[NOT_RUN]
    lines = [
        f"transformers {key}, transformer-lens {_version('transformer-lens')}: the bridge passes {counts[PASSES]} of {runnable} "
        f"runnable types, and all but the resid_mid edit on {counts[PASSES_BUT_MID]} more ({counts[FAILED]} fail, "
        f"{counts[NO_BOOT]} do not boot; {counts[NOT_RUN]} not runnable tiny)"
    ]
    for status in (FAILED, NO_BOOT):
        groups = collections.defaultdict(list)
        for model_type, result in sorted(results.items()):
            if result["status"] == status:
                groups[result.get("reason", "")[:150]].append(model_type)
        for reason, types in sorted(groups.items(), key=lambda item: -len(item[1])):
            lines.append(f"  {status} ({len(types)}): {reason}: {', '.join(types)}")
    for status in (PASSES, PASSES_BUT_MID):
        lines.append(f"  {status}: {', '.join(t for t, r in sorted(results.items()) if r['status'] == status)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
