"""The .npz episode format: exact round trip through the replay buffer, and clear errors for malformed files."""

from __future__ import annotations

import re

import numpy as np
import pytest

from worldmodel import RandomPolicy, ReplayBuffer, make_env
from worldmodel.dataset import (DatasetError, DatasetFile, buffer_to_episodes, collect_episodes, episodes_to_buffer,
                                fill_buffer, load_dataset, require_dataset, save_dataset)
from worldmodel.env import env_spec
from worldmodel.errors import ConfigError


def record(env_id: str, episodes: int):
    env = make_env(env_id, seed=0)
    spec = env_spec(env)
    return spec, collect_episodes(env, spec, RandomPolicy(env.action_space, 0), episodes, seed=0, chunk=50)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_round_trip_through_file_and_buffer(tmp_path, env_id):
    spec, data = record(env_id, 4)
    assert data["obs"].shape == (4, data["lengths"].max() + 1, spec.obs_dim)
    assert data["actions"].shape[:2] == (4, data["lengths"].max())
    assert (data["actions"].ndim == 2) is spec.discrete
    save_dataset(tmp_path / "d.npz", data)
    loaded = load_dataset(tmp_path / "d.npz", spec.obs_dim, spec.action_dim)
    buffer = ReplayBuffer(10_000, spec.obs_dim, spec.action_dim)
    episodes_to_buffer(buffer, loaded)
    again = buffer_to_episodes(buffer, spec.discrete)
    for key in ("obs", "actions", "rewards", "terminated", "truncated", "lengths"):
        np.testing.assert_array_equal(again[key], data[key])
    rows = buffer[:]
    ends = np.flatnonzero(rows["terminated"] | rows["truncated"])
    assert (ends + 1).tolist() == np.cumsum(data["lengths"]).tolist()  # one episode end per recorded episode
    if spec.discrete:
        assert set(rows["action"].sum(1)) == {1.0}  # indices become one-hot


def test_an_episode_cut_short_is_stored_as_truncated(tmp_path):
    spec, data = record("CartPole-v1", 2)
    data["lengths"][0] -= 1  # the recorded end of episode 0 is dropped: neither flag is set on its last step now
    buffer = ReplayBuffer(10_000, spec.obs_dim, spec.action_dim)
    episodes_to_buffer(buffer, data)
    first_end = int(data["lengths"][0]) - 1
    assert buffer[first_end]["truncated"] and not buffer[first_end]["terminated"]


def malformed(data, key, value):
    return {**data, key: value}


def nan_in_final_observations(data):
    """NaN at obs[i, lengths[i]] alone: each episode's final observation, the last transition's next_obs target (the
    padding after it may hold anything)."""
    obs = data["obs"].copy()
    obs[np.arange(len(obs)), data["lengths"]] = np.nan
    return malformed(data, "obs", obs)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: {k: v for k, v in d.items() if k != "rewards"}, "missing key(s) ['rewards']"),
        (lambda d: malformed(d, "obs", d["obs"][:, :, :3]), "`obs` has shape"),
        (lambda d: malformed(d, "actions", d["actions"][:, :-1]), "`actions` has shape"),
        (lambda d: malformed(d, "rewards", d["rewards"][None]), "`rewards` has shape"),
        (lambda d: malformed(d, "lengths", d["lengths"] + 100), "`lengths` must hold"),
        # An episode of no steps has no transition to store (and no last step to mark as the episode's end).
        (lambda d: malformed(d, "lengths", np.where(np.arange(len(d["lengths"])) == 1, 0, d["lengths"])),
         "`lengths` must hold"),
        (lambda d: malformed(d, "actions", d["actions"] + 5), "outside 0..1"),
        # Index 2, one past CartPole's last action, in the first (always valid) step of each episode.
        (lambda d: malformed(d, "actions", np.where(np.arange(d["actions"].shape[1]) == 0, 2, d["actions"])),
         "outside 0..1"),
        (lambda d: malformed(d, "obs", np.where(np.arange(d["obs"].shape[1])[None, :, None] == 1, np.nan, d["obs"])),
         "`obs` holds"),
        (nan_in_final_observations, "`obs` holds 12 NaN/inf"),  # 3 episodes x 4 CartPole dims
        (lambda d: malformed(d, "terminated", d["terminated"] * 0.5), "`terminated` has shape"),
        (lambda d: malformed(d, "truncated", d["truncated"].astype(str)), "booleans (or 0/1 numbers)"),
        (lambda d: malformed(d, "actions", d["actions"].astype(np.float32)), "integer action indices (Discrete"),
    ],
)
def test_malformed_files_name_the_key(tmp_path, break_it, message):
    spec, data = record("CartPole-v1", 3)
    path = tmp_path / "bad.npz"
    np.savez(path, **break_it(data))
    with pytest.raises(DatasetError) as err:
        load_dataset(path, spec.obs_dim, spec.action_dim)
    assert message in str(err.value) and str(path) in str(err.value)


