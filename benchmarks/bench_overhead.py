"""What tlshim costs over the model's own forward, on CPU with one thread.

Every contender runs on its own instance of the same Llama, built with the same seed (bitwise-equal
weights, checked before timing), in one process. Timing goes in rounds: each round runs every
contender once (``inner`` calls, rotated order), and a contender's ratio is the median over rounds of
its time divided by the native forward's time in the same round, so slow drift of the machine cancels.
An idle tlshim model has no wrapper at all, so it is compared as a separate instance (not by toggling
install on one model); the "native twin" row, a second plain instance, shows what that costs by itself
(the noise floor of every ratio).

When transformer-lens is importable (the ``bench`` extra), TransformerBridge is built on a further
twin in the same run. The bridge switches its model to eager attention, so its ratios are taken
against a plain eager twin (the kernel difference is its own row).

    python benchmarks/bench_overhead.py            # a few minutes
    python benchmarks/bench_overhead.py --quick    # smoke run, about a minute
    python benchmarks/bench_overhead.py --model smollm2   # the real model (tlshim.examples.smollm2)
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tlshim  # noqa: E402
import transformers  # noqa: E402

SEQ = 128
NEW_TOKENS = 32
SIZES = {
    # 8 x (attention 0.79M + MLP 2.36M) + embed and unembed 2 x 4.19M = 33.6M parameters
    "mid": dict(num_hidden_layers=8, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=8192),
    "tiny": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
#: real models (tlshim.examples), each instance loaded from the converted checkpoint
REAL = {"smollm2": dict(vocab_size=49152, hidden_size=576)}
HOOK_NAME = "blocks.3.hook_resid_post"
#: CPU time of this thread (with one torch thread, the work runs on it): on a shared machine it leaves
#: out the time the process waits for a core, which wall time (--clock wall) counts as overhead.
CLOCK = time.thread_time

# (key, label, {size: target}; no entry = no target). Ratios unless the key ends in _s.
ROWS = [
    ("idle", "tlshim installed, no hook", {"mid": 1.01, "tiny": 1.05}),
    ("hook", f"tlshim run_with_hooks, 1 hook ({HOOK_NAME} += v)", {"mid": 1.02}),
    ("resid", "tlshim run_with_cache, resid_pre/mid/post", {"mid": 1.05}),
    ("full", "tlshim run_with_cache, every name", {"mid": 1.15, "tiny": 1.8}),
    ("full_tl", "tlshim run_with_cache, every name but hook_result (TransformerLens's default set)", {}),
    ("gen", f"tlshim generate {NEW_TOKENS} tokens (greedy), idle", {"mid": 1.02}),
    ("install_s", "tlshim install (ms, median of install+uninstall cycles)", {"mid": 0.020}),
    ("twin", "native twin, a second plain instance (noise floor)", {}),
    ("eager", "native eager attention / native sdpa (kernel only)", {}),
    ("b_idle", "TransformerBridge forward, no hook (vs native eager)", {}),
    ("b_hook", "TransformerBridge run_with_hooks, 1 hook", {}),
    ("b_resid", "TransformerBridge run_with_cache, resid_pre/mid/post", {}),
    ("b_full", "TransformerBridge run_with_cache, every name", {}),
    ("b_gen", f"TransformerBridge generate {NEW_TOKENS} tokens (greedy)", {}),
    ("b_build_s", "TransformerBridge build (ms, boot_transformers(hf_model=...))", {}),
]
BASELINE = {"b_idle": "eager", "b_hook": "eager", "b_resid": "eager", "b_full": "eager", "b_gen": "eager_gen"}


def is_resid(name):
    return name.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))


def build(size, attn="sdpa", seed=0):
    if size in REAL:
        model = real_model(size, attn_implementation=attn)[0]
    else:
        config = transformers.LlamaConfig(max_position_embeddings=SEQ + NEW_TOKENS, **SIZES[size])
        config.architectures = ["LlamaForCausalLM"]
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn).eval()
    model.generation_config.eos_token_id = None  # always NEW_TOKENS new tokens
    model.generation_config.pad_token_id = 0
    return model


def real_model(size, **kwargs):
    from tlshim import examples

    return getattr(examples, size)(install=False, **kwargs)


def word_tokenizer(vocab_size):
    """A word-level tokenizer saved to a temp dir (TransformerBridge reloads it by path; nothing is fetched)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    inner = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="t1", eos_token="t2",
                                               pad_token="t0", unk_token="t0")
    path = tempfile.mkdtemp(prefix="bench_tok_")
    tok.save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def bridge_available():
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
    except Exception:
        return False
    return True


