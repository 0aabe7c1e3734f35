"""``python -m tlshim harvest``: store a model's activations over a dataset (``torchrun`` for several processes).

    python -m tlshim harvest --model PATH --data corpus.txt --names 'blocks.*.hook_resid_post' --out acts/
    torchrun --nproc-per-node 2 -m tlshim harvest --model PATH --data corpus.txt --names ... --out acts/
"""

from __future__ import annotations

import argparse
import os


def _load(path, device, dtype):
    import torch
    from transformers import AutoTokenizer

    from .loading import from_pretrained

    kwargs = {"torch_dtype" if _old_transformers() else "dtype": getattr(torch, dtype)} if dtype else {}
    if device == "auto":
        kwargs["device_map"] = "auto"  # accelerate spreads a model larger than one device
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = from_pretrained(path, tokenizer=tokenizer, **kwargs).eval()
    if device != "auto":
        model.to(device)
    return model


def _old_transformers() -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) < Version("4.56")


def _default_device() -> str:
    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def main(argv=None) -> int:
    from .harvest import POSITIONS, harvest

    parser = argparse.ArgumentParser(prog="tlshim harvest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local model folder (loaded with tlshim.from_pretrained)")
    parser.add_argument("--data", required=True, help="a text file (a document a line), a .jsonl file, or a datasets folder")
    parser.add_argument("--names", required=True, nargs="+", help="hook names or globs, e.g. 'blocks.*.hook_resid_post'")
    parser.add_argument("--out", required=True, help="the output folder (rerun the same command to resume it)")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--no-pack", action="store_true", help="one context per document instead of packing them")
    parser.add_argument("--no-bos", action="store_true", help="do not start each context with BOS")
    parser.add_argument("--positions", choices=POSITIONS, default="all")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-rows", type=int, default=16384, help="rows (kept positions) per shard file")
    parser.add_argument("--dtype", default=None, help="storage dtype (default: the activations'), e.g. float16")
    parser.add_argument("--model-dtype", default=None, help="dtype to load the model in, e.g. bfloat16")
    parser.add_argument("--device", default=None, help="cpu, cuda:N or auto (accelerate device_map); default: this rank's GPU, else cpu")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--split", default=None)
    parser.add_argument("--max-contexts", type=int, default=None)
    parser.add_argument("--saelens", action="store_true", help="also write SAELens's cached-activations layout to OUT/saelens")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    model = _load(args.model, args.device or _default_device(), args.model_dtype)
    manifest = harvest(
        model, args.data, args.names, args.out, context_size=args.context_size, pack=not args.no_pack,
        prepend_bos=not args.no_bos, positions=args.positions, batch_size=args.batch_size, shard_rows=args.shard_rows,
        dtype=args.dtype, text_column=args.text_column, split=args.split, max_contexts=args.max_contexts,
        saelens=args.saelens, progress=not args.quiet,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        m = manifest
        size = sum(os.path.getsize(os.path.join(args.out, s["file"])) for s in m["shards"])
        run = m["last_run"]
        rate = run["tokens"] / run["seconds"] if run["seconds"] else float("nan")
        print(f"harvested {m['tokens']} tokens ({m['contexts']} contexts, {m['rows']} rows) at {len(m['names'])} names into "
              f"{args.out}: {len(m['shards'])} shards, {size / 1e6:.1f} MB; this run: {run['tokens']} tokens in {run['seconds']:.1f} s "
              f"({rate:.0f} tokens/s), {run['world_size']} process{'es' if run['world_size'] > 1 else ''}")
    return 0
