"""Episode datasets on disk (.npz), for offline training and evaluation.

Format: N episodes padded to T steps.
    obs         [N, T+1, obs_dim]  float   observation before each step, then the final one
    actions     [N, T, act_dim]    float   (Box actions)
                [N, T] or [N, T, 1] int    (Discrete actions, as the action index)
    rewards     [N, T]             float
    terminated  [N, T]             bool
    truncated   [N, T]             bool
    lengths     [N]                int     real length of each episode; steps >= lengths[i] are padding
Episode i's valid transitions are steps 0 .. lengths[i]-1: (obs[i, t], actions[i, t], rewards[i, t], obs[i, t+1]).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from worldmodel.errors import WorldModelError
from worldmodel.replay import ReplayBuffer

KEYS = ("obs", "actions", "rewards", "terminated", "truncated", "lengths")


class DatasetError(WorldModelError):
    pass


def buffer_to_episodes(buffer: ReplayBuffer, discrete: bool) -> dict[str, np.ndarray]:
    """The complete episodes in `buffer`, stream after stream, padded into the format above.

    Left out: each stream's trailing unfinished episode and, in a stream that is full, its oldest episode: the ring
    may have overwritten its first steps, and a dataset episode must start where the env was reset."""
    rows = buffer[:]
    done = rows["terminated"] | rows["truncated"]
    begins, ends = [], []
    for first_row, size in buffer._stream_spans():  # logical rows are stream after stream; episodes never span two
        stream_ends = first_row + np.flatnonzero(done[first_row : first_row + size])
        stream_begins = np.concatenate([[first_row], stream_ends[:-1] + 1])[: len(stream_ends)]
        cut = 1 if size == buffer.ring.stream_capacity else 0
        begins.append(stream_begins[cut:])
        ends.append(stream_ends[cut:])
    begins, ends = np.concatenate(begins).astype(np.int64), np.concatenate(ends).astype(np.int64)
    lengths = ends - begins + 1
    n, t = len(lengths), int(lengths.max()) if len(lengths) else 0
    act_shape = (n, t) if discrete else (n, t, buffer.action_dim)
    out = {
        "obs": np.zeros((n, t + 1, buffer.obs_dim), np.float32),
        "actions": np.zeros(act_shape, np.int64 if discrete else np.float32),
        "rewards": np.zeros((n, t), np.float32),
        "terminated": np.zeros((n, t), bool),
        "truncated": np.zeros((n, t), bool),
        "lengths": lengths,
    }
    for i, (b, length) in enumerate(zip(begins, lengths)):
        sl = slice(b, b + length)
        out["obs"][i, :length] = rows["obs"][sl]
        out["obs"][i, length] = rows["next_obs"][b + length - 1]
        out["actions"][i, :length] = rows["action"][sl].argmax(-1) if discrete else rows["action"][sl]
        out["rewards"][i, :length] = rows["reward"][sl]
        out["terminated"][i, :length] = rows["terminated"][sl]
        out["truncated"][i, :length] = rows["truncated"][sl]
    return out


def save_dataset(path: str | Path, episodes: dict[str, np.ndarray]) -> None:
    """Atomic: a temporary file renamed into place, so an existing dataset is never left half-overwritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{k: episodes[k] for k in KEYS})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: the half-written file would keep it full
        raise


def require_dataset(path: str | Path, key: str = "buffer.dataset") -> Path:
    """`path`, or an error naming config `key` and saying that no dataset is there."""
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"Dataset {key}={path} is a directory; give the path of a .npz file in it (write one with "
                           "scripts/collect.py).")  # fmt: skip
    if not path.is_file():
        raise DatasetError(f"Dataset {key}={path} does not exist (write one with scripts/collect.py).")
    return path