def test_unreadable_or_missing_file(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a readable .npz"):
        load_dataset(tmp_path / "junk.npz", 4, 2)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "none.npz", 4, 2)
    # A directory (buffer.dataset=<a run dir>) is no dataset file either: refused before np.load is tried on it.
    with pytest.raises(DatasetError, match="does not exist"):
        require_dataset(tmp_path)


def test_buffer_loads_a_dataset_and_refuses_one_larger_than_its_capacity(tmp_path):
    spec, data = record("Pendulum-v1", 2)  # 400 transitions
    save_dataset(tmp_path / "d.npz", data)
    assert len(ReplayBuffer(1000, 3, 1, dataset=tmp_path / "d.npz")) == 400
    with pytest.raises(ConfigError, match="buffer.capacity"):
        ReplayBuffer(300, 3, 1, dataset=tmp_path / "d.npz")


def rows_of(obs: list[float], done_at: list[int]) -> dict[str, np.ndarray]:
    """Transitions with obs_dim 1: obs t, next_obs t + 0.5, terminated on the steps in done_at."""
    obs = np.array(obs, dtype=np.float32)[:, None]
    n = len(obs)
    return {"obs": obs, "action": np.zeros((n, 1), np.float32), "reward": np.zeros(n, np.float32),
            "next_obs": obs + 0.5, "terminated": np.isin(obs[:, 0], done_at), "truncated": np.zeros(n, bool)}  # fmt: skip


def test_export_keeps_only_episodes_that_start_at_a_reset_and_stay_in_one_stream():
    # One stream that wrapped: rows 0..2 were overwritten, so the stored part of episode 0-5 starts mid-episode.
    wrapped = ReplayBuffer(7, 1, 1)
    wrapped.extend(**rows_of(list(range(10)), done_at=[5, 9]))
    out = buffer_to_episodes(wrapped, discrete=False)
    assert out["lengths"].tolist() == [4] and out["obs"][0, :, 0].tolist() == [6, 7, 8, 9, 9.5]
    # Two streams of 5 rows, neither full: stream 0's unfinished episode (12, 13) must not be joined to stream 1's
    # first one. (A full stream's oldest episode is left out even if nothing was overwritten: the ring cannot tell.)
    two = ReplayBuffer(10, 1, 1, streams=2)
    two.extend(**rows_of([10, 11, 12, 13], done_at=[11]), stream=0)
    two.extend(**rows_of([20, 21], done_at=[21]), stream=1)
    out = buffer_to_episodes(two, discrete=False)
    assert out["lengths"].tolist() == [2, 2]
    assert out["obs"][:, :, 0].tolist() == [[10, 11, 11.5], [20, 21, 21.5]]


def test_collecting_episodes_longer_than_the_buffer_guess_keeps_their_start():
    """An env without a registered time limit: collect_episodes guesses 1000 steps per episode, and must grow its
    buffer rather than overwrite the start of a longer episode."""
    import gymnasium as gym
    from gymnasium.envs.classic_control import PendulumEnv

    def make():
        return gym.wrappers.TimeLimit(PendulumEnv(), max_episode_steps=2500)

    env = make()
    assert env.spec is None
    spec = env_spec(env)
    data = collect_episodes(env, spec, RandomPolicy(env.action_space, 0), episodes=1, seed=0, chunk=500)
    assert data["lengths"].tolist() == [2500] and data["truncated"][0, 2499]
    np.testing.assert_array_equal(data["obs"][0, 0], make().reset(seed=0)[0])


