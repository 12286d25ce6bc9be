"""A channel streamed into its file sorted by pulse id, each pulse id once, in bounded memory.

Users' analysis tools index by pulse id and must not meet a repeated or out-of-order one. The
rule is ``channels.select_rows``'s on the whole run: rows inside ``[start, stop]``, sorted by
pulse id, the *first received* of each repeated pulse id kept. Here it is applied to a stream
of batches without holding the run:

- the api/1 stream is ordered per channel, so nearly every batch is increasing and starts
  after the last pulse id written: it is appended as it is (one vectorised check);
- a batch that is not increasing is sorted (stably) and its repeats dropped first;
- a row repeating the last pulse id written (a buffer's "same pulse twice in a row") is
  dropped at once;
- a row older than the last pulse id written (*late*: out of order across batches) waits in a
  small stash. When the stash exceeds ``late_budget`` bytes, and at ``finish``, the stash is
  merged into the file: its pulse ids are looked up in the written column (read in blocks),
  those already written are repeats (the written row came first), and the rest are inserted
  by rewriting the tail of the datasets from the earliest late row on, block by block from
  the end, each block moved up by the number of late rows before it. That costs I/O
  proportional to the tail, only when rows come late — rarely.

Every row of the file arrived before any late row with the same pulse id (a pulse id is only
written when it is newer than everything written), so "already written" always means "received
first", and the stash keeps arrival order for its own repeats: the result is exactly
``select_rows`` of the whole stream, whatever the batches.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from sf_daq_broker.h5.channels import ChannelRows, StreamedGroup

#: Bytes of late rows held before they are merged into the file.
LATE_BUDGET = 32 << 20
#: Bytes of rows read and rewritten at a time when late rows are merged.
MERGE_BLOCK_BYTES = 16 << 20
#: Pulse ids read at a time when late rows are looked up in the file.
SCAN_ROWS = 1 << 20


def _sorted_unique(rows: ChannelRows) -> tuple[ChannelRows, int]:
    """Rows sorted by pulse id (stable), the first of each repeat; and how many were dropped."""
    order = np.argsort(rows.pulse_ids, kind="stable")
    ids = rows.pulse_ids[order]
    first = np.ones(ids.size, dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    return rows.take(order[first]), int(np.count_nonzero(~first))


class SortedChannel:
    """Batches of one channel in, sorted unique rows inside ``[start, stop]`` out to the file."""

    def __init__(
        self, group: StreamedGroup, start: int, stop: int, late_budget: int = LATE_BUDGET
    ) -> None:
        self.group = group
        self.start = start
        self.stop = stop
        self.late_budget = late_budget
        self._reset()

    def _reset(self) -> None:
        self.received = 0  # events received, inside the range or not
        self.duplicates = 0  # repeated pulse ids dropped
        self.newest: int | None = None  # the largest pulse id received
        self._last: int | None = None  # the largest pulse id written
        self._late: list[ChannelRows] = []
        self._late_bytes = 0

    def append(self, rows: ChannelRows) -> None:
        if not len(rows):
            return
        self.group.create(rows)
        self.received += len(rows)
        newest = int(rows.pulse_ids.max())
        self.newest = newest if self.newest is None else max(self.newest, newest)
        ids = rows.pulse_ids
        inside = (ids >= self.start) & (ids <= self.stop)
        if not inside.all():
            rows = rows.take(np.flatnonzero(inside))
        if len(rows) > 1 and not bool(np.all(np.diff(rows.pulse_ids) > 0)):
            rows, repeats = _sorted_unique(rows)
            self.duplicates += repeats
        if not len(rows):
            return
        if self._last is not None:
            behind = int(np.searchsorted(rows.pulse_ids, self._last, side="right"))
            if behind:
                self._keep_late(rows.slice(0, behind))
                rows = rows.slice(behind, len(rows))
        if len(rows):
            self.group.append(rows)
            self._last = int(rows.pulse_ids[-1])

    def _keep_late(self, late: ChannelRows) -> None:
        """Sorted unique rows with pulse ids up to the last one written."""
        if int(late.pulse_ids[-1]) == self._last:
            self.duplicates += 1  # the last one written, again
            late = late.slice(0, len(late) - 1)
        if not len(late):
            return
        self._late.append(late.take(np.arange(len(late))))  # a copy: a view holds the batch
        self._late_bytes += late.nbytes
        if self._late_bytes > self.late_budget:
            self._merge_late()

    def finish(self) -> None:
        """Merge what came late; the file then holds the channel complete."""
        if self._late:
            self._merge_late()

    def restart(self) -> None:
        """Forget everything: the channel is being fetched again from its start."""
        self.group.remove()
        self._reset()

    def _merge_late(self) -> None:
        late, repeats = _sorted_unique(ChannelRows.concat(self._late))
        self._late, self._late_bytes = [], 0
        self.duplicates += repeats
        position, written = self._locate(late.pulse_ids)
        self.duplicates += int(np.count_nonzero(written))
        new = np.flatnonzero(~written)
        if not new.size:
            return
        late, position = late.take(new), position[new]
        group = self.group
        end, count = group.rows, len(late)
        block = max(1, MERGE_BLOCK_BYTES // group.row_bytes)
        group.resize(end + count)
        # From the end down: rows [begin, end) move up by the late rows before them (those
        # with position < begin); the late rows positioned in [begin, end) join them.
        first = int(position[0])
        late_end = count
        while end > first:
            begin = max(first, end - block)
            late_begin = int(np.searchsorted(position, begin, side="left"))
            merged = ChannelRows.concat([group.read(begin, end), late.slice(late_begin, late_end)])
            merged = merged.take(np.argsort(merged.pulse_ids, kind="stable"))
            group.write_at(begin + late_begin, merged)
            end, late_end = begin, late_begin

    def _locate(
        self, ids: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """For sorted unique ``ids`` older than the last written: where each goes among the
        written rows (the index of the first written row after it), and whether it is there
        already."""
        position = np.zeros(ids.size, dtype=np.int64)
        written = np.zeros(ids.size, dtype=bool)
        lower = 0
        for begin in range(0, self.group.rows, SCAN_ROWS):
            column = self.group.pulse_ids(begin, begin + SCAN_ROWS)
            upper = int(np.searchsorted(ids, column[-1], side="right"))
            if upper > lower:
                index = np.searchsorted(column, ids[lower:upper], side="left")
                position[lower:upper] = begin + index
                written[lower:upper] = column[index] == ids[lower:upper]
            lower = upper
            if lower == ids.size:
                break
        return position, written
