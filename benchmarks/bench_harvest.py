"""Harvest throughput (tokens per second) against a plain forward loop over the same batches, 1 and 2 processes.

A random Llama (``--size``), token-id contexts of 128, batches of 8, one torch thread per process, on
CPU; the harvest stores every ``blocks.*.hook_resid_post`` (writing to disk included). One process:
rounds of the plain loop (``model(input_ids=batch, use_cache=False)`` under ``no_grad``, on the same
installed and idle model) and the harvest, their order alternating; the ratio is the median of the
rounds' ratios. Two processes: the same rounds in one torchrun launch (gloo on 127.0.0.1), each rank
forwarding the batches of its shards, timed from a barrier to a barrier (start-up left out); the
scaling is the ratio of the median rates. Wall time: with two processes the question is how much
sooner the work is done.

    python benchmarks/bench_harvest.py                 # a few minutes on a 2-core machine
    python benchmarks/bench_harvest.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tlshim  # noqa: E402
import transformers  # noqa: E402

SEQ, BATCH = 128, 8
NAMES = "blocks.*.hook_resid_post"
SIZES = {
    # 4 x (attention 0.26M + MLP 0.79M) + embed and unembed 2 x 1.05M = 6.3M parameters
    "small": dict(num_hidden_layers=4, hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, vocab_size=4096),
    # as bench_overhead.py's mid: 33.6M parameters
    "mid": dict(num_hidden_layers=8, hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4, vocab_size=8192),
}
SHARD_ROWS = 4 * BATCH * SEQ  # 4 batches a shard


def build(size, folder):
    config = transformers.LlamaConfig(max_position_embeddings=SEQ, **SIZES[size])
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config).eval()
    model.save_pretrained(folder)


def load(folder):
    return tlshim.install(transformers.AutoModelForCausalLM.from_pretrained(folder).eval())


def plain(model, ids, shards):
    with torch.no_grad():
        for s in shards:
            for start in range(s * SHARD_ROWS // SEQ, min((s + 1) * SHARD_ROWS // SEQ, len(ids)), BATCH):
                model(input_ids=ids[start : start + BATCH], use_cache=False)


def run_harvest(model, ids, out):
    return tlshim.harvest(model, ids, NAMES, out, batch_size=BATCH, shard_rows=SHARD_ROWS, progress=False)


def n_shards(ids):
    return -(-len(ids) * SEQ // SHARD_ROWS)


def timed(rounds, contenders, barrier=lambda: None):
    """{key: [wall seconds]} over rounds, the contenders' order alternating between rounds."""
    times = {key: [] for key in contenders}
    for r in range(rounds):
        for key in sorted(contenders, reverse=r % 2 == 1):
            prepare, run = contenders[key]
            prepare()
            barrier()
            began = time.perf_counter()
            run()
            barrier()
            times[key].append(time.perf_counter() - began)
    return times


def worker(work, rounds):
    """One torchrun rank: the plain loop over this rank's shards and the harvest, barrier to barrier."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, ids = load(os.path.join(work, "model")), torch.load(os.path.join(work, "ids.pt"))
    plain(model, ids[: 2 * BATCH], [0])  # warm-up
    out = os.path.join(work, "out2")
    times = timed(rounds, {
        "plain2": (lambda: None, lambda: plain(model, ids, range(rank, n_shards(ids), world))),
        "harvest2": (lambda: rank == 0 and shutil.rmtree(out, ignore_errors=True), lambda: run_harvest(model, ids, out)),
    }, dist.barrier)
    if rank == 0:
        with open(os.path.join(work, "two.json"), "w") as fh:
            json.dump(times, fh)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(work, rounds):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), __file__, "--worker", work, "--rounds", str(rounds)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"torchrun failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(work, "two.json")) as fh:
        return json.load(fh)


def report(args, model, ids, times, manifest, work):
    tokens = ids.numel()
    rate = {key: statistics.median(tokens / t for t in ts) for key, ts in times.items()}
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    same = all(Path(work, "out1", s["file"]).read_bytes() == Path(work, "out2", s["file"]).read_bytes() for s in manifest["shards"])
    written = sum(os.path.getsize(os.path.join(work, "out1", s["file"])) for s in manifest["shards"])
    vs_plain, scaling = ratio("plain1", "harvest1"), rate["harvest2"] / rate["harvest1"]
    print(f"{args.size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {args.contexts} contexts x {SEQ} tokens, "
          f"batch {BATCH}, {len(manifest['names'])} names ({NAMES}), {written / 1e6:.1f} MB written per harvest, {args.rounds} rounds; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"2-process shards equal to 1-process shards, bit for bit: {same}\n")
    print("| contender | tokens/s (median) | ratio | target |")
    print("|---|---|---|---|")
    print(f"| plain forward loop, 1 process | {rate['plain1']:.0f} | 1 | - |")
    print(f"| harvest, 1 process | {rate['harvest1']:.0f} | {vs_plain:.3f} of plain | >= 0.9 {'ok' if vs_plain >= 0.9 else 'MISSED'} |")
    print(f"| plain forward loop, 2 processes | {rate['plain2']:.0f} | {rate['plain2'] / rate['plain1']:.2f} x 1 process | - |")
    print(f"| harvest, 2 processes | {rate['harvest2']:.0f} | {scaling:.2f} x 1 process ({ratio('plain2', 'harvest2'):.3f} of plain) "
          f"| >= 1.6 {'ok' if scaling >= 1.6 else 'MISSED'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--contexts", type=int, default=128, help="contexts of 128 tokens per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="32 contexts, 2 rounds")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.rounds)
    if args.quick:
        args.contexts, args.rounds = 32, 2
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="bench-harvest-")
    try:
        build(args.size, os.path.join(work, "model"))
        ids = torch.randint(0, SIZES[args.size]["vocab_size"], (args.contexts, SEQ), generator=torch.Generator().manual_seed(0))
        torch.save(ids, os.path.join(work, "ids.pt"))
        model = load(os.path.join(work, "model"))
        plain(model, ids[: 2 * BATCH], [0])  # warm-up
        one = os.path.join(work, "out1")
        times = timed(args.rounds, {
            "plain1": (lambda: None, lambda: plain(model, ids, range(n_shards(ids)))),
            "harvest1": (lambda: shutil.rmtree(one, ignore_errors=True), lambda: run_harvest(model, ids, one)),
        })
        times.update(two_processes(work, args.rounds))
        report(args, model, ids, times, tlshim.open_harvest(one).manifest, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
