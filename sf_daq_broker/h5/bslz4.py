"""Bitshuffle+LZ4 chunks written directly (JUNGFRAU.md §8), and datasets that declare them.

A chunk is ``uint64 BE uncompressed bytes`` + ``uint32 BE block bytes`` +
``bitshuffle.compress_lz4(frame, 32768)``: byte for byte what the HDF5 filter 32008 produces
with ``hdf5plugin.Bitshuffle(nelems=32768, cname="lz4")``, so readers only need
``import hdf5plugin``. Compressing ourselves lets a batch be compressed on several threads
(``compress_lz4`` releases the GIL) instead of inside HDF5's single-threaded filter pipeline.

``compress_chunk_into`` calls the ``bitshuffle`` package's own C function
(``bshuf_compress_lz4``, the one ``compress_lz4`` wraps, so the bytes are the same) through
ctypes, straight into a caller's reusable buffer after the 12-byte header. Measured on the
2-core machine with float32 frames, the Python wrapper's fresh output array plus the copy into
a chunk with its header cost ~15 % of the compression time (first-touch page faults of new
9-17 MB arrays, one more pass over the data); where the C symbol is not exported the wrapper is
used and the result copied.

The dataset must declare the filter with cd_values ``(0, 5, itemsize, 32768, 2)``: bitshuffle
format 0.5 (the ``bitshuffle`` package that compresses the chunks), element size, block size in
elements, 2 = LZ4. HDF5 lets a registered filter rewrite cd_values when a dataset is created,
and hdf5plugin's copy stamps its own version, 0.4. So the dataset is created while a copy of
hdf5plugin's filter class *without* that hook is registered, and the original is registered
again right after, all under h5py's global lock so no other h5py call sees the swap. (HDF5
replaces a registered filter in place; nothing is unregistered, which HDF5 would refuse while
any file using the filter is open.) Where that is impossible (another HDF5 build, no
/proc/self/maps) the dataset is created through hdf5plugin, with its cd_values, and a warning
is logged once; the chunks and the data read back are the same either way.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import bitshuffle
import bitshuffle.ext
import h5py
import hdf5plugin
import numpy as np
import numpy.typing as npt
from h5py._objects import phil

log = logging.getLogger(__name__)

FILTER_ID = 32008
BLOCK_ELEMENTS = 32768
LZ4 = 2
FORMAT_VERSION = (0, 5)
HEADER = struct.Struct(">QI")  # uncompressed bytes, block bytes (big-endian)


def cd_values(itemsize: int) -> tuple[int, ...]:
    return (*FORMAT_VERSION, itemsize, BLOCK_ELEMENTS, LZ4)


def compress_chunk(frame: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """One HDF5 chunk (header included) holding ``frame`` bitshuffle+LZ4 compressed.

    Returned as a uint8 array (``write_direct_chunk`` takes any buffer; ``bytes(chunk)`` for
    comparisons). A worker compressing many frames reuses buffers: ``compress_chunk_into``.
    """
    frame = np.ascontiguousarray(frame)
    return compress_chunk_into(frame, np.empty(chunk_bound(frame), dtype=np.uint8))


def chunk_bound(frame: npt.NDArray[Any]) -> int:
    """Bytes a chunk of ``frame`` (header included) may need at most."""
    elements, itemsize = frame.size, frame.itemsize
    native = _native()
    if native is not None:
        return HEADER.size + int(native[1](elements, itemsize, BLOCK_ELEMENTS))
    # LZ4's worst case per block plus bitshuffle's 4-byte block headers, generously.
    blocks = -(-elements // BLOCK_ELEMENTS)
    return HEADER.size + frame.nbytes + blocks * (4 + BLOCK_ELEMENTS * itemsize // 255 + 16) + 64


def compress_chunk_into(
    frame: npt.NDArray[Any], buffer: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    """Compress ``frame`` (C-contiguous) into ``buffer`` (at least ``chunk_bound(frame)``
    bytes); returns the chunk, a view of ``buffer``."""
    if not frame.flags.c_contiguous:
        raise ValueError("frame must be C-contiguous")
    if buffer.size < chunk_bound(frame):
        raise ValueError(f"buffer of {buffer.size} bytes is smaller than the chunk bound")
    HEADER.pack_into(buffer.data, 0, frame.nbytes, BLOCK_ELEMENTS * frame.itemsize)
    native = _native()
    if native is None:
        compressed = bitshuffle.compress_lz4(frame, BLOCK_ELEMENTS)
        buffer[HEADER.size : HEADER.size + compressed.size] = compressed
        return buffer[: HEADER.size + compressed.size]
    written = native[0](
        frame.ctypes.data,
        buffer.ctypes.data + HEADER.size,
        frame.size,
        frame.itemsize,
        BLOCK_ELEMENTS,
    )
    if written < 0:
        raise RuntimeError(f"bitshuffle+LZ4 compression failed (error {written})")
    return buffer[: HEADER.size + written]


@functools.cache
def _native() -> tuple[Any, Any] | None:
    """``bshuf_compress_lz4`` and ``bshuf_compress_lz4_bound`` of the bitshuffle package."""
    try:
        library = ctypes.CDLL(bitshuffle.ext.__file__)
        compress = library.bshuf_compress_lz4
        bound = library.bshuf_compress_lz4_bound
    except (OSError, AttributeError) as exc:
        log.warning("bitshuffle's C functions are not reachable (%s): using its wrapper", exc)
        return None
    compress.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_size_t] * 3
    compress.restype = ctypes.c_int64
    bound.argtypes = [ctypes.c_size_t] * 3
    bound.restype = ctypes.c_size_t
    return compress, bound


def create_dataset(
    group: h5py.Group,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    chunks: tuple[int, ...],
    maxshape: tuple[int | None, ...] | None = None,
) -> h5py.Dataset:
    """A chunked dataset declaring filter 32008 with ``cd_values(itemsize)``."""
    options = cd_values(np.dtype(dtype).itemsize)
    with _without_set_local() as stamped:
        filter_options: Mapping[str, Any] = (
            {"compression": FILTER_ID, "compression_opts": options}
            if stamped
            else hdf5plugin.Bitshuffle(nelems=BLOCK_ELEMENTS, cname="lz4")
        )
        return group.create_dataset(
            name, shape=shape, dtype=dtype, chunks=chunks, maxshape=maxshape, **filter_options
        )


class _FilterClass(ctypes.Structure):
    """HDF5's ``H5Z_class2_t``."""

    _fields_ = [
        ("version", ctypes.c_int),
        ("id", ctypes.c_int),
        ("encoder_present", ctypes.c_uint),
        ("decoder_present", ctypes.c_uint),
        ("name", ctypes.c_char_p),
        ("can_apply", ctypes.c_void_p),
        ("set_local", ctypes.c_void_p),
        ("filter", ctypes.c_void_p),
    ]


