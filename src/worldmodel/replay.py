"""ReplayBuffer: how the agent writes, reads, updates, deletes and samples sequences of transitions.

Each row is one transition (obs, action, reward, next_obs, terminated, truncated), so an episode's final observation
(the one returned together with terminated/truncated) is kept as the last row's `next_obs` and is a real prediction
target. Consecutive rows are consecutive steps of one stream; an episode ends at a row with terminated or truncated
set. A caller that abandons an episode early marks its last row truncated, which is what truncation means.

Sampling contract (each point is a bug of the seed notebook):
* windows are drawn in logical (oldest-to-newest) order, so a window never runs across the ring's write pointer;
* windows may span an episode boundary, but then `first` marks the step where the new episode starts and the model
  resets its recurrent state there. Every row's target is its own `next_obs`, so no loss term ever links an
  episode's last step to the next episode's reset observation;
* `first` is derived from the previous row's done flags at sample time, never stored, so `update` cannot leave it
  stale;
* with several streams (one per parallel env, see vector.py) a window never mixes two streams;
* sampling is index arithmetic plus one gather per storage dtype (each window is a contiguous block of the table, so
  the gather copies whole blocks), returning torch tensors of shape [batch, seq_len, ...] on `batch_device`.

Three kinds of row index appear below. The public API speaks in *logical* indices (0 = oldest stored row, streams
one after another; see ring.py). Internally a window is also a (stream, offset within the stream) pair, and
`sample_rows` / `batch_at` pass *physical* table rows, which is what a CUDA graph replays (cuda_graph.py).

Storage lives on `device` (`buffer.device=cuda` keeps it next to the model, so a batch never crosses the bus); with
host storage and a CUDA model, batches are gathered into pinned memory and copied without blocking.
`obs_dtype=float16` halves the memory of observations (the bulk of a buffer); batches are always float32.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from worldmodel.errors import ConfigError, NotEnoughDataError, WorldModelError
from worldmodel.ring import RingBuffer, TooLarge
from worldmodel.transfer import copy_into, to_device
from worldmodel.runtime import resolve_device

OBS_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rows_alone(table: torch.Tensor, row: int, n: int) -> torch.Tensor:
    """Rows row .. row+n-1 of a 2-d table, on the table's own memory. Unlike table[row:row+n], whose storage is the
    whole table's, so that torch.save would write every row of it, this tensor's storage is those rows alone. Off the
    host, a copy on the host: torch.save would copy a GPU tensor to the host anyway."""
    if table.device.type != "cpu":
        return table[row : row + n].cpu()
    nbytes, base = table.shape[1] * table.element_size(), table.storage_offset() * table.element_size()
    storage = table.untyped_storage()[base + row * nbytes : base + (row + n) * nbytes]
    return torch.empty(0, dtype=table.dtype, device=table.device).set_(storage).view(n, table.shape[1])


def obs_storage_dtype(name: str) -> torch.dtype:
    """The torch dtype of `buffer.obs_dtype=name`, or a ConfigError naming the valid ones."""
    if name not in OBS_DTYPES:
        raise ConfigError("buffer.obs_dtype", name, f"one of {', '.join(OBS_DTYPES)}")
    return OBS_DTYPES[name]


FORMAT_VERSION = 2  # the filled rows in logical order, with per-stream sizes: a snapshot (state_dict(), save())
TABLES_VERSION = 3  # the stored rows as spans of the ring's own tables, with write pointers: state_dict(copy=False)


def count(name: str, value, minimum: int = 1) -> int:
    """`value` as an int >= minimum, or an error naming the argument: a float seq_len would otherwise be truncated
    silently by the index arithmetic, and 0 would read as "not enough data"."""
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {number}")
    return number


class WrongFile(ValueError):
    """A readable file that `ReplayBuffer.load` cannot restore."""


@dataclass
class Batch:
    """Sequences of transitions, each tensor shaped [batch, seq_len, ...]."""

    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    first: torch.Tensor  # True where the model must start from a fresh state (window start or new episode)

    def __len__(self) -> int:
        return self.obs.shape[0]

    def to(self, device: str | torch.device) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class ReplayBuffer:
    def __init__(
        self,
        capacity: int,
        obs_dim: int,
        action_dim: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
        dataset: str | Path | None = None,
        streams: int = 1,
        obs_dtype: str = "float32",
        batch_device: str | torch.device | None = None,
        discrete_actions: bool | None = None,
        capacity_key: str | None = None,
        device_key: str = "buffer.device",
    ):
        """capacity_key, device_key: what set the capacity and the device (config keys, for the errors), e.g.
        buffer.capacity, or trainer.val_steps for a run's held-out buffer."""
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        batch_device = None if batch_device is None else torch.device(batch_device)
        self.device = resolve_device(device, key=device_key, auto=batch_device or torch.device("cpu"))
        self.batch_device = batch_device or self.device
        store = obs_storage_dtype(obs_dtype)
        self.obs_dtype = obs_dtype
        try:
            self.ring = self._ring(capacity, store, streams)
        except TooLarge as err:
            remedies = ["lower it"]
            if obs_dtype == "float32" and capacity_key == "buffer.capacity":  # the held-out buffer is always float32
                remedies.append("store observations as float16 (buffer.obs_dtype=float16)")
            if self.device.type == "cuda":
                remedies.append(f"keep the ring on the host ({device_key}=cpu)")
            given = f"capacity={capacity}" + (f" ({capacity_key})" if capacity_key else "")
            raise WorldModelError(f"The replay buffer does not fit: {given} at obs_dim {self.obs_dim} and action_dim "
                                  f"{self.action_dim}: {err}. Nothing was allocated; "
                                  f"{', '.join(remedies[:-1]) + ' or ' if len(remedies) > 1 else ''}{remedies[-1]}.")  # fmt: skip
        # Host storage feeding a CUDA model: gather into page-locked memory so the copy to the GPU is asynchronous.
        self._pin = self.device.type == "cpu" and self.batch_device.type == "cuda"
        self.rng = np.random.default_rng(seed)
        if dataset:  # discrete_actions: the env's kind of actions, checked against the dataset's
            self._load_dataset(dataset, int(capacity), discrete_actions)

    def _ring(self, capacity: int, obs_storage: torch.dtype, streams: int) -> RingBuffer:
        schema = {
            "obs": ((self.obs_dim,), obs_storage),
            "action": ((self.action_dim,), torch.float32),
            "reward": ((), torch.float32),
            "next_obs": ((self.obs_dim,), obs_storage),
            "terminated": ((), torch.bool),
            "truncated": ((), torch.bool),
        }
        return RingBuffer(capacity, schema, streams=streams, device=self.device)

    # ---- create -------------------------------------------------------------------------------------------------
    def add(self, obs, action, reward, next_obs, terminated, truncated, stream: int = 0) -> None:
        """Stores one transition of `stream`."""
        if reward is None or terminated is None or truncated is None:  # numpy would store NaN or False (a None obs
            # or action fails the shape check)
            missing = [k for k, v in {"reward": reward, "terminated": terminated, "truncated": truncated}.items()
                       if v is None]  # fmt: skip
            raise TypeError(f"add: {', '.join(missing)} is None; nothing was written")
        self.ring.append(stream=stream, obs=obs, action=action, reward=reward, next_obs=next_obs,
                         terminated=terminated, truncated=truncated)  # fmt: skip

    def extend(self, obs, action, reward, next_obs, terminated, truncated, stream: int = 0) -> None:
        """Stores a batch of consecutive transitions of `stream` (leading axis = time)."""
        self.ring.extend(stream=stream, obs=obs, action=action, reward=reward, next_obs=next_obs,
                         terminated=terminated, truncated=truncated)  # fmt: skip

    def extend_streams(self, valid, obs, action, reward, next_obs, terminated, truncated) -> None:
        """Stores T steps of every stream at once (arrays [T, streams, ...]); rows where `valid` [T, streams] is False
        are not transitions (a vectorized env's reset step) and are skipped."""
        self.ring.extend_streams(valid, obs=obs, action=action, reward=reward, next_obs=next_obs,
                                 terminated=terminated, truncated=truncated)  # fmt: skip

    # ---- read ---------------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.ring.capacity

    @property
    def streams(self) -> int:
        return self.ring.streams

    def __len__(self) -> int:
        return len(self.ring)

    def can_sample(self, seq_len: int) -> bool:
        """Whether some stream holds a window of seq_len transitions (what `sample` needs)."""
        return int(self.ring.sizes.max()) >= count("seq_len", seq_len)

    def newest_rows(self) -> np.ndarray:
        """Logical index of each non-empty stream's newest row (where that stream's data ends, maybe mid-episode)."""
        sizes = self.ring.sizes
        return np.cumsum(sizes)[sizes > 0] - 1

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        """Rows by logical index (0 = oldest stored, -1 = newest; with several streams, stream 0's rows come first);
        ints, slices and integer arrays work. Returns numpy copies."""
        return self.ring.read(index)

    def sample(self, batch_size: int, seq_len: int) -> Batch:
        """`batch_size` windows of `seq_len` consecutive transitions, uniformly over all windows stored."""
        batch_size, seq_len = count("batch_size", batch_size, minimum=0), count("seq_len", seq_len)
        return self._gather(*self._draw(batch_size, seq_len), seq_len)

    def sample_rows(self, batch_size: int, seq_len: int) -> torch.Tensor:
        """The windows `sample` would draw, from the same random draws, as the table rows they cover: int64
        [batch_size, seq_len] on the host (page-locked when the ring is on a GPU, so copying them there does not
        wait). `batch_at` gathers them. A graphed update (cuda_graph.py) records that gather, so per update only these
        indices are copied in, not the batch."""
        batch_size, seq_len = count("batch_size", batch_size, minimum=0), count("seq_len", seq_len)
        stream, offset = self._draw(batch_size, seq_len)
        rows = self.ring.physical_of(stream[:, None], offset[:, None] + np.arange(seq_len))
        rows = torch.from_numpy(rows)
        return rows.pin_memory() if self.device.type == "cuda" else rows

    def batch_at(self, rows: torch.Tensor) -> Batch:
        """The batch at table rows `rows` [batch, seq_len] (from `sample_rows`, copied to the ring's device), on the
        ring's device: one gather per table and a few elementwise ops, none of which reads a value back to the host."""
        flat = rows.reshape(-1)
        return self._assemble({dt: table.index_select(0, flat).view(*rows.shape, table.shape[1])
                               for dt, table in self.ring.tables.items()})  # fmt: skip

    def sequences(self, seq_len: int, batch_size: int) -> Iterator[Batch]:
        """Every stored transition once, as consecutive non-overlapping windows per stream (each stream's tail shorter
        than seq_len is dropped). Deterministic, for validation."""
        seq_len, batch_size = count("seq_len", seq_len), count("batch_size", batch_size)
        self._window_counts(seq_len)  # raises NotEnoughDataError when no stream holds one window
        starts = np.concatenate([np.arange(0, n - seq_len + 1, seq_len) + begin for begin, n in self._stream_spans()])
        for chunk in np.array_split(starts, max(1, -(-len(starts) // batch_size))):
            yield self.gather(chunk, seq_len)

    def gather(self, starts: np.ndarray, seq_len: int) -> Batch:
        """Windows of seq_len consecutive transitions starting at logical indices `starts`."""
        seq_len = count("seq_len", seq_len)
        stream, offset = self.ring.locate(starts)  # refuses non-integer starts rather than truncating them
        if np.any(offset + seq_len > self.ring.sizes[stream]):
            raise IndexError(f"a window of {seq_len} rows from logical indices {starts} runs past its stream's newest")
        return self._gather(stream, offset, seq_len)

    # ---- update / delete ----------------------------------------------------------------------------------------
    def update(self, index, **fields) -> None:
        """Overwrites stored fields (e.g. reward=..., obs=...) at logical `index`."""
        self.ring.write(index, **fields)

    def clear(self) -> None:
        self.ring.clear()

    def delete_oldest(self, n: int, stream: int = 0) -> int:
        """Deletes the oldest `n` transitions of `stream` (all it holds, if fewer), e.g. data of a policy long gone;
        returns how many. Windows are drawn from what remains, so none reaches a deleted row; a window that starts
        where the deleted data ended starts with `first` set, as every window does."""
        return self.ring.drop_oldest(count("n", n, minimum=0), stream)

    # ---- persistence --------------------------------------------------------------------------------------------
    def state_dict(self, copy: bool = True) -> dict:
        """Contents, per-stream sizes and sampling RNG: everything needed to restore a buffer that samples, and
        keeps filling, exactly like this one. By default a snapshot: the filled rows, copied, in logical order.

        copy=False gives the stored rows where they are instead: per table, each span of rows (ring.spans) as a
        tensor on the ring's own memory, with the write pointers. torch.save writes them straight from there, so a
        checkpoint never holds a second copy of a buffer that may fill most of the machine's memory, and holds only
        the stored rows. Later writes to the buffer change such a state: save it at once."""
        shape = {"format_version": FORMAT_VERSION if copy else TABLES_VERSION, **self._shape(),
                 "sizes": self.ring.sizes.tolist(), "rng": self.rng.bit_generator.state}  # fmt: skip
        if not copy:
            spans = self.ring.spans()
            return {**shape, "ptrs": self.ring.ptrs.tolist(), "tables": {
                str(dt): [rows_alone(table, row, n) for row, n in spans] for dt, table in self.ring.tables.items()}}
        return {**shape, "columns": {k: torch.from_numpy(v) for k, v in self.ring.read(slice(None)).items()}}

    def load_state_dict(self, state: dict, source: str = "replay buffer state") -> None:
        """Restores a `state_dict` (either kind); refuses one whose capacity, streams or shapes differ from this
        buffer's, before changing anything."""
        mine = self._shape()
        theirs = {k: state.get(k) for k in mine}
        version = state.get("format_version")
        contents = {FORMAT_VERSION: "columns", TABLES_VERSION: "tables"}.get(version)
        if contents not in state:
            raise ValueError(f"{source} has format_version {version!r}, but this version of worldmodel reads "
                             f"format_version {FORMAT_VERSION} and {TABLES_VERSION} only")  # fmt: skip
        if theirs != mine:
            raise ValueError(f"{source} holds a buffer of {theirs}, but this buffer is {mine}")
        ring, sizes = self.ring, np.asarray(state["sizes"], dtype=np.int64)
        if version == TABLES_VERSION:
            ptrs, seg = np.asarray(state["ptrs"], dtype=np.int64), ring.stream_capacity
            fits = sizes.shape == ptrs.shape == (ring.streams,) and bool(
                ((0 <= sizes) & (sizes <= seg) & (0 <= ptrs) & (ptrs < seg)).all())
            spans = ring.spans(sizes, ptrs) if fits else []
            got = {name: [tuple(piece.shape) for piece in pieces] for name, pieces in state["tables"].items()}
            want = {str(dt): [(n, table.shape[1]) for _, n in spans] for dt, table in ring.tables.items()}
            if not fits or got != want:
                raise ValueError(f"{source} holds rows of shapes {got} with sizes {sizes.tolist()} and pointers "
                                 f"{ptrs.tolist()}, which this buffer's tables cannot take")  # fmt: skip
            for dt, table in ring.tables.items():  # in place: a recorded CUDA graph reads the tables by address
                for (row, n), piece in zip(spans, state["tables"][str(dt)]):
                    table[row : row + n].copy_(piece)
            ring.sizes, ring.ptrs = sizes.copy(), ptrs
        else:
            # Stream k's rows go to the start of its segment, oldest first; the pointer then sits after its newest.
            rows = np.concatenate([k * ring.stream_capacity + np.arange(n) for k, n in enumerate(sizes)])
            index = to_device(rows, self.device)
            for name, values in state["columns"].items():
                copy_into(ring.columns[name], index, np.asarray(values))
            ring.sizes, ring.ptrs = sizes.copy(), sizes % ring.stream_capacity
        self.rng.bit_generator.state = state["rng"]

    def save(self, path: str | Path) -> None:
        """Writes `state_dict` to an .npz file. The write goes to a temporary file that replaces `path` only once
        complete, so a crash never leaves a half-written file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        columns = {k: v.numpy() for k, v in state.pop("columns").items()}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(state)), **columns)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, path: str | Path) -> None:
        """Restores a buffer written by `save`; refuses files whose capacity or shapes differ from this buffer's."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"replay buffer file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                if "meta" not in data.files:  # a zip of arrays, but not ours: most likely an episode dataset
                    raise WrongFile(f"replay buffer file {path} was not written by ReplayBuffer.save: it holds "
                                    f"{sorted(data.files)}. An episode dataset (scripts/collect.py) is loaded with "
                                    "ReplayBuffer(..., dataset=path), or buffer.dataset=path in a run.")  # fmt: skip
                state = json.loads(str(data["meta"]))
                state["columns"] = {k: data[k] for k in self.ring.columns}
        except WrongFile:
            raise
        except Exception as err:  # zip/npz/json errors all mean the same thing to the user
            raise ValueError(f"replay buffer file {path} is unreadable or truncated ({err})") from None
        self.load_state_dict(state, source=f"replay buffer file {path}")

    # ---- internals ----------------------------------------------------------------------------------------------
    def _shape(self) -> dict:
        return {"capacity": self.capacity, "streams": self.streams, "obs_dim": self.obs_dim,
                "action_dim": self.action_dim, "obs_dtype": self.obs_dtype}  # fmt: skip

    def _stream_spans(self) -> list[tuple[int, int]]:
        """(first logical index, rows stored) of each stream."""
        sizes = self.ring.sizes
        return list(zip((np.cumsum(sizes) - sizes).tolist(), sizes.tolist()))

    def _load_dataset(self, path: str | Path, asked: int, discrete: bool | None) -> None:
        from worldmodel.dataset import DatasetFile, fill_buffer  # dataset.py builds on this module

        with DatasetFile(path, self.obs_dim, self.action_dim, discrete=discrete) as data:
            # Episodes are dealt to the streams in turn, so each stream holds whole episodes.
            per_stream = [int(data.lengths[k :: self.streams].sum()) for k in range(self.streams)]
            if max(per_stream) > self.ring.stream_capacity:
                need = max(per_stream) * self.streams
                raise ConfigError("buffer.capacity", asked, f"at least {need} to hold the {sum(per_stream)} "
                                  f"transitions of dataset {path} dealt over {self.streams} stream(s) (whole episodes "
                                  f"per stream, each stream holding capacity // streams = {self.ring.stream_capacity} "
                                  "rows)")  # fmt: skip
            fill_buffer(self, data)

    def _window_counts(self, seq_len: int) -> np.ndarray:
        """Number of windows of seq_len that start in each stream; refuses when there are none at all."""
        per_stream = np.maximum(self.ring.sizes - seq_len + 1, 0)
        if per_stream.sum() < 1:
            longest = int(self.ring.sizes.max())
            raise NotEnoughDataError(
                f"Cannot sample sequences of seq_len={seq_len}: the replay buffer's longest stream holds {longest} "
                f"transitions and needs at least {seq_len} (collect {seq_len - longest} more "
                "steps per env, e.g. raise trainer.prefill, or lower trainer.seq_len)."
            )
        return per_stream

    def _draw(self, batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(stream, offset of the first row among that stream's rows) of `batch_size` windows drawn uniformly."""
        per_stream = self._window_counts(seq_len)
        ends = np.cumsum(per_stream)
        draw = self.rng.integers(0, ends[-1], size=batch_size)
        stream = np.searchsorted(ends, draw, side="right")
        return stream, draw - (ends - per_stream)[stream]

    def _gather(self, stream: np.ndarray, offset: np.ndarray, seq_len: int) -> Batch:
        ring, seg = self.ring, self.ring.stream_capacity
        start = ring.physical_of(stream, offset)
        # A window that runs over the end of its stream's segment wraps around to the segment's start: those few are
        # gathered row by row, all others as one contiguous block each.
        wrapped = np.flatnonzero(start - stream * seg + seq_len > seg)
        block = to_device(np.where(start + seq_len > ring.capacity, 0, start), self.device)
        if len(wrapped):
            rows = ring.physical_of(stream[wrapped, None], offset[wrapped, None] + np.arange(seq_len))
            wrapped, rows = to_device(wrapped, self.device), to_device(rows, self.device)
        gathered = {}
        for dtype, table in ring.tables.items():
            width = table.shape[1]
            windows = table.as_strided((ring.capacity - seq_len + 1, seq_len, width), (width, width, 1))
            out = torch.empty((len(start), seq_len, width), dtype=dtype, pin_memory=self._pin) if self._pin else None
            out = torch.index_select(windows, 0, block, out=out) if out is not None else windows.index_select(0, block)
            if len(wrapped):
                out[wrapped] = table[rows]
            # Non-blocking only towards a GPU: a copy from a GPU ring to host batches (buffer.device=cuda with
            # trainer.device=cpu) would return before it lands, and _assemble and the caller read the batch at once.
            gathered[dtype] = out.to(self.batch_device, non_blocking=self.batch_device.type == "cuda")
        return self._assemble(gathered)

    def _assemble(self, gathered: dict[torch.dtype, torch.Tensor]) -> Batch:
        """The batch from gathered windows of the packed tables ([batch, seq_len, width] each)."""
        ring = self.ring
        cols = {name: ring.unpack(name, gathered) for name in ring.columns}
        if self.obs_dtype != "float32":
            cols["obs"], cols["next_obs"] = cols["obs"].float(), cols["next_obs"].float()
        done = cols["terminated"] | cols["truncated"]
        first = torch.ones_like(done)
        first[:, 1:] = done[:, :-1]
        return Batch(**cols, first=first)
