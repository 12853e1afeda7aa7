"""RingBuffer: a fixed-size table of named, preallocated columns where new rows overwrite the oldest.

It knows nothing about episodes or sampling (that is ReplayBuffer's job). Rows are addressed by *logical* index:
0 is the oldest row still stored and len-1 the newest, whatever the physical position of the write pointer. Working
in logical indices is what keeps every reader from running across the seam between newest and oldest data.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Schema = Mapping[str, tuple[tuple[int, ...], np.dtype | type]]


class RingBuffer:
    def __init__(self, capacity: int, schema: Schema):
        if int(capacity) <= 0:
            raise ValueError(f"RingBuffer capacity must be a positive integer, got {capacity}")
        self.capacity = int(capacity)
        self.schema = {name: (tuple(shape), np.dtype(dtype)) for name, (shape, dtype) in schema.items()}
        self.columns = {
            name: np.zeros((self.capacity, *shape), dtype=dtype) for name, (shape, dtype) in self.schema.items()
        }
        self.ptr = 0  # physical row the next append writes
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, **row) -> None:
        """Writes one row in O(1), overwriting the oldest when full."""
        self._check_names(row, complete=True)
        for name, value in row.items():
            self.columns[name][self.ptr] = value
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def extend(self, **rows) -> None:
        """Writes n rows (leading axis) with at most two slice copies per column."""
        self._check_names(rows, complete=True)
        n = len(next(iter(rows.values())))
        if any(len(v) != n for v in rows.values()):
            raise ValueError(f"extend: columns have different lengths {[len(v) for v in rows.values()]}")
        if n == 0:
            return
        skip = max(0, n - self.capacity)  # rows that would be overwritten within this same call
        start = (self.ptr + skip) % self.capacity
        head = min(n - skip, self.capacity - start)
        for name, value in rows.items():
            value = np.asarray(value)[skip:]
            col = self.columns[name]
            col[start : start + head] = value[:head]
            col[: len(value) - head] = value[head:]
        self.ptr = (start + n - skip) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def physical(self, logical) -> np.ndarray:
        """Maps logical indices (negative counts from the newest) to physical rows, with bounds checks."""
        logical = np.asarray(logical)
        if not np.issubdtype(logical.dtype, np.integer):
            raise TypeError(f"ring indices must be integers, got dtype {logical.dtype}")
        if logical.size and (logical.min() < -self.size or logical.max() >= self.size):
            raise IndexError(f"index out of range for a ring holding {self.size} rows")
        logical = np.where(logical < 0, logical + self.size, logical)
        return (self.ptr - self.size + logical) % self.capacity

    def logical(self, index) -> np.ndarray:
        """Normalises an int, slice or integer array into logical indices."""
        if isinstance(index, slice):
            return np.arange(self.size)[index]
        return np.asarray(index)

    def read(self, index, names=None) -> dict[str, np.ndarray]:
        rows = self.physical(self.logical(index))
        return {name: self.columns[name][rows] for name in (names or self.columns)}

    def write(self, index, **fields) -> None:
        """Overwrites stored fields in place at logical `index`."""
        self._check_names(fields)
        rows = self.physical(self.logical(index))
        for name, value in fields.items():
            self.columns[name][rows] = value

    def clear(self) -> None:
        """Forgets every row; the tables stay allocated so clearing costs nothing."""
        self.ptr = 0
        self.size = 0

    def _check_names(self, fields: Mapping, complete: bool = False) -> None:
        # A new row with a column left out would silently keep the overwritten row's stale value.
        unknown = set(fields) - set(self.columns)
        missing = set(self.columns) - set(fields) if complete else set()
        if unknown or missing:
            raise KeyError(
                f"ring columns are {sorted(self.columns)}; got unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
