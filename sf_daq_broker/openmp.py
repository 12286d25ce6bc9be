"""How many OpenMP threads a pipeline stage may start: the thread policy of the workers.

Two libraries bring an OpenMP runtime into a worker: the ``bitshuffle`` wheel (its own
``libgomp``: every ``bshuf_*`` call opens a parallel region over the value's 8 KiB blocks) and
numba (the Jungfrau kernel's ``prange``, numba's threading layer). Each runtime starts as many
threads as there are cores *per calling thread*, and idle OpenMP threads spin before they sleep.
On the 2-core machine an api/1 job decoding compressed waveforms in one thread while another
thread writes HDF5 therefore ran three to four busy threads on two cores, and every value of a
few KiB paid a fork/join of a thread team. Measured (``bench/README.md``, "OpenMP threads"):
one ``bitshuffle.decompress_lz4`` of a 1 KiB waveform took 65-160 µs with the default two
threads, 6 µs single-threaded; the whole 60 000-pulse BSDATA job 1.2-4.6x longer with the
default than with ``OMP_NUM_THREADS=1`` when the machine was busy.

The policy, per stage (a stage is one thread of a pipeline):

- **api/1 decoding** (the event loop: values of a few KiB, one bitshuffle block each) runs
  bitshuffle single-threaded (``single_threaded()``): a value has no parallelism to offer, and
  the second core belongs to the other stage (the HDF5 writer thread), not to a spinning team.
- **Bulk compression** of large frames (the detector writer, several blocks of 32 K elements
  per frame) parallelises over frames on its own pool of threads, each of which should then
  also run single-threaded inside bitshuffle; numba's kernel takes ``numba.set_num_threads``.

OpenMP's thread count is a per-thread setting (the calling thread's ``nthreads-var``), so a
stage limits only itself, never another stage or library user in the process; the limit is
set and restored around each bulk call through ``threadpoolctl`` (~5 µs), which finds every
OpenMP runtime loaded in the process (bitshuffle's bundled ``libgomp`` here; others on other
builds). ``OMP_NUM_THREADS`` in the environment still sets every thread's default.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import bitshuffle.ext  # noqa: F401 - loaded first, so its OpenMP runtime is found
from threadpoolctl import ThreadpoolController


@functools.cache
def _openmp() -> ThreadpoolController:
    """The OpenMP runtimes loaded when first asked (bitshuffle's is loaded by this module)."""
    return ThreadpoolController().select(internal_api="openmp")


@contextmanager
def single_threaded() -> Iterator[None]:
    """Inside, OpenMP code called from *this thread* runs on this thread alone."""
    with _openmp().limit(limits=1):
        yield