def load_dataset(path: str | Path, obs_dim: int, action_dim: int, key: str = "buffer.dataset",
                 discrete: bool | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """A whole dataset file, read and checked (see DatasetFile): for small files and tests; a buffer reads its
    dataset a block at a time (fill_buffer)."""
    with DatasetFile(path, obs_dim, action_dim, key, discrete, block_rows=None) as data:
        (episodes,) = data.blocks()
        return {**episodes, "discrete": np.array(data.discrete)}


#: Padded steps read at a time: a dataset file as large as the replay buffer is never held whole beside it.
BLOCK_ROWS = 65536


class DatasetFile:
    """A dataset file checked against the env's dimensions (and, given `discrete`, the kind of its actions: action
    index 0 of a Discrete env would otherwise pass as a 1-wide Box action), then read a block of episodes at a time.
    Every problem names the file and the config `key`. Shapes, kinds and lengths are checked on opening; values as
    the blocks are read, so a block already handed out may come from a file refused at a later one."""

    def __init__(self, path: str | Path, obs_dim: int, action_dim: int, key: str = "buffer.dataset",
                 discrete: bool | None = None, block_rows: int | None = BLOCK_ROWS):  # fmt: skip
        self.path = require_dataset(path, key)
        self.where = f"{key}={self.path}"
        self.action_dim = int(action_dim)
        self._block_rows, self._read = block_rows, False
        self._zip = self._readable(zipfile.ZipFile, self.path)
        try:
            self._check_shapes(int(obs_dim), discrete)
        except BaseException:
            self.close()
            raise

    def _readable(self, read, *args):
        try:
            return read(*args)
        except Exception as err:
            raise DatasetError(f"Dataset {self.where} is not a readable .npz file ({type(err).__name__}: {err}).") \
                from None  # fmt: skip

    def _check_shapes(self, obs_dim: int, discrete: bool | None) -> None:
        members = {name[: -len(".npy")] for name in self._zip.namelist() if name.endswith(".npy")}
        if missing := [k for k in KEYS if k not in members]:
            raise DatasetError(f"Dataset {self.where} is missing key(s) {missing}; a dataset holds {list(KEYS)}.")
        self._arrays = {}  # filled one by one, so that close() reaches the members opened before one that fails
        for k in KEYS:
            self._arrays[k] = self._readable(_Member, self._zip, k)
        self._shape = {k: (m.shape, m.dtype) for k, m in self._arrays.items()}
        obs, actions = self._shape["obs"][0], self._shape["actions"]
        self._expect("obs", len(obs) == 3 and obs[1] >= 2, f"[N, T+1, {obs_dim}] floats")
        for name in ("obs", "actions", "rewards"):  # text, dates or complex numbers would fail (or pass) as floats
            dtype = self._shape[name][1]
            self._expect(name, dtype == bool or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating),
                         "real numbers (a float, integer or bool dtype)")  # fmt: skip
        n, t = self.n, self.t = obs[0], obs[1] - 1
        self._expect("obs", obs[2] == obs_dim, f"[N, T+1, {obs_dim}]: obs_dim {obs_dim} is the env's observation size")
        if discrete is not None and discrete != np.issubdtype(actions[1], np.integer):
            kinds = ("action vectors (a Box env's)", "integer action indices (a Discrete env's)")
            raise DatasetError(f"Dataset {self.where} holds {kinds[not discrete]}, but this env has "
                               f"{'Discrete' if discrete else 'Box'} actions: it was recorded from another env.")  # fmt: skip
        self.discrete = bool(np.issubdtype(actions[1], np.integer))
        if self.discrete:
            ok = actions[0] in ((n, t), (n, t, 1))
            self._expect("actions", ok, f"[{n}, {t}] or [{n}, {t}, 1] integer action indices (Discrete env)")
        else:
            self._expect("actions", actions[0] == (n, t, self.action_dim), f"[{n}, {t}, {self.action_dim}] floats "
                         f"(Box actions), or [{n}, {t}] integer action indices (Discrete actions)")  # fmt: skip
        for name in ("rewards", "terminated", "truncated"):
            self._expect(name, self._shape[name][0] == (n, t), f"[{n}, {t}]")
        for name in ("terminated", "truncated"):
            dtype = self._shape[name][1]
            numeric = dtype == bool or np.issubdtype(dtype, np.number)
            self._expect(name, numeric, f"[{n}, {t}] booleans (or 0/1 numbers)")
        lengths = self._shape["lengths"]
        self._expect("lengths", lengths[0] == (n,) and np.issubdtype(lengths[1], np.integer), f"[{n}] integers")
        self.lengths = self._readable(self._arrays["lengths"].read, n)
        if n == 0 or self.lengths.min() < 1 or self.lengths.max() > t:
            raise DatasetError(f"Dataset {self.where}: key `lengths` must hold N >= 1 values in 1..{t} (the padded "
                               "length).")  # fmt: skip

    def _expect(self, name: str, ok: bool, shape: str) -> None:
        if not ok:
            found, dtype = self._shape[name]
            raise DatasetError(f"Dataset {self.where}: key `{name}` has shape {list(found)} (dtype {dtype}), "
                               f"expected {shape}.")  # fmt: skip

    def blocks(self):
        """Checked blocks of whole episodes, in file order: obs, actions ([n, T] indices if Discrete), rewards,
        terminated and truncated (bool), lengths. NaN/inf in valid steps are counted over the whole file and refused
        after the last block; other bad values at the block that holds them."""
        if self._read:
            raise RuntimeError("DatasetFile.blocks() reads the file once; open it again to read it again")
        self._read = True
        per_block = self.n if self._block_rows is None else max(1, self._block_rows // (self.t + 1))
        bad, out_of_range = dict.fromkeys(("obs", "actions", "rewards"), 0), False
        for first in range(0, self.n, per_block):
            count = min(per_block, self.n - first)
            block = {k: self._readable(self._arrays[k].read, count) for k in KEYS if k != "lengths"}
            block["lengths"] = self.lengths[first : first + count]
            for name in ("terminated", "truncated"):
                if not np.isin(block[name], (0, 1)).all():
                    self._expect(name, False, f"[{self.n}, {self.t}] booleans (or 0/1 numbers)")
                block[name] = block[name].astype(bool)
            self._refuse_flags_before_the_end(block, first)
            if self.discrete:
                block["actions"] = block["actions"].reshape(count, self.t)
            for name, found in non_finite(block).items():
                bad[name] += found
            if self.discrete:
                valid = np.arange(self.t)[None, :] < block["lengths"][:, None]  # [n, T]
                out_of_range |= bool(((block["actions"] < 0) | (block["actions"] >= self.action_dim))[valid].any())
            if not any(bad.values()) and not out_of_range:  # a refused file is read on only to count its NaN/inf
                yield block
        if any(bad.values()):
            counts = "; ".join(f"key `{k}` holds {v} NaN/inf value(s)" for k, v in bad.items() if v)
            raise DatasetError(f"Dataset {self.where}: {counts} in valid steps.")
        if out_of_range:
            raise DatasetError(f"Dataset {self.where}: key `actions` holds indices outside 0..{self.action_dim - 1}.")

    def _refuse_flags_before_the_end(self, block: dict, first: int) -> None:
        """An episode ends at its first flag. One set earlier would make the rows after it transitions from the final
        observation of one episode to the start of the next (a concatenation of episodes), which no env step did."""
        before_last = np.arange(self.t)[None, :] < block["lengths"][:, None] - 1
        early = (block["terminated"] | block["truncated"]) & before_last
        if early.any():
            i, step = np.argwhere(early)[0]
            raise DatasetError(
                f"Dataset {self.where}: episode {first + i} has `terminated` or `truncated` set at step {step}, before "
                f"its last valid step {block['lengths'][i] - 1} (`lengths` is {block['lengths'][i]}): an episode ends "
                "at its first flag. Store each episode in its own row, or set `lengths` to end it at that step."
            )

    def close(self) -> None:
        for member in getattr(self, "_arrays", {}).values():
            member.close()
        self._zip.close()

    def __enter__(self) -> DatasetFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Member:
    """One .npy array of a zip, read sequentially along its first axis (a deflated member cannot seek cheaply)."""

    def __init__(self, archive: zipfile.ZipFile, name: str):
        self._file = archive.open(f"{name}.npy")
        try:
            version = np.lib.format.read_magic(self._file)
            header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in header:
                raise ValueError(f"member {name}.npy: .npy format version {version} is not supported")
            self.shape, fortran_order, self.dtype = header[version](self._file)
            if self.dtype.hasobject:
                raise ValueError(f"member {name}.npy holds Python objects, which are not loaded (allow_pickle=False)")
            self._whole = self._read_whole() if fortran_order and len(self.shape) > 1 else None
        except BaseException:
            self._file.close()  # each member holds the zip's file open
            raise

    def _read_whole(self) -> np.ndarray:
        """A column-major array (np.savez of a transposed array) has no contiguous rows: it is read whole, as the rows
        of its transpose."""
        return np.ascontiguousarray(self._fill(np.empty(self.shape[::-1], self.dtype)).T)

    def read(self, rows: int) -> np.ndarray:
        """The next `rows` rows."""
        if self._whole is not None:
            block, self._whole = self._whole[:rows], self._whole[rows:]
            return block
        return self._fill(np.empty((rows, *self.shape[1:]), self.dtype))

    def _fill(self, array: np.ndarray) -> np.ndarray:
        if (got := self._file.readinto(memoryview(array.reshape(-1).view(np.uint8)))) != array.nbytes:
            raise EOFError(f"the file ends {array.nbytes - got} bytes early")
        return array

    def close(self) -> None:
        self._file.close()


def non_finite(episodes: dict[str, np.ndarray]) -> dict[str, int]:
    """{key: number of NaN/inf values} of obs, actions and rewards in the valid steps of padded episodes, for the keys
    that hold any."""
    lengths, t = episodes["lengths"], episodes["rewards"].shape[1]
    valid = np.arange(t)[None, :] < lengths[:, None]  # [N, T]
    valid_obs = np.arange(t + 1)[None, :] <= lengths[:, None]
    counts = {name: int((~np.isfinite(episodes[name][mask].astype(np.float64))).sum())
              for name, mask in (("obs", valid_obs), ("actions", valid), ("rewards", valid))}  # fmt: skip
    return {name: count for name, count in counts.items() if count}


def fill_buffer(buffer: ReplayBuffer, data: DatasetFile) -> None:
    """Writes every episode of `data` into `buffer`, a block of episodes at a time (see episodes_to_buffer)."""
    first = 0
    for block in data.blocks():
        episodes_to_buffer(buffer, block, first)
        first += len(block["lengths"])


def episodes_to_buffer(buffer: ReplayBuffer, episodes: dict[str, np.ndarray], first: int = 0) -> None:
    """Writes every valid transition into `buffer`, episode by episode, dealt to its streams in turn (`first`: the
    number of the first episode, for a dataset written a block at a time). An episode that ends with neither flag set
    (cut short when it was recorded) is stored as truncated, which keeps consecutive rows consecutive steps."""
    discrete = bool(episodes.get("discrete", np.issubdtype(episodes["actions"].dtype, np.integer)))
    for i, length in enumerate(episodes["lengths"]):
        length = int(length)
        actions = episodes["actions"][i, :length]
        if discrete:
            actions = np.eye(buffer.action_dim, dtype=np.float32)[actions.reshape(length)]
        truncated = episodes["truncated"][i, :length].copy()
        truncated[-1] |= not episodes["terminated"][i, length - 1]
        buffer.extend(
            obs=episodes["obs"][i, :length],
            action=actions,
            reward=episodes["rewards"][i, :length],
            next_obs=episodes["obs"][i, 1 : length + 1],
            terminated=episodes["terminated"][i, :length],
            truncated=truncated,
            stream=(first + i) % buffer.streams,
        )


def collect_episodes(env, spec, policy, episodes: int, seed: int, chunk: int = 1000) -> dict[str, np.ndarray]:
    """Runs `policy` until `episodes` episodes are complete and returns them in the dataset format."""
    from worldmodel.rollout import Collector  # rollout builds on replay; imported here to keep this module light

    limit = env.spec.max_episode_steps if env.spec and env.spec.max_episode_steps else 1000
    # Room for every episode at its time limit, up to 2^16 rows: most episodes end far sooner (random CartPole: ~22 of
    # 500 steps), so a buffer for the worst case (100k episodes: 2 GB) would mostly stay empty. It grows when needed.
    grown_by = f"episodes={episodes} of up to {limit} steps"  # what sets the size, for an error
    buffer = ReplayBuffer(min(episodes * limit, 1 << 16) + chunk, spec.obs_dim, spec.action_dim, capacity_key=grown_by)
    collector = Collector(env, buffer, policy, seed=seed, spec=spec)
    done = 0
    while done < episodes:
        if len(buffer) + chunk >= buffer.capacity:
            # Longer episodes than the guess (an env without a time limit): a bigger buffer, so that nothing recorded
            # is overwritten and every episode keeps its first steps.
            bigger = ReplayBuffer(2 * buffer.capacity, spec.obs_dim, spec.action_dim, capacity_key=grown_by)
            bigger.extend(**buffer[:])
            buffer = collector.buffer = bigger
        done += len(collector.collect(chunk).episode_returns)
    data = buffer_to_episodes(buffer, spec.discrete)
    return {k: v[:episodes] for k, v in data.items()}
