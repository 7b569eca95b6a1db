"""The IDX file format of MNIST, Fashion-MNIST, KMNIST and EMNIST, read with numpy, every fault named.

Layout: bytes 0, 0, a type code, ndim; then ndim big-endian uint32 dimensions; then prod(dims)
big-endian elements and nothing after; optionally gzip-compressed (``.gz``). `read_idx` checks the
magic number, the number of dimensions and the exact length, and reads into one buffer without a
second copy; every fault is a one-line ValueError naming the file.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

# IDX type byte -> element dtype (big-endian; 0x08/0x09 are single bytes)
IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_chunks(f, n: int, chunk: int = 1 << 24, first: int = 1 << 26) -> tuple[np.ndarray, int]:
    """Reads the rest of ``f``: (its first ``n`` bytes as a new writable uint8 [<= n] array, total bytes left).

    Reads straight into one buffer that starts at <= ``first`` bytes (64 MiB) and doubles up to ``n``, so a header
    claiming a huge size costs no huge allocation before the file runs out, and a correct file is not copied.
    """
    buf = np.empty(min(n, first), np.uint8)
    got = 0
    while got < n:
        if got == len(buf):
            grown = np.empty(min(n, 2 * len(buf)), np.uint8)
            grown[:got] = buf
            buf = grown
        k = f.readinto(memoryview(buf)[got:min(got + chunk, len(buf))])
        if not k:
            break
        got += k
    total = got
    if got == n:
        while block := f.read(chunk):
            total += len(block)
    return buf[:got], total


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Parses one IDX file (plain or gzip by its ``.gz`` suffix) into an array of shape dims, native byte order.

    Layout: bytes 0, 0, type code (see ``IDX_DTYPES``), ndim; then ndim big-endian uint32 dims; then
    prod(dims) big-endian elements, nothing after. Raises ValueError naming ``path`` when the magic number,
    ``ndim``, the length or the gzip stream is wrong.
    """
    kind = "an images" if ndim == 3 else "a labels"
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            magic = f.read(4)
            if len(magic) < 4:
                raise ValueError(f"IDX file {path!r} is {len(magic)} bytes long, shorter than the 4-byte IDX header; "
                                 f"the file is truncated or empty, re-download it")
            if magic[:2] == b"\x1f\x8b":
                raise ValueError(f"IDX file {path!r} is gzip-compressed but not named .gz; rename it to "
                                 f"{os.path.basename(path)}.gz or gunzip it")
            if magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES:
                raise ValueError(f"IDX file {path!r} does not start with an IDX magic number (00 00 <type> <ndim>, "
                                 f"type one of {', '.join(f'{c:02x}' for c in IDX_DTYPES)}); got {magic.hex(' ')}")
            if magic[3] != ndim:
                raise ValueError(f"IDX file {path!r} has {magic[3]} dimensions but {kind} file needs {ndim} "
                                 f"({'[n, rows, cols]' if ndim == 3 else '[n]'}); check the file is the right one")
            dtype = IDX_DTYPES[magic[2]]
            raw_dims = f.read(4 * ndim)
            header = 4 + len(raw_dims)
            if len(raw_dims) < 4 * ndim:
                raise ValueError(f"IDX file {path!r} is {header} bytes long, shorter than its {4 + 4 * ndim}-byte "
                                 f"header; the file is truncated, re-download it")
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, ">u4"))
            need = math.prod(dims) * dtype.itemsize
            payload, have = read_chunks(f, need)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"IDX file {path!r} is not a valid gzip file ({type(exc).__name__}: {exc}); "
                         f"re-download it") from exc
    except OSError as exc:
        raise ValueError(f"IDX file {path!r} cannot be read ({type(exc).__name__}: {exc})") from exc
    if have != need:
        what = "truncated" if have < need else "followed by trailing bytes"
        raise ValueError(f"IDX file {path!r} has {header + have} bytes but its header (shape {dims}, {dtype.name}) "
                         f"needs exactly {header + need}; the file is {what}, re-download it")
    arr = payload.view(dtype).reshape(dims)
    return arr if dtype.byteorder in ("=", "|") else arr.astype(dtype.newbyteorder("="))


def images_from_idx(arr: np.ndarray, path: str) -> np.ndarray:
    """IDX images [n, h, w] -> [n, h, w, 1]: uint8 kept as is (no copy); float32 when float in [0, 1]; else error."""
    if arr.dtype == np.uint8:
        return arr[..., None]
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:  # NaN compares False and is reported by _check_arrays
            raise ValueError(f"IDX file {path!r} holds {arr.dtype.name} images in [{lo}, {hi}]; float images must "
                             f"lie in [0, 1] (rescale them, or store uint8 0..255)")
        return arr.astype(np.float32, copy=False)[..., None]
    raise ValueError(f"IDX file {path!r} holds {arr.dtype.name} images; distill_jax takes uint8 (0..255) or float "
                     f"(0..1) images, so convert it to uint8 (type code 0x08)")
