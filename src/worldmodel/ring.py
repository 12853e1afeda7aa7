"""RingBuffer: a fixed-size table of named, preallocated columns where new rows overwrite the oldest.

It knows nothing about episodes or sampling (that is ReplayBuffer's job). Rows are addressed by *logical* index:
0 is the oldest row still stored and len-1 the newest, whatever the physical position of the write pointer. Working
in logical indices is what keeps every reader from running across the seam between newest and oldest data.

Two layout choices make reads fast and let the table live on any torch device:
* columns of one dtype are packed side by side in one 2-D tensor, so a read of every column is one gather per dtype;
* with `streams=N` (one per parallel env) the table is split into N equal segments, each its own ring with its own
  write pointer. Logical order is stream-major (stream 0 oldest..newest, then stream 1, ...), so a run of
  consecutive logical rows inside one stream is a run of consecutive steps of one env.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from math import prod

import numpy as np
import torch

from worldmodel.runtime import free_memory
from worldmodel.transfer import copy_into, host_array, to_device, torch_dtype

Schema = Mapping[str, tuple[tuple[int, ...], np.dtype | type]]

NUMPY_SCATTERED_ROWS = 1024
WRITE_AS_ON_GPU = False  # tests set it: a host ring then writes as a GPU ring does (no numpy views, packed tables)


def stream_index(stream, streams: int) -> int:
    """`stream` as a Python int in 0 .. streams - 1: numpy would read True as a mask and 1.0 as an error of its own."""
    try:
        index = operator.index(stream)
        if isinstance(stream, bool) or str(getattr(stream, "dtype", "")) in ("bool", "torch.bool"):
            raise TypeError  # an int to Python (and a bool tensor's __index__), but surely a flag in the wrong place
    except TypeError:
        raise TypeError(f"stream must be an integer, got {stream!r}") from None
    if not 0 <= index < streams:
        raise IndexError(f"stream {stream} does not exist: this buffer has streams 0 .. {streams - 1}")
    return index


class TooLarge(MemoryError):
    """The table would not fit in its device's free memory. Checked before allocating: too large a table fails at once
    only when the kernel refuses it outright; otherwise its pages are filled in later and the OOM killer ends the run."""

    def __init__(self, rows: int, row_bytes: int, free: int, device: torch.device):
        self.rows, self.row_bytes, self.free, self.device = rows, row_bytes, free, device
        super().__init__(f"{rows:,} rows of {row_bytes} bytes need {rows * row_bytes / 2**30:.3g} GiB on {device}, "
                         f"which has {free / 2**30:.3g} GiB available: at most {free // row_bytes:,} rows would fit, "
                         "with nothing else")  # fmt: skip


class RingBuffer:
    def __init__(self, capacity: int, schema: Schema, streams: int = 1, device: str | torch.device = "cpu"):
        capacity, streams = int(capacity), int(streams)
        if streams < 1 or capacity < streams:
            raise ValueError(f"RingBuffer needs streams >= 1 and capacity >= streams, got {capacity=}, {streams=}")
        self.streams = streams
        self.stream_capacity = capacity // streams  # rows per stream; a remainder of capacity % streams is unused
        self.capacity = self.stream_capacity * streams
        self.device = torch.device(device)
        self.schema = {name: (tuple(shape), torch_dtype(dtype)) for name, (shape, dtype) in schema.items()}
        # What writes are converted to on the host (numpy has no bfloat16: float32, then torch converts).
        self._host_dtypes = {name: np.float32 if dt == torch.bfloat16 else torch.empty(0, dtype=dt).numpy().dtype
                             for name, (_, dt) in self.schema.items()}  # fmt: skip
        widths: dict[torch.dtype, int] = {}
        self.slots: dict[str, tuple[torch.dtype, int, int]] = {}  # column -> (table, first, last+1 packed position)
        for name, (shape, dtype) in self.schema.items():
            start = widths.get(dtype, 0)
            widths[dtype] = start + prod(shape)
            self.slots[name] = (dtype, start, widths[dtype])
        row_bytes = sum(w * dt.itemsize for dt, w in widths.items())
        free = free_memory(self.device)
        if free is not None and self.capacity * row_bytes > free:
            raise TooLarge(self.capacity, row_bytes, free, self.device)
        # Allocated once and only ever written in place: a recorded CUDA graph's gather (cuda_graph.py) reads them by
        # address, and the columns below are views of them.
        self.tables = {dt: torch.zeros(self.capacity, w, dtype=dt, device=self.device) for dt, w in widths.items()}
        self.columns = {name: self.unpack(name, self.tables) for name in self.schema}
        self._packing = {dt: [name for name in self.schema if self.slots[name][0] == dt] for dt in self.tables}
        # On the host, numpy views of the same memory: a small slice write through numpy costs ~1 µs, through torch ~5.
        self._host = {name: col.numpy() for name, col in self.columns.items()
                      if self.device.type == "cpu" and col.dtype != torch.bfloat16}  # fmt: skip
        self.ptrs = np.zeros(streams, np.int64)  # per stream: row (within its segment) the next write goes to
        self.sizes = np.zeros(streams, np.int64)

    # ---- shape of the contents ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.sizes.sum())

    @property
    def ptr(self) -> int:
        """The write pointer of a single-stream ring (a physical row)."""
        if self.streams != 1:
            raise AttributeError("a multi-stream ring has one pointer per stream: use .ptrs")
        return int(self.ptrs[0])

    def unpack(self, name: str, tables: Mapping[torch.dtype, torch.Tensor]) -> torch.Tensor:
        """Column `name` as a view of packed `tables` shaped [..., width] (stored rows or a gathered batch)."""
        dtype, start, stop = self.slots[name]
        shape = self.schema[name][0]
        part = tables[dtype].narrow(-1, start, stop - start)  # narrow/select/view: a few µs cheaper than [..., a:b]
        return part.select(-1, 0) if shape == () else part.view(*part.shape[:-1], *shape)

    # ---- writes -------------------------------------------------------------------------------------------------
    def append(self, stream: int = 0, **row) -> None:
        """Writes one row to `stream`, overwriting its oldest when full."""
        # Only a leading axis here (a tensor keeps its own): _extend converts every column once.
        self._extend(stream, {k: v[None] if hasattr(v, "ndim") else np.asarray(v)[None] for k, v in row.items()},
                     "append")  # fmt: skip

    def extend(self, stream: int = 0, **rows) -> None:
        """Writes n consecutive rows (leading axis) to `stream` with one indexed write per column."""
        self._extend(stream, rows, "extend")

    def _extend(self, stream: int, rows: Mapping, what: str) -> None:
        self._check_names(rows, complete=True)
        try:
            lengths = {name: len(v) for name, v in rows.items()}
        except TypeError:  # len() of a number or a 0-d array
            scalars = [name for name, v in rows.items() if not np.ndim(v)]
            raise ValueError(f"{what}: {scalars} are single values; extend takes rows along a leading axis (one row: "
                             "append / ReplayBuffer.add); nothing was written") from None  # fmt: skip
        n = next(iter(lengths.values()))
        if any(length != n for length in lengths.values()):
            raise ValueError(f"{what}: columns have different lengths {lengths}; nothing was written")
        stream = stream_index(stream, self.streams)
        rows = self._as_columns(rows, (n,), what)
        seg, ptr = self.stream_capacity, int(self.ptrs[stream])
        skip = max(0, n - seg)  # rows that would be overwritten within this same call
        first = stream * seg + (ptr + skip) % seg
        if first + n - skip <= (stream + 1) * seg:  # no wrap inside the segment: one slice (the common case)
            rows_at = slice(first, first + n - skip)
        else:
            rows_at = stream * seg + (ptr + np.arange(skip, n)) % seg
        self._write(rows_at, {k: v[skip:] for k, v in rows.items()})
        self.ptrs[stream] = (ptr + n) % seg
        self.sizes[stream] = min(int(self.sizes[stream]) + n, seg)

    def _write(self, rows_at: slice | np.ndarray, values: Mapping[str, np.ndarray]) -> None:
        """Stores values[name] (already cut to the rows kept) at physical rows `rows_at` of each column."""
        rest = dict(values)
        # numpy writes a slice, or up to about a thousand scattered rows (one vector step), in ~1 µs where torch takes
        # ~5; torch's threaded index_put is faster for more scattered rows (16k: 104 against 296 µs on 2 cores).
        if (isinstance(rows_at, slice) or len(rows_at) <= NUMPY_SCATTERED_ROWS) and not WRITE_AS_ON_GPU:
            for name in [name for name in rest if name in self._host]:
                self._host[name][rows_at] = rest.pop(name)
        if not rest:
            return
        index = rows_at if isinstance(rows_at, slice) else to_device(rows_at, self.device)
        # On a GPU each copy is a transfer and a launch, and a collected step writes every column: the columns of a
        # table written together are packed on the host first, one copy per table. On the host packing is an extra
        # pass over the data, which costs more than it saves once a write holds more than a few rows.
        pack = self.device.type != "cpu" or WRITE_AS_ON_GPU
        for dtype, names in self._packing.items() if pack else ():
            if all(name in rest for name in names):
                n = len(rest[names[0]])
                widths = [self.slots[name][2] - self.slots[name][1] for name in names]
                packed = np.concatenate([rest.pop(name).reshape(n, w) for name, w in zip(names, widths)], axis=1)
                copy_into(self.tables[dtype], index, packed)
        for name, value in rest.items():
            copy_into(self.columns[name], index, value)

    def extend_streams(self, valid: np.ndarray, **rows) -> None:
        """Writes a block of steps of every stream at once: rows[name] is [T, streams, ...] and valid [T, streams]
        says which of them are real rows (the others are skipped, e.g. the reset step of a vectorized env)."""
        self._check_names(rows, complete=True)
        valid = np.asarray(valid, dtype=bool)
        if valid.ndim != 2 or valid.shape[1] != self.streams:
            raise ValueError(f"extend_streams: valid must be [T, {self.streams}], got {valid.shape}")
        rows = self._as_columns(rows, valid.shape, "extend_streams")
        counts = np.cumsum(valid, axis=0)  # rows written so far in this call, per stream
        total = counts[-1] if len(valid) else np.zeros(self.streams, np.int64)
        # A stream given more rows than it holds keeps only its newest stream_capacity of them.
        keep = valid & (counts > total - self.stream_capacity)
        position = (self.ptrs + counts - 1) % self.stream_capacity
        kept = np.flatnonzero(keep)  # once for all columns: a boolean mask per column recounts it each time (3x slower)
        rows_at = (np.arange(self.streams) * self.stream_capacity + position).reshape(-1)[kept]
        if rows_at.size:
            self._write(rows_at, {name: value.reshape(keep.size, *value.shape[2:]).take(kept, axis=0)
                                  for name, value in rows.items()})  # fmt: skip
        self.ptrs = (self.ptrs + total) % self.stream_capacity
        self.sizes = np.minimum(self.sizes + total, self.stream_capacity)

    # ---- addressing ---------------------------------------------------------------------------------------------
    def locate(self, logical) -> tuple[np.ndarray, np.ndarray]:
        """Logical indices (negative counts from the newest) -> (stream, offset within that stream's rows)."""
        logical = np.asarray(logical)
        if logical.size == 0:
            logical = logical.astype(np.int64)  # an empty list is float64 to numpy
        if not np.issubdtype(logical.dtype, np.integer):
            raise TypeError(f"ring indices must be integers, got dtype {logical.dtype}")
        size = len(self)
        if logical.size and (logical.min() < -size or logical.max() >= size):
            raise IndexError(f"index out of range for a ring holding {size} rows")
        # After the bounds check (a huge uint64 would wrap to -1): int8 + size overflows, uint64 - int64 is float64.
        logical = logical.astype(np.int64, copy=False)
        logical = np.where(logical < 0, logical + size, logical)
        ends = np.cumsum(self.sizes)
        stream = np.searchsorted(ends, logical, side="right")
        return stream, logical - (ends - self.sizes)[stream]

    def physical_of(self, stream: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """(stream, offset among its stored rows, oldest = 0) -> physical row of the table."""
        seg = self.stream_capacity
        return stream * seg + (self.ptrs[stream] - self.sizes[stream] + offset) % seg

    def spans(self, sizes: np.ndarray | None = None, ptrs: np.ndarray | None = None) -> list[tuple[int, int]]:
        """(first physical row, rows) of the stored rows, stream by stream, oldest first: a stream's rows are one arc
        of its segment, so one span, or two where they wrap past the segment's end. Of this ring's fill, or of the
        given per-stream sizes and pointers."""
        sizes = self.sizes if sizes is None else sizes
        ptrs = self.ptrs if ptrs is None else ptrs
        seg, out = self.stream_capacity, []
        for stream, (n, ptr) in enumerate(zip(sizes.tolist(), ptrs.tolist())):
            start = (ptr - n) % seg
            first = min(n, seg - start)
            out += [(stream * seg + row, rows) for row, rows in ((start, first), (0, n - first)) if rows]
        return out

    def physical(self, logical) -> np.ndarray:
        """Maps logical indices to physical rows, with bounds checks."""
        return self.physical_of(*self.locate(logical))

    def logical(self, index) -> np.ndarray:
        """Normalises an int, slice or integer array into logical indices."""
        if isinstance(index, slice):
            return np.arange(len(self))[index]
        return np.asarray(index)

    # ---- reads and in-place updates -----------------------------------------------------------------------------
    def read(self, index, names=None) -> dict[str, np.ndarray]:
        """Rows at logical `index` as numpy arrays (a copy, on the host; bfloat16, which numpy lacks, as float32)."""
        rows = self._device_rows(index)
        out = {name: self.columns[name][rows] for name in (names or self.columns)}
        if rows.dim() == 0:  # torch reads a 0-d index as it does an int: a view of the table, where an array copies
            out = {name: v.clone() for name, v in out.items()}
        return {name: (v.float() if v.dtype == torch.bfloat16 else v).cpu().numpy() for name, v in out.items()}

    def write(self, index, **fields) -> None:
        """Overwrites stored fields in place at logical `index`."""
        self._check_names(fields)
        rows = self._device_rows(index)
        fields = self._as_columns(fields, tuple(rows.shape), "update", broadcast=True)
        for name, value in fields.items():
            copy_into(self.columns[name], rows, value)

    def _device_rows(self, index) -> torch.Tensor:
        """Physical rows of logical `index` (int, slice or integer array, bounds-checked) as a tensor on the device."""
        return to_device(np.asarray(self.physical(self.logical(index))), self.device)

    def _as_columns(self, values: Mapping, leading: tuple[int, ...], what: str, broadcast: bool = False) -> dict:
        """Each value as a numpy array in its column's dtype, its shape checked as `leading` + the column's shape (or
        broadcastable to it). Every column is checked before any is written, so a refused write changes nothing; and
        numpy rounds to the storage dtype once (float64 -> float16 through torch goes via float32, rounding twice)."""
        out, wrong = {}, {}
        for name, value in values.items():
            want = (*leading, *self.schema[name][0])
            array = host_array(value, self._host_dtypes[name])
            try:
                ok = np.broadcast_shapes(array.shape, want) == want if broadcast else array.shape == want
            except ValueError:
                ok = False
            if not ok:
                wrong[name] = array.shape
            out[name] = array
        if wrong:
            raise ValueError(f"{what}: column shapes {wrong} do not fit {len(leading)} leading dims {leading} and the "
                             f"columns' own shapes { {k: self.schema[k][0] for k in wrong} }; nothing was written")  # fmt: skip
        return out

    def clear(self) -> None:
        """Forgets every row; the tables stay allocated so clearing costs nothing."""
        self.ptrs[:] = 0
        self.sizes[:] = 0

    def drop_oldest(self, n: int, stream: int = 0) -> int:
        """Forgets the oldest `n` rows of `stream` (all it holds, if fewer); returns how many. The oldest stored row
        is the one `size` rows behind the write pointer, so a smaller size is all it takes: nothing moves, and later
        writes reuse the rows as they would any free one."""
        stream = stream_index(stream, self.streams)
        if (n := operator.index(n)) < 0:  # a negative count would grow the ring over stale rows
            raise ValueError(f"drop_oldest: n must be an integer >= 0, got {n}")
        dropped = min(n, int(self.sizes[stream]))
        self.sizes[stream] -= dropped
        return dropped

    def _check_names(self, fields: Mapping, complete: bool = False) -> None:
        # A new row with a column left out would silently keep the overwritten row's stale value.
        unknown = set(fields) - set(self.columns)
        missing = set(self.columns) - set(fields) if complete else set()
        if unknown or missing:
            raise KeyError(
                f"ring columns are {sorted(self.columns)}; got unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