@contextmanager
def _without_set_local() -> Iterator[bool]:
    """Inside: filter 32008 keeps cd_values as given. Yields False if that cannot be arranged."""
    swap = _filter_swap()
    if swap is None:
        yield False
        return
    register, original, stamped = swap
    with phil:
        if register(ctypes.byref(stamped)) < 0:
            yield False
            return
        try:
            yield True
        finally:
            register(original)


@functools.cache
def _filter_swap() -> tuple[Any, Any, _FilterClass] | None:
    """(H5Zregister, hdf5plugin's class, its copy without set_local), or None."""
    try:
        library = _loaded_hdf5_library()
        plugin_path = hdf5plugin.get_config().registered_filters["bshuf"]
        plugin = ctypes.CDLL(plugin_path)
        plugin.H5PLget_plugin_info.restype = ctypes.POINTER(_FilterClass)
        original = plugin.H5PLget_plugin_info()
        if original.contents.id != FILTER_ID:
            raise RuntimeError(f"{plugin_path} is not filter {FILTER_ID}")
        stamped = _FilterClass()
        ctypes.pointer(stamped)[0] = original.contents
        stamped.set_local = None
        register = ctypes.CDLL(library, mode=os.RTLD_NOLOAD | os.RTLD_NOW).H5Zregister
        register.argtypes = [ctypes.c_void_p]
        register.restype = ctypes.c_int
    except (OSError, KeyError, AttributeError, RuntimeError) as exc:
        log.warning(
            "bitshuffle datasets get hdf5plugin's cd_values (%s); the data are unaffected", exc
        )
        return None
    return register, original, stamped


def _loaded_hdf5_library() -> str:
    """Path of the HDF5 library h5py uses (already loaded into this process)."""
    h5py.h5.get_libversion()  # make sure it is loaded
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            path = line.rsplit(" ", 1)[-1].strip()
            base = os.path.basename(path)
            if base.startswith("libhdf5") and ".so" in base and not base.startswith("libhdf5_"):
                return path
    raise OSError("the HDF5 library of h5py is not in /proc/self/maps")
