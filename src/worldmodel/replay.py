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
* sampling is one vectorized gather, returning torch tensors of shape [batch, seq_len, ...] on the buffer's device.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from worldmodel.errors import ConfigError, NotEnoughDataError
from worldmodel.ring import RingBuffer

FORMAT_VERSION = 1


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


class ReplayBuffer:
    def __init__(
        self,
        capacity: int,
        obs_dim: int,
        action_dim: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
        dataset: str | Path | None = None,
    ):
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        self.device = torch.device(device)
        self.ring = RingBuffer(
            capacity,
            {
                "obs": ((self.obs_dim,), np.float32),
                "action": ((self.action_dim,), np.float32),
                "reward": ((), np.float32),
                "next_obs": ((self.obs_dim,), np.float32),
                "terminated": ((), np.bool_),
                "truncated": ((), np.bool_),
            },
        )
        self.rng = np.random.default_rng(seed)
        if dataset:
            self._load_dataset(dataset)

    # ---- create -------------------------------------------------------------------------------------------------
    def add(self, obs, action, reward, next_obs, terminated, truncated) -> None:
        """Stores one transition."""
        self.ring.append(
            obs=obs, action=action, reward=reward, next_obs=next_obs, terminated=terminated, truncated=truncated
        )

    def extend(self, obs, action, reward, next_obs, terminated, truncated) -> None:
        """Stores a batch of consecutive transitions (leading axis = time)."""
        self.ring.extend(
            obs=obs, action=action, reward=reward, next_obs=next_obs, terminated=terminated, truncated=truncated
        )

    # ---- read ---------------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.ring.capacity

    def __len__(self) -> int:
        return len(self.ring)

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        """Rows by logical index (0 = oldest stored, -1 = newest); ints, slices and integer arrays work."""
        return self.ring.read(index)

    def sample(self, batch_size: int, seq_len: int) -> Batch:
        """`batch_size` windows of `seq_len` consecutive transitions, uniformly over all windows stored."""
        n_starts = self._check_enough(seq_len)
        starts = self.rng.integers(0, n_starts, size=int(batch_size))
        return self.gather(starts, seq_len)

    def sequences(self, seq_len: int, batch_size: int) -> Iterator[Batch]:
        """Every stored transition once, as consecutive non-overlapping windows (the tail shorter than seq_len is
        dropped). Deterministic, for validation."""
        self._check_enough(seq_len)
        starts = np.arange(0, len(self) - seq_len + 1, seq_len)
        for chunk in np.array_split(starts, max(1, -(-len(starts) // batch_size))):
            yield self.gather(chunk, seq_len)

    # ---- update / delete ----------------------------------------------------------------------------------------
    def update(self, index, **fields) -> None:
        """Overwrites stored fields (e.g. reward=..., obs=...) at logical `index`."""
        self.ring.write(index, **fields)

    def clear(self) -> None:
        self.ring.clear()

    # ---- persistence --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Contents, write pointer and sampling RNG: everything needed to restore an identical buffer."""
        ring = self.ring
        return {
            "format_version": FORMAT_VERSION,
            "capacity": ring.capacity,
            "ptr": ring.ptr,
            "size": ring.size,
            "obs_dim": self.obs_dim,
            "action_dim": self.action_dim,
            "rng": self.rng.bit_generator.state,
            # Only the filled rows: until the ring wraps they are rows [0, size), afterwards all of them.
            "columns": {k: torch.from_numpy(v[: ring.size].copy()) for k, v in ring.columns.items()},
        }

    def load_state_dict(self, state: dict, source: str = "replay buffer state") -> None:
        """Restores a `state_dict`; refuses one whose capacity or shapes differ from this buffer's."""
        mine = {"capacity": self.capacity, "obs_dim": self.obs_dim, "action_dim": self.action_dim}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine or state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{source} holds a buffer of {theirs}, but this buffer is {mine}")
        ring, size = self.ring, int(state["size"])
        for name, values in state["columns"].items():
            ring.columns[name][:size] = np.asarray(values)
        ring.ptr, ring.size = int(state["ptr"]), size
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
                state = json.loads(str(data["meta"]))
                state["columns"] = {k: data[k] for k in self.ring.columns}
        except Exception as err:  # zip/npz/json errors all mean the same thing to the user
            raise ValueError(f"replay buffer file {path} is unreadable or truncated ({err})") from None
        self.load_state_dict(state, source=f"replay buffer file {path}")

    # ---- internals ----------------------------------------------------------------------------------------------
    def _load_dataset(self, path: str | Path) -> None:
        from worldmodel.dataset import episodes_to_buffer, load_dataset  # dataset.py builds on this module

        episodes = load_dataset(path, self.obs_dim, self.action_dim)
        total = int(episodes["lengths"].sum())
        if total > self.capacity:
            raise ConfigError("buffer.capacity", self.capacity, f"at least the {total} transitions of dataset {path}")
        episodes_to_buffer(self, episodes)

    def _check_enough(self, seq_len: int) -> int:
        n_starts = len(self) - int(seq_len) + 1
        if seq_len < 1 or n_starts < 1:
            raise NotEnoughDataError(
                f"Cannot sample sequences of seq_len={seq_len}: the replay buffer holds {len(self)} transitions and "
                f"needs at least {max(int(seq_len), 1)} (collect {max(int(seq_len) - len(self), 0)} more steps, e.g. "
                "raise trainer.prefill, or lower trainer.seq_len)."
            )
        return n_starts

    def gather(self, starts: np.ndarray, seq_len: int) -> Batch:
        """Windows of seq_len consecutive transitions starting at logical indices `starts`."""
        starts = np.asarray(starts)
        logical = starts[:, None] + np.arange(seq_len)  # [batch, seq_len], chronological, never past the newest
        rows = self.ring.physical(logical)
        cols = {name: col[rows] for name, col in self.ring.columns.items()}
        first = np.empty_like(cols["terminated"])
        first[:, 0] = True
        first[:, 1:] = cols["terminated"][:, :-1] | cols["truncated"][:, :-1]
        cols["first"] = first
        to = self.device
        return Batch(**{f.name: torch.from_numpy(cols[f.name]).to(to, non_blocking=True) for f in fields(Batch)})
