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
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **{k: episodes[k] for k in KEYS})
    os.replace(tmp, path)


def require_dataset(path: str | Path, key: str = "buffer.dataset") -> Path:
    """`path`, or an error naming config `key` and saying that no dataset is there."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Dataset {key}={path} does not exist (write one with scripts/collect.py).")
    return path


def load_dataset(path: str | Path, obs_dim: int, action_dim: int, key: str = "buffer.dataset",
                 discrete: bool | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Reads and checks a dataset file against the env's dimensions (and, given `discrete`, the kind of its actions:
    action index 0 of a Discrete env would otherwise pass as a 1-wide Box action); every problem names the file and
    the key."""
    path = require_dataset(path, key)
    where = f"{key}={path}"
    try:
        with np.load(path, allow_pickle=False) as data:
            found = {k: data[k] for k in data.files}
    except Exception as err:
        raise DatasetError(f"Dataset {where} is not a readable .npz file ({type(err).__name__}: {err}).") from None
    missing = [k for k in KEYS if k not in found]
    if missing:
        raise DatasetError(f"Dataset {where} is missing key(s) {missing}; a dataset holds {list(KEYS)}.")
    obs, actions, lengths = found["obs"], found["actions"], found["lengths"]

    def expect(name: str, ok: bool, shape: str) -> None:
        if not ok:
            raise DatasetError(
                f"Dataset {where}: key `{name}` has shape {list(found[name].shape)} (dtype {found[name].dtype}), "
                f"expected {shape}."
            )

    expect("obs", obs.ndim == 3 and obs.shape[1] >= 2, f"[N, T+1, {obs_dim}] floats")
    n, t = obs.shape[0], obs.shape[1] - 1
    expect("obs", obs.shape[2] == obs_dim, f"[N, T+1, {obs_dim}]: obs_dim {obs_dim} is the env's observation size")
    if discrete is not None and discrete != np.issubdtype(actions.dtype, np.integer):
        kinds = ("action vectors (a Box env's)", "integer action indices (a Discrete env's)")
        raise DatasetError(f"Dataset {where} holds {kinds[not discrete]}, but this env has "
                           f"{'Discrete' if discrete else 'Box'} actions: it was recorded from another env.")  # fmt: skip
    discrete = np.issubdtype(actions.dtype, np.integer)
    if discrete:
        ok = actions.shape in ((n, t), (n, t, 1))
        expect("actions", ok, f"[{n}, {t}] or [{n}, {t}, 1] integer action indices (Discrete env)")
        actions = actions.reshape(n, t)
    else:
        expect("actions", actions.shape == (n, t, action_dim), f"[{n}, {t}, {action_dim}] floats (Box actions), or "
               f"[{n}, {t}] integer action indices (Discrete actions)")  # fmt: skip
    for name in ("rewards", "terminated", "truncated"):
        expect(name, found[name].shape == (n, t), f"[{n}, {t}]")
    for name in ("terminated", "truncated"):
        flags = found[name]
        numeric = flags.dtype == bool or np.issubdtype(flags.dtype, np.number)
        expect(name, numeric and bool(np.isin(flags, (0, 1)).all()), f"[{n}, {t}] booleans (or 0/1 numbers)")
        found[name] = flags.astype(bool)
    expect("lengths", lengths.shape == (n,) and np.issubdtype(lengths.dtype, np.integer), f"[{n}] integers")
    if n == 0 or lengths.min() < 1 or lengths.max() > t:
        raise DatasetError(f"Dataset {where}: key `lengths` must hold N >= 1 values in 1..{t} (the padded length).")
    if bad := non_finite({**found, "obs": obs, "actions": actions}):
        counts = "; ".join(f"key `{k}` holds {v} NaN/inf value(s)" for k, v in bad.items())
        raise DatasetError(f"Dataset {where}: {counts} in valid steps.")
    valid = np.arange(t)[None, :] < lengths[:, None]  # [N, T]
    if discrete and (actions[valid].min() < 0 or actions[valid].max() >= action_dim):
        raise DatasetError(f"Dataset {where}: key `actions` holds indices outside 0..{action_dim - 1}.")
    return {**found, "actions": actions, "discrete": np.array(discrete)}


def non_finite(episodes: dict[str, np.ndarray]) -> dict[str, int]:
    """{key: number of NaN/inf values} of obs, actions and rewards in the valid steps of padded episodes, for the keys
    that hold any."""
    lengths, t = episodes["lengths"], episodes["rewards"].shape[1]
    valid = np.arange(t)[None, :] < lengths[:, None]  # [N, T]
    valid_obs = np.arange(t + 1)[None, :] <= lengths[:, None]
    counts = {name: int((~np.isfinite(episodes[name][mask].astype(np.float64))).sum())
              for name, mask in (("obs", valid_obs), ("actions", valid), ("rewards", valid))}  # fmt: skip
    return {name: count for name, count in counts.items() if count}


def episodes_to_buffer(buffer: ReplayBuffer, episodes: dict[str, np.ndarray]) -> None:
    """Writes every valid transition into `buffer`, episode by episode (dealt to its streams in turn). An episode that
    ends with neither flag set (cut short when it was recorded) is stored as truncated, which keeps consecutive rows
    consecutive steps."""
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
            stream=i % buffer.streams,
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
