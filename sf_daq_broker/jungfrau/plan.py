"""The kernel's schedule: the index image cut into runs ("segments") grouped into tasks.

Following ``Layout.source`` pixel by pixel would cost an index load per pixel and defeat
vectorisation. Instead each output row is cut into runs that are either empty (written as 0) or
read the raw frame with a constant stride: +1 for unrotated modules, -1 for half turns, +-1024
for quarter turns (a column of the raw module). Runs of quarter-turned modules in consecutive
output rows read neighbouring raw columns; they are grouped into *blocks* that the kernel first
transposes into a small buffer, reading the raw frame along its rows. That is still the slowest
case (about a quarter of the speed of straight modules): raw rows are 2 KiB apart, which
hardware prefetchers serve poorly.

A task is a band of consecutive output rows: its outputs never overlap another task's, so tasks
run in parallel without locks, and its calibration constants stay in cache while the kernel
runs through all frames of a batch.

One record per run or block, ``int64[7]``: OUT (flat output offset), LENGTH, SRC (flat raw
offset, -1 = empty), STRIDE, COUNT (rows of a block, 1 for a plain run), SRC_STEP and OUT_STEP
(offsets between the rows of a block).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

OUT, LENGTH, SRC, STRIDE, COUNT, SRC_STEP, OUT_STEP = range(7)
FIELDS = 7

#: Output rows per task: many tasks for two threads, the constants of a band fit in L2 cache,
#: and a band of a quarter-turned module reads whole 64-byte lines of 32 raw columns.
ROWS_PER_TASK = 32
#: Longest block (rows transposed together): 32 uint16 columns = one 64-byte cache line.
MAX_BLOCK = 32


@dataclass(frozen=True)
class Plan:
    records: npt.NDArray[np.int64]  # (n_records, FIELDS), ordered by task
    task_start: npt.NDArray[np.int64]  # (n_tasks + 1,): records of task t
    scratch_size: int  # uint16 elements of the transpose buffer a task needs


def build_plan(
    source: npt.NDArray[np.int64], rows_per_task: int = ROWS_PER_TASK, max_block: int = MAX_BLOCK
) -> Plan:
    """Cut ``source`` (output rows x columns, raw index or -1) into runs, blocks and tasks."""
    height, width = source.shape
    starts, lengths, src, stride = _runs(source)
    rows = starts // width
    tasks = rows // rows_per_task
    records = np.zeros((starts.size, FIELDS), dtype=np.int64)
    records[:, OUT] = starts
    records[:, LENGTH] = lengths
    records[:, SRC] = src
    records[:, STRIDE] = stride
    records[:, COUNT] = 1
    block_heads, block_members = _blocks(records, tasks, width, max_block)
    keep = np.ones(starts.size, dtype=bool)
    keep[block_members] = False
    for head, count, src_step in block_heads:
        records[head, COUNT] = count
        records[head, SRC_STEP] = src_step
        records[head, OUT_STEP] = width
        keep[head] = True
    records, tasks = records[keep], tasks[keep]
    order = np.lexsort((records[:, OUT], tasks))
    records, tasks = records[order], tasks[order]
    n_tasks = (height + rows_per_task - 1) // rows_per_task
    task_start = np.searchsorted(tasks, np.arange(n_tasks + 1)).astype(np.int64)
    blocked = records[records[:, SRC] >= 0]
    scratch = int((blocked[:, COUNT] * blocked[:, LENGTH]).max(initial=1))
    # Every output pixel is written exactly once.
    assert int((records[:, LENGTH] * records[:, COUNT]).sum()) == height * width
    return Plan(records=np.ascontiguousarray(records), task_start=task_start, scratch_size=scratch)


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
    records: npt.NDArray[np.int64], tasks: npt.NDArray[np.int64], width: int, max_block: int
) -> tuple[list[tuple[int, int, int]], npt.NDArray[np.int64]]:
    """Group strided runs of consecutive rows of one task that read neighbouring raw columns.

    Returns (head index, rows, raw step between rows) per block, and the indices of the runs
    absorbed into a block (not the heads).
    """
    strided = np.flatnonzero(
        (records[:, SRC] >= 0) & (records[:, LENGTH] > 1) & (np.abs(records[:, STRIDE]) != 1)
    )
    columns = records[strided, OUT] % width
    rows = records[strided, OUT] // width
    order = np.lexsort(
        (rows, records[strided, STRIDE], records[strided, LENGTH], columns, tasks[strided])
    )
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
            and _continues(records, tasks, width, previous, index, count, src_step)
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
    tasks: npt.NDArray[np.int64],
    width: int,
    previous: int,
    index: int,
    count: int,
    src_step: int,
) -> bool:
    a, b = records[previous], records[index]
    if tasks[previous] != tasks[index] or b[OUT] - a[OUT] != width:
        return False
    if (a[LENGTH], a[STRIDE]) != (b[LENGTH], b[STRIDE]):
        return False
    step = int(b[SRC] - a[SRC])
    return step != 0 and (count == 1 or step == src_step)