def test_flags_stored_as_0_1_numbers_load_as_booleans(tmp_path):
    spec, data = record("CartPole-v1", 3)
    path = tmp_path / "flags.npz"
    np.savez(path, **{**data, "terminated": data["terminated"].astype(np.float32), "truncated": data["truncated"] * 1})
    loaded = load_dataset(path, spec.obs_dim, spec.action_dim)
    for name in ("terminated", "truncated"):
        assert loaded[name].dtype == bool and np.array_equal(loaded[name], data[name])


def small_dataset(lengths: list[int]) -> dict[str, np.ndarray]:
    """Episodes with obs_dim 1 and Box actions of dim 1; obs[i, t] = 100 i + t, so every stored row is identifiable."""
    n, t = len(lengths), max(lengths)
    obs = (100 * np.arange(n)[:, None] + np.arange(t + 1)[None, :]).astype(np.float32)[:, :, None]
    terminated = np.arange(t)[None, :] == np.array(lengths)[:, None] - 1
    return {"obs": obs, "actions": np.zeros((n, t, 1), np.float32), "rewards": np.zeros((n, t), np.float32),
            "terminated": terminated, "truncated": np.zeros((n, t), bool),
            "lengths": np.array(lengths, np.int64)}  # fmt: skip


@pytest.mark.parametrize(
    "streams, fits, too_small, need",
    [(1, [14, 15], [13, 7], 14), (2, [18, 19], [17, 16], 18)],  # 2 streams: episodes 0, 2 (5 rows) and 1, 3 (9 rows)
)
def test_dataset_capacity_boundary(tmp_path, streams, fits, too_small, need):
    """A dataset that exactly fills the buffer loads whole; one row more is refused, naming buffer.capacity and file."""
    lengths = [3, 5, 2, 4]
    path = tmp_path / "d.npz"
    save_dataset(path, small_dataset(lengths))
    ids = [[100 * i + t for t in range(n)] for i, n in enumerate(lengths)]
    expected = [row for k in range(streams) for episode in ids[k::streams] for row in episode]
    for capacity in fits:
        buffer = ReplayBuffer(capacity, 1, 1, dataset=path, streams=streams)
        assert len(buffer) == 14
        assert buffer[:]["obs"][:, 0].tolist() == expected  # nothing overwritten, every episode from its start
    for capacity in too_small:
        with pytest.raises(ConfigError) as err:
            ReplayBuffer(capacity, 1, 1, dataset=path, streams=streams)
        message = str(err.value)
        assert f"buffer.capacity={capacity}" in message and f"at least {need}" in message and str(path) in message


def test_a_dataset_of_the_other_kind_of_actions_is_refused(tmp_path):
    """A Discrete env's action indices are integers; read for a Box env of the same width, index 0 passed as a 1-wide
    action vector (and other indices failed as 'outside 0..0'). Given the env's kind, the mismatch is named."""
    for env_id, discrete in (("CartPole-v1", True), ("Pendulum-v1", False)):
        spec, data = record(env_id, 2)
        path = tmp_path / f"{env_id}.npz"
        np.savez(path, **data)
        load_dataset(path, spec.obs_dim, spec.action_dim, discrete=discrete)  # its own kind
        held = "integer action indices (a Discrete env's)" if discrete else "action vectors (a Box env's)"
        expected = f"holds {held}, but this env has {'Box' if discrete else 'Discrete'} actions: it was recorded from"
        with pytest.raises(DatasetError, match=re.escape(expected)):
            ReplayBuffer(1000, spec.obs_dim, spec.action_dim, dataset=path, discrete_actions=not discrete)


