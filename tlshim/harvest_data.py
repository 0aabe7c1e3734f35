"""The contexts a harvest runs: documents from a file, a ``datasets`` dataset or token ids, tokenized and packed.

Packing follows SAELens's activations store: documents are tokenized without special tokens and
joined into one stream, BOS between documents; each context is BOS followed by the next
``context_size - 1`` tokens of the stream (a separator that would follow the context's own BOS is
skipped); the tail shorter than a context is dropped. Unpacked, each document is its own context:
BOS and its first ``context_size - 1`` tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from dataclasses import dataclass

import torch

EXTRA = "pip install 'tlshim[harvest]'"


def require(module: str, what: str):
    """Import an optional dependency of the harvest, or say which extra brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs the {module!r} package, which is not installed: {EXTRA}") from exc


@dataclass
class Contexts:
    """Every context as one flat token tensor and the offsets where each context starts (n + 1 of them)."""

    tokens: torch.Tensor
    offsets: torch.Tensor
    source: str

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i) -> torch.Tensor:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def length(self, i) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def span(self, first, last) -> int:
        """Tokens in contexts ``first .. last - 1``."""
        return int(self.offsets[last] - self.offsets[first])

    def sha256(self) -> str:
        digest = hashlib.sha256(self.offsets.numpy().tobytes())
        digest.update(self.tokens.numpy().tobytes())
        return digest.hexdigest()


def _is_datasets_object(data) -> bool:
    return type(data).__module__.split(".")[0] == "datasets"


def _rows_to_documents(rows, text_column):
    for row in rows:
        if text_column in row:
            yield row[text_column]
        elif "input_ids" in row or "tokens" in row:
            yield list(row["input_ids"] if "input_ids" in row else row["tokens"])
        else:
            raise ValueError(f"a data row has no {text_column!r} column (it has {sorted(row)}): pass text_column=... (--text-column) naming the text, or give 'input_ids'")


def _split(dataset, split):
    if type(dataset).__name__.endswith("DatasetDict"):
        if split is None:
            raise ValueError(f"the dataset has splits {sorted(dataset)}: pick one with split=... (--split)")
        return dataset[split]
    return dataset


def _lines(path):
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield line.rstrip("\n")


def _documents(data, text_column, split):
    """(documents, source): documents are strings or lists of token ids."""
    if _is_datasets_object(data):
        return _rows_to_documents(_split(data, split), text_column), f"datasets object {getattr(data, '_fingerprint', type(data).__name__)}"
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if os.path.isdir(path):
            datasets = require("datasets", "reading a dataset folder")
            if any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
                dataset = datasets.load_from_disk(path)
            else:
                dataset = datasets.load_dataset(path, split=split or "train")
            return _rows_to_documents(_split(dataset, split), text_column), f"dataset folder {os.path.abspath(path)}"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no data at {path!r}: give a text file (one document a line), a .jsonl file, a dataset folder, or token ids")
        lines = _lines(path)
        if path.endswith((".jsonl", ".json")):
            return _rows_to_documents(map(json.loads, lines), text_column), f"jsonl file {os.path.abspath(path)}"
        return lines, f"text file {os.path.abspath(path)}"
    if isinstance(data, (list, tuple)):
        return iter(data), f"list of {len(data)} documents"
    raise TypeError(f"harvest data of type {type(data).__name__}: give a path, a datasets Dataset, a list of strings or token-id lists, or a 2-D tensor of token ids")


def _token_documents(documents, tokenizer, chunk=1000):
    """Token ids of each document, texts tokenized in chunks (fast tokenizers batch them)."""
    pending = []

    def flush():
        if pending:
            if tokenizer is None:
                raise ValueError("text data needs a tokenizer: install the model with tokenizer=tok or pass tokenizer=...")
            yield from tokenizer(pending, add_special_tokens=False)["input_ids"]
            pending.clear()

    for doc in documents:
        if isinstance(doc, str):
            pending.append(doc)
            if len(pending) >= chunk:
                yield from flush()
        else:
            yield from flush()
            yield [int(t) for t in doc]
    yield from flush()


def build_contexts(data, tokenizer=None, context_size=128, pack=True, prepend_bos=True, text_column="text", split=None, max_contexts=None) -> Contexts:
    """The contexts of ``data``; a 2-D tensor of token ids is taken as the contexts themselves."""
    if torch.is_tensor(data):
        if data.dim() != 2:
            raise ValueError(f"token ids as a tensor must be 2-D (contexts, positions); got shape {tuple(data.shape)}")
        data = data[:max_contexts] if max_contexts is not None else data
        offsets = torch.arange(0, data.numel() + 1, max(data.shape[1], 1), dtype=torch.long)[: data.shape[0] + 1]
        return Contexts(data.reshape(-1).long().clone(), offsets, f"tensor of token ids {tuple(data.shape)}")
    if context_size < 2 and prepend_bos:
        raise ValueError(f"context_size {context_size} leaves no room after BOS: use 2 or more")
    bos = None
    if prepend_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError("prepend_bos needs the tokenizer's bos_token_id (it has none): pass prepend_bos=False (--no-bos)")
    documents, source = _documents(data, text_column, split)
    tokens, offsets = array("q"), array("q", [0])
    body = context_size - (bos is not None)
    stream = array("q")

    def emit(ids):
        if bos is not None:
            tokens.append(bos)
        tokens.extend(ids)
        offsets.append(len(tokens))

    for ids in _token_documents(documents, tokenizer):
        if max_contexts is not None and len(offsets) - 1 >= max_contexts:
            break
        if not pack:
            if ids:
                emit(ids[:body])
            continue
        if bos is not None and len(stream):
            stream.append(bos)
        stream.extend(ids)
        start = 0
        while True:
            if bos is not None and start < len(stream) and stream[start] == bos:
                start += 1  # no separator right after a context's own BOS
            if len(stream) - start < body or (max_contexts is not None and len(offsets) - 1 >= max_contexts):
                break
            emit(stream[start : start + body])
            start += body
        del stream[:start]
    return Contexts(torch.frombuffer(tokens, dtype=torch.long).clone() if tokens else torch.empty(0, dtype=torch.long),
                    torch.frombuffer(offsets, dtype=torch.long).clone(), source)
