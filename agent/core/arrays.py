"""Per-device state arrays, each in an anonymous memory map of its own.

The window ring, the past forecasts and the detector state grow with the device table (x1.5, copying the used
rows). From malloc, the freed smaller arrays stayed in the process's heap, and numpy asks for transparent huge
pages on large arrays, so a row first written made 2 MiB resident. Here a page takes memory only once written,
unused capacity costs nothing, and a replaced array's memory goes back to the system when it is freed.
"""

from __future__ import annotations

import mmap

import numpy as np

_SMALL = 1 << 16  # below this, malloc's arrays are as good and a map per array would only add system calls


def zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.zeros(shape, dtype) backed by a private anonymous map (zero pages until written)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < _SMALL:
        return np.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)  # the array holds the map; freeing it unmaps


def replace(owner, fresh: dict[str, np.ndarray], rows: int) -> None:
    """Put each array of `fresh` on `owner` in place of the attribute of its name, after copying the old array's
    first `rows` rows into it: how the per-device tables grow, copying only the rows in use."""
    for key, array in fresh.items():
        if rows:
            array[:rows] = getattr(owner, key)[:rows]
        setattr(owner, key, array)


def full(shape: tuple[int, ...], value, dtype) -> np.ndarray:
    out = zeros(shape, dtype)
    out.fill(value)
    return out
