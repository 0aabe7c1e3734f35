"""TransformerLens's public API, name by name, on an installed model and its cache (issue 12's table).

Two steps, because no one environment has both TransformerLens generations:
  python scripts/api_coverage.py --names    refresh scripts/api_names.json from the TransformerLens
                                            installed here: the `tl` env gives TransformerBridge 4.3 and
                                            its ActivationCache, the `sae` env HookedTransformer 3.x
                                            and what SAELens's HookedSAETransformer adds to it
  python scripts/api_coverage.py [--write]  any env with tlshim (e.g. quick): check every listed name
                                            on an installed tiny Llama and its cache, print the counts;
                                            --write puts the table in README.md between the api markers

A surface's public API: the names without a leading underscore that its class (and its TransformerLens
base classes) define, its instance attributes and its child modules, less what torch.nn.Module itself has.
A name is present when getattr finds it (a property that raises for this model counts as present);
"HF" marks a name found only on the HuggingFace model (HF's meaning, e.g. ``generate``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
NAMES = Path(__file__).with_name("api_names.json")
README = ROOT / "README.md"
START, END = "<!-- api:start -->", "<!-- api:end -->"
MODULE_NAMES = set(dir(torch.nn.Module)) | set(vars(torch.nn.Module()))


def tiny_llama():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def word_tokenizer():
    """A word-level tokenizer over the tiny vocabulary, saved and reloaded (TransformerLens reads its path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    inner = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t0")
    path = tempfile.mkdtemp(prefix="tlshim-api-")
    tok.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def public_names(obj) -> list:
    """The public API of ``obj`` (see the module docstring)."""
    own = {n for cls in type(obj).__mro__ if cls is not object and not cls.__module__.startswith("torch") for n in vars(cls)}
    instance = set(vars(obj)) | set(getattr(obj, "_modules", None) or ())
    if isinstance(obj, torch.nn.Module):
        instance -= MODULE_NAMES  # `training` and the like: torch's, not TransformerLens's
    return sorted(n for n in own | instance if not n.startswith("_"))


def harvest_names() -> dict:
    """{surface label: names} of the TransformerLens installed in this environment."""
    import importlib.metadata

    version = importlib.metadata.version("transformer-lens")
    ids = torch.tensor([[1, 5, 6, 7]])
    found = {}
    if int(version.split(".")[0]) >= 4:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers("llama", hf_model=tiny_llama(), tokenizer=word_tokenizer(), device="cpu")
        _, cache = bridge.run_with_cache(ids)
        found[f"TransformerBridge {version}"] = public_names(bridge)
        found[f"ActivationCache {version}"] = public_names(cache)
    else:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(d_model=64, d_head=16, n_heads=4, d_mlp=128, n_layers=2, n_ctx=64, d_vocab=64,
                                      act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary")
        model = HookedTransformer(cfg, tokenizer=None)
        found[f"HookedTransformer {version}"] = public_names(model)
        try:
            from sae_lens import HookedSAETransformer
        except ImportError:
            return found
        # what SAELens adds to HookedTransformer: the names its own class defines
        label = f"HookedSAETransformer {importlib.metadata.version('sae-lens')}"
        found[label] = sorted(n for n in vars(HookedSAETransformer) if not n.startswith("_"))
    return found


def check(names: dict) -> dict:
    """{surface: {name: "tlshim" | "HF" | None}} on an installed tiny Llama and its cache."""
    import tlshim
    from tlshim.api import ModelAPI

    model = tlshim.install(tiny_llama(), tokenizer=word_tokenizer())
    _, cache = model.run_with_cache(torch.tensor([[1, 5, 6, 7]]))
    out = {}
    for surface, listed in names.items():
        obj = cache if surface.startswith("ActivationCache") else model
        out[surface] = {}
        for name in listed:
            try:
                getattr(obj, name)
            except AttributeError:
                out[surface][name] = None
                continue
            except Exception:  # noqa: BLE001 - there, but raising for this model (e.g. a stacked weight)
                pass
            ours = obj is cache or hasattr(ModelAPI, name) or name in vars(model)
            out[surface][name] = "tlshim" if ours else "HF"
    return out


def summary(result: dict) -> list:
    lines = []
    for surface, found in result.items():
        present = [n for n, where in found.items() if where]
        hf = sum(where == "HF" for where in found.values())
        lines.append(f"{surface}: {len(present)} of {len(found)} present ({hf} of them HF's own: same name, HF's meaning)")
    return lines


def _grid(result: dict, surfaces: list) -> str:
    mark = {"tlshim": "yes", "HF": "HF", None: "**no**"}
    rows = sorted({name for s in surfaces for name in result[s]})
    head = "| name | " + " | ".join(surfaces) + " |\n|---|" + "---|" * len(surfaces) + "\n"
    return head + "".join(
        f"| `{name}` | " + " | ".join(mark[result[s][name]] if name in result[s] else "" for s in surfaces) + " |\n"
        for name in rows
    )


def table(result: dict) -> str:
    caches = [s for s in result if s.startswith("ActivationCache")]
    models = [s for s in result if s not in caches]
    counts = "\n".join(f"- {line}" for line in summary(result))
    return (
        f"{START}\n<!-- generated by scripts/api_coverage.py --write; do not edit by hand -->\n{counts}\n\n"
        "<details><summary>name by name (yes: tlshim provides it; HF: only HF's attribute of that name; "
        "no: missing; blank: not in that API)</summary>\n\n" + _grid(result, models) + "\n" + _grid(result, caches)
        + f"\n</details>\n{END}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", action="store_true", help="refresh api_names.json from the TransformerLens installed here")
    parser.add_argument("--write", action="store_true", help="write the table into README.md between the api markers")
    args = parser.parse_args(argv)
    saved = json.loads(NAMES.read_text()) if NAMES.exists() else {}
    if args.names:
        fresh = harvest_names()
        kinds = {label.split()[0] for label in fresh}
        saved = {k: v for k, v in saved.items() if k.split()[0] not in kinds} | fresh
        NAMES.write_text(json.dumps(dict(sorted(saved.items())), indent=1) + "\n")
        for label, names in fresh.items():
            print(f"{label}: {len(names)} names -> {NAMES.name}")
        return 0
    if not saved:
        sys.exit(f"{NAMES} is missing: run this script with --names in the `tl` and `sae` tox envs first")
    result = check(saved)
    print("\n".join(summary(result)))
    for surface, found in result.items():
        print(f"missing from {surface}: " + ", ".join(n for n, where in found.items() if not where))
    if args.write:
        text = README.read_text()
        if START not in text or END not in text:
            sys.exit(f"README.md has no {START} ... {END} markers")
        README.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: table(result), text, flags=re.S))
        print(f"README.md: table written between {START} and {END}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