def boot_bridge(model, tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers("bench-llama", hf_model=model, tokenizer=tokenizer, device="cpu")


def interleaved(contenders: dict, baselines: dict, rounds: int, inner: int, warmup: int):
    """Per-call seconds of each contender, per round; ratio = median over rounds of t / t_baseline."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    names = list(contenders)
    times = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = contenders[name]
            start = CLOCK()
            for _ in range(inner):
                fn()
            times[name].append((CLOCK() - start) / inner)
    result = {}
    for name in names:
        base = times[baselines.get(name, names[0])]
        ratio = statistics.median(t / b for t, b in zip(times[name], base))
        result[name] = (ratio, statistics.median(times[name]))
    return result


def time_install(size, cycles):
    model = build(size)
    samples = []
    for _ in range(cycles + 3):
        start = CLOCK()
        tlshim.install(model)
        samples.append(CLOCK() - start)
        tlshim.uninstall(model)
    return statistics.median(samples[3:])


def time_bridge_build(size, tokenizer, repeats):
    samples = []
    for _ in range(repeats + 1):
        model = build(size)
        gc.collect()
        start = CLOCK()
        boot_bridge(model, tokenizer)
        samples.append(CLOCK() - start)
    return statistics.median(samples[1:])


def bench_size(size, args, with_bridge):
    dims = (REAL | SIZES)[size]
    ids = torch.randint(0, dims["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(1))
    d_model = dims["hidden_size"]
    vec = torch.randn(d_model, generator=torch.Generator().manual_seed(2))

    def add_vec(tensor, hook):
        return tensor + vec

    native, twin, shim = build(size), build(size), tlshim.install(build(size))
    assert torch.equal(native(ids).logits, shim(ids).logits), "twins differ: the comparison would be unfair"
    resid = [name for name in shim.hook_dict if is_resid(name)]
    # TransformerLens computes hook_result only with use_attn_result; its run_with_cache leaves it out
    but_result = [name for name in shim.hook_dict if not name.endswith("hook_result")]
    gen_kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False)

    forward = {
        "native": lambda: native(input_ids=ids),
        "twin": lambda: twin(input_ids=ids),
        "idle": lambda: shim(input_ids=ids),
        "hook": lambda: shim.run_with_hooks(ids, fwd_hooks=[(HOOK_NAME, add_vec)]),
        "resid": lambda: shim.run_with_cache(ids, names_filter=resid),
        "full": lambda: shim.run_with_cache(ids),
        "full_tl": lambda: shim.run_with_cache(ids, names_filter=but_result),
    }
    generate = {
        "native_gen": lambda: native.generate(ids, **gen_kw),
        "gen": lambda: shim.generate(ids, **gen_kw),
    }
    baselines = {"gen": "native_gen"}
    if with_bridge:
        tokenizer = real_model(size)[1] if size in REAL else word_tokenizer(dims["vocab_size"])
        eager = build(size, attn="eager")
        bridge = boot_bridge(build(size), tokenizer)
        assert torch.allclose(bridge(ids), eager(ids).logits, atol=1e-4), "bridge disagrees with its twin"
        b_resid = [name for name in bridge.hook_dict if is_resid(name)]
        forward |= {
            "eager": lambda: eager(input_ids=ids),
            "b_idle": lambda: bridge(ids),
            "b_hook": lambda: bridge.run_with_hooks(ids, fwd_hooks=[(HOOK_NAME, add_vec)]),
            "b_resid": lambda: bridge.run_with_cache(ids, names_filter=b_resid),
            "b_full": lambda: bridge.run_with_cache(ids),
        }
        generate |= {
            "eager_gen": lambda: eager.generate(ids, **gen_kw),
            "b_gen": lambda: bridge.generate(ids, stop_at_eos=False, verbose=False, return_type="tokens", **gen_kw),
        }
        baselines |= BASELINE
    with torch.no_grad():
        assert torch.equal(native.generate(ids, **gen_kw), shim.generate(ids, **gen_kw))
        out = interleaved(forward, baselines, **args.forward[size])
        out |= interleaved(generate, baselines, **args.generate[size])
    out["install_s"] = (math.nan, time_install(size, args.install_cycles))
    if with_bridge:
        out["b_build_s"] = (math.nan, time_bridge_build(size, tokenizer, args.bridge_builds))
    return out


def cell(row, result):
    if result is None:
        return "-"
    ratio, seconds = result
    if row.endswith("_s"):
        return f"{seconds * 1e3:.1f} ms"
    return f"{ratio:.3f}"


def verdict(row, result, target):
    value = result[1] if row.endswith("_s") else result[0]
    return "ok" if value <= target else "MISSED"


def target_text(row, targets, results):
    parts = []
    for size, target in targets.items():
        if size not in results:
            continue
        shown = f"{target * 1e3:g} ms" if row.endswith("_s") else f"{target:g}"
        mark = f" {verdict(row, results[size][row], target)}" if size in results and row in results[size] else ""
        parts.append(f"{size} ≤ {shown}{mark}")
    return ", ".join(parts) or "-"


def print_tables(results, sizes):
    print("\n| contender | " + " | ".join(f"{s} (ratio)" for s in sizes) + " | target |")
    print("|---|" + "---|" * len(sizes) + "---|")
    for row, label, targets in ROWS:
        if not any(row in results[s] for s in sizes):
            continue
        cells = " | ".join(cell(row, results[s].get(row)) for s in sizes)
        print(f"| {label} | {cells} | {target_text(row, targets, results)} |")
    print("\nabsolute medians, ms per call (forward: batch 1 x 128 tokens; generate: 32 new tokens)\n")
    print("| run | " + " | ".join(sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    labels = {"native": "native forward (sdpa)", "native_gen": "native generate (sdpa)", "eager_gen": "native generate (eager)"}
    labels |= {row: label for row, label, _ in ROWS}
    order = ["native", "native_gen", "eager_gen"] + [row for row, _, _ in ROWS]
    for row in order:
        if any(row in results[s] for s in sizes):
            cells = " | ".join(f"{results[s][row][1] * 1e3:.2f}" if row in results[s] else "-" for s in sizes)
            print(f"| {labels[row]} | {cells} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run, not a measurement")
    parser.add_argument("--sizes", default="mid,tiny", help="comma-separated, from: " + ", ".join(SIZES))
    parser.add_argument("--model", choices=list(REAL), help="a real model instead of the random sizes")
    parser.add_argument("--no-bridge", action="store_true", help="skip TransformerBridge even if installed")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: this thread's CPU time (default, robust on a busy machine); wall: perf_counter")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    q = args.quick
    args.forward = {
        "mid": dict(rounds=4 if q else 30, inner=1, warmup=1 if q else 2),
        "smollm2": dict(rounds=4 if q else 20, inner=1, warmup=1 if q else 2),
        "tiny": dict(rounds=8 if q else 60, inner=3 if q else 5, warmup=3 if q else 10),
    }
    args.generate = {
        "mid": dict(rounds=2 if q else 10, inner=1, warmup=1),
        "smollm2": dict(rounds=2 if q else 8, inner=1, warmup=1),
        "tiny": dict(rounds=3 if q else 20, inner=1, warmup=1 if q else 2),
    }
    args.install_cycles = 5 if q else 50
    args.bridge_builds = 1 if q else 5
    sizes = [args.model] if args.model else args.sizes.split(",")
    with_bridge = not args.no_bridge and bridge_available()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, tlshim {tlshim.__version__}, "
          f"threads {torch.get_num_threads()}, clock {args.clock}, TransformerBridge: "
          + (_tl_version() if with_bridge else "not measured (transformer-lens not installed)"), flush=True)
    results = {}
    for size in sizes:
        start = time.perf_counter()
        results[size] = bench_size(size, args, with_bridge)
        print(f"{size}: {time.perf_counter() - start:.0f} s", flush=True)
    print_tables(results, sizes)
    if q:
        print("\n(--quick: few repeats, numbers are rough)")


def _tl_version():
    from importlib.metadata import version

    return f"transformer-lens {version('transformer-lens')}"


if __name__ == "__main__":
    main()
