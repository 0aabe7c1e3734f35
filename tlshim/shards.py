"""Safetensors shard files, written atomically from preallocated buffers and read back memory-mapped.

safetensors' own ``save_file`` copies every tensor into a bytes object first; writing the buffers
straight to the file keeps a harvest's peak memory at one shard buffer. The layout is the
safetensors format (``safetensors.safe_open`` reads these files), each tensor placed at an offset
aligned to its element size (tensors are written largest element first) so a reader can map it.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import torch

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
TORCH_DTYPES = {code: dtype for dtype, code in DTYPES.items()}


def write_temporary(path, tensors: dict) -> str:
    """Write ``tensors`` as a safetensors file beside ``path``, under a temporary name, and return that name.

    The bytes reach the page cache, not yet the disk (``commit`` syncs and renames); on an error (a
    full disk) the temporary file is removed and the error raised.
    """
    order = sorted(tensors, key=lambda name: -tensors[name].element_size())
    header, offset = {}, 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-aligned
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(text)))
            fh.write(text)
            for name in order:
                flat = tensors[name].detach().reshape(-1).contiguous().cpu()
                if flat.numel():
                    fh.write(memoryview(flat.view(torch.uint8).numpy()))
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def commit(tmp, path):
    """Sync the temporary file to disk, then rename it to ``path``: a crash leaves no file there or a complete one."""
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp):
    if os.path.exists(tmp):
        os.remove(tmp)


class ShardWriter:
    """Writes shard files one after another; a file's sync and rename run on a thread while the caller
    computes the next shard. Its bytes are written (copied to the page cache) before ``save`` returns,
    so the caller may refill its buffers at once. One commit in flight: an error of the previous one is
    raised (through ``error(path, exc)``) before the next file is started."""

    def __init__(self, error):
        from concurrent.futures import ThreadPoolExecutor

        self.error, self.pool, self.pending = error, ThreadPoolExecutor(1, thread_name_prefix="tlshim-shards"), None

    def save(self, path, tensors):
        self.wait()
        try:
            tmp = write_temporary(path, tensors)
        except OSError as exc:
            raise self.error(path, exc) from exc
        self.pending = (path, self.pool.submit(commit, tmp, path))

    def wait(self):
        if self.pending is not None:
            (path, future), self.pending = self.pending, None
            try:
                future.result()
            except OSError as exc:
                raise self.error(path, exc) from exc

    def close(self):
        try:
            self.wait()
        finally:
            self.pool.shutdown()


def read_shard(path) -> dict:
    """The tensors of a shard file, memory-mapped (nothing is read until used).

    A private (copy-on-write) mapping: writing into a returned tensor never changes the file.
    """
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if os.fstat(fh.fileno()).st_size > 8 + length else None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = TORCH_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            out[name] = torch.empty(info["shape"], dtype=dtype)
        else:
            out[name] = torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + length + begin).view(info["shape"])
    return out

