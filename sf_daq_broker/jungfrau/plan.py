"""The kernel's schedule: the index image cut into runs ("segments") grouped into tasks.

Following ``Layout.source`` pixel by pixel would cost an index load per pixel and defeat
vectorisation. Instead each output row is cut into runs that are either empty (written as 0) or
read the raw frame with a constant stride: +1 for unrotated modules, -1 for half turns, +-1024
for quarter turns (a column of the raw module).

Runs of quarter-turned modules in consecutive output rows read neighbouring raw columns; they
are grouped into *tiles* of up to 64 output rows by 256 output columns (a chip's height), which
the kernel transposes 8 x 8 values at a time in vector registers (``transpose8``) into a small
buffer and then converts like a plain run. Tiles reading 128 contiguous bytes of each raw row
with rows of 256 values to convert measured fastest on the development machine among shapes
from 32 x 256 to 256 x 32: narrow tiles read 64 bytes per 2 KiB raw row, which the hardware
prefetches poorly, and short output rows leave the conversion's vector loop in its scalar
remainder. A tile's constants (~400 KB) stay in L2 cache while the kernel runs through every
frame of the batch, two frames per pass (each pixel's constants loaded once for both).

A task is either a band of consecutive output rows (the plain, reversed and empty runs in it)
or one tile. Tasks never write the same output pixels, so they run in parallel without locks,
and each keeps its calibration constants in cache while the kernel runs through all frames of
a batch. Tasks are ordered by where their output starts, so that bands (cheap when they are
mostly gaps) and tiles interleave and the threads' shares of a batch are alike.

One record per run or tile, ``int64[8]``: OUT (flat output offset), LENGTH, SRC (flat raw
offset, -1 = empty), STRIDE, COUNT (rows of a tile, 1 for a run), SRC_STEP and OUT_STEP
(offsets between the rows of a tile), PAD (zeros written after each row of a tile: the empty
run that follows it, see ``_absorb_gaps``). A task's records are
``task_start[t]:task_start[t+1]``; a tile task has exactly one record, with COUNT > 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

OUT, LENGTH, SRC, STRIDE, COUNT, SRC_STEP, OUT_STEP, PAD = range(8)
FIELDS = 8

#: Output rows per band task: many tasks for two threads, and the constants of a band
#: (25 bytes per pixel) fit in L2 cache.
ROWS_PER_TASK = 32
#: Rows of a tile (output rows = raw columns read together: 128 contiguous bytes per raw row).
MAX_BLOCK = 64
#: Output columns of a tile (raw rows; a chip's height): the tile's buffer, 64 x 256 uint16,
#: is 32 KiB, and its output rows are long enough for the conversion's vector loop.
TILE_LENGTH = 256


@dataclass(frozen=True)
class Plan:
    records: npt.NDArray[np.int64]  # (n_records, FIELDS), ordered by task
    task_start: npt.NDArray[np.int64]  # (n_tasks + 1,): records of task t
    scratch_size: int  # uint16 elements of the transpose buffer a task needs


def build_plan(
    source: npt.NDArray[np.int64],
    rows_per_task: int = ROWS_PER_TASK,
    max_block: int = MAX_BLOCK,
    tile_length: int = TILE_LENGTH,
) -> Plan:
    """Cut ``source`` (output rows x columns, raw index or -1) into runs, tiles and tasks."""
    height, width = source.shape
    starts, lengths, src, stride = _runs(source)
    records = np.zeros((starts.size, FIELDS), dtype=np.int64)
    records[:, OUT] = starts
    records[:, LENGTH] = lengths
    records[:, SRC] = src
    records[:, STRIDE] = stride
    records[:, COUNT] = 1
    block_heads, block_members = _blocks(records, width, max_block)
    keep = np.ones(starts.size, dtype=bool)
    keep[block_members] = False
    for head, count, src_step in block_heads:
        records[head, COUNT] = count
        records[head, SRC_STEP] = src_step
        records[head, OUT_STEP] = width
    keep[[head for head, _, _ in block_heads]] = True
    records = records[keep]
    tiled = records[:, COUNT] > 1
    runs, tiles = _absorb_gaps(records[~tiled], _split(records[tiled], tile_length))
    # Tasks in the order of their first output pixel: a band's first row, a tile's corner.
    band_keys = runs[:, OUT] // width // rows_per_task * rows_per_task * width
    keys = np.concatenate([band_keys, tiles[:, OUT]])
    is_tile = np.concatenate([np.zeros(len(runs), bool), np.ones(len(tiles), bool)])
    records = np.concatenate([runs, tiles])
    # One task per band (all its runs) and one per tile (a negative id of its own).
    task_of = np.where(is_tile, -1 - np.arange(len(records)), keys)
    order = np.lexsort((records[:, OUT], task_of, keys))
    records, task_of = records[order], task_of[order]
    new_task = np.ones(len(records), dtype=bool)
    new_task[1:] = task_of[1:] != task_of[:-1]
    task_start = np.append(np.flatnonzero(new_task), len(records)).astype(np.int64)
    gathered = records[(records[:, SRC] >= 0) & (records[:, STRIDE] != 1)]
    scratch = int((gathered[:, COUNT] * gathered[:, LENGTH]).max(initial=1))
    # Every output pixel is written exactly once.
    assert int(((records[:, LENGTH] + records[:, PAD]) * records[:, COUNT]).sum()) == height * width
    return Plan(records=np.ascontiguousarray(records), task_start=task_start, scratch_size=scratch)


def _split(tiles: npt.NDArray[np.int64], tile_length: int) -> npt.NDArray[np.int64]:
    """Cut each block of runs along its length into tiles of ``tile_length`` columns."""
    pieces = []
    for record in tiles:
        for offset in range(0, int(record[LENGTH]), tile_length):
            piece = record.copy()
            piece[OUT] += offset
            piece[LENGTH] = min(tile_length, int(record[LENGTH]) - offset)
            piece[SRC] += offset * record[STRIDE]
            pieces.append(piece)
    return np.asarray(pieces, dtype=np.int64).reshape(-1, FIELDS)


def _absorb_gaps(
    runs: npt.NDArray[np.int64], tiles: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Give a tile the empty runs (chip gaps, space between modules) that follow its rows.

    A quarter-turned detector has about four short empty runs per output row, each next to a
    tile's row. Written by a band task, each costs a cache line fetched from memory again,
    which the tile's task has just written: ~10 % of the kernel's time on JF06T04. The tile's
    task writes them (PAD zeros after each row) while the line is in cache. Only a run of the
    same length after every row of the tile is taken.
    """
    empty = runs[runs[:, SRC] < 0]
    if not len(empty):
        return runs, tiles
    starts = empty[:, OUT]  # ordered: runs come in output order
    taken = np.zeros(len(empty), dtype=bool)
    for tile in tiles:
        after = tile[OUT] + tile[LENGTH] + tile[OUT_STEP] * np.arange(tile[COUNT])
        at = np.minimum(np.searchsorted(starts, after), len(empty) - 1)
        lengths = empty[at, LENGTH]
        if (starts[at] == after).all() and (lengths == lengths[0]).all():
            tile[PAD] = lengths[0]
            taken[at] = True
    return np.concatenate([runs[runs[:, SRC] >= 0], empty[~taken]]), tiles


