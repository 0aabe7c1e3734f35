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


def write_shard(path, tensors: dict) -> int:
    """Write ``tensors`` to ``path`` through a temporary name, renamed once complete and synced.

    A crash leaves either no file at ``path`` or a complete one; returns the bytes written. On an
    error (a full disk) the temporary file is removed and the error raised.
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
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return 8 + len(text) + offset


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

