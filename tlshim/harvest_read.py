"""open_harvest: a finished harvest folder as a torch ``Dataset`` of rows, an HF ``datasets.Dataset``, or SAELens's layout."""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import tempfile

import torch

from .harvest_data import require
from .shards import read_shard

INDEX = ("tokens", "sequence", "position")


class Harvest(torch.utils.data.Dataset):
    """The rows of a harvest: ``h[i]`` is a dict of one row per name plus ``tokens``, ``sequence``, ``position``.

    Shards are memory-mapped when first touched; nothing is loaded whole. ``h.manifest`` is the
    folder's manifest, ``h.shard(s)`` the tensors of one shard, ``h.column(name)`` one name over
    every row (that one is loaded).
    """

    def __init__(self, folder):
        self.folder = os.fspath(folder)
        path = os.path.join(self.folder, "manifest.json")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"no manifest.json in {self.folder!r}: not a finished harvest (an interrupted run finishes when rerun with the same arguments)"
            )
        with open(path) as fh:
            self.manifest = json.load(fh)
        self.names = list(self.manifest["names"])
        self._starts = [0]
        for shard in self.manifest["shards"]:
            self._starts.append(self._starts[-1] + shard["rows"])
        self._open: dict = {}

    def __len__(self):
        return self._starts[-1]

    def __getstate__(self):  # DataLoader workers map the shards again rather than receive copies
        return {**self.__dict__, "_open": {}}

    def shard(self, index) -> dict:
        if index not in self._open:
            self._open[index] = read_shard(os.path.join(self.folder, self.manifest["shards"][index]["file"]))
        return self._open[index]

    def __getitem__(self, i) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of a harvest of {len(self)} rows")
        i %= len(self)
        s = bisect.bisect_right(self._starts, i) - 1
        tensors = self.shard(s)
        return {key: tensors[key][i - self._starts[s]] for key in (*self.names, *INDEX)}

    def column(self, name) -> torch.Tensor:
        return torch.cat([self.shard(s)[name] for s in range(len(self.manifest["shards"]))])

    def to_hf(self):
        """An HF ``datasets.Dataset`` over the same rows, zero-copy on the memory-mapped shards.

        A row of a multi-dimensional name is flattened (``manifest["shapes"]`` has its shape);
        ``.with_format("torch")`` gives tensors.
        """
        datasets = require("datasets", "open_harvest(...).to_hf()")
        pa = require("pyarrow", "open_harvest(...).to_hf()")
        # an explicit fingerprint: deriving one would hash (read) every row
        key = hashlib.sha256(json.dumps([os.path.abspath(self.folder), self.manifest], sort_keys=True).encode()).hexdigest()[:16]
        parts = []
        for s in range(len(self.manifest["shards"])):
            tensors = self.shard(s)
            columns = {key: _arrow(pa, tensors[key], key) for key in (*self.names, *INDEX)}
            table = datasets.table.InMemoryTable(pa.table(columns))
            parts.append(datasets.Dataset(table, fingerprint=f"tlshim-harvest-{key}-{s}"))
        return datasets.concatenate_datasets(parts)

    def save_saelens(self, path):
        """Write SAELens's cached-activations layout to ``path``: a ``datasets`` folder with one row per
        context, a column per hook name of shape (positions, d_in) and ``token_ids``, which
        ``sae_lens`` reads as ``cached_activations_path``. Needs contexts of one length."""
        datasets = require("datasets", "the SAELens layout")
        m = self.manifest
        per_context = len(self) // max(m["contexts"], 1)
        if per_context * m["contexts"] != len(self):
            raise ValueError("the SAELens layout needs contexts of one length (pack=True); this harvest's differ")
        for name in self.names:
            if m["dtypes"][name] == "bfloat16":
                raise ValueError(f"{name} is stored as bfloat16, which HF datasets cannot hold: harvest with dtype float32 or float16 for the SAELens layout")
        d_in = {name: int(torch.tensor(m["shapes"][name]).prod()) for name in self.names}
        features = datasets.Features({
            **{name: datasets.Array2D(shape=(per_context, d_in[name]), dtype=m["dtypes"][name]) for name in self.names},
            "token_ids": datasets.Sequence(datasets.Value("int32"), length=per_context),
        })

        def contexts():
            for s in range(len(m["shards"])):
                tensors = self.shard(s)
                for row in range(0, tensors["tokens"].shape[0], per_context):
                    part = slice(row, row + per_context)
                    yield {**{name: tensors[name][part].reshape(per_context, -1).numpy() for name in self.names}, "token_ids": tensors["tokens"][part].numpy()}

        path = os.fspath(path)
        work = tempfile.mkdtemp(prefix=".saelens-", dir=os.path.dirname(os.path.abspath(path)))
        try:
            dataset = datasets.Dataset.from_generator(contexts, features=features, cache_dir=os.path.join(work, "cache"))
            dataset.save_to_disk(os.path.join(work, "out"))
            del dataset
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(os.path.join(work, "out"), path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return path


def _arrow(pa, tensor, name):
    if tensor.dtype == torch.bfloat16:
        raise ValueError(f"{name} is stored as bfloat16, which HF datasets cannot hold: use the torch view (open_harvest(...)[i])")
    flat = tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor
    array = flat.reshape(-1).numpy()
    values = pa.Array.from_buffers(pa.from_numpy_dtype(array.dtype), len(array), [None, pa.py_buffer(array)])
    return pa.FixedSizeListArray.from_arrays(values, flat.shape[1]) if tensor.dim() > 1 else values


def open_harvest(folder) -> Harvest:
    """A finished harvest folder, memory-mapped: a torch ``Dataset`` of rows (``.to_hf()`` for HF datasets).

    >>> h = tlshim.open_harvest("acts/")
    >>> h[0]["blocks.1.hook_resid_post"].shape, len(h), h.manifest["tokens"]
    """
    return Harvest(folder)