def _runs(
    source: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], ...]:
    """Maximal runs of each row that are empty or read with one constant stride."""
    height, width = source.shape
    valid = source >= 0
    step = np.diff(source, axis=1)
    both_valid = valid[:, 1:] & valid[:, :-1]
    both_empty = ~valid[:, 1:] & ~valid[:, :-1]
    start = np.ones_like(valid)
    start[:, 1:] = ~(both_valid | both_empty)
    # A pixel also starts a run where the stride changes (module edges that touch).
    start[:, 2:] |= both_valid[:, 1:] & both_valid[:, :-1] & (step[:, 1:] != step[:, :-1])
    starts = np.flatnonzero(start.ravel()).astype(np.int64)
    lengths = np.diff(np.append(starts, height * width))
    flat = source.ravel()
    src = flat[starts]
    following = flat[np.minimum(starts + 1, flat.size - 1)]
    stride = np.where(src < 0, 0, np.where(lengths > 1, following - src, 1))
    src = np.where(src < 0, -1, src)
    return starts, lengths, src, stride


def _blocks(
    records: npt.NDArray[np.int64], width: int, max_block: int
) -> tuple[list[tuple[int, int, int]], npt.NDArray[np.int64]]:
    """Group strided runs of consecutive output rows that read neighbouring raw columns.

    Returns (head index, rows, raw step between rows) per block, and the indices of the runs
    absorbed into a block (not the heads).
    """
    strided = np.flatnonzero(
        (records[:, SRC] >= 0) & (records[:, LENGTH] > 1) & (np.abs(records[:, STRIDE]) != 1)
    )
    columns = records[strided, OUT] % width
    rows = records[strided, OUT] // width
    order = np.lexsort((rows, records[strided, STRIDE], records[strided, LENGTH], columns))
    heads: list[tuple[int, int, int]] = []
    members: list[int] = []
    head = -1
    count = 0
    src_step = 0
    previous = -1
    for index in strided[order].tolist():
        if (
            head >= 0
            and count < max_block
            and _continues(records, width, previous, index, count, src_step)
        ):
            if count == 1:
                src_step = int(records[index, SRC] - records[previous, SRC])
            members.append(index)
            count += 1
        else:
            if head >= 0:
                heads.append((head, count, src_step))
            head, count, src_step = index, 1, 0
        previous = index
    if head >= 0:
        heads.append((head, count, src_step))
    return heads, np.asarray(members, dtype=np.int64)


def _continues(
    records: npt.NDArray[np.int64],
    width: int,
    previous: int,
    index: int,
    count: int,
    src_step: int,
) -> bool:
    a, b = records[previous], records[index]
    if b[OUT] - a[OUT] != width:
        return False
    if (a[LENGTH], a[STRIDE]) != (b[LENGTH], b[STRIDE]):
        return False
    step = int(b[SRC] - a[SRC])
    return step != 0 and (count == 1 or step == src_step)
