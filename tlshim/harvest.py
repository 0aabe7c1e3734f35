"""harvest: run a model over many contexts and store the activations at some hook names, shard by shard.

Shard ``s`` holds contexts ``[s * C, (s + 1) * C)`` run in batches from its first context, and
under ``torch.distributed`` rank ``r`` writes the shards with ``s % world_size == r``: a shard's
bytes do not depend on how many processes ran, and a restart (with any number of processes) redoes
only the shards that are missing. Each shard is written to a temporary name and renamed when
complete; ``run.json`` pins the arguments of the folder, ``manifest.json`` is written by rank 0
once every shard exists.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import sys
import time

import torch

from .errors import TlshimError, unknown_hook_name
from .harvest_data import build_contexts, require
from .install import hf_model, is_installed
from .shards import ShardWriter, read_shard

POSITIONS = ("all", "drop_bos", "last")
_ATTN = ("hook_attn_scores", "hook_pattern")  # (b h p k): positions on axis 2


class HarvestError(TlshimError, RuntimeError):
    pass


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def resolve_names(hook_dict, names) -> list:
    """Hook names from a name, a glob (``blocks.*.hook_resid_post``), a list of those, or a predicate."""
    if callable(names):
        found = [name for name in hook_dict if names(name)]
        if not found:
            raise HarvestError("the names filter accepts no hook name of this model; model.hook_dict lists them")
        return found
    found = []
    for entry in [names] if isinstance(names, str) else list(names):
        if any(c in entry for c in "*?["):
            matched = [name for name in hook_dict if fnmatch.fnmatchcase(name, entry)]
            if not matched:
                raise HarvestError(f"the pattern {entry!r} matches no hook name of this model; model.hook_dict lists them")
        elif entry in hook_dict:
            matched = [entry]
        else:
            raise unknown_hook_name(entry, hook_dict)
        found += [name for name in matched if name not in found]
    if not found:
        raise HarvestError("no hook names given: name some, e.g. names=['blocks.0.hook_resid_post']")
    return found


def kept_positions(length: int, positions: str) -> torch.Tensor:
    if positions == "all":
        return torch.arange(length)
    if positions == "drop_bos":
        return torch.arange(1, length)
    return torch.tensor([length - 1])


def _distributed():
    """(rank, world size, whether this call started the process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun / accelerate launch
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _rank0_then_all(rank, world, step):
    """Run ``step`` on rank 0 while the others wait; a HarvestError there is raised on every rank (not a hang)."""
    failure = None
    if rank == 0:
        try:
            step()
        except HarvestError as exc:
            if world == 1:
                raise
            failure = exc
    if world > 1:
        import torch.distributed as dist

        box = [str(failure) if failure else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            if failure is not None:
                raise failure
            raise HarvestError(f"rank 0 stopped: {box[0]}")


def _write_json(path, data):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


def _model_identity(model) -> dict:
    first = next(model.parameters())
    return {
        "name_or_path": str(getattr(model.config, "_name_or_path", "") or ""),
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(first.dtype).removeprefix("torch."),
    }


def _claim_folder(out, run):
    """Check that ``out`` is new, empty or holds a harvest with the same arguments, then pin them (rank 0 only)."""
    path = os.path.join(out, "run.json")
    try:
        os.makedirs(out, exist_ok=True)
        existing = None
        if os.path.exists(path):
            with open(path) as fh:
                existing = json.load(fh)
        elif [f for f in os.listdir(out) if not f.startswith(".")]:
            raise HarvestError(f"{out} is not empty and holds no harvest (no run.json): harvest into a new or empty folder")
        if existing is not None and existing != run:
            diff = [f"{key}: {existing.get(key)!r} there, {run.get(key)!r} here" for key in sorted(set(existing) | set(run)) if existing.get(key) != run.get(key)]
            raise HarvestError(
                f"{out} holds a harvest made with other arguments ({'; '.join(diff)}). Rerun with the same arguments to "
                "resume it, or harvest into another folder"
            )
        if existing is None:
            _write_json(path, run)
        for name in os.listdir(out):  # a killed run's partial shards: no other rank writes before the barrier
            if name.startswith(".shard-") and ".tmp-" in name:
                os.remove(os.path.join(out, name))
    except HarvestError:
        raise
    except OSError as exc:
        raise HarvestError(f"cannot write the harvest folder {out!r}: {exc.strerror or exc}. Give a folder you can write to") from exc


class _Collector:
    """The forward hooks: each copies its kept positions into the shard buffer, at the batch's rows."""

    def __init__(self, names, dtype, shard_rows):
        self.names, self.dtype, self.shard_rows = names, dtype, shard_rows
        self.buffers: dict = {}
        self.row = 0
        self.picks = None

    def hooks(self):
        return [(name, self._hook(name)) for name in self.names]

    def _hook(self, name):
        axis = 2 if name.endswith(_ATTN) else 1

        def keep(tensor, hook):
            if self.picks is not None:
                tensor = tensor.index_select(axis, self.picks.to(tensor.device))
            picked = tensor.detach().movedim(axis, 1).flatten(0, 1)  # a view for every position of a (b p ...) name
            buffer = self.buffers.get(name)
            if buffer is None or buffer.shape[1:] != picked.shape[1:]:
                if buffer is not None and self.row:
                    raise HarvestError(f"{name} changed shape within a shard ({tuple(buffer.shape[1:])} then {tuple(picked.shape[1:])} per row): attention names need contexts of one length")
                buffer = self.buffers[name] = torch.empty((self.shard_rows, *picked.shape[1:]), dtype=self.dtype or picked.dtype)
            buffer[self.row : self.row + picked.shape[0]].copy_(picked)

        return keep


def _run_shard(model, contexts, collector, first, last, batch_size, positions, device, on_batch):
    """Forward contexts ``first..last`` batch by batch; returns the shard's tensors (views of the buffers)."""
    tokens, sequence, position = [], [], []
    collector.row = 0
    start = first
    while start < last:
        stop = start + 1
        while stop < last and stop - start < batch_size and contexts.length(stop) == contexts.length(start):
            stop += 1  # a batch holds contexts of one length (no padding)
        ids = torch.stack([contexts[i] for i in range(start, stop)])
        picks = kept_positions(ids.shape[1], positions)
        collector.picks = None if positions == "all" else picks
        model(input_ids=ids.to(device), use_cache=False)
        kept = ids[:, picks]
        tokens.append(kept.reshape(-1))
        sequence.append(torch.arange(start, stop).repeat_interleave(len(picks)))
        position.append(picks.repeat(stop - start))
        collector.row += kept.numel()
        on_batch(ids.numel())
        start = stop
    rows = collector.row
    out = {name: buffer[:rows] for name, buffer in collector.buffers.items()}
    out.update(tokens=torch.cat(tokens).int(), sequence=torch.cat(sequence).long(), position=torch.cat(position).int())
    return out


def _progress(enabled, total, initial):
    if not enabled:
        return None
    tqdm = require("tqdm", "the harvest's progress bar (progress=False / --quiet runs without it)").tqdm
    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc="harvest", dynamic_ncols=True, file=sys.stderr)


def _manifest(out, run, shards, last_run):
    first = read_shard(os.path.join(out, shards[0]["file"]))
    import transformers

    from . import __version__

    return {
        "format": "tlshim-harvest/1",
        "model": run["model"],
        "versions": {"tlshim": __version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "names": run["names"],
        "shapes": {name: list(first[name].shape[1:]) for name in run["names"]},
        "dtypes": {name: str(first[name].dtype).removeprefix("torch.") for name in run["names"]},
        "positions": run["positions"],
        "context_size": run["context_size"],
        "contexts": run["contexts"],
        "tokens": run["tokens"],
        "rows": sum(shard["rows"] for shard in shards),
        "shards": shards,
        "data": run["data"],
        "batch_size": run["batch_size"],
        "last_run": last_run,
    }


def harvest(model, data, names, out, *, tokenizer=None, context_size=128, pack=True, prepend_bos=True, positions="all",
            batch_size=8, shard_rows=16384, dtype=None, text_column="text", split=None, max_contexts=None,
            saelens=False, progress=True) -> dict:
    """Run ``model`` over ``data`` and store the activations at ``names`` in ``out``; returns the manifest.

    ``data``: a text file (one document a line), a .jsonl file (``text_column``, or ``input_ids``), a
    ``datasets`` dataset or its folder, a list of strings or token-id lists (packed into contexts of
    ``context_size``, BOS first; ``pack=False``: one context per document), or a 2-D tensor of token
    ids (the contexts as they are). ``names``: names, globs or a predicate. ``positions``: ``"all"``,
    ``"drop_bos"`` or ``"last"``. Each shard holds about ``shard_rows`` rows (one per kept position):
    one tensor per name (``dtype``, default the activation's) plus ``tokens``, ``sequence`` (context
    index) and ``position``. Under torchrun every rank calls this with the same arguments.
    ``saelens=True`` also writes SAELens's cached-activations layout to ``out/saelens``.

    >>> tlshim.harvest(model, "corpus.txt", ["blocks.1.hook_resid_post"], "acts/", context_size=64)
    >>> tlshim.open_harvest("acts/")[0]["blocks.1.hook_resid_post"]
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}: use one of {', '.join(POSITIONS)}")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    model = hf_model(model)
    if not is_installed(model):
        raise HarvestError("harvest reads tlshim's hook points: tlshim.install(model, tokenizer=tok) first")
    names = resolve_names(model.hook_dict, names)
    contexts = build_contexts(data, tokenizer or model.tokenizer, context_size, pack, prepend_bos, text_column, split, max_contexts)
    if not len(contexts):
        raise HarvestError(f"the data ({contexts.source}) makes no context of {context_size} tokens: give more data or a smaller context_size")
    lengths = contexts.offsets.diff()
    width = int(lengths.max())
    if any(name.endswith(_ATTN) for name in names) and bool((lengths != width).any()):
        raise HarvestError("attention names (hook_pattern, hook_attn_scores) need contexts of one length: use pack=True")
    per_context = len(kept_positions(width, positions))
    shard_contexts = max(1, shard_rows // per_context)
    n_shards = -(-len(contexts) // shard_contexts)
    rank, world, started = _distributed()
    out = os.fspath(out)
    run = {
        "model": _model_identity(model), "names": names, "positions": positions, "dtype": str(dtype).removeprefix("torch.") if dtype else None,
        "context_size": width, "pack": pack, "prepend_bos": prepend_bos, "batch_size": batch_size,
        "shard_contexts": shard_contexts, "contexts": len(contexts), "tokens": len(contexts.tokens),
        "data": {"source": contexts.source, "sha256": contexts.sha256()},
    }
    bounds = [(s, s * shard_contexts, min((s + 1) * shard_contexts, len(contexts))) for s in range(n_shards)]
    try:
        done = {s for s, _, _ in bounds if os.path.exists(os.path.join(out, shard_file(s)))}  # no rank writes before the next line
        _rank0_then_all(rank, world, lambda: _claim_folder(out, run))
        with open(os.path.join(out, "run.json")) as fh:
            if json.load(fh) != run:  # rank 0 pinned other arguments: this rank was started with other ones
                raise HarvestError(f"rank {rank} got other arguments than rank 0: every rank must run harvest with the same ones")
        manifest_path = os.path.join(out, "manifest.json")
        if len(done) < n_shards or not os.path.exists(manifest_path):
            began = time.perf_counter()
            bar = _progress(progress and rank == 0, len(contexts.tokens), sum(contexts.span(a, b) for s, a, b in bounds if s in done))
            own = [bound for bound in bounds if bound[0] % world == rank and bound[0] not in done]
            _harvest_shards(model, contexts, own, _Collector(names, dtype, shard_contexts * per_context), batch_size, positions, out, bar, world)
            _barrier(world)
            kept = _kept_counts(lengths, positions)
            shards = [{"file": shard_file(s), "contexts": [a, b], "rows": int(kept[a:b].sum())} for s, a, b in bounds]
            last_run = {"seconds": round(time.perf_counter() - began, 3), "tokens": sum(contexts.span(a, b) for s, a, b in bounds if s not in done), "world_size": world}
            _rank0_then_all(rank, world, lambda: _finish(out, run, shards, last_run))
        if saelens and rank == 0:  # the other ranks are released already: they need not wait for it
            from .harvest_read import open_harvest

            open_harvest(out).save_saelens(os.path.join(out, "saelens"))
        with open(manifest_path) as fh:
            return json.load(fh)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _kept_counts(lengths, positions):
    if positions == "all":
        return lengths
    return lengths - 1 if positions == "drop_bos" else torch.ones_like(lengths)


def _harvest_shards(model, contexts, own, collector, batch_size, positions, out, bar, world):
    """Run and write this rank's shards; the bar (rank 0's) counts its tokens times the world size."""
    device = model.get_input_embeddings().weight.device
    on_batch = (lambda n: bar.update(min(n * world, bar.total - bar.n))) if bar else (lambda n: None)
    writer = ShardWriter(_write_error)
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=collector.hooks()):
            for s, first, last in own:
                tensors = _run_shard(model, contexts, collector, first, last, batch_size, positions, device, on_batch)
                writer.save(os.path.join(out, shard_file(s)), tensors)
    finally:
        writer.close()
        if bar:
            bar.close()


def _finish(out, run, shards, last_run):
    """Rank 0, once every rank is done: check the shards, write the manifest."""
    missing = [shard["file"] for shard in shards if not os.path.exists(os.path.join(out, shard["file"]))]
    if missing:
        raise HarvestError(f"shards missing after every rank finished: {missing[:5]}; rerun with the same arguments")
    _write_json(os.path.join(out, "manifest.json"), _manifest(out, run, shards, last_run))


def _write_error(path, exc):
    what = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return HarvestError(
        f"writing {path} failed: {what}. The shards already complete are kept; free space (or fix the folder) and "
        "rerun with the same arguments to resume after them"
    )
