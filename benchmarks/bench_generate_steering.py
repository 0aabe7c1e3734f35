"""Generate with one steering hook: tlshim's hook against the same edit as a plain torch forward hook.

Each contender generates 32 tokens (greedy, KV cache) from a 128-token prompt on its own instance of
the same random Llama (same seed, bitwise-equal weights):

- native: a plain model with ``layers[3].register_forward_hook`` adding a vector to the layer output;
- tlshim: an installed twin inside ``model.hooks(fwd_hooks=[("blocks.3.hook_resid_post", add)])``
  (entering and leaving the block is timed too);
- native twin: a second plain model with the plain hook (the noise floor of the ratio).

Before timing, both steered generations must give the same tokens. Timing reuses
bench_overhead.py's interleaved rounds and CPU-time clock (one torch thread): the ratio is the median
over rounds of tlshim's time over native's in the same round. Target: ratio <= 1.05.

    python benchmarks/bench_generate_steering.py           # about two minutes
    python benchmarks/bench_generate_steering.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_overhead  # noqa: E402
import tlshim  # noqa: E402
import transformers  # noqa: E402

LAYER = 3
NEW_TOKENS = bench_overhead.NEW_TOKENS
TARGET = 1.05


def plain_steering(model, vector):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + vector, *output[1:])
        return output + vector

    return model.model.layers[LAYER].register_forward_hook(hook)


def bench_size(size, rounds, warmup):
    ids = torch.randint(0, bench_overhead.SIZES[size]["vocab_size"], (1, bench_overhead.SEQ),
                        generator=torch.Generator().manual_seed(1))
    vector = torch.randn(bench_overhead.SIZES[size]["hidden_size"], generator=torch.Generator().manual_seed(2))
    native, twin, shim = bench_overhead.build(size), bench_overhead.build(size), tlshim.install(bench_overhead.build(size))
    plain_steering(native, vector)
    plain_steering(twin, vector)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                  attention_mask=torch.ones_like(ids))
    hooks = [(f"blocks.{LAYER}.hook_resid_post", lambda tensor, hook: tensor + vector)]

    def steered_shim():
        with shim.hooks(fwd_hooks=hooks):
            return shim.generate(ids, **kwargs)

    with torch.no_grad():
        reference = native.generate(ids, **kwargs)
        assert torch.equal(steered_shim(), reference), "tlshim's steering differs from the plain hook's"
        assert reference.shape[1] == ids.shape[1] + NEW_TOKENS
        contenders = {
            "native": lambda: native.generate(ids, **kwargs),
            "tlshim": steered_shim,
            "twin": lambda: twin.generate(ids, **kwargs),
        }
        return bench_overhead.interleaved(contenders, {}, rounds=rounds, inner=1, warmup=warmup)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run, not a measurement")
    parser.add_argument("--sizes", default="mid,tiny", help="comma-separated, from: " + ", ".join(bench_overhead.SIZES))
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args(argv)
    bench_overhead.CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    rounds = {"mid": 3 if args.quick else 15, "tiny": 4 if args.quick else 30}
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, tlshim {tlshim.__version__}, "
          f"threads {torch.get_num_threads()}, clock {args.clock}, {NEW_TOKENS} new tokens, prompt {bench_overhead.SEQ}")
    print("\n| size | native ms | tlshim ms | ratio tlshim / native | native twin / native | target |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        out = bench_size(size, rounds[size], warmup=1 if args.quick else 2)
        ratio = out["tlshim"][0]
        verdict = "ok" if ratio <= TARGET else "MISSED"
        print(f"| {size} | {out['native'][1] * 1e3:.1f} | {out['tlshim'][1] * 1e3:.1f} | {ratio:.3f} | "
              f"{out['twin'][0]:.3f} | ≤ {TARGET} {verdict} |", flush=True)
    if args.quick:
        print("\n(--quick: few rounds, numbers are rough)")


if __name__ == "__main__":
    main()