def buffers_equal(a: ReplayBuffer, b: ReplayBuffer) -> None:
    assert (a.ring.sizes == b.ring.sizes).all()
    for key, value in a[:].items():
        np.testing.assert_array_equal(b[:][key], value, err_msg=key)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_a_dataset_read_a_few_episodes_at_a_time_fills_the_buffer_as_one_read_does(tmp_path, env_id):
    """A buffer reads its dataset a block at a time, so a file as large as the ring is never held whole beside it.
    Blocks of 1 to 3 episodes (of 7, over 3 streams) must deal every episode to the stream a single read gives it."""
    spec, data = record(env_id, 7)
    save_dataset(tmp_path / "d.npz", data)
    whole = ReplayBuffer(10_000, spec.obs_dim, spec.action_dim, streams=3)
    episodes_to_buffer(whole, load_dataset(tmp_path / "d.npz", spec.obs_dim, spec.action_dim))
    t = data["obs"].shape[1]
    for episodes in (1, 2, 3):
        with DatasetFile(tmp_path / "d.npz", spec.obs_dim, spec.action_dim, block_rows=episodes * t) as file:
            assert [len(b["lengths"]) for b in file.blocks()] == [episodes] * (7 // episodes) + [7 % episodes] * (
                7 % episodes > 0)
        blocks = ReplayBuffer(10_000, spec.obs_dim, spec.action_dim, streams=3)
        with DatasetFile(tmp_path / "d.npz", spec.obs_dim, spec.action_dim, block_rows=episodes * t) as file:
            fill_buffer(blocks, file)
        buffers_equal(whole, blocks)
    buffers_equal(whole, ReplayBuffer(10_000, spec.obs_dim, spec.action_dim, streams=3, dataset=tmp_path / "d.npz"))


def test_non_finite_values_are_counted_over_every_block_before_the_file_is_refused(tmp_path):
    """NaN in episodes 0 and 5 of 6, read one episode at a time: the message counts both, as a single read does."""
    spec, data = record("CartPole-v1", 6)
    obs = data["obs"].copy()
    obs[[0, 5], 1] = np.nan
    np.savez(tmp_path / "nan.npz", **malformed(data, "obs", obs))
    expected = "key `obs` holds 8 NaN/inf value(s) in valid steps"  # 2 episodes x 4 CartPole dims
    with pytest.raises(DatasetError, match=re.escape(expected)):
        load_dataset(tmp_path / "nan.npz", spec.obs_dim, spec.action_dim)
    with DatasetFile(tmp_path / "nan.npz", spec.obs_dim, spec.action_dim, block_rows=1) as file:
        with pytest.raises(DatasetError, match=re.escape(expected)):
            list(file.blocks())


def test_column_major_big_endian_and_uncompressed_arrays_read_as_they_were_saved(tmp_path):
    """np.savez keeps what it is given: a transposed (column-major) array, another byte order, no compression."""
    spec, data = record("Pendulum-v1", 3)
    odd = {**data, "obs": np.asfortranarray(data["obs"]), "rewards": data["rewards"].astype(">f8"),
           "actions": np.asfortranarray(data["actions"]).astype(">f4")}  # fmt: skip
    assert odd["obs"].flags.f_contiguous and not odd["obs"].flags.c_contiguous
    np.savez(tmp_path / "odd.npz", **odd)
    with DatasetFile(tmp_path / "odd.npz", spec.obs_dim, spec.action_dim, block_rows=1) as file:
        blocks = list(file.blocks())
    assert len(blocks) == 3
    for key in ("obs", "actions", "rewards"):
        np.testing.assert_array_equal(np.concatenate([b[key] for b in blocks]), data[key], err_msg=key)


def test_a_file_cut_short_or_holding_objects_is_not_readable(tmp_path):
    spec, data = record("CartPole-v1", 3)
    save_dataset(tmp_path / "d.npz", data)
    whole = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match="not a readable .npz"):
        load_dataset(tmp_path / "cut.npz", spec.obs_dim, spec.action_dim)
    np.savez(tmp_path / "plain.npz", **data)  # stored, not deflated: a changed byte reaches the CRC check as it is
    plain = bytearray((tmp_path / "plain.npz").read_bytes())
    plain[plain.index(data["obs"].tobytes()[:64]) + 100] ^= 0xFF
    (tmp_path / "changed.npz").write_bytes(bytes(plain))
    with pytest.raises(DatasetError, match="not a readable .npz.*CRC"):
        load_dataset(tmp_path / "changed.npz", spec.obs_dim, spec.action_dim)
    np.savez(tmp_path / "objects.npz", **malformed(data, "rewards", data["rewards"].astype(object)))
    with pytest.raises(DatasetError, match="not a readable .npz.*Python objects"):
        load_dataset(tmp_path / "objects.npz", spec.obs_dim, spec.action_dim)
